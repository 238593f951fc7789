"""Augmentation semantics and invariants: boxes must stay on the pixels they label."""

from __future__ import annotations

import random
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from utils.augmentations import (
    AugmentPolicy,
    RandomFlip,
    RandomHSV,
    RandomPerspective,
    Sample,
    WarpParams,
    apply_hsv_gains,
    blend,
    box_candidates,
    draw_mixup_weight,
    flip_sample,
    letterbox,
    mosaic4_origins,
    mosaic9_origins,
    paste_tiles,
    warp_sample,
)
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
    ("hyp", "median_fill", "low_fill"),
    [
        (_hyp(), 0.9, 0.7),  # mosaic + scale/translate + random left-right flip
        (_hyp(flipud=1.0, fliplr=1.0), 0.9, 0.7),  # both flips always
        (_hyp(degrees=8.0, shear=3.0), 0.7, 0.4),  # rotated boxes are hulls: partly background
        (_hyp(perspective=0.0005), 0.75, 0.6),
        (_hyp(mosaic9=1.0), 0.9, 0.6),  # nine-image mosaic
        (_hyp(mosaic=0.0, degrees=5.0), 0.75, 0.6),  # letterbox + perspective without mosaic
    ],
)
def test_boxes_stay_on_their_pixels(rect_dataset: Path, hyp: dict, median_fill: float, low_fill: float):
    """Most of each box has its class's colour. Boxes 2-3 pixels thin have blurred edges, hence a low quantile
    (5%) rather than the minimum."""
    ds = LoadImagesAndLabels(rect_dataset, img_size=128, batch_size=4, augment=True, hyp=hyp)
    fills, shifted, n = [], [], 0
    for seed in range(3):
        for i in range(len(ds)):
            img, targets, _, _ = ds[(i, 100 * seed + i)]
            assert img.shape == (3, 128, 128) and img.dtype == torch.uint8
            assert (targets[:, 2:] >= 0).all() and (targets[:, 2:] <= 1).all()
            fills += _box_fill(img, targets)
            shifted += _box_fill(img, targets + torch.tensor([0, 0, 0.15, 0.15, 0, 0]))  # control: misaligned boxes
            n += len(targets)
    assert n >= 3 * len(ds)  # augmentation keeps most boxes
    assert np.median(fills) > median_fill and np.quantile(fills, 0.05) > low_fill
    assert np.median(shifted) < 0.5


def test_seeded_items_are_reproducible(rect_dataset: Path):
    ds = LoadImagesAndLabels(rect_dataset, img_size=128, batch_size=4, augment=True, hyp=_hyp(mixup=0.5))
    for i in range(4):
        a, b, c = ds[(i, 7)], ds[(i, 7)], ds[(i, 8)]
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert not torch.equal(a[0], c[0])
    random.seed(0)  # unseeded items follow NumPy's global generator
    np.random.seed(0)
    first = ds[0]
    np.random.seed(0)
    assert torch.equal(ds[0][0], first[0])


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
    """INTER_AREA when shrinking for evaluation, INTER_LINEAR when augmenting."""
    original = cv2.imread(str(sorted(rect_dataset.iterdir())[0]))
    h0, w0 = original.shape[:2]
    for augment, interp in ((False, cv2.INTER_AREA), (True, cv2.INTER_LINEAR)):
        ds = LoadImagesAndLabels(rect_dataset, img_size=50, batch_size=4, augment=augment, hyp=_hyp())
        im, hw0, hw = ds.load_image(0)
        r = 50 / max(h0, w0)
        expected = cv2.resize(original, (int(np.ceil(w0 * r)), int(np.ceil(h0 * r))), interpolation=interp)
        assert hw0 == (h0, w0) and hw == expected.shape[:2] and np.array_equal(im, expected)


def _boxes_sample(h=64, w=96) -> Sample:
    im = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
    return Sample(im, np.array([[1, 10, 10, 40, 30], [2, 50, 20, 90, 60]], dtype=np.float32))


def test_warp_identity_border_and_known_geometry():
    sample = _boxes_sample()
    same = warp_sample(sample, WarpParams(), sample.hw)
    assert np.array_equal(same.image, sample.image) and np.array_equal(same.labels, sample.labels)
    cropped = RandomPerspective(border=(-16, -16))(Sample(np.full((128, 128, 3), 50, np.uint8), np.zeros((0, 5))),
                                                   np.random.default_rng(0))
    assert cropped.image.shape == (96, 96, 3) and len(cropped.labels) == 0
    # a 90-degree turn about the centre of a square image maps (x, y) to (y, w - x)
    square = Sample(np.zeros((64, 64, 3), np.uint8), np.array([[0, 4, 8, 20, 40]], dtype=np.float32))
    turned = warp_sample(square, WarpParams(angle=90), (64, 64))
    np.testing.assert_allclose(turned.labels, [[0, 8, 44, 40, 60]], atol=1e-4)
    shifted = warp_sample(square, WarpParams(centre=(0.75, 0.5)), (64, 64))  # centre moves 16 px right
    np.testing.assert_allclose(shifted.labels, [[0, 20, 8, 36, 40]], atol=1e-4)
    zoomed = warp_sample(square, WarpParams(zoom=2.0), (128, 128))  # about the centre, into a 2x canvas
    np.testing.assert_allclose(zoomed.labels, [[0, 8, 16, 40, 80]], atol=1e-4)


def test_warp_drops_boxes_pushed_out_or_squashed():
    sample = _boxes_sample()
    out = warp_sample(sample, WarpParams(centre=(1.0, 0.5)), sample.hw)  # image shifted right by half its width
    assert out.labels[:, 0].tolist() == [1.0]  # the right box left the image; the left one moved along
    np.testing.assert_allclose(out.labels[0, 1:], [58, 10, 88, 30], atol=1e-4)
    assert (out.image[:, :48] == 114).all()


def test_box_candidates_filters_small_thin_and_shrunk():
    before = np.array([[0, 0, 10, 10]] * 5, dtype=float)
    after = np.array([[0, 0, 10, 10], [0, 0, 1.5, 10], [0, 0, 3, 3], [0, 0, 9, 9], [0, 0, 2.5, 300]], dtype=float)
    assert box_candidates(before, after).tolist() == [True, False, False, True, False]


def test_random_perspective_draws_span_each_range():
    warp = RandomPerspective(degrees=10, translate=0.1, scale=0.5, shear=3, perspective=0.001)
    draws = [warp.draw(np.random.default_rng(seed)) for seed in range(2000)]
    for values, low, high in (([d.angle for d in draws], -10, 10), ([d.zoom for d in draws], 0.5, 1.5),
                              ([s for d in draws for s in d.shear], -3, 3),
                              ([c for d in draws for c in d.centre], 0.4, 0.6),
                              ([p for d in draws for p in d.perspective], -0.001, 0.001)):
        values = np.array(values)
        span = high - low
        assert low <= values.min() < low + 0.02 * span and high - 0.02 * span < values.max() <= high
        assert abs(values.mean() - (low + high) / 2) < 0.05 * span  # uniform: centred
        assert abs(values.std() - span / 12**0.5) < 0.05 * span
    assert RandomPerspective().draw(np.random.default_rng(0)) == WarpParams()


def test_hsv_gains_and_jitter():
    im = np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    assert np.array_equal(apply_hsv_gains(im, np.ones(3)), cv2.cvtColor(cv2.cvtColor(im, cv2.COLOR_BGR2HSV),
                                                                           cv2.COLOR_HSV2BGR))
    grey = np.full((4, 4, 3), 100, np.uint8)
    assert (apply_hsv_gains(grey, [1.0, 1.0, 1.5]) == 150).all() and (apply_hsv_gains(grey, [1, 1, 3]) == 255).all()
    blue = np.full((1, 1, 3), (255, 0, 0), np.uint8)  # OpenCV hue 120
    hue = cv2.cvtColor(apply_hsv_gains(blue, [1.6, 1, 1]), cv2.COLOR_BGR2HSV)[0, 0, 0]
    assert abs(int(hue) - 12) <= 1  # 120 * 1.6 = 192 wraps round the 180-step hue circle to 12
    sample = Sample(im, np.zeros((0, 5)))
    assert RandomHSV()(sample, np.random.default_rng(0)) is sample
    gains = np.array([RandomHSV(0.015, 0.7, 0.4).draw(np.random.default_rng(s)) for s in range(2000)])
    assert (gains.min(0) >= [0.985, 0.3, 0.6]).all() and (gains.max(0) <= [1.015, 1.7, 1.4]).all()
    np.testing.assert_allclose(gains.mean(0), 1.0, atol=0.03)
    changed = RandomHSV(0.5, 0.5, 0.5)(sample, np.random.default_rng(0))
    assert changed.image.dtype == np.uint8 and not np.array_equal(changed.image, im)


def test_flips_move_boxes_with_pixels():
    sample = _boxes_sample()
    flipped = flip_sample(sample, vertical=True, horizontal=True)
    assert np.array_equal(flipped.image, sample.image[::-1, ::-1])
    np.testing.assert_allclose(flipped.labels, [[1, 56, 34, 86, 54], [2, 6, 4, 46, 44]])
    assert RandomFlip()(sample, np.random.default_rng(0)) is sample
    hits = np.zeros(2)
    for seed in range(1000):
        out = RandomFlip(0.3, 0.8)(sample, np.random.default_rng(seed))
        hits += [out.labels[0, 2] != 10, out.labels[0, 1] != 10]  # y1 changes with a vertical flip, x1 horizontal
    np.testing.assert_allclose(hits / 1000, [0.3, 0.8], atol=0.05)


def test_mixup_blends_pixels_and_keeps_both_box_sets():
    a = Sample(np.full((8, 8, 3), 200, np.uint8), np.zeros((1, 5)))
    b = Sample(np.full((8, 8, 3), 100, np.uint8), np.ones((2, 5)))
    mixed = blend(a, b, 0.25)
    assert (mixed.image == 125).all() and len(mixed.labels) == 3 and mixed.image.dtype == np.uint8
    weights = np.array([draw_mixup_weight(np.random.default_rng(s)) for s in range(4000)])
    # Beta(32, 32): mean 1/2, variance 1/260
    assert abs(weights.mean() - 0.5) < 0.005 and abs(weights.var() - 1 / 260) < 0.0005


def test_mosaic_layouts():
    hw = np.array([[30, 40], [20, 50], [60, 10], [25, 25]])
    origins = mosaic4_origins(hw, (64, 70))
    assert origins.tolist() == [[24, 40], [64, 50], [54, 70], [64, 70]]  # corners all touch (64, 70)
    tiles = [Sample(np.full((h, w, 3), k, np.uint8), np.array([[k, 0, 0, w, h]], np.float32))
             for k, (h, w) in enumerate(hw)]
    canvas = paste_tiles(tiles, origins, 96)
    assert canvas.image.shape == (96, 96, 3) and canvas.image[69, 63, 0] == 0 and canvas.image[70, 64, 0] == 3
    assert canvas.labels[2].tolist() == [2, 54, 70, 64, 96]  # clipped at the canvas edge
    nine = np.array([[40, 40], [10, 20], [15, 30], [20, 10], [5, 5], [30, 20], [10, 10], [25, 15], [12, 18]])
    o = mosaic9_origins(nine, 64)
    assert o[0].tolist() == [64, 64] and o[1].tolist() == [64, 54] and o[2].tolist() == [84, 49]
    assert o[3].tolist() == [104, 64] and o[4].tolist() == [104, 84] and o[5].tolist() == [84, 104]
    assert o[6].tolist() == [74, 104] and o[7].tolist() == [49, 79] and o[8].tolist() == [46, 67]


def test_policy_reads_every_hyperparameter():
    hyp = dict(hsv_h=0.1, hsv_s=0.2, hsv_v=0.3, degrees=4.0, translate=0.05, scale=0.6, shear=2.0, perspective=1e-4,
               flipud=0.25, fliplr=0.75, mosaic=0.9, mixup=0.15, copy_paste=0.5)
    policy = AugmentPolicy.from_hyp(hyp)
    assert policy.warp == RandomPerspective(4.0, 0.05, 0.6, 2.0, 1e-4)
    assert policy.photometric.transforms == [RandomHSV(0.1, 0.2, 0.3), RandomFlip(0.25, 0.75)]
    assert (policy.mosaic, policy.mosaic9, policy.mixup) == (0.9, 0.0, 0.15)
    assert policy.mosaic_warp(640) == RandomPerspective(4.0, 0.05, 0.6, 2.0, 1e-4, border=(-320, -320))
    assert AugmentPolicy.from_hyp(None).warp == RandomPerspective()
