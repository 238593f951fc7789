"""Validate a trained detector on a dataset: P, R, mAP@0.5, mAP@0.5:0.95, per-class table, speed, plots.

Usage:
    python val.py --weights runs/train/exp/weights/best.pt --data data/BCCD.yaml --img 320
    python val.py --weights best.onnx --data data/shapes.yaml
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from models.backend import InferenceBackend, Stopwatch  # noqa: E402
from utils.boxes import scale_boxes, xywh2xyxy, xyxy2xywh  # noqa: E402
from utils.dataloaders import create_dataloader  # noqa: E402
from utils.datasets_check import check_dataset  # noqa: E402
from utils.general import (  # noqa: E402
    LOGGER, UserInputError, check_img_size, colorstr, increment_path, run_cli,
)
from utils.metrics import ConfusionMatrix, ap_per_class, process_batch  # noqa: E402
from utils.nms import non_max_suppression  # noqa: E402
from utils.plots import output_to_target, plot_images  # noqa: E402
from utils.torch_utils import select_device  # noqa: E402

TQDM_BAR_FORMAT = "{l_bar}{bar:10}{r_bar}"


def save_one_txt(predn: torch.Tensor, save_conf: bool, shape: tuple, file: Path) -> None:
    """Write one image's predictions as YOLO label rows (class x y w h [conf]), normalized."""
    gn = torch.tensor(shape)[[1, 0, 1, 0]]
    lines = []
    for *xyxy, conf, cls in predn.tolist():
        xywh = (xyxy2xywh(torch.tensor(xyxy).view(1, 4)) / gn).view(-1).tolist()
        row = (cls, *xywh, conf) if save_conf else (cls, *xywh)
        lines.append(("%g " * len(row)).rstrip() % row)
    file.write_text("".join(f"{line}\n" for line in lines))


def image_id(path: Path) -> int | str:
    """COCO image id: the numeric file stem when it is one, else the stem."""
    return int(path.stem) if path.stem.isnumeric() else path.stem


def save_one_json(predn: torch.Tensor, jdict: list, path: Path) -> None:
    """Append one image's predictions in COCO results format (xywh with top-left corner, pixels)."""
    box = xyxy2xywh(predn[:, :4])
    box[:, :2] -= box[:, 2:] / 2
    for p, b in zip(predn.tolist(), box.tolist()):
        jdict.append({"image_id": image_id(path), "category_id": int(p[5]), "bbox": [round(x, 3) for x in b],
                      "score": round(p[4], 5)})


def coco_ground_truth(dataset, names: dict) -> dict:
    """The dataset's labels as a COCO ground-truth dict (boxes in original-image pixels)."""
    images, annotations = [], []
    for path, (w, h), labels in zip(dataset.im_files, dataset.shapes, dataset.labels):
        iid = image_id(Path(path))
        images.append({"id": iid, "file_name": Path(path).name, "width": int(w), "height": int(h)})
        for cls, x, y, bw, bh in labels.tolist():
            annotations.append({"id": len(annotations) + 1, "image_id": iid, "category_id": int(cls), "iscrowd": 0,
                                "bbox": [(x - bw / 2) * w, (y - bh / 2) * h, bw * w, bh * h], "area": bw * w * bh * h})
    return {"images": images, "annotations": annotations,
            "categories": [{"id": k, "name": v} for k, v in names.items()]}


def coco_evaluate(gt_file: Path, pred_file: Path) -> tuple[float, float]:
    """mAP@0.5:0.95 and mAP@0.5 from pycocotools on the written JSON files."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO(str(gt_file))
    evaluator = COCOeval(gt, gt.loadRes(str(pred_file)), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return float(evaluator.stats[0]), float(evaluator.stats[1])


@torch.no_grad()
def run(
    data: str | Path | dict,
    weights: str | Path | None = None,
    batch_size: int = 32,
    imgsz: int = 640,
    conf_thres: float = 0.001,
    iou_thres: float = 0.6,
    max_det: int = 300,
    task: str = "val",
    device: str = "",
    workers: int = 8,
    single_cls: bool = False,
    augment: bool = False,
    verbose: bool = False,
    save_txt: bool = False,
    save_hybrid: bool = False,
    save_conf: bool = False,
    save_json: bool = False,
    project: str | Path = ROOT / "runs/val",
    name: str = "exp",
    exist_ok: bool = False,
    half: bool = True,
    dnn: bool = False,
    model=None,
    dataloader=None,
    save_dir: Path = Path(""),
    plots: bool = True,
    compute_loss=None,
):
    """Evaluate ``weights`` (or, from train.py, ``model`` with its ``dataloader``). Returns
    ((P, R, mAP50, mAP50-95, box_loss, obj_loss, cls_loss), per-class mAP50-95, per-image ms (pre, inf, nms))."""
    training = model is not None
    if training:
        device = next(model.parameters()).device
        half &= device.type == "cuda"
        model.half() if half else model.float()
        names = model.names
    else:
        device = select_device(device, batch_size)
        save_dir = increment_path(Path(project) / name, exist_ok=exist_ok)
        (save_dir / "labels" if save_txt else save_dir).mkdir(parents=True, exist_ok=True)
        half &= device.type == "cuda"
        model = InferenceBackend(weights, device, fp16=half)
        names = model.names
        imgsz = check_img_size(imgsz, s=model.stride)
        data = check_dataset(data)
    model.eval()
    nc = 1 if single_cls else int(data["nc"])
    iouv = torch.linspace(0.5, 0.95, 10, device=device)

    if not training:
        if not single_cls and len(names) != nc:
            raise UserInputError(f"{weights} is trained on {len(names)} classes but {data['yaml_file']} has nc={nc}; "
                                 "pass matching --weights and --data (or --single-cls)")
        model.warmup(imgsz=(1, 3, imgsz, imgsz))
        rect = task != "speed" and (model.kind == ".pt" or getattr(model, "static_shape", 1) is None)
        pad = 0.0 if task == "speed" else 0.5
        task = task if task in ("train", "val", "test") else "val"
        if not data.get(task):
            raise UserInputError(f"{data.get('yaml_file', 'data')}: no '{task}' split defined")
        dataloader = create_dataloader(data[task], imgsz, batch_size, model.stride, single_cls, pad=pad, rect=rect,
                                       workers=workers, prefix=colorstr(f"{task}: "), nc=nc)[0]

    confusion_matrix = ConfusionMatrix(nc=nc)
    header = ("%22s" + "%11s" * 6) % ("Class", "Images", "Instances", "P", "R", "mAP50", "mAP50-95")
    mp = mr = map50 = map5095 = 0.0
    timers = Stopwatch(), Stopwatch(), Stopwatch()
    loss = torch.zeros(3, device=device)
    jdict, stats, seen = [], [], 0
    ap, ap50, p, r, ap_class = np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0, int)
    pbar = tqdm(dataloader, desc=header, bar_format=TQDM_BAR_FORMAT, disable=training and not sys.stdout.isatty())
    for batch_i, (im, targets, paths, shapes) in enumerate(pbar):
        with timers[0]:
            im = im.to(device, non_blocking=True)
            targets = targets.to(device)
            im = (im.half() if half else im.float()) / 255
            nb, _, height, width = im.shape
        with timers[1]:
            if compute_loss:
                preds, train_out = model(im)
            else:
                preds = model(im, augment=augment)
        if compute_loss:
            loss += compute_loss(train_out, targets)[1]
        targets[:, 2:] *= torch.tensor((width, height, width, height), device=device)
        hybrid = [targets[targets[:, 0] == i, 1:] for i in range(nb)] if save_hybrid else []
        with timers[2]:
            preds = non_max_suppression(preds, conf_thres, iou_thres, labels=hybrid, multi_label=True,
                                        agnostic=single_cls, max_det=max_det)
        for si, pred in enumerate(preds):
            labels = targets[targets[:, 0] == si, 1:]
            path, shape = Path(paths[si]), shapes[si][0]
            seen += 1
            correct = torch.zeros(pred.shape[0], len(iouv), dtype=torch.bool, device=device)
            if len(pred) == 0:
                if len(labels):
                    stats.append((correct, *torch.zeros((2, 0), device=device), labels[:, 0]))
                    if plots:
                        confusion_matrix.process_batch(detections=None, labels=labels[:, 0])
                continue
            if single_cls:
                pred[:, 5] = 0
            predn = pred.clone()
            scale_boxes(im[si].shape[1:], predn[:, :4], shape, shapes[si][1])
            if len(labels):
                tbox = xywh2xyxy(labels[:, 1:5])
                scale_boxes(im[si].shape[1:], tbox, shape, shapes[si][1])
                labelsn = torch.cat((labels[:, 0:1], tbox), 1)
                correct = process_batch(predn, labelsn, iouv)
                if plots:
                    confusion_matrix.process_batch(predn, labelsn)
            stats.append((correct, pred[:, 4], pred[:, 5], labels[:, 0]))
            if save_txt:
                save_one_txt(predn, save_conf, shape, save_dir / "labels" / f"{path.stem}.txt")
            if save_json:
                save_one_json(predn, jdict, path)
        if plots and batch_i < 3:
            plot_images(im, targets, paths, save_dir / f"val_batch{batch_i}_labels.jpg", names)
            plot_images(im, output_to_target(preds), paths, save_dir / f"val_batch{batch_i}_pred.jpg", names)

    stats = [torch.cat(x, 0).cpu().numpy() for x in zip(*stats)]
    if stats and stats[0].any():
        _, _, p, r, _, ap, ap_class = ap_per_class(*stats, plot=plots, save_dir=save_dir, names=names)
        ap50, ap = ap[:, 0], ap.mean(1)
        mp, mr, map50, map5095 = p.mean(), r.mean(), ap50.mean(), ap.mean()
    nt = np.bincount(stats[3].astype(int), minlength=nc) if stats else np.zeros(nc, int)

    row = "%22s" + "%11i" * 2 + "%11.3g" * 4
    LOGGER.info(header)
    LOGGER.info(row % ("all", seen, nt.sum(), mp, mr, map50, map5095))
    if nt.sum() == 0:
        LOGGER.warning(f"WARNING no labels found in {task} set, can not compute metrics without labels")
    if (verbose or (nc < 50 and not training)) and nc > 1 and stats:
        for i, c in enumerate(ap_class):
            LOGGER.info(row % (names[c], seen, nt[c], p[i], r[i], ap50[i], ap[i]))

    speeds = tuple(x.t / max(seen, 1) * 1e3 for x in timers)
    if not training:
        LOGGER.info(f"Speed: %.1fms pre-process, %.1fms inference, %.1fms NMS per image at shape "
                    f"{(batch_size, 3, imgsz, imgsz)}" % speeds)
    if plots:
        confusion_matrix.plot(save_dir=save_dir, names=names)
    if save_json and jdict:
        map5095, map50 = _save_and_score_json(jdict, dataloader.dataset, names, save_dir, weights, map5095, map50)

    model.float()
    if not training:
        saved = f"\n{len(list(save_dir.glob('labels/*.txt')))} labels saved to {save_dir / 'labels'}" if save_txt else ""
        LOGGER.info(f"Results saved to {colorstr('bold', save_dir)}{saved}")
    maps = np.zeros(nc) + map5095
    for i, c in enumerate(ap_class):
        maps[c] = ap[i]
    return (mp, mr, map50, map5095, *(loss.cpu() / max(len(dataloader), 1)).tolist()), maps, speeds


def _save_and_score_json(jdict, dataset, names, save_dir, weights, map5095, map50):
    """Write COCO predictions (and the ground truth we derive from the labels) and score them with pycocotools."""
    stem = Path(weights).stem if weights else "model"
    pred_file = save_dir / f"{stem}_predictions.json"
    gt_file = save_dir / "ground_truth.json"
    pred_file.write_text(json.dumps(jdict))
    gt_file.write_text(json.dumps(coco_ground_truth(dataset, names)))
    LOGGER.info(f"\nEvaluating pycocotools mAP... saving {pred_file}...")
    try:
        return coco_evaluate(gt_file, pred_file)
    except ImportError as e:
        LOGGER.warning(f"pycocotools unable to run: {e}")
        return map5095, map50


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=str, default=ROOT / "data/shapes.yaml", help="dataset.yaml path")
    parser.add_argument("--weights", nargs="+", type=str, default=ROOT / "runs/train/exp/weights/best.pt",
                        help="model path(s)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size")
    parser.add_argument("--imgsz", "--img", "--img-size", type=int, default=640, help="inference size (pixels)")
    parser.add_argument("--conf-thres", type=float, default=0.001, help="confidence threshold")
    parser.add_argument("--iou-thres", type=float, default=0.6, help="NMS IoU threshold")
    parser.add_argument("--max-det", type=int, default=300, help="maximum detections per image")
    parser.add_argument("--task", default="val", help="train, val, test or speed")
    parser.add_argument("--device", default="", help="cuda device, i.e. 0 or 0,1,2,3 or cpu")
    parser.add_argument("--workers", type=int, default=8, help="max dataloader workers")
    parser.add_argument("--single-cls", action="store_true", help="treat as single-class dataset")
    parser.add_argument("--augment", action="store_true", help="augmented inference (TTA)")
    parser.add_argument("--verbose", action="store_true", help="report mAP by class")
    parser.add_argument("--save-txt", action="store_true", help="save results to *.txt")
    parser.add_argument("--save-hybrid", action="store_true", help="save label+prediction hybrid results to *.txt")
    parser.add_argument("--save-conf", action="store_true", help="save confidences in --save-txt labels")
    parser.add_argument("--save-json", action="store_true", help="save a COCO-JSON results file and score it")
    parser.add_argument("--project", default=ROOT / "runs/val", help="save to project/name")
    parser.add_argument("--name", default="exp", help="save to project/name")
    parser.add_argument("--exist-ok", action="store_true", help="existing project/name ok, do not increment")
    parser.add_argument("--half", action="store_true", help="use FP16 half-precision inference (CUDA)")
    parser.add_argument("--dnn", action="store_true", help="accepted for compatibility; ONNX runs in ONNX Runtime")
    opt = parser.parse_args(argv)
    opt.save_txt |= opt.save_hybrid
    return opt


def main(opt: argparse.Namespace) -> None:
    weights = opt.weights if isinstance(opt.weights, list) else [opt.weights]
    if opt.task in ("train", "val", "test"):
        if opt.conf_thres > 0.001:
            LOGGER.info(f"WARNING confidence threshold {opt.conf_thres} > 0.001 produces invalid results")
        for w in weights:
            run(**{**vars(opt), "weights": w})
    elif opt.task == "speed":
        for w in weights:
            t0 = time.time()
            run(**{**vars(opt), "weights": w, "conf_thres": 0.25, "iou_thres": 0.45, "plots": False})
            LOGGER.info(f"{w}: {time.time() - t0:.1f}s")
    else:
        raise UserInputError(f"--task {opt.task}: expected one of train, val, test, speed")


if __name__ == "__main__":
    run_cli(main, parse_opt, "val")
