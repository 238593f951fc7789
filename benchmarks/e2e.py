"""The e2e task: val.py on a data set's val split as a whole command, and detect.py's per-image loop, timed the way
upstream YOLOv5 reports its figures (per-image pre-process, inference and NMS milliseconds).

Usage:
    python -m benchmarks e2e                                      # yolov5s (random weights) on data/BCCD.yaml at 640
    python -m benchmarks e2e --weights runs/train/exp/weights/best.pt --img 320
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from benchmarks.common import ROOT, fmt, header_lines, markdown_table, standard_options, write_csv, write_text
from models.backend import SPEED_PATTERN, InferenceBackend
from models.yolo import DetectionModel
from utils.checkpoint import make_checkpoint, save_checkpoint
from utils.dataloaders import LoadImages
from utils.datasets_check import check_dataset
from utils.general import LOGGER, set_logging
from utils.nms import non_max_suppression

VAL_THRESHOLDS = {"conf": 0.001, "iou": 0.6}  # val.py's defaults, as in upstream's val commands
DETECT_THRESHOLDS = {"conf": 0.25, "iou": 0.45, "max_det": 1000}  # upstream detect.py's defaults


def random_checkpoint(cfg: str, data: dict, file: Path) -> Path:
    """A checkpoint of ``cfg`` with seeded random weights and the dataset's classes (speed only: its mAP is 0)."""
    torch.manual_seed(0)
    model = DetectionModel(cfg, nc=data["nc"], verbose=False)
    model.names = data["names"]
    save_checkpoint(make_checkpoint(model, ema=None, epoch=-1), file)
    return file


def parse_speed(text: str) -> tuple[float, float, float]:
    """(pre-process, inference, NMS) ms per image from val.py's timing line."""
    match = SPEED_PATTERN.search(text)
    if not match:
        raise RuntimeError("val.py printed no per-image timing line")
    return tuple(float(x) for x in match.groups())


def time_val(weights: Path, opt: argparse.Namespace, folder: Path) -> dict:
    """Wall time of the whole val.py command and its per-image times."""
    cmd = [sys.executable, "val.py", "--weights", str(weights), "--data", str(opt.data), "--img", str(opt.img),
           "--batch-size", str(opt.batch), "--device", "cpu", "--project", str(folder), "--name", "val",
           "--exist-ok"]
    env = {**os.environ, "OMP_NUM_THREADS": str(opt.threads)}
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if out.returncode:
        raise RuntimeError(f"val.py failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    pre, inf, nms = parse_speed(out.stdout + out.stderr)
    return {"command": "python " + shlex.join(cmd[1:]), "wall_s": wall, "pre_ms": pre, "inf_ms": inf, "nms_ms": nms}


def detect_one(model: nn.Module, im: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """(raw predictions, detections, [pre, inference, NMS] seconds) of detect.py's steps on one letterboxed image."""
    marks = [time.perf_counter()]
    x = (torch.from_numpy(im).float() / 255)[None]
    marks.append(time.perf_counter())
    with torch.inference_mode():
        pred = model(x)
        marks.append(time.perf_counter())
        det = non_max_suppression(pred, DETECT_THRESHOLDS["conf"], DETECT_THRESHOLDS["iou"],
                                  max_det=DETECT_THRESHOLDS["max_det"])[0]
    marks.append(time.perf_counter())
    return pred, det, [b - a for a, b in zip(marks, marks[1:], strict=False)]


def time_detect(weights: Path, source: str, img: int) -> dict:
    """detect.py's loop over the images of ``source``: letterbox (auto), folded .pt model, NMS at detect's defaults.

    Timed like upstream's detect.py: pre-process = array -> normalized tensor, no warm-up (the first image is
    included); reading + letterboxing is timed separately ('load'). Also counts the boxes NMS had to consider:
    those whose objectness passes val's and detect's confidence thresholds.
    """
    model = InferenceBackend(weights, "cpu")
    images = iter(LoadImages(source, img_size=img, stride=model.stride, auto=True))
    times = dict.fromkeys(("load", "pre", "inf", "nms"), 0.0)
    counts = dict.fromkeys(("val_candidates", "detect_candidates", "detections"), 0)
    n, start = 0, time.perf_counter()
    while True:
        before = time.perf_counter()
        item = next(images, None)
        if item is None:
            break
        times["load"] += time.perf_counter() - before
        pred, det, seconds = detect_one(model, item[1])
        for key, s in zip(("pre", "inf", "nms"), seconds, strict=True):
            times[key] += s
        counts["val_candidates"] += int((pred[..., 4] > VAL_THRESHOLDS["conf"]).sum())
        counts["detect_candidates"] += int((pred[..., 4] > DETECT_THRESHOLDS["conf"]).sum())
        counts["detections"] += len(det)
        n += 1
    wall, per = time.perf_counter() - start, 1 / max(n, 1)
    return {"images": n, "wall_s": wall, **{f"{k}_ms": v * per * 1e3 for k, v in times.items()},
            **{f"{k}_per_image": v * per for k, v in counts.items()}}


E2E_COLUMNS = ["what", "command", "images", "wall_s", "load_ms", "pre_ms", "inf_ms", "nms_ms",
               "val_candidates_per_image", "detect_candidates_per_image", "detections_per_image"]


def e2e_report(opt: argparse.Namespace, header: list[str], val: dict, detect: dict, weights: Path) -> list[str]:
    rows = [["val.py", fmt(val["wall_s"]), "-", fmt(val["pre_ms"]), fmt(val["inf_ms"]), fmt(val["nms_ms"])],
            ["detect loop", fmt(detect["wall_s"]), fmt(detect["load_ms"]), fmt(detect["pre_ms"]),
             fmt(detect["inf_ms"]), fmt(detect["nms_ms"])]]
    return ["# End-to-end benchmarks", "", *(f"- {line}" for line in header), f"- weights: {weights}",
            f"- val.py: `{val['command']}` (conf {VAL_THRESHOLDS['conf']}, IoU {VAL_THRESHOLDS['iou']}: val.py's "
            "defaults, as in upstream's val commands); wall = the whole command, Python start-up included",
            f"- detect loop: {detect['images']} images of {opt.data}'s val split at {opt.img}, batch 1, folded model "
            f"through InferenceBackend, NMS conf {DETECT_THRESHOLDS['conf']}, IoU {DETECT_THRESHOLDS['iou']}, "
            f"max_det {DETECT_THRESHOLDS['max_det']} (upstream detect.py's defaults); wall = the loop only",
            f"- NMS time depends on how many boxes pass the confidence threshold. Per image, objectness passed "
            f"{detect['val_candidates_per_image']:.0f} boxes at conf {VAL_THRESHOLDS['conf']} and "
            f"{detect['detect_candidates_per_image']:.1f} at conf {DETECT_THRESHOLDS['conf']}; "
            f"{detect['detections_per_image']:.1f} detections kept. A trained model gives other counts.", "",
            *markdown_table(["what", "wall (s)", "load ms/image", "pre-process ms/image", "inference ms/image",
                             "NMS ms/image"], rows)]


def run(opt: argparse.Namespace) -> int:
    """The e2e task: val.py's wall and per-image times, and detect.py's per-image times, on --data's val split."""
    torch.set_num_threads(opt.threads)
    header = header_lines(opt.threads)
    data = check_dataset(opt.data)
    opt.csv.parent.mkdir(parents=True, exist_ok=True)
    weights = Path(opt.weights) if opt.weights else random_checkpoint(
        opt.cfg, data, opt.csv.parent / f"{Path(opt.cfg).stem}_random_{data['nc']}cls.pt")
    LOGGER.info("\n".join(header))
    val = time_val(weights, opt, opt.csv.parent)
    detect = time_detect(weights, data["val"], opt.img)
    write_csv(opt.csv, [{"what": "val.py", **val}, {"what": "detect loop", **detect}], E2E_COLUMNS)
    report = e2e_report(opt, header, val, detect, weights)
    write_text(opt.md, report)
    LOGGER.info("\n" + "\n".join(report) + f"\n\nResults saved to {opt.csv} and {opt.md}")
    return 0


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks e2e", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", help=".pt weights (default: --cfg with seeded random weights)")
    parser.add_argument("--cfg", default="yolov5s.yaml", help="model YAML for the random-weights checkpoint")
    parser.add_argument("--data", default="data/BCCD.yaml", help="data YAML (its val split is used)")
    parser.add_argument("--img", "--imgsz", type=int, default=640, help="image size")
    parser.add_argument("--batch", type=int, default=32, help="val.py batch size")
    standard_options(parser, "e2e")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    opt = parse_opt(argv)
    set_logging()
    return run(opt)
