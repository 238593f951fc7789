"""Image augmentations with YOLOv5 semantics: letterbox, HSV jitter, random perspective, mosaic helpers, mixup, flips.

Boxes are passed as ``labels`` arrays (n, 5) = (class, x1, y1, x2, y2) in pixels unless a function says otherwise.
Randomness comes from Python's ``random`` and NumPy's global generator, like upstream; the dataset seeds both per
item (``SeededBatchSampler``), so every worker reproduces the same samples. Segment copy-paste is not implemented (boxes only).
"""

from __future__ import annotations

import math
import random

import cv2
import numpy as np

PAD_COLOR = (114, 114, 114)


def letterbox(
    im: np.ndarray,
    new_shape: int | tuple[int, int] = (640, 640),
    color: tuple[int, int, int] = PAD_COLOR,
    auto: bool = True,
    scaleFill: bool = False,  # noqa: N803 (upstream's keyword name)
    scaleup: bool = True,
    stride: int = 32,
) -> tuple[np.ndarray, tuple[float, float], tuple[float, float]]:
    """Resize ``im`` keeping its aspect ratio and pad it to ``new_shape`` (h, w).

    ``auto`` pads only up to the next multiple of ``stride`` (minimum rectangle); ``scaleFill`` stretches to the
    exact shape without padding; ``scaleup=False`` never enlarges. Returns (image, (rw, rh) gains, (dw, dh) padding
    on each side, possibly fractional: the left/top border is round(d - 0.1), the right/bottom round(d + 0.1)).
    """
    shape = im.shape[:2]
    if isinstance(new_shape, int):
        new_shape = (new_shape, new_shape)
    r = min(new_shape[0] / shape[0], new_shape[1] / shape[1])
    if not scaleup:
        r = min(r, 1.0)
    ratio = r, r
    new_unpad = int(round(shape[1] * r)), int(round(shape[0] * r))  # (w, h)
    dw, dh = new_shape[1] - new_unpad[0], new_shape[0] - new_unpad[1]
    if auto:
        dw, dh = np.mod(dw, stride), np.mod(dh, stride)
    elif scaleFill:
        dw, dh = 0.0, 0.0
        new_unpad = (new_shape[1], new_shape[0])
        ratio = new_shape[1] / shape[1], new_shape[0] / shape[0]
    dw, dh = dw / 2, dh / 2
    if shape[::-1] != new_unpad:
        im = cv2.resize(im, new_unpad, interpolation=cv2.INTER_LINEAR)
    top, bottom = int(round(dh - 0.1)), int(round(dh + 0.1))
    left, right = int(round(dw - 0.1)), int(round(dw + 0.1))
    im = cv2.copyMakeBorder(im, top, bottom, left, right, cv2.BORDER_CONSTANT, value=color)
    return im, ratio, (dw, dh)


def augment_hsv(im: np.ndarray, hgain: float = 0.5, sgain: float = 0.5, vgain: float = 0.5) -> None:
    """Scale hue, saturation and value of a uint8 BGR image in place by random gains in [1 - g, 1 + g]."""
    if not (hgain or sgain or vgain):
        return
    gains = np.random.uniform(-1, 1, 3) * [hgain, sgain, vgain] + 1
    hue, sat, val = cv2.split(cv2.cvtColor(im, cv2.COLOR_BGR2HSV))
    levels = np.arange(0, 256, dtype=gains.dtype)
    lut_hue = ((levels * gains[0]) % 180).astype(im.dtype)  # OpenCV hue range is [0, 180)
    lut_sat = np.clip(levels * gains[1], 0, 255).astype(im.dtype)
    lut_val = np.clip(levels * gains[2], 0, 255).astype(im.dtype)
    hsv = cv2.merge((cv2.LUT(hue, lut_hue), cv2.LUT(sat, lut_sat), cv2.LUT(val, lut_val)))
    cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR, dst=im)


def _random_warp_matrix(
    in_hw: tuple[int, int], out_hw: tuple[int, int], degrees: float, translate: float, scale: float, shear: float,
    perspective: float,
) -> tuple[np.ndarray, float]:
    """Compose centre -> perspective -> rotation/scale -> shear -> translation; returns (3x3 matrix, scale)."""
    centre = np.eye(3)
    centre[0, 2], centre[1, 2] = -in_hw[1] / 2, -in_hw[0] / 2
    persp = np.eye(3)
    persp[2, 0] = random.uniform(-perspective, perspective)
    persp[2, 1] = random.uniform(-perspective, perspective)
    rot = np.eye(3)
    angle = random.uniform(-degrees, degrees)
    s = random.uniform(1 - scale, 1 + scale)
    rot[:2] = cv2.getRotationMatrix2D(angle=angle, center=(0, 0), scale=s)
    shr = np.eye(3)
    shr[0, 1] = math.tan(random.uniform(-shear, shear) * math.pi / 180)
    shr[1, 0] = math.tan(random.uniform(-shear, shear) * math.pi / 180)
    trans = np.eye(3)
    trans[0, 2] = random.uniform(0.5 - translate, 0.5 + translate) * out_hw[1]
    trans[1, 2] = random.uniform(0.5 - translate, 0.5 + translate) * out_hw[0]
    return trans @ shr @ rot @ persp @ centre, s


def _warp_boxes(boxes: np.ndarray, matrix: np.ndarray, perspective: bool, out_hw: tuple[int, int]) -> np.ndarray:
    """Transform the 4 corners of each xyxy box and return their clipped axis-aligned hull (n, 4)."""
    n = len(boxes)
    corners = np.ones((n * 4, 3))
    corners[:, :2] = boxes[:, [0, 1, 2, 3, 0, 3, 2, 1]].reshape(n * 4, 2)  # x1y1, x2y2, x1y2, x2y1
    corners = corners @ matrix.T
    xy = (corners[:, :2] / corners[:, 2:3] if perspective else corners[:, :2]).reshape(n, 8)
    x, y = xy[:, [0, 2, 4, 6]], xy[:, [1, 3, 5, 7]]
    hull = np.stack((x.min(1), y.min(1), x.max(1), y.max(1)), 1)
    hull[:, [0, 2]] = hull[:, [0, 2]].clip(0, out_hw[1])
    hull[:, [1, 3]] = hull[:, [1, 3]].clip(0, out_hw[0])
    return hull


def random_perspective(
    im: np.ndarray,
    targets: np.ndarray | None = None,
    degrees: float = 10,
    translate: float = 0.1,
    scale: float = 0.1,
    shear: float = 10,
    perspective: float = 0.0,
    border: tuple[int, int] = (0, 0),
) -> tuple[np.ndarray, np.ndarray]:
    """Random affine (or perspective) warp of an image and its (n, 5) pixel-xyxy targets.

    The output is ``im`` grown by ``2 * border`` (negative borders crop a mosaic back to ``img_size``). Boxes are
    the hull of their warped corners, clipped, and kept only when ``box_candidates`` accepts them.
    """
    targets = np.zeros((0, 5)) if targets is None else targets
    out_hw = (im.shape[0] + border[0] * 2, im.shape[1] + border[1] * 2)
    matrix, s = _random_warp_matrix(im.shape[:2], out_hw, degrees, translate, scale, shear, perspective)
    if border[0] or border[1] or (matrix != np.eye(3)).any():
        dsize = (out_hw[1], out_hw[0])
        if perspective:
            im = cv2.warpPerspective(im, matrix, dsize=dsize, borderValue=PAD_COLOR)
        else:
            im = cv2.warpAffine(im, matrix[:2], dsize=dsize, borderValue=PAD_COLOR)
    if len(targets):
        new = _warp_boxes(targets[:, 1:5], matrix, bool(perspective), out_hw)
        keep = box_candidates(box1=targets[:, 1:5].T * s, box2=new.T, area_thr=0.10)
        targets = targets[keep]
        targets[:, 1:5] = new[keep]
    return im, targets


def box_candidates(
    box1: np.ndarray, box2: np.ndarray, wh_thr: float = 2, ar_thr: float = 100, area_thr: float = 0.1,
    eps: float = 1e-16,
) -> np.ndarray:
    """Mask of augmented boxes ``box2`` (4, n) worth keeping given the originals ``box1`` (4, n) scaled by the
    augmentation gain: both sides > ``wh_thr`` pixels, area kept > ``area_thr``, aspect ratio < ``ar_thr``."""
    w1, h1 = box1[2] - box1[0], box1[3] - box1[1]
    w2, h2 = box2[2] - box2[0], box2[3] - box2[1]
    aspect = np.maximum(w2 / (h2 + eps), h2 / (w2 + eps))
    return (w2 > wh_thr) & (h2 > wh_thr) & (w2 * h2 / (w1 * h1 + eps) > area_thr) & (aspect < ar_thr)


def mixup(im: np.ndarray, labels: np.ndarray, im2: np.ndarray, labels2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Blend two equally sized images with a Beta(32, 32) ratio and concatenate their labels (MixUp)."""
    r = np.random.beta(32.0, 32.0)
    im = (im * r + im2 * (1 - r)).astype(np.uint8)
    return im, np.concatenate((labels, labels2), 0)


def random_flip(im: np.ndarray, labels: np.ndarray, flipud: float, fliplr: float) -> tuple[np.ndarray, np.ndarray]:
    """Flip up-down with probability ``flipud`` then left-right with ``fliplr``; ``labels`` are normalized xywh."""
    if random.random() < flipud:
        im = np.flipud(im)
        labels[:, 2] = 1 - labels[:, 2]
    if random.random() < fliplr:
        im = np.fliplr(im)
        labels[:, 1] = 1 - labels[:, 1]
    return im, labels


def mosaic4_tile(slot: int, xc: int, yc: int, s: int, h: int, w: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Where tile ``slot`` (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right) of an (h, w) image goes in a
    2s x 2s mosaic centred at (xc, yc): returns (canvas x1, y1, x2, y2) and the matching (image x1, y1, x2, y2)."""
    if slot == 0:
        dst = max(xc - w, 0), max(yc - h, 0), xc, yc
        return dst, (w - (dst[2] - dst[0]), h - (dst[3] - dst[1]), w, h)
    if slot == 1:
        dst = xc, max(yc - h, 0), min(xc + w, s * 2), yc
        return dst, (0, h - (dst[3] - dst[1]), min(w, dst[2] - dst[0]), h)
    if slot == 2:
        dst = max(xc - w, 0), yc, xc, min(s * 2, yc + h)
        return dst, (w - (dst[2] - dst[0]), 0, w, min(dst[3] - dst[1], h))
    dst = xc, yc, min(xc + w, s * 2), min(s * 2, yc + h)
    return dst, (0, 0, min(w, dst[2] - dst[0]), min(dst[3] - dst[1], h))


def mosaic9_origin(
    slot: int, s: int, hw: tuple[int, int], centre_hw: tuple[int, int], prev_hw: tuple[int, int]
) -> tuple[int, int]:
    """Top-left corner (x, y) of tile ``slot`` in a 3s x 3s nine-image mosaic.

    Slot 0 is the centre image at (s, s); slots 1-8 go round it clockwise from the top (top, top-right, right,
    bottom-right, bottom, bottom-left, left, top-left), each abutting the centre tile or the previous tile.
    """
    (h, w), (h0, w0), (hp, wp) = hw, centre_hw, prev_hw
    origins = (
        (s, s),
        (s, s - h),
        (s + wp, s - h),
        (s + w0, s),
        (s + w0, s + hp),
        (s + w0 - w, s + h0),
        (s + w0 - wp - w, s + h0),
        (s - w, s + h0 - h),
        (s - w, s + h0 - hp - h),
    )
    return origins[slot]

