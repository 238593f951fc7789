"""Augmentation semantics and invariants: boxes must stay on the pixels they label."""

from __future__ import annotations

import random
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from utils.augmentations import augment_hsv, box_candidates, letterbox, mixup, random_flip, random_perspective
from utils.dataloaders import LoadImagesAndLabels

# one unique BGR colour per class, far from each other and from the grey padding (114)
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]
NO_COLOUR = dict(hsv_h=0.0, hsv_s=0.0, hsv_v=0.0, mixup=0.0)


def _hyp(**kwargs) -> dict:
    base = dict(degrees=0.0, translate=0.1, scale=0.5, shear=0.0, perspective=0.0, flipud=0.0, fliplr=0.5,
                mosaic=1.0, **NO_COLOUR)
    return {**base, **kwargs}


@pytest.fixture(scope="module")
def rect_dataset(tmp_path_factory) -> Path:
    """8 images of various sizes on dark backgrounds, each with 2-3 filled rectangles of class-unique colours."""
    images = tmp_path_factory.mktemp("rects") / "images"
    labels = images.parent / "labels"
    images.mkdir()
    labels.mkdir()
    rng = np.random.default_rng(0)
    for k in range(8):
        h, w = int(rng.integers(80, 160)), int(rng.integers(80, 160))
        im = np.full((h, w, 3), 30, np.uint8)
        rows = []
        for j, cls in enumerate(rng.choice(len(COLOURS), 3, replace=False)):
            x1, y1 = int(w * (0.05 + 0.3 * j)), int(rng.integers(0, h // 2))
            x2, y2 = x1 + int(w * 0.25), y1 + int(rng.integers(h // 4, h // 2))
            im[y1:y2, x1:x2] = COLOURS[cls]
            rows.append(f"{cls} {(x1 + x2) / 2 / w} {(y1 + y2) / 2 / h} {(x2 - x1) / w} {(y2 - y1) / h}")
        cv2.imwrite(str(images / f"{k}.png"), im)
        (labels / f"{k}.txt").write_text("\n".join(rows) + "\n")
    return images


def _box_fill(img_chw: torch.Tensor, targets: torch.Tensor) -> list[float]:
    """Fraction of pixels inside each normalized xywh target box that have the target class's colour."""
    img = img_chw.numpy().transpose(1, 2, 0)[..., ::-1]  # RGB CHW -> BGR HWC
    h, w = img.shape[:2]
    fills = []
    for _, cls, x, y, bw, bh in targets.tolist():
        x1, x2 = round((x - bw / 2) * w), round((x + bw / 2) * w)
        y1, y2 = round((y - bh / 2) * h), round((y + bh / 2) * h)
        patch = img[y1:y2, x1:x2].astype(int)
        near = np.abs(patch - np.array(COLOURS[int(cls)])).sum(-1) < 90
        fills.append(near.mean() if near.size else 0.0)
    return fills


@pytest.mark.parametrize(
    ("hyp", "median_fill", "min_fill"),
    [
        (_hyp(), 0.9, 0.7),  # mosaic + scale/translate + random left-right flip (small boxes: blurred edges)
        (_hyp(flipud=1.0, fliplr=1.0), 0.9, 0.7),  # both flips always
        (_hyp(degrees=8.0, shear=3.0), 0.75, 0.3),  # rotated boxes are hulls: partly background
        (_hyp(perspective=0.0005), 0.75, 0.3),
        (_hyp(mosaic9=1.0), 0.9, 0.7),  # nine-image mosaic
        (_hyp(mosaic=0.0, degrees=5.0), 0.75, 0.3),  # letterbox + perspective without mosaic
    ],
)
def test_boxes_stay_on_their_pixels(rect_dataset: Path, hyp: dict, median_fill: float, min_fill: float):
    ds = LoadImagesAndLabels(rect_dataset, img_size=128, batch_size=4, augment=True, hyp=hyp)
    random.seed(0)
    np.random.seed(0)
    fills, shifted, n = [], [], 0
    for i in range(len(ds)):
        img, targets, _, _ = ds[i]
        assert img.shape == (3, 128, 128) and img.dtype == torch.uint8
        assert (targets[:, 2:] >= 0).all() and (targets[:, 2:] <= 1).all()
        fills += _box_fill(img, targets)
        shifted += _box_fill(img, targets + torch.tensor([0, 0, 0.15, 0.15, 0, 0]))  # control: misaligned boxes
        n += len(targets)
    assert n >= len(ds)  # augmentation keeps most boxes
    assert np.median(fills) > median_fill and min(fills) > min_fill
    assert np.median(shifted) < 0.5


def test_letterbox_shapes_padding_and_ratio():
    im = np.full((100, 200, 3), 7, np.uint8)
    out, ratio, (dw, dh) = letterbox(im, 128, auto=False)
    assert out.shape == (128, 128, 3) and ratio == (0.64, 0.64) and (dw, dh) == (0.0, 32.0)
    assert (out[:32] == 114).all() and (out[-32:] == 114).all() and (out[32:96] == 7).all()
    out, _, (dw, dh) = letterbox(im, 128, auto=True, stride=32)  # minimum rectangle: 64 -> 64 rows
    assert out.shape == (64, 128, 3) and dh == 0
    out, ratio, _ = letterbox(im, (128, 128), scaleFill=True, auto=False)
    assert out.shape == (128, 128, 3) and ratio == (0.64, 1.28)
    out, ratio, (dw, dh) = letterbox(im, (256, 352), auto=False, scaleup=False)  # never enlarge
    assert ratio == (1.0, 1.0) and out.shape == (256, 352, 3) and (dw, dh) == (76.0, 78.0)
    odd, _, (dw, dh) = letterbox(np.zeros((10, 20, 3), np.uint8), (13, 20), auto=False, scaleup=False)
    assert dh == 1.5 and (odd[:1] == 114).all() and (odd[1:11] == 0).all() and (odd[11:] == 114).all()


def test_load_image_interpolation(rect_dataset: Path):
    """INTER_AREA when shrinking for evaluation, INTER_LINEAR when augmenting (upstream's choice)."""
    original = cv2.imread(str(sorted(rect_dataset.iterdir())[0]))
    h0, w0 = original.shape[:2]
    for augment, interp in ((False, cv2.INTER_AREA), (True, cv2.INTER_LINEAR)):
        ds = LoadImagesAndLabels(rect_dataset, img_size=50, batch_size=4, augment=augment, hyp=_hyp())
        im, hw0, hw = ds.load_image(0)
        r = 50 / max(h0, w0)
        expected = cv2.resize(original, (int(np.ceil(w0 * r)), int(np.ceil(h0 * r))), interpolation=interp)
        assert hw0 == (h0, w0) and hw == expected.shape[:2] and np.array_equal(im, expected)


def test_random_perspective_identity_and_border():
    im = np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    targets = np.array([[1, 10, 10, 40, 30]], dtype=np.float32)
    out, t = random_perspective(im, targets.copy(), degrees=0, translate=0, scale=0, shear=0)
    assert np.array_equal(out, im) and np.allclose(t, targets)
    canvas = np.full((128, 128, 3), 50, np.uint8)
    out, t = random_perspective(canvas, np.zeros((0, 5)), degrees=0, translate=0, scale=0, shear=0,
                                border=(-32, -32))
    assert out.shape == (64, 64, 3) and len(t) == 0


def test_box_candidates_filters_small_thin_and_shrunk():
    before = np.array([[0, 0, 10, 10]] * 4, dtype=float).T
    after = np.array([[0, 0, 10, 10], [0, 0, 1.5, 10], [0, 0, 3, 3], [0, 0, 9, 9]], dtype=float).T
    assert box_candidates(before, after).tolist() == [True, False, False, True]


def test_hsv_flip_mixup():
    im = np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    same = im.copy()
    augment_hsv(same, 0, 0, 0)
    assert np.array_equal(same, im)
    np.random.seed(0)
    changed = im.copy()
    augment_hsv(changed, 0.5, 0.5, 0.5)
    assert changed.dtype == np.uint8 and not np.array_equal(changed, im)
    labels = np.array([[0, 0.25, 0.1, 0.2, 0.2]], dtype=np.float32)
    flipped, lb = random_flip(im, labels.copy(), flipud=1.0, fliplr=1.0)
    assert np.array_equal(flipped, im[::-1, ::-1]) and np.allclose(lb, [[0, 0.75, 0.9, 0.2, 0.2]])
    mixed, both = mixup(im, labels, np.zeros_like(im), labels + 1)
    assert mixed.shape == im.shape and len(both) == 2
    assert (mixed <= im).all() and mixed.mean() > 0.3 * im.mean()
