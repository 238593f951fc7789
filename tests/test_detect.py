"""detect.py end to end (subprocesses): the same detections from .pt, .torchscript and .onnx on the example
images and a generated video; every output flag; clear, fast errors for an offline stream and missing weights.

The model is upstream's yolov5n trained on BCCD (shared fixture), so detections are real, confident ones.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import export
from detect import save_one_box
from models.backend import SPEED_PATTERN, speed_summary
from models.yolo import DetectionModel
from tests.helpers import ROOT, SHARED
from utils.boxes import box_iou, xywh2xyxy
from utils.checkpoint import make_checkpoint, save_checkpoint

KINDS = (".pt", ".torchscript", ".onnx")
IMAGES = sorted((ROOT / "data/images").glob("*.jpg"))
VIDEO_FRAMES = 4
IMGSZ = 320


def trained_checkpoint(path: Path) -> Path:
    """Upstream's BCCD-trained yolov5n (3 classes) saved as one of our checkpoints at ``path``."""
    fixture = torch.load(SHARED / "fixtures/upstream_yolov5n_bccd_state.pt", map_location="cpu", weights_only=True)
    model = DetectionModel(fixture["cfg"], verbose=False)
    model.load_state_dict(fixture["state_dict"])
    model.names = {int(k): v for k, v in fixture["names"].items()}
    save_checkpoint(make_checkpoint(model), path)
    return path


def detect(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """python detect.py ARGS, one thread, output (stdout and stderr together) as text."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_COLOR": "1"}
    return subprocess.run([sys.executable, str(ROOT / "detect.py"), *args], cwd=ROOT, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)


def write_video(path: Path, frames: int = VIDEO_FRAMES) -> Path:
    """A short mp4v clip: the first example image, shifted a little more in each frame."""
    image = cv2.imread(str(IMAGES[0]))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, image.shape[1::-1])
    for i in range(frames):
        writer.write(np.roll(image, 8 * i, axis=1))
    writer.release()
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """best.pt, with best.torchscript and best.onnx exported beside it at IMGSZ (fixed shape)."""
    path = trained_checkpoint(tmp_path_factory.mktemp("weights") / "best.pt")
    export.run(weights=path, include=["torchscript", "onnx"], imgsz=[IMGSZ, IMGSZ])
    return path


@pytest.fixture(scope="module")
def runs(weights: Path, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """detect.py with every saving flag, once per weights format, on a folder of the images and a video.
    Returns {suffix: (output folder, log)}."""
    root = tmp_path_factory.mktemp("detect")
    source = root / "media"
    source.mkdir()
    for image in IMAGES:
        shutil.copy(image, source)
    write_video(source / "clip.mp4")
    results = {}
    for kind in KINDS:
        proc = detect("--weights", str(weights.with_suffix(kind)), "--source", str(source), "--imgsz", str(IMGSZ),
                      "--save-txt", "--save-conf", "--save-csv", "--save-crop", "--view-img",
                      "--project", str(root / "runs"), "--name", kind[1:])
        assert proc.returncode == 0, proc.stdout
        results[kind] = root / "runs" / kind[1:], proc.stdout
    return results


def read_labels(save_dir: Path) -> dict[str, np.ndarray]:
    """labels/*.txt -> {file name: rows (class, x, y, w, h, conf)}."""
    return {f.name: np.loadtxt(f, ndmin=2) for f in sorted((save_dir / "labels").glob("*.txt"))}


def test_formats_give_the_same_detections(runs):
    labels = {kind: read_labels(save_dir) for kind, (save_dir, _) in runs.items()}
    reference = labels[".pt"]
    n_images, n_frames = len(IMAGES), VIDEO_FRAMES
    assert len(reference) == n_images + n_frames, sorted(reference)
    assert sum(len(rows) for rows in reference.values()) >= 50
    for kind in KINDS[1:]:
        assert sorted(labels[kind]) == sorted(reference), kind
        for name, rows in reference.items():
            other = labels[kind][name]
            assert len(other) == len(rows), (kind, name)
            ious = box_iou(xywh2xyxy(torch.from_numpy(rows[:, 1:5])), xywh2xyxy(torch.from_numpy(other[:, 1:5])))
            best = ious.max(1)
            assert (best.values > 0.99).all(), (kind, name, best.values.min())
            np.testing.assert_array_equal(rows[:, 0], other[best.indices.numpy(), 0])
            np.testing.assert_allclose(rows[:, 5], other[best.indices.numpy(), 5], atol=1e-3)


def test_outputs_are_saved_and_parse(runs):
    save_dir, log = runs[".pt"]
    labels = read_labels(save_dir)
    n_boxes = sum(len(rows) for rows in labels.values())
    assert {f.name for f in save_dir.glob("*.jpg")} == {p.name for p in IMAGES}
    assert {f"clip_{i}.txt" for i in range(1, VIDEO_FRAMES + 1)} <= set(labels)
    for rows in labels.values():
        assert rows.shape[1] == 6 and (rows[:, 1:5] >= 0).all() and (rows[:, 1:5] <= 1).all()
        assert ((rows[:, 5] >= 0.25) & (rows[:, 5] <= 1)).all()
    video = cv2.VideoCapture(str(save_dir / "clip.mp4"))
    assert int(video.get(cv2.CAP_PROP_FRAME_COUNT)) == VIDEO_FRAMES
    video.release()
    with open(save_dir / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == n_boxes and list(rows[0]) == ["Image Name", "Prediction", "Confidence", "xmin", "ymin",
                                                      "xmax", "ymax"]
    assert {r["Prediction"] for r in rows} <= {"RBC", "WBC", "Platelets"} and float(rows[0]["Confidence"]) >= 0.25
    crops = list((save_dir / "crops").rglob("*.jpg"))
    assert len(crops) == n_boxes and all(cv2.imread(str(c)) is not None for c in crops)
    n_files = len(IMAGES) + 1  # clip.mp4 sorts first
    assert re.search(rf"video 1/{n_files} \(1/{VIDEO_FRAMES}\) .*clip\.mp4: {IMGSZ}x{IMGSZ} (\d+ \w+, )+[\d.]+ms", log)
    assert re.search(rf"image 2/{n_files} .*shapes1\.jpg: {IMGSZ}x{IMGSZ} (\d+ \w+, )+[\d.]+ms", log)
    speed = SPEED_PATTERN.search(log)
    assert speed and all(float(ms) >= 0 for ms in speed.groups()) and f"input (1, 3, {IMGSZ}, {IMGSZ})" in log
    assert f"Outputs written to {save_dir}" in log and f"{len(labels)} label files in {save_dir / 'labels'}" in log
    assert "WARNING --view-img: no display available" in log


def test_save_one_box_grows_clips_and_squares_the_crop(tmp_path: Path):
    """Box sides scaled by 1.02 plus 10 px about the centre, edges truncated, clipped to the image; crops
    written as numbered JPEGs."""
    image = np.random.default_rng(0).integers(0, 255, (100, 200, 3), dtype=np.uint8)
    file = tmp_path / "crops" / "RBC" / "a.jpg"
    crop = save_one_box([50, 20, 90, 40], image, file)
    # width 40 -> 50.8 about x 70: columns 44.6-95.4 -> 44:95; height 20 -> 30.4 about y 30: rows 14.8-45.2 -> 14:45
    np.testing.assert_array_equal(crop, image[14:45, 44:95])
    save_one_box([50, 20, 90, 40], image, file)
    assert sorted(f.name for f in file.parent.iterdir()) == ["a.jpg", "a2.jpg"]
    square = save_one_box([50, 20, 90, 40], image, tmp_path / "b.jpg", square=True, save=False)
    np.testing.assert_array_equal(square, image[4:55, 44:95])  # both sides from the longer one (40)
    np.testing.assert_array_equal(save_one_box([-5, -5, 10, 10], image, file, save=False), image[0:15, 0:15])
    np.testing.assert_array_equal(save_one_box([190, 90, 210, 110], image, file, save=False), image[84:, 184:])
    assert not (tmp_path / "b.jpg").exists()


def test_speed_pattern_reads_our_line_and_upstreams():
    ours = speed_summary((1.25, 30.0, 0.5), (1, 3, 320, 320))
    upstream = "Speed: 2.2ms pre-process, 131.4ms inference, 78.0ms NMS per image at shape (32, 3, 640, 640)"
    assert SPEED_PATTERN.search(ours).groups() == ("1.2", "30.0", "0.5")
    assert SPEED_PATTERN.search(upstream).groups() == ("2.2", "131.4", "78.0")


def test_offline_stream_fails_fast(weights: Path, tmp_path: Path):
    start = time.monotonic()
    proc = detect("--weights", str(weights), "--source", "rtsp://127.0.0.1:9/live", "--project", str(tmp_path))
    assert proc.returncode == 2 and "ERROR: could not open stream rtsp://127.0.0.1:9/live" in proc.stdout
    assert time.monotonic() - start < 60


def test_missing_weights_is_a_clear_error(tmp_path: Path):
    proc = detect("--weights", str(tmp_path / "nope.pt"), "--project", str(tmp_path / "runs"))
    assert proc.returncode == 2, proc.stdout
    assert f"ERROR: --weights {tmp_path / 'nope.pt'}: file not found" in proc.stdout
    assert not (tmp_path / "runs").exists()
