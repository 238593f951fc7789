"""Deterministic synthetic detection dataset ("shapes"), the repository's embedded default (data/shapes.yaml).

Each image has a muted colour gradient with stripe texture, a few clutter lines and pixel noise as background,
and 4-10 filled, anti-aliased shapes (circle, square, triangle, star, ellipse; 3% of images have none) of random
size (8-30% of the image side), position, rotation and vivid contrasting colour. Shapes may partly occlude each
other, never hide one another. Labels are the tight boxes of the drawn polygons in YOLO format. Every image is
drawn from its own NumPy generator seeded by (seed, split, index), so the output is byte-identical between runs.
Many large, contrasted objects per image make the set learnable from scratch in minutes on a CPU.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

CLASS_NAMES = ("circle", "square", "triangle", "star", "ellipse")
SPLITS = ("train", "val")
JPEG_QUALITY = 90
MIN_CONTRAST = 150  # minimum L1 distance (sum over BGR) between an object's colour and the background under it
SUBPIXEL_BITS = 4
NOISE_SIGMA = 6.0
BG_TINT = 40  # background colour deviation from grey (muted backgrounds make vivid shapes stand out)
MIN_EXTENT, MAX_EXTENT = 0.08, 0.3  # object size range as a fraction of the image side (log-uniform)


def _regular_polygon(n: int, radius: float, phase: float) -> np.ndarray:
    angles = phase + 2 * math.pi * np.arange(n) / n
    return radius * np.stack((np.cos(angles), np.sin(angles)), 1)


def _ellipse(a: float, b: float, angle: float, n: int = 72) -> np.ndarray:
    t = 2 * math.pi * np.arange(n) / n
    x, y = a * np.cos(t), b * np.sin(t)
    c, s = math.cos(angle), math.sin(angle)
    return np.stack((x * c - y * s, x * s + y * c), 1)


def shape_polygon(cls: int, size: float, rng: np.random.Generator) -> np.ndarray:
    """Outline (k, 2) of shape class ``cls`` of extent ~``size`` px, centred at the origin, randomly rotated."""
    angle = rng.uniform(0, 2 * math.pi)
    r = size / 2
    name = CLASS_NAMES[cls]
    if name == "circle":
        return _ellipse(r, r, 0.0)
    if name == "square":
        return _regular_polygon(4, r, angle)
    if name == "triangle":
        return _regular_polygon(3, r, angle)
    if name == "star":
        outer, inner = _regular_polygon(5, r, angle), _regular_polygon(5, 0.45 * r, angle + math.pi / 5)
        return np.stack((outer, inner), 1).reshape(10, 2)
    return _ellipse(r, r * rng.uniform(0.35, 0.6), angle)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth, muted random colour field with a sinusoidal stripe texture and a few thin clutter lines (float32)."""
    grey = rng.uniform(50, 205, (4, 4, 1))
    coarse = (grey + rng.uniform(-BG_TINT, BG_TINT, (4, 4, 3))).astype(np.float32)
    bg = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_LINEAR)
    angle, period = rng.uniform(0, math.pi), rng.uniform(6, 40)
    coords = np.arange(size, dtype=np.float32)
    phase = (coords[None, :] * math.cos(angle) + coords[:, None] * math.sin(angle)) * (2 * math.pi / period)
    bg += (rng.uniform(3, 15) * np.sin(phase))[..., None]
    for _ in range(rng.integers(0, 3)):
        p1, p2 = rng.integers(0, size, 2), rng.integers(0, size, 2)
        colour = tuple(float(v) for v in rng.uniform(0, 255, 3))
        cv2.line(bg, (int(p1[0]), int(p1[1])), (int(p2[0]), int(p2[1])), colour, int(rng.integers(1, 3)), cv2.LINE_AA)
    return bg


def _saturated_colour(rng: np.random.Generator) -> np.ndarray:
    """A random vivid BGR colour (HSV saturation >= 0.6, value >= 0.5)."""
    hsv = np.array([[[rng.uniform(0, 180), rng.uniform(153, 255), rng.uniform(128, 255)]]], dtype=np.float32)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2BGR)[0, 0].astype(np.float64)


def _contrasting_colour(rng: np.random.Generator, under: np.ndarray) -> tuple[float, float, float]:
    """A vivid colour far (L1 >= MIN_CONTRAST) from the mean background colour ``under``."""
    for _ in range(20):
        colour = _saturated_colour(rng)
        if np.abs(colour - under).sum() >= MIN_CONTRAST:
            return tuple(float(v) for v in colour)
    return tuple(float(v) for v in np.where(under > 127, 0.0, 255.0))


def _fits(box: np.ndarray, boxes: list[np.ndarray]) -> bool:
    """Whether ``box`` overlaps every earlier box only partly (IoU <= 0.3, covers <= 40% of it)."""
    for other in boxes:
        iw = min(box[2], other[2]) - max(box[0], other[0])
        ih = min(box[3], other[3]) - max(box[1], other[1])
        inter = max(iw, 0) * max(ih, 0)
        area, other_area = (box[2] - box[0]) * (box[3] - box[1]), (other[2] - other[0]) * (other[3] - other[1])
        if inter / (area + other_area - inter) > 0.3 or inter / other_area > 0.4:
            return False
    return True


def render_image(rng: np.random.Generator, size: int = 320, noise: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """One uint8 BGR image and its labels (n, 5) = (class, x, y, w, h) normalized.

    ``noise`` is a float32 (>= size, >= size, 3) bank of pixel noise, of which a random window is added (drawing
    fresh Gaussian noise for every image would dominate the generation time); fresh noise when None.
    """
    image = _background(rng, size)
    n_objects = 0 if rng.random() < 0.03 else int(rng.integers(4, 11))
    boxes, labels = [], []
    for _ in range(n_objects * 5):  # a few placement attempts per object
        if len(labels) == n_objects:
            break
        cls = int(rng.integers(len(CLASS_NAMES)))
        extent = size * math.exp(rng.uniform(math.log(MIN_EXTENT), math.log(MAX_EXTENT)))
        polygon = shape_polygon(cls, extent, rng)
        low, high = polygon.min(0), polygon.max(0)
        offset = rng.uniform(1 - low, size - 1 - high)
        box = np.concatenate((low + offset, high + offset))
        if not _fits(box, boxes):
            continue
        x1, y1, x2, y2 = box.astype(int)
        colour = _contrasting_colour(rng, image[y1:y2 + 1, x1:x2 + 1].reshape(-1, 3).mean(0))
        # continuous coordinates (pixel i spans [i, i + 1]) -> OpenCV's (pixel i centred at i)
        points = np.round((polygon + offset - 0.5) * (1 << SUBPIXEL_BITS)).astype(np.int32)
        cv2.fillPoly(image, [points], colour, cv2.LINE_AA, SUBPIXEL_BITS)
        boxes.append(box)
        labels.append([cls, (box[0] + box[2]) / 2 / size, (box[1] + box[3]) / 2 / size,
                       (box[2] - box[0]) / size, (box[3] - box[1]) / size])
    if noise is None:
        noise = NOISE_SIGMA * rng.standard_normal((size, size, 3), dtype=np.float32)
    y0, x0 = rng.integers(0, noise.shape[0] - size + 1), rng.integers(0, noise.shape[1] - size + 1)
    image += noise[y0:y0 + size, x0:x0 + size]
    return np.clip(image, 0, 255).astype(np.uint8), np.array(labels, dtype=np.float64).reshape(-1, 5)


def generate_shapes(root: str | Path, n_train: int = 256, n_val: int = 64, imgsz: int = 320, seed: int = 0
                    ) -> dict[str, int]:
    """Write ``root/images/{train,val}/*.jpg`` and ``root/labels/{train,val}/*.txt``; returns image counts."""
    root = Path(root)
    counts = dict(zip(SPLITS, (n_train, n_val)))
    noise = NOISE_SIGMA * np.random.default_rng(seed).standard_normal((2 * imgsz, 2 * imgsz, 3), dtype=np.float32)
    for split_id, (split, n) in enumerate(counts.items()):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image, labels = render_image(np.random.default_rng([seed, split_id, i]), imgsz, noise)
            ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
            if not ok:
                raise RuntimeError("JPEG encoding failed")
            (root / "images" / split / f"{split}_{i:05d}.jpg").write_bytes(jpeg.tobytes())
            rows = "".join(f"{int(c)} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n" for c, x, y, w, h in labels)
            (root / "labels" / split / f"{split}_{i:05d}.txt").write_text(rows, encoding="utf-8")
    return counts
