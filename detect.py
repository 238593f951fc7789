"""Run YOLOv5 detection on images, videos, folders, globs, lists, webcams and streams.

Usage - sources:
    python detect.py --weights best.pt --source 0                               # webcam
                                                img.jpg                         # image
                                                vid.mp4                         # video
                                                path/                           # directory
                                                list.txt                        # list of images
                                                'path/*.jpg'                    # glob
                                                'rtsp://example.com/media.mp4'  # RTSP, RTMP, HTTP stream

Usage - formats:
    python detect.py --weights best.pt                 # PyTorch checkpoint (folded before inference)
                               best.torchscript        # TorchScript (export.py --include torchscript)
                               best.onnx               # ONNX Runtime, or OpenCV DNN with --dnn
                               best_int8.onnx          # INT8 ONNX (export.py --include onnx --int8 --data ...)
                               best_openvino_model/    # OpenVINO IR folder (export.py --include openvino), or its .xml

Results go to runs/detect/exp*: annotated images and videos, and with --save-txt labels/*.txt
(class x y w h [conf], normalized), --save-csv predictions.csv, --save-crop crops/<class>/*.jpg.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import torch

if str(Path(__file__).resolve().parent) not in sys.path:  # run as a script: make the repository importable
    sys.path.append(str(Path(__file__).resolve().parent))

from models.backend import (  # noqa: E402
    InferenceBackend, Stopwatch, class_counts, mean_ms, speed_summary, weights_rule,
)
from utils.boxes import scale_boxes  # noqa: E402
from utils.checkpoint import fill_weights, newest_best  # noqa: E402
from utils.dataloaders import LoadImages, LoadStreams, is_stream_source  # noqa: E402
from utils.datasets_check import data_yaml_file  # noqa: E402
from utils.general import (  # noqa: E402
    ROOT, LOGGER, UserInputError, check_img_size, colorstr, increment_path, run_cli,
)
from utils.nms import non_max_suppression  # noqa: E402
from utils.options import (  # noqa: E402
    Combination, OptionParser, check_options, device_spec, each, found, fraction, not_empty, on_cpu, whole,
)
from utils.plots import Annotator, colors, imwrite, save_one_box  # noqa: E402
from utils.predictions import save_one_txt  # noqa: E402
from utils.torch_utils import select_device  # noqa: E402

CSV_COLUMNS = ("Image Name", "Prediction", "Confidence", "xmin", "ymin", "xmax", "ymax")


def display_available() -> bool:
    """Whether cv2.imshow can open a window here (never on headless OpenCV builds or without a display)."""
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return False
    try:
        cv2.imshow("test", np.zeros((8, 8, 3), dtype=np.uint8))
        cv2.waitKey(1)
        cv2.destroyAllWindows()
        return True
    except cv2.error:
        return False


def write_csv(file: Path, image_name: str, det: torch.Tensor, names: dict[int, str]) -> None:
    """Append one row per detection (upstream's three columns, then the box in pixels)."""
    new = not file.exists()
    with open(file, "a", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(CSV_COLUMNS)
        for *xyxy, conf, cls in det.tolist():
            writer.writerow([image_name, names[int(cls)], f"{conf:.2f}", *(f"{v:.1f}" for v in xyxy)])


class VideoSaver:
    """One mp4v writer per video or stream slot, reopened when the output path changes."""

    def __init__(self):
        self.paths: dict[int, str] = {}
        self.writers: dict[int, cv2.VideoWriter] = {}

    def write(self, i: int, path: str, frame: np.ndarray, cap: cv2.VideoCapture | None) -> None:
        if self.paths.get(i) != path:
            self.paths[i] = path
            if i in self.writers:
                self.writers[i].release()
            fps = (cap.get(cv2.CAP_PROP_FPS) if cap else 0) or 30
            h, w = frame.shape[:2]
            self.writers[i] = cv2.VideoWriter(str(Path(path).with_suffix(".mp4")), cv2.VideoWriter_fourcc(*"mp4v"),
                                              fps, (w, h))
        self.writers[i].write(frame)

    def close(self) -> None:
        for writer in self.writers.values():
            writer.release()


class ResultSaver:
    """Per image, what the flags ask for: labels, CSV rows, crops, the annotated image or video frame."""

    def __init__(self, save_dir: Path, names: dict[int, str], save_txt: bool = False, save_conf: bool = False,
                 save_csv: bool = False, save_crop: bool = False, save_img: bool = True, view_img: bool = False,
                 line_thickness: int = 3, hide_labels: bool = False, hide_conf: bool = False):
        self.save_dir, self.names = save_dir, names
        self.save_txt, self.save_conf, self.save_csv, self.save_crop = save_txt, save_conf, save_csv, save_crop
        self.save_img, self.view_img = save_img, view_img
        self.line_thickness, self.hide_labels, self.hide_conf = line_thickness, hide_labels, hide_conf
        self.videos = VideoSaver()

    def __call__(self, det: torch.Tensor, im0: np.ndarray, p: Path, frame: int, mode: str, slot: int = 0,
                 cap: cv2.VideoCapture | None = None) -> None:
        """Save the results ``det`` (boxes in ``im0`` pixels) of image ``p`` (frame ``frame`` in video/stream mode)."""
        if self.save_txt and len(det):
            suffix = "" if mode == "image" else f"_{frame}"
            save_one_txt(det, self.save_conf, im0.shape[:2], self.save_dir / "labels" / f"{p.stem}{suffix}.txt")
        if self.save_csv:
            write_csv(self.save_dir / "predictions.csv", p.name, det, self.names)
        if self.save_crop:
            for *xyxy, _, cls in det.tolist():
                save_one_box(xyxy, im0, self.save_dir / "crops" / self.names[int(cls)] / f"{p.stem}.jpg")
        if not (self.save_img or self.view_img):
            return
        im0 = self.annotate(det, im0)
        if self.view_img:
            cv2.imshow(str(p), im0)
            cv2.waitKey(1)
        if self.save_img and mode == "image":
            imwrite(self.save_dir / p.name, im0)
        elif self.save_img:
            self.videos.write(slot, str(self.save_dir / p.name), im0, cap)

    def annotate(self, det: torch.Tensor, im0: np.ndarray) -> np.ndarray:
        """Boxes in class colours with 'name conf' labels (as --hide-labels/--hide-conf allow), drawn on ``im0``."""
        annotator = Annotator(im0, line_width=self.line_thickness, example=str(self.names))
        for *xyxy, conf, cls in reversed(det.tolist()):
            c = int(cls)
            label = "" if self.hide_labels else self.names[c] if self.hide_conf else f"{self.names[c]} {conf:.2f}"
            annotator.box_label(xyxy, label, color=colors(c, bgr=True))
        return annotator.result()


def load_backend(weights, device: torch.device, half: bool, dnn: bool, data) -> InferenceBackend:
    """The model behind ``--weights`` (one file), with a clear error when it is missing."""
    if isinstance(weights, (list, tuple)):
        if len(weights) != 1:
            names = " ".join(map(str, weights))
            raise UserInputError(f"--weights {names}: give one model (ensembles are not supported)")
        weights = weights[0]
    if not Path(weights).exists():  # a file, or an OpenVINO export's folder
        raise UserInputError(f"--weights {weights}: file not found (train one with train.py, or export one with "
                             "export.py, and pass its path)")
    return InferenceBackend(weights, device, fp16=half, dnn=dnn, data=data)


def inference_size(model: InferenceBackend, imgsz: list[int]) -> list[int]:
    """--imgsz rounded to the stride, or the input size a fixed-shape export was traced at."""
    imgsz = check_img_size(imgsz, s=model.stride)
    if model.static_shape and list(model.static_shape[2:]) != imgsz:
        LOGGER.warning(f"WARNING --imgsz {imgsz} differs from the {model.kind} model's fixed input "
                       f"{list(model.static_shape[2:])}; using {list(model.static_shape[2:])}")
        return list(model.static_shape[2:])
    return imgsz


def supported_options(model: InferenceBackend, augment: bool, visualize: bool, view_img: bool) -> tuple[bool, ...]:
    """(augment, visualize, view_img), switched off with a warning where this model or machine cannot do them."""
    if (augment or visualize) and model.kind != ".pt":
        LOGGER.warning(f"WARNING --augment and --visualize need a .pt model; ignored for {model.kind}")
        augment = visualize = False
    if view_img and not display_available():
        LOGGER.warning("WARNING --view-img: no display available (headless OpenCV or no $DISPLAY); not showing results")
        view_img = False
    return augment, visualize, view_img


def open_source(source: str, imgsz: list[int], model: InferenceBackend, vid_stride: int) -> LoadImages | LoadStreams:
    """Streams (webcam index, URL, .streams list) or files; letterboxed to the minimal stride multiple
    unless the model takes one fixed shape. An unreachable stream raises ConnectionError within seconds."""
    kwargs = dict(img_size=imgsz, stride=model.stride, auto=model.static_shape is None, vid_stride=vid_stride)
    return LoadStreams(source, **kwargs) if is_stream_source(source) else LoadImages(source, **kwargs)


def log_summary(timers: tuple[Stopwatch, ...], seen: int, imgsz: list[int], save_dir: Path, save_txt: bool,
                saved: bool) -> None:
    """The closing lines: mean time per image of each stage, then where the outputs are."""
    LOGGER.info(speed_summary(mean_ms(timers, seen), (1, 3, *imgsz)))
    if not saved:
        return
    where = f"Outputs written to {colorstr('bold', save_dir)}"
    if save_txt:
        where += f"\n{len(list(save_dir.glob('labels/*.txt')))} label files in {save_dir / 'labels'}"
    LOGGER.info(where)


def to_model_input(im: np.ndarray, device: torch.device, fp16: bool) -> torch.Tensor:
    """A loader's uint8 CHW image (or BCHW stream batch) as a float batch in [0, 1] on ``device``."""
    x = torch.as_tensor(im, device=device).to(torch.float16 if fp16 else torch.float32).div(255)
    return x if x.ndim == 4 else x.unsqueeze(0)


def batch_members(dataset: LoadImages | LoadStreams, paths, originals) -> list[tuple[Path, np.ndarray, int, str]]:
    """(file, writable copy of the original image, frame number, log prefix) of each image of one loader item:
    one per stream for LoadStreams (frames counted by the loader), else the single image or video frame."""
    if isinstance(dataset, LoadStreams):
        return [(Path(p), im.copy(), dataset.count, f"{k}: ") for k, (p, im) in enumerate(zip(paths, originals))]
    return [(Path(paths), originals.copy(), dataset.frame, "")]


def detect_source(dataset: LoadImages | LoadStreams, model: InferenceBackend, saver: ResultSaver,
                  stages: tuple[Stopwatch, Stopwatch, Stopwatch], nms, feature_dir, augment: bool = False) -> int:
    """Predict on every item of ``dataset`` and save and log each image's results; returns how many images.

    ``nms`` maps the model's output to per-image detections; ``feature_dir(path)`` is the --visualize folder
    of an input (or False). ``stages`` time pre-processing, inference and NMS.
    """
    prepare, infer, suppress = stages
    images = 0
    for path, im, im0s, vid_cap, s in dataset:
        with prepare:
            x = to_model_input(im, model.device, model.fp16)
        with infer:
            raw = model(x, augment=augment, visualize=feature_dir(path))
        with suppress:
            dets = nms(raw)
        mode = getattr(dataset, "mode", "stream")  # LoadImages switches between 'image' and 'video'
        for slot, (det, (file, original, frame, prefix)) in enumerate(zip(dets, batch_members(dataset, path, im0s))):
            scale_boxes(x.shape[2:], det[:, :4], original.shape).round_()
            saver(det, original, file, frame, mode, slot, vid_cap)
            found = "".join(f"{c}, " for c in class_counts(det, model.names)) or "(no detections), "
            LOGGER.info(f"{s}{prefix}{x.shape[2]}x{x.shape[3]} {found}{infer.dt * 1e3:.1f}ms")
        images += len(dets)
    return images


@torch.no_grad()
def run(
    weights: str | Path | list | None = None,
    source: str | Path = ROOT / "data/images",
    data: str | Path = ROOT / "data/shapes.yaml",
    imgsz: tuple[int, int] | list[int] = (640, 640),
    conf_thres: float = 0.25,
    iou_thres: float = 0.45,
    max_det: int = 1000,
    device: str = "",
    view_img: bool = False,
    save_txt: bool = False,
    save_conf: bool = False,
    save_csv: bool = False,
    save_crop: bool = False,
    nosave: bool = False,
    classes: list[int] | None = None,
    agnostic_nms: bool = False,
    augment: bool = False,
    visualize: bool = False,
    project: str | Path = ROOT / "runs/detect",
    name: str = "exp",
    exist_ok: bool = False,
    line_thickness: int = 3,
    hide_labels: bool = False,
    hide_conf: bool = False,
    half: bool = False,
    dnn: bool = False,
    vid_stride: int = 1,
) -> Path:
    """Detect objects in ``source`` and save the results; returns the output folder."""
    device = select_device(device)
    model = load_backend(weights or newest_best(), device, half, dnn, data)
    imgsz = inference_size(model, list(imgsz))
    augment, visualize, view_img = supported_options(model, augment, visualize, view_img)
    dataset = open_source(str(source), imgsz, model, vid_stride)
    streams = isinstance(dataset, LoadStreams)
    save_dir = increment_path(Path(project) / name, exist_ok=exist_ok)
    (save_dir / "labels" if save_txt else save_dir).mkdir(parents=True, exist_ok=True)
    saver = ResultSaver(save_dir, model.names, save_txt, save_conf, save_csv, save_crop, not nosave, view_img,
                        line_thickness, hide_labels, hide_conf)
    nms = partial(non_max_suppression, conf_thres=conf_thres, iou_thres=iou_thres, classes=classes,
                  agnostic=agnostic_nms, max_det=max_det)

    def feature_dir(path) -> Path | bool:
        return visualize and increment_path(save_dir / Path(path).stem, mkdir=True)

    batch = len(dataset) if streams and model.kind != ".pt" else 1
    model.warmup(imgsz=(batch, 3, *imgsz))
    stages = Stopwatch(), Stopwatch(), Stopwatch()
    try:
        images = detect_source(dataset, model, saver, stages, nms, feature_dir, augment)
    finally:
        saver.videos.close()
        if streams:
            dataset.close()
    if skipped := getattr(dataset, "skipped", []):
        LOGGER.warning(f"WARNING {len(skipped)} of {len(dataset)} files of {source} unreadable and skipped "
                       "(named above)")
    log_summary(stages, images, imgsz, save_dir, save_txt, saved=save_txt or not nosave or save_csv or save_crop)
    return save_dir


def one_model(weights) -> str | None:
    """--weights: one model file (a list from the command line holds one path)."""
    if isinstance(weights, (list, tuple)) and len(weights) != 1:
        return "give one model (ensembles are not supported)"
    return weights_rule(weights)


DETECT_RULES = {  # flag -> rule; checked in this order, before anything is loaded
    "--weights": one_model,
    "--data": found(data_yaml_file, "data YAML not found (a path, or a file name in data/)"),
    "--imgsz": each(whole(1), counts=(1, 2)),
    "--conf-thres": fraction(),
    "--iou-thres": fraction(),
    "--max-det": whole(1),
    "--device": device_spec,
    "--classes": each(whole(0)),
    "--name": not_empty,
    "--line-thickness": whole(1),
    "--vid-stride": whole(1),
}
DETECT_COMBINATIONS = (
    Combination(("--save-conf",), lambda o: o.save_conf and not o.save_txt,
                "it adds a column to the --save-txt label files; pass --save-txt too"),
    Combination(("--half", "--device"), lambda o: o.half and on_cpu(o.device),
                "float16 inference needs a CUDA device (e.g. --device 0)"),
)


def check_detect_options(opt: argparse.Namespace, spelled: dict[str, str] | None = None) -> None:
    """DETECT_RULES and DETECT_COMBINATIONS; a failure raises UserInputError naming the flag."""
    check_options(opt, DETECT_RULES, DETECT_COMBINATIONS, spelled)


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OptionParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", nargs="+", type=str, default=None,
                        help="the model: a .pt checkpoint, a .torchscript/.onnx export or an OpenVINO export folder "
                             "(*_openvino_model; default: the newest runs/train/*/weights/best.pt)")
    parser.add_argument("--source", type=str, default=ROOT / "data/images",
                        help="what to run on: an image, video, folder, glob, .txt list, stream URL, or 0 (webcam)")
    parser.add_argument("--data", type=str, default=ROOT / "data/shapes.yaml",
                        help="data YAML whose class names are used when the model file carries none")
    parser.add_argument("--imgsz", "--img", "--img-size", nargs="+", type=int, default=[640],
                        help="model input size in pixels: one number (square) or height width")
    parser.add_argument("--conf-thres", type=float, default=0.25, help="keep detections scoring at least this")
    parser.add_argument("--iou-thres", type=float, default=0.45, help="overlap (IoU) above which NMS drops a box")
    parser.add_argument("--max-det", type=int, default=1000, help="at most this many detections in one image")
    parser.add_argument("--device", default="", help="where to run: cpu, or CUDA index(es) such as 0 or 0,1")
    parser.add_argument("--view-img", action="store_true", help="also show each result in a window")
    parser.add_argument("--save-txt", action="store_true", help="write YOLO-format label files to labels/")
    parser.add_argument("--save-conf", action="store_true", help="add a confidence column to --save-txt files")
    parser.add_argument("--save-csv", action="store_true", help="append every detection to predictions.csv")
    parser.add_argument("--save-crop", action="store_true", help="write each detected object as an image to crops/")
    parser.add_argument("--nosave", action="store_true", help="do not write the annotated images and videos")
    parser.add_argument("--classes", nargs="+", type=int, help="keep only these class indices, e.g. --classes 0 2")
    parser.add_argument("--agnostic-nms", action="store_true", help="run NMS across classes, not per class")
    parser.add_argument("--augment", action="store_true", help="test-time augmentation (flips and scales)")
    parser.add_argument("--visualize", action="store_true", help="save feature maps of every layer")
    parser.add_argument("--project", default=ROOT / "runs/detect", help="parent folder of the output folder")
    parser.add_argument("--name", default="exp", help="output folder name inside --project")
    parser.add_argument("--exist-ok", action="store_true", help="reuse an existing --project/--name folder "
                        "instead of creating a numbered new one")
    parser.add_argument("--line-thickness", default=3, type=int, help="width of the drawn boxes in pixels")
    parser.add_argument("--hide-labels", default=False, action="store_true", help="draw boxes without text")
    parser.add_argument("--hide-conf", default=False, action="store_true", help="omit the score from box labels")
    parser.add_argument("--half", action="store_true", help="run in float16 (CUDA only)")
    parser.add_argument("--dnn", action="store_true", help="run .onnx files with OpenCV DNN, not ONNX Runtime")
    parser.add_argument("--vid-stride", type=int, default=1, help="use every n-th frame of videos and streams")
    opt = parser.parse_checked(argv, check_detect_options, fill=fill_weights)
    opt.imgsz *= 2 if len(opt.imgsz) == 1 else 1
    return opt


def main(opt: argparse.Namespace) -> Path:
    return run(**vars(opt))


if __name__ == "__main__":
    run_cli(main, parse_opt, "detect", errors=(FileNotFoundError, ConnectionError))
