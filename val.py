"""Validate a trained detector on a dataset: P, R, mAP@0.5, mAP@0.5:0.95, per-class table, speed, plots.

Usage:
    python val.py --weights runs/train/exp/weights/best.pt --data data/BCCD.yaml --img 320
    python val.py --weights best.onnx --data data/shapes.yaml
    python val.py --weights best_int8_openvino_model --data data/shapes.yaml   # OpenVINO (INT8) export folder

``evaluate(model, dataloader, names)`` is the evaluation itself (train.py calls it after every epoch); ``run()`` is
the command: it loads the weights and the dataset, then evaluates.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

if str(Path(__file__).resolve().parent) not in sys.path:  # run as a script: make the repository importable
    sys.path.append(str(Path(__file__).resolve().parent))

from models.backend import InferenceBackend, Stopwatch, mean_ms, speed_summary, weights_rule  # noqa: E402
from utils.boxes import scale_boxes, xywh2xyxy  # noqa: E402
from utils.checkpoint import fill_weights, newest_best  # noqa: E402
from utils.dataloaders import create_dataloader  # noqa: E402
from utils.datasets_check import data_yaml_file, check_dataset  # noqa: E402
from utils.general import (  # noqa: E402
    ROOT, LOGGER, TQDM_BAR_FORMAT, UserInputError, check_img_size, colorstr, increment_path, run_cli,
)
from utils.metrics import ConfusionMatrix, ap_per_class, process_batch  # noqa: E402
from utils.nms import non_max_suppression  # noqa: E402
from utils.options import (  # noqa: E402
    Combination, OptionParser, check_options, device_spec, found, fraction, not_empty, on_cpu, one_of, whole,
)
from utils.plots import output_to_target, plot_images  # noqa: E402
from utils.predictions import save_one_json, save_one_txt, write_and_score_json  # noqa: E402
from utils.torch_utils import select_device  # noqa: E402

COLUMNS = ("Class", "Images", "Instances", "P", "R", "mAP50", "mAP50-95")  # the results table, as upstream's
IOU_THRESHOLDS = torch.linspace(0.5, 0.95, 10)  # COCO's ten IoU thresholds


def table_line(name: str, images=None, instances=None, values=()) -> str:
    """One line of the results table: the class name right-aligned in 22 columns, then 11-wide cells (``None``
    cells print the column titles instead: the header)."""
    if images is None:
        return f"{COLUMNS[0]:>22}" + "".join(f"{title:>11}" for title in COLUMNS[1:])
    return f"{name:>22}{images:>11d}{instances:>11d}" + "".join(f"{v:>11.3g}" for v in values)


@dataclass
class Outputs:
    """What an evaluation writes besides its figures."""

    save_dir: Path = Path("")
    plots: bool = False  # first three batches' label/prediction mosaics, PR/F1/P/R curves, confusion matrix
    txt: bool = False  # labels/<image>.txt per image
    hybrid: bool = False  # ... with the ground-truth labels added to the predictions before NMS
    conf: bool = False  # confidence column in the .txt rows
    json: bool = False  # COCO results JSON, scored with pycocotools
    json_stem: str = "model"


@dataclass
class Tally:
    """What the evaluation gathers image by image."""

    nc: int
    matches: list = field(default_factory=list)  # per image: (correct (n, 10), conf (n,), class (n,), labels (m,))
    coco: list = field(default_factory=list)
    loss: torch.Tensor = field(default_factory=lambda: torch.zeros(3))
    images: int = 0

    def __post_init__(self):
        self.confusion = ConfusionMatrix(nc=self.nc)

    def arrays(self) -> list[np.ndarray]:
        """The per-image records joined into four arrays: correct, conf, predicted class, label class."""
        if not self.matches:
            return [np.zeros((0, len(IOU_THRESHOLDS)), bool), np.zeros(0), np.zeros(0), np.zeros(0)]
        return [torch.cat(column).cpu().numpy() for column in zip(*self.matches)]


@dataclass
class Metrics:
    """Summary figures of an evaluation; the per-class arrays follow ``classes``."""

    mp: float = 0.0
    mr: float = 0.0
    map50: float = 0.0
    map: float = 0.0
    classes: np.ndarray = field(default_factory=lambda: np.zeros(0, int))
    p: np.ndarray = field(default_factory=lambda: np.zeros(0))
    r: np.ndarray = field(default_factory=lambda: np.zeros(0))
    ap50: np.ndarray = field(default_factory=lambda: np.zeros(0))
    ap: np.ndarray = field(default_factory=lambda: np.zeros(0))
    instances: np.ndarray = field(default_factory=lambda: np.zeros(0, int))


def score_image(pred: torch.Tensor, labels: torch.Tensor, im_hw: tuple, shape0: tuple, ratio_pad, tally: Tally,
                plots: bool) -> torch.Tensor:
    """Match one image's predictions (model-input pixels, [xyxy, conf, cls]) with its labels ([cls, xywh] pixels)
    in original-image pixels; records the match and returns the predictions mapped to the original image."""
    predn = pred.clone()
    scale_boxes(im_hw, predn[:, :4], shape0, ratio_pad)
    correct = torch.zeros(len(pred), len(IOU_THRESHOLDS), dtype=torch.bool, device=pred.device)
    if len(labels):
        truth = torch.cat((labels[:, :1], scale_boxes(im_hw, xywh2xyxy(labels[:, 1:5]), shape0, ratio_pad)), 1)
        if len(pred):
            correct = process_batch(predn, truth, IOU_THRESHOLDS.to(pred.device))
        if plots:
            tally.confusion.process_batch(predn if len(pred) else None, truth if len(pred) else labels[:, 0])
    tally.matches.append((correct, pred[:, 4], pred[:, 5], labels[:, 0]))
    return predn


def save_image(predn: torch.Tensor, path: Path, shape0: tuple, tally: Tally, out: Outputs) -> None:
    """--save-txt / --save-json records of one image (nothing for an image without predictions)."""
    if not len(predn):
        return
    if out.txt:
        save_one_txt(predn, out.conf, shape0, out.save_dir / "labels" / f"{path.stem}.txt")
    if out.json:
        save_one_json(predn, tally.coco, path)


def infer(model, im: torch.Tensor, augment: bool, compute_loss, targets: torch.Tensor, tally: Tally):
    """The decoded predictions of a batch; adds its loss terms to the tally when ``compute_loss`` is given."""
    if compute_loss is None:
        return model(im, augment=augment)
    decoded, raw = model(im)
    tally.loss += compute_loss(raw, targets)[1].cpu()
    return decoded


def evaluate_batch(model, batch, tally: Tally, timers, out: Outputs, opts: dict, compute_loss=None) -> list:
    """Pre-process, infer, suppress and score one batch; returns its predictions (for the mosaics)."""
    im, targets, paths, shapes = batch
    device = opts["device"]
    with timers[0]:
        im = im.to(device, non_blocking=True)
        im = (im.half() if opts["half"] else im.float()) / 255
        targets = targets.to(device)
    with timers[1]:
        preds = infer(model, im, opts["augment"], compute_loss, targets, tally)
    height, width = im.shape[2:]
    targets[:, 2:] *= torch.tensor((width, height, width, height), device=device)
    per_image = [targets[targets[:, 0] == i, 1:] for i in range(len(im))]
    with timers[2]:
        preds = non_max_suppression(preds, opts["conf_thres"], opts["iou_thres"], multi_label=True,
                                    labels=per_image if out.hybrid else [], agnostic=opts["single_cls"],
                                    max_det=opts["max_det"])
    for pred, labels, path, (shape0, ratio_pad) in zip(preds, per_image, paths, shapes):
        if opts["single_cls"]:
            pred[:, 5] = 0
        predn = score_image(pred, labels, im.shape[2:], shape0, ratio_pad, tally, out.plots)
        save_image(predn, Path(path), shape0, tally, out)
    tally.images += len(im)
    return im, targets, paths, preds


def summarize(tally: Tally, names: dict, out: Outputs) -> Metrics:
    """P, R and AP per class (classes with labels only) and their means."""
    correct, conf, pred_cls, label_cls = tally.arrays()
    metrics = Metrics(instances=np.bincount(label_cls.astype(int), minlength=tally.nc))
    if correct.any():
        _, _, p, r, _, ap, classes = ap_per_class(correct, conf, pred_cls, label_cls, plot=out.plots,
                                                  save_dir=out.save_dir, names=names)
        metrics = Metrics(p.mean(), r.mean(), ap[:, 0].mean(), ap.mean(), classes, p, r, ap[:, 0], ap.mean(1),
                          metrics.instances)
    return metrics


def print_table(metrics: Metrics, names: dict, images: int, per_class: bool) -> None:
    LOGGER.info(table_line(""))
    LOGGER.info(table_line("all", images, int(metrics.instances.sum()),
                           (metrics.mp, metrics.mr, metrics.map50, metrics.map)))
    if not metrics.instances.sum():
        LOGGER.warning("WARNING the evaluated split has no labels: its metrics are all zero")
    if per_class:
        for i, c in enumerate(metrics.classes):
            LOGGER.info(table_line(names[c], images, int(metrics.instances[c]),
                                   (metrics.p[i], metrics.r[i], metrics.ap50[i], metrics.ap[i])))


@dataclass
class Evaluation:
    """An evaluation's figures in train.py's order: (P, R, mAP@0.5, mAP@0.5:0.95, box, obj, cls loss), the
    mAP@0.5:0.95 of every class (the overall value for classes without labels) and ms per image (pre, infer, NMS)."""

    results: tuple
    maps: np.ndarray
    speeds: tuple
    metrics: Metrics


@torch.no_grad()
def evaluate(model, dataloader, names: dict, nc: int | None = None, conf_thres: float = 0.001,
             iou_thres: float = 0.6, max_det: int = 300, single_cls: bool = False, augment: bool = False,
             half: bool = False, compute_loss=None, verbose: bool = False, out: Outputs | None = None) -> Evaluation:
    """Evaluate ``model`` (a DetectionModel or an InferenceBackend, already on its device) on ``dataloader``.

    ``compute_loss`` (training) also averages the loss terms over the batches. Prints the results table.
    """
    out, nc = out or Outputs(), nc or len(names)
    backend = isinstance(model, InferenceBackend)  # handles its own precision; a bare model is cast here
    device = model.device if backend else next(model.parameters()).device
    model.eval()
    if not backend:
        model.half() if half else model.float()
    opts = {"device": device, "half": half, "augment": augment, "conf_thres": conf_thres, "iou_thres": iou_thres,
            "single_cls": single_cls, "max_det": max_det}
    tally, timers = Tally(nc=nc), (Stopwatch(), Stopwatch(), Stopwatch())
    bar = tqdm(dataloader, desc=table_line(""), bar_format=TQDM_BAR_FORMAT,
               disable=compute_loss is not None and not sys.stdout.isatty())
    for i, batch in enumerate(bar):
        im, targets, paths, preds = evaluate_batch(model, batch, tally, timers, out, opts, compute_loss)
        if out.plots and i < 3:
            plot_images(im, targets, paths, out.save_dir / f"val_batch{i}_labels.jpg", names)
            plot_images(im, output_to_target(preds), paths, out.save_dir / f"val_batch{i}_pred.jpg", names)
    metrics = summarize(tally, names, out)
    print_table(metrics, names, tally.images, nc > 1 and (verbose or (nc < 50 and compute_loss is None)))
    if out.plots:
        tally.confusion.plot(save_dir=out.save_dir, names=names)
    if out.json and tally.coco:
        LOGGER.info(f"\npycocotools: scoring the COCO predictions in {out.save_dir} ...")
        try:
            metrics.map, metrics.map50 = write_and_score_json(tally.coco, dataloader.dataset, names, out.save_dir,
                                                              out.json_stem)
        except ImportError as e:
            LOGGER.warning(f"WARNING pycocotools is not usable ({e}); the figures above stand")
    if not backend:
        model.float()
    maps = np.full(nc, metrics.map)
    maps[metrics.classes] = metrics.ap
    speeds = mean_ms(timers, tally.images)
    losses = (tally.loss / max(len(dataloader), 1)).tolist()
    return Evaluation((metrics.mp, metrics.mr, metrics.map50, metrics.map, *losses), maps, speeds, metrics)


def val_dataloader(data: dict, task: str, model: InferenceBackend, imgsz: int, batch_size: int, workers: int,
                   single_cls: bool, nc: int):
    """The split to evaluate, letterboxed as val.py does: rectangular batches (padding 0.5 stride) for models that
    take any shape, square ones for fixed-shape exports and for --task speed."""
    split = task if task in ("train", "val", "test") else "val"
    if not data.get(split):
        raise UserInputError(f"{data.get('yaml_file', 'data')}: there is no '{split}' split to evaluate")
    rect = task != "speed" and (model.kind == ".pt" or model.static_shape is None)
    return create_dataloader(data[split], imgsz, batch_size, model.stride, single_cls, pad=0.0 if task == "speed"
                             else 0.5, rect=rect, workers=workers, prefix=colorstr(f"{split}: "), nc=nc)[0]


@torch.no_grad()
def run(data: str | Path | dict, weights: str | Path | None = None, batch_size: int = 32, imgsz: int = 640,
        conf_thres: float = 0.001, iou_thres: float = 0.6, max_det: int = 300, task: str = "val", device: str = "",
        workers: int = 8, single_cls: bool = False, augment: bool = False, verbose: bool = False,
        save_txt: bool = False, save_hybrid: bool = False, save_conf: bool = False, save_json: bool = False,
        project: str | Path = ROOT / "runs/val", name: str = "exp", exist_ok: bool = False, half: bool = True,
        dnn: bool = False, plots: bool = True):
    """val.py: evaluate ``weights`` on the ``task`` split of ``data``. Returns ((P, R, mAP50, mAP50-95, 0, 0, 0),
    per-class mAP50-95, ms per image (pre-process, inference, NMS)), as upstream's val.run does."""
    save_txt |= save_hybrid
    device = select_device(device, batch_size)
    save_dir = increment_path(Path(project) / name, exist_ok=exist_ok)
    (save_dir / "labels" if save_txt else save_dir).mkdir(parents=True, exist_ok=True)
    half &= device.type == "cuda"
    weights = weights or newest_best()
    model = InferenceBackend(weights, device, fp16=half)
    imgsz = check_img_size(imgsz, s=model.stride)
    data = check_dataset(data)
    nc = 1 if single_cls else int(data["nc"])
    if not single_cls and len(model.names) != nc:
        raise UserInputError(f"{weights} predicts {len(model.names)} classes but {data['yaml_file']} has nc={nc}: "
                             "pass --weights and --data that agree (or --single-cls)")
    model.warmup(imgsz=(1, 3, imgsz, imgsz))
    loader = val_dataloader(data, task, model, imgsz, batch_size, workers, single_cls, nc)
    out = Outputs(save_dir, plots, save_txt, save_hybrid, save_conf, save_json, Path(weights).stem)
    result = evaluate(model, loader, model.names, nc, conf_thres, iou_thres, max_det, single_cls, augment, half,
                      verbose=verbose, out=out)
    LOGGER.info(speed_summary(result.speeds, (batch_size, 3, imgsz, imgsz)))
    labels = f", {len(list(save_dir.glob('labels/*.txt')))} label files in {save_dir / 'labels'}" if save_txt else ""
    LOGGER.info(f"Results saved to {colorstr('bold', save_dir)}{labels}")
    return result.results, result.maps, result.speeds


VAL_RULES = {  # flag -> rule; checked in this order, before anything is loaded
    "--data": found(data_yaml_file, "data YAML not found (a path, or a file name in data/)"),
    "--weights": weights_rule,
    "--batch-size": whole(1),
    "--imgsz": whole(1),
    "--conf-thres": fraction(),
    "--iou-thres": fraction(),
    "--max-det": whole(1),
    "--task": one_of("train", "val", "test", "speed"),
    "--device": device_spec,
    "--workers": whole(0),
    "--name": not_empty,
}
VAL_COMBINATIONS = (
    Combination(("--save-conf",), lambda o: o.save_conf and not (o.save_txt or o.save_hybrid),
                "it adds a column to the --save-txt label files; pass --save-txt too"),
    Combination(("--half", "--device"), lambda o: o.half and on_cpu(o.device),
                "float16 inference needs a CUDA device (e.g. --device 0)"),
)


def check_val_options(opt: argparse.Namespace, spelled: dict[str, str] | None = None) -> None:
    """VAL_RULES and VAL_COMBINATIONS; a failure raises UserInputError naming the flag."""
    check_options(opt, VAL_RULES, VAL_COMBINATIONS, spelled)


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OptionParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=str, default=ROOT / "data/shapes.yaml", help="data YAML (path or name)")
    parser.add_argument("--weights", nargs="+", type=str, default=None,
                        help="weights to evaluate: .pt, .torchscript, .onnx or an OpenVINO folder, several in turn "
                             "(default: the newest runs/train/*/weights/best.pt)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch")
    parser.add_argument("--imgsz", "--img", "--img-size", type=int, default=640, help="longest image side, pixels")
    parser.add_argument("--conf-thres", type=float, default=0.001, help="lowest confidence kept before NMS")
    parser.add_argument("--iou-thres", type=float, default=0.6, help="IoU above which NMS drops the weaker box")
    parser.add_argument("--max-det", type=int, default=300, help="most detections kept per image")
    parser.add_argument("--task", default="val", help="split to evaluate (train, val, test), or speed")
    parser.add_argument("--device", default="", help="'cpu', or CUDA device indices such as 0 or 0,1")
    parser.add_argument("--workers", type=int, default=8, help="dataloader worker processes at most")
    parser.add_argument("--single-cls", action="store_true", help="evaluate every class as one")
    parser.add_argument("--augment", action="store_true", help="test-time augmentation (flips and scales)")
    parser.add_argument("--verbose", action="store_true", help="print the table row of every class")
    parser.add_argument("--save-txt", action="store_true", help="write each image's predictions as a label file")
    parser.add_argument("--save-hybrid", action="store_true",
                        help="like --save-txt, with the ground-truth boxes merged into the predictions first")
    parser.add_argument("--save-conf", action="store_true", help="add the confidence column to --save-txt files")
    parser.add_argument("--save-json", action="store_true", help="write COCO-format predictions and score them")
    parser.add_argument("--project", default=ROOT / "runs/val", help="parent folder of the run folder")
    parser.add_argument("--name", default="exp", help="run folder name (exp, exp2, ... when taken)")
    parser.add_argument("--exist-ok", action="store_true", help="reuse project/name instead of numbering a new one")
    parser.add_argument("--half", action="store_true", help="FP16 inference (CUDA only)")
    parser.add_argument("--dnn", action="store_true", help="accepted for compatibility; ONNX runs in ONNX Runtime")
    return parser.parse_checked(argv, check_val_options, fill=fill_weights)


def main(opt: argparse.Namespace) -> None:
    weights = opt.weights if isinstance(opt.weights, list) else [opt.weights]
    if opt.task != "speed" and opt.conf_thres > 0.001:
        LOGGER.info(f"WARNING --conf-thres {opt.conf_thres} is above 0.001: mAP will read lower than it is")
    overrides = {"conf_thres": 0.25, "iou_thres": 0.45, "plots": False} if opt.task == "speed" else {}
    for w in weights:
        start = time.time()
        run(**{**vars(opt), "weights": w, **overrides})
        if opt.task == "speed":
            LOGGER.info(f"{w}: {time.time() - start:.1f}s")


if __name__ == "__main__":
    run_cli(main, parse_opt, "val")
