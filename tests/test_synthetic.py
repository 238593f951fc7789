"""The embedded synthetic shapes dataset: deterministic, fast, well-formed labels that match the pixels."""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from tests.helpers import ROOT
from utils.datasets_check import DataConfigError, check_dataset
from utils.synthetic import CLASS_NAMES, _background, generate_shapes, render_image


@pytest.fixture(scope="module")
def full_set(tmp_path_factory) -> tuple[Path, float]:
    """The default 256 + 64 images at 320 px, and how long generating them took."""
    root = tmp_path_factory.mktemp("shapes") / "shapes"
    start = time.perf_counter()
    generate_shapes(root)
    return root, time.perf_counter() - start


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_generation_is_fast_and_byte_identical(full_set, tmp_path: Path):
    root, seconds = full_set
    assert seconds < 20  # typically 1-3 s on 2 shared cores
    generate_shapes(tmp_path / "again", n_train=10, n_val=5)  # same seeds per (split, index)
    again = _files(tmp_path / "again")
    reference = _files(root)
    assert len(again) == 30 and all(reference[name] == data for name, data in again.items())
    generate_shapes(tmp_path / "other", n_train=10, n_val=5, seed=1)
    assert _files(tmp_path / "other") != again


def test_labels_are_valid_and_varied(full_set):
    root, _ = full_set
    assert len(list((root / "images" / "train").iterdir())) == 256
    assert len(list((root / "images" / "val").iterdir())) == 64
    lines = [line.split() for f in (root / "labels").rglob("*.txt") for line in f.read_text().splitlines()]
    rows = np.array(lines, dtype=float)
    assert np.bincount(rows[:, 0].astype(int)).min() > 100  # every class well represented
    assert rows[:, 0].max() == len(CLASS_NAMES) - 1
    x1, y1 = rows[:, 1] - rows[:, 3] / 2, rows[:, 2] - rows[:, 4] / 2
    x2, y2 = rows[:, 1] + rows[:, 3] / 2, rows[:, 2] + rows[:, 4] / 2
    assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= 1).all() and (y2 <= 1).all()
    side = np.maximum(rows[:, 3], rows[:, 4]) * 320
    assert side.min() < 30 and side.max() > 85  # varied scales
    image = cv2.imread(str(root / "images" / "train" / "train_00000.jpg"))
    assert image.shape == (320, 320, 3)


def _isolated(boxes: np.ndarray, margin: float = 3) -> list[int]:
    """Indices of xyxy boxes that stay ``margin`` px away from every other box."""
    grown = boxes + [-margin, -margin, margin, margin]
    return [i for i, b in enumerate(grown) if not any(
        j != i and b[0] < o[2] and o[0] < b[2] and b[1] < o[3] and o[1] < b[3] for j, o in enumerate(grown))]


def test_boxes_are_tight_around_drawn_shapes():
    """Without noise, the pixels that differ from the bare background around a shape span exactly its box."""
    checked = 0
    for seed in range(10):
        image, labels = render_image(np.random.default_rng(seed), 160, noise=np.zeros((160, 160, 3), np.float32))
        bare = np.clip(_background(np.random.default_rng(seed), 160), 0, 255).astype(np.uint8)  # same draws
        changed = np.abs(image.astype(int) - bare).sum(-1) > 30
        xywh = labels[:, 1:] * 160
        boxes = np.concatenate((xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2), 1)
        for i in _isolated(boxes):
            x1, y1 = np.maximum(boxes[i, :2].astype(int) - 3, 0)
            x2, y2 = boxes[i, 2:].astype(int) + 4
            ys, xs = np.nonzero(changed[y1:y2, x1:x2])
            # partly covered edge pixels (pixel i spans [i, i + 1]) and anti-aliasing: within one pixel
            assert np.allclose([xs.min() + x1, ys.min() + y1], boxes[i, :2], atol=1.05)
            assert np.allclose([xs.max() + x1 + 1, ys.max() + y1 + 1], boxes[i, 2:], atol=1.05)
            checked += 1
    assert checked >= 10


def test_check_dataset_generates_atomically(tmp_path: Path):
    cfg = yaml.safe_load((ROOT / "data" / "shapes.yaml").read_text())
    cfg["path"] = str(tmp_path / "shapes")
    cfg["generate"].update(train=6, val=3, imgsz=64)
    d = check_dataset(cfg)
    assert len(list(Path(d["train"]).iterdir())) == 6 and len(list(Path(d["val"]).iterdir())) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["shapes"]  # the temporary folder was renamed
    assert d["names"] == dict(enumerate(CLASS_NAMES))
    cfg["names"] = ["a", "b"]
    cfg["path"] = str(tmp_path / "other")
    with pytest.raises(DataConfigError, match="'names' must be"):
        check_dataset(cfg)
