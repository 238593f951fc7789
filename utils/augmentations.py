"""Image augmentations as small composable transforms, with the hyperparameter meanings of data/hyps/*.yaml.

A ``Sample`` is an HWC BGR uint8 image with its boxes as an (n, 5) array of (class, x1, y1, x2, y2) in pixels.
Random transforms take a ``numpy.random.Generator`` from the caller, so an item's augmentation depends on that
generator's seed alone. Each one first draws its parameters (``draw``) and then applies them with a deterministic
function, so tests can check the distributions and the geometry separately.

What each training hyperparameter means here:

- ``hsv_h``, ``hsv_s``, ``hsv_v``: hue, saturation and value are multiplied by gains drawn from U(1 - g, 1 + g);
  hue wraps round OpenCV's 180-step circle, saturation and value saturate at 255.
- ``degrees``: rotation angle ~ U(-degrees, degrees). ``scale``: zoom ~ U(1 - scale, 1 + scale). ``shear``:
  horizontal and vertical shear angles ~ U(-shear, shear) degrees each. ``perspective``: the two projective terms
  ~ U(-p, p) each. ``translate``: the image centre lands at U(0.5 - t, 0.5 + t) of the output width and height.
  The warp moves the image centre to the origin, applies perspective, then rotation and zoom, then shear, then the
  translation. Boxes become the clipped hull of their warped corners; ``box_candidates`` drops the ones the warp
  made too small, too thin or mostly cut off.
- ``flipud``, ``fliplr``: probabilities of a vertical and a horizontal flip.
- ``mosaic``: probability that a training item is a mosaic of 4 images (``mosaic9``, optional: the share of
  mosaics made of 9 images instead). ``mixup``: probability of blending a mosaic with a second one, the first
  image weighted by r ~ Beta(32, 32).
- ``copy_paste``: pastes segment masks; this pipeline reads boxes only, so it has no effect.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

PAD_VALUE = 114
PAD_COLOR = (PAD_VALUE, PAD_VALUE, PAD_VALUE)
MIXUP_BETA = 32.0  # both shape parameters of the mixup weight's Beta distribution


@dataclass
class Sample:
    """An HWC BGR uint8 image and its (n, 5) boxes: class, x1, y1, x2, y2 in pixels."""

    image: np.ndarray
    labels: np.ndarray

    @property
    def hw(self) -> tuple[int, int]:
        return self.image.shape[:2]


class Compose:
    """Apply transforms in order; ``None`` entries (disabled augmentations) are left out."""

    def __init__(self, *transforms) -> None:
        self.transforms = [t for t in transforms if t is not None]

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        for transform in self.transforms:
            sample = transform(sample, rng)
        return sample


# ------------------------------------------------------------------------------------------------------ letterbox


def letterbox_geometry(
    src_hw: tuple[int, int], new_shape, auto: bool = True, scale_fill: bool = False, scaleup: bool = True,
    stride: int = 32,
) -> tuple[tuple[int, int], tuple[float, float], tuple[float, float]]:
    """Where ``letterbox`` puts an image of ``src_hw``: ((w, h) after resizing, (x gain, y gain), (dw, dh)).

    The gain is the largest that fits ``new_shape`` (at most 1 without ``scaleup``); the resized size is rounded
    half-to-even. ``dw``/``dh`` is the padding per side, a half-integer when the spare room is odd. ``auto`` keeps
    only the spare room beyond a multiple of ``stride``; it takes precedence over ``scale_fill``, which stretches
    the image to ``new_shape`` exactly.
    """
    h, w = src_hw
    if np.ndim(new_shape) == 0:
        new_shape = (new_shape, new_shape)
    out_h, out_w = int(new_shape[0]), int(new_shape[1])
    if scale_fill and not auto:
        return (out_w, out_h), (out_w / w, out_h / h), (0.0, 0.0)
    gain = min(out_h / h, out_w / w)
    if not scaleup:
        gain = min(gain, 1.0)
    size = (round(w * gain), round(h * gain))  # Python's round: half to even
    spare_w, spare_h = out_w - size[0], out_h - size[1]
    if auto:
        spare_w, spare_h = spare_w % stride, spare_h % stride
    return size, (gain, gain), (float(spare_w / 2), float(spare_h / 2))


def _split_padding(d: float) -> tuple[int, int]:
    """Border before and after for a padding of ``d`` per side; an odd pixel goes after (right/bottom)."""
    return round(d - 0.1), round(d + 0.1)


def letterbox(
    im: np.ndarray,
    new_shape: int | tuple[int, int] = (640, 640),
    color: tuple[int, int, int] = PAD_COLOR,
    auto: bool = True,
    scaleFill: bool = False,  # the keyword name callers use
    scaleup: bool = True,
    stride: int = 32,
) -> tuple[np.ndarray, tuple[float, float], tuple[float, float]]:
    """Resize ``im`` (bilinear, only when its size changes) and pad it with ``color`` to ``new_shape`` (h, w).

    Returns (image, (x gain, y gain), (dw, dh) padding per side); see ``letterbox_geometry`` for the rules.
    """
    (w, h), ratio, (dw, dh) = letterbox_geometry(im.shape[:2], new_shape, auto, scaleFill, scaleup, stride)
    if im.shape[:2] != (h, w):
        im = cv2.resize(im, (w, h), interpolation=cv2.INTER_LINEAR)
    (top, bottom), (left, right) = _split_padding(dh), _split_padding(dw)
    canvas = np.empty((top + h + bottom, left + w + right, *im.shape[2:]), im.dtype)
    canvas[...] = color if im.ndim == 3 else color[0]
    canvas[top:top + h, left:left + w] = im
    return canvas, ratio, (dw, dh)


# --------------------------------------------------------------------------------------------- geometric warp


@dataclass(frozen=True)
class WarpParams:
    """One draw of the random warp (the identity by default)."""

    angle: float = 0.0  # degrees, counter-clockwise on the screen
    zoom: float = 1.0
    shear: tuple[float, float] = (0.0, 0.0)  # degrees: x moves with y, y moves with x
    centre: tuple[float, float] = (0.5, 0.5)  # where the image centre lands, as fractions of the output (w, h)
    perspective: tuple[float, float] = (0.0, 0.0)

    def matrix(self, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> np.ndarray:
        """3x3 homography from input to output pixel coordinates."""
        cos, sin = (f(math.radians(self.angle)) * self.zoom for f in (math.cos, math.sin))
        shear = np.array([[1.0, math.tan(math.radians(self.shear[0]))], [math.tan(math.radians(self.shear[1])), 1.0]])
        to_output = np.eye(3)
        to_output[:2, :2] = shear @ np.array([[cos, sin], [-sin, cos]])
        to_output[:2, 2] = self.centre[0] * out_hw[1], self.centre[1] * out_hw[0]
        projective = np.eye(3)
        projective[2, :2] = self.perspective
        centred = np.eye(3)
        centred[:2, 2] = -in_hw[1] / 2, -in_hw[0] / 2
        return to_output @ projective @ centred


def warp_boxes(boxes: np.ndarray, matrix: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Axis-aligned hull of each warped (n, 4) xyxy box, clipped to the output image."""
    xs, ys = boxes[:, [0, 2, 2, 0]], boxes[:, [1, 1, 3, 3]]  # the 4 corners of every box
    mapped = [m[0] * xs + m[1] * ys + m[2] for m in matrix]  # homogeneous u, v, z of each corner
    u, v = mapped[0] / mapped[2], mapped[1] / mapped[2]
    hull = np.stack((u.min(1), v.min(1), u.max(1), v.max(1)), 1)
    return np.clip(hull, 0, [out_hw[1], out_hw[0], out_hw[1], out_hw[0]])


def box_candidates(
    before: np.ndarray, after: np.ndarray, min_side: float = 2.0, min_area_kept: float = 0.1,
    max_elongation: float = 100.0,
) -> np.ndarray:
    """Which augmented (n, 4) xyxy boxes ``after`` to keep, given the same boxes ``before`` at the warp's zoom.

    A box survives when its short side exceeds ``min_side`` pixels, it keeps more than ``min_area_kept`` of its
    area, and its long side is less than ``max_elongation`` times its short side.
    """
    sides = after[:, 2:4] - after[:, :2]
    area_kept = sides.prod(1) / ((before[:, 2:4] - before[:, :2]).prod(1) + 1e-16)
    short, long = sides.min(1), sides.max(1)
    return (short > min_side) & (area_kept > min_area_kept) & (long < max_elongation * short)


def warp_sample(sample: Sample, params: WarpParams, out_hw: tuple[int, int]) -> Sample:
    """Warp image and boxes with ``params`` into an ``out_hw`` image padded with grey; drop boxes that degrade."""
    matrix = params.matrix(sample.hw, out_hw)
    image = sample.image
    if tuple(out_hw) != sample.hw or not np.array_equal(matrix, np.eye(3)):
        size = (int(out_hw[1]), int(out_hw[0]))
        if matrix[2, 0] or matrix[2, 1]:
            image = cv2.warpPerspective(image, matrix, size, borderValue=PAD_COLOR)
        else:
            image = cv2.warpAffine(image, matrix[:2], size, borderValue=PAD_COLOR)
    labels = sample.labels
    if len(labels):
        boxes = warp_boxes(labels[:, 1:5], matrix, out_hw)
        keep = box_candidates(labels[:, 1:5] * params.zoom, boxes)
        labels = np.concatenate((labels[keep, :1], boxes[keep]), 1).astype(labels.dtype)
    return Sample(image, labels)


@dataclass(frozen=True)
class RandomPerspective:
    """Random rotation, zoom, shear, translation and perspective (hyperparameters as in the module docstring).

    ``border`` (y, x) grows the output by that many pixels on each side; a negative border crops, which is how a
    2s x 2s mosaic comes back to s x s.
    """

    degrees: float = 0.0
    translate: float = 0.0
    scale: float = 0.0
    shear: float = 0.0
    perspective: float = 0.0
    border: tuple[int, int] = (0, 0)

    def draw(self, rng: np.random.Generator) -> WarpParams:
        u = rng.uniform(-1.0, 1.0, 8)  # every parameter is symmetric around its neutral value
        return WarpParams(
            angle=u[0] * self.degrees,
            zoom=1.0 + u[1] * self.scale,
            shear=(u[2] * self.shear, u[3] * self.shear),
            centre=(0.5 + u[4] * self.translate, 0.5 + u[5] * self.translate),
            perspective=(u[6] * self.perspective, u[7] * self.perspective),
        )

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        h, w = sample.hw
        return warp_sample(sample, self.draw(rng), (h + 2 * self.border[0], w + 2 * self.border[1]))


# ------------------------------------------------------------------------------------------ colour, flips, mixup


def hsv_lut(gains: np.ndarray) -> np.ndarray:
    """(256, 1, 3) uint8 table scaling H, S and V by ``gains``: hue wraps at 180, the others saturate at 255."""
    scaled = np.arange(256.0)[:, None] * np.asarray(gains, np.float64)
    scaled[:, 0] %= 180
    return np.clip(scaled, 0, 255).astype(np.uint8)[:, None, :]


def apply_hsv_gains(image: np.ndarray, gains: np.ndarray) -> np.ndarray:
    """A copy of a BGR uint8 image with hue, saturation and value scaled by ``gains``."""
    hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
    return cv2.cvtColor(cv2.LUT(hsv, hsv_lut(gains)), cv2.COLOR_HSV2BGR)


@dataclass(frozen=True)
class RandomHSV:
    """HSV colour jitter: each channel's gain ~ U(1 - g, 1 + g)."""

    hue: float = 0.0
    saturation: float = 0.0
    value: float = 0.0

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        return 1.0 + rng.uniform(-1.0, 1.0, 3) * (self.hue, self.saturation, self.value)

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        if not (self.hue or self.saturation or self.value):
            return sample
        return Sample(apply_hsv_gains(sample.image, self.draw(rng)), sample.labels)


def flip_sample(sample: Sample, vertical: bool, horizontal: bool) -> Sample:
    """Mirror image and boxes top-bottom and/or left-right."""
    image, labels = sample.image, sample.labels.copy()
    h, w = sample.hw
    if vertical:
        image = image[::-1]
        labels[:, [2, 4]] = h - sample.labels[:, [4, 2]]
    if horizontal:
        image = image[:, ::-1]
        labels[:, [1, 3]] = w - sample.labels[:, [3, 1]]
    return Sample(image, labels)


@dataclass(frozen=True)
class RandomFlip:
    """Vertical flip with probability ``vertical`` (hyp ``flipud``), horizontal with ``horizontal`` (``fliplr``)."""

    vertical: float = 0.0
    horizontal: float = 0.0

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        vertical, horizontal = rng.random(2) < (self.vertical, self.horizontal)
        return flip_sample(sample, vertical, horizontal) if vertical or horizontal else sample


def blend(first: Sample, second: Sample, weight: float) -> Sample:
    """MixUp of two equally sized samples: pixels ``weight`` * first + (1 - weight) * second, truncated to uint8;
    the boxes of both."""
    mixed = first.image * weight  # float64
    mixed += second.image * (1.0 - weight)
    return Sample(mixed.astype(np.uint8), np.concatenate((first.labels, second.labels), 0))


def draw_mixup_weight(rng: np.random.Generator) -> float:
    return float(rng.beta(MIXUP_BETA, MIXUP_BETA))


# ------------------------------------------------------------------------------------------------------- mosaics


def mosaic4_origins(tiles_hw: np.ndarray, centre_xy: tuple[int, int]) -> np.ndarray:
    """Top-left corners (x, y) of 4 tiles meeting at ``centre_xy``: the tiles sit top-left, top-right,
    bottom-left and bottom-right of it, each touching the centre with one corner."""
    heights, widths = np.asarray(tiles_hw, dtype=np.int64).T
    left_of_centre, above_centre = np.array([1, 0, 1, 0]), np.array([1, 1, 0, 0])
    return np.stack((centre_xy[0] - widths * left_of_centre, centre_xy[1] - heights * above_centre), 1)


def mosaic9_origins(tiles_hw: np.ndarray, s: int) -> np.ndarray:
    """Top-left corners (x, y) of 9 tiles in a 3s x 3s layout.

    Tile 0 sits at (s, s). Tiles 1-8 go clockwise round it starting above it; each is aligned with an edge of the
    centre tile and, on the diagonals, placed against the tile before it.
    """
    (h0, w0), origins = tiles_hw[0], [(s, s)]
    for k in range(1, 9):
        (h, w), (ph, pw), (px, py) = tiles_hw[k], tiles_hw[k - 1], origins[-1]
        match k:
            case 1:  # above the centre, left edges aligned
                origin = (s, s - h)
            case 2:  # right of tile 1, above the centre
                origin = (px + pw, s - h)
            case 3:  # right of the centre, top edges aligned
                origin = (s + w0, s)
            case 4:  # below tile 3
                origin = (s + w0, py + ph)
            case 5:  # below the centre, right edges aligned
                origin = (s + w0 - w, s + h0)
            case 6:  # left of tile 5
                origin = (px - w, s + h0)
            case 7:  # left of the centre, bottom edges aligned
                origin = (s - w, s + h0 - h)
            case _:  # above tile 7
                origin = (s - w, py - h)
        origins.append(origin)
    return np.array(origins, dtype=np.int64)


def paste_tiles(tiles: list[Sample], origins: np.ndarray, size: int) -> Sample:
    """Paste tiles at their (x, y) origins on a grey ``size`` x ``size`` canvas, cropping what falls outside;
    boxes move with their tile and are clipped to the canvas."""
    canvas = np.full((size, size, tiles[0].image.shape[2]), PAD_VALUE, np.uint8)
    moved = []
    for tile, (x0, y0) in zip(tiles, origins):
        h, w = tile.hw
        x1, y1, x2, y2 = max(x0, 0), max(y0, 0), min(x0 + w, size), min(y0 + h, size)
        if x2 > x1 and y2 > y1:
            canvas[y1:y2, x1:x2] = tile.image[y1 - y0:y2 - y0, x1 - x0:x2 - x0]
        moved.append(tile.labels + np.array([0, x0, y0, x0, y0], dtype=tile.labels.dtype))
    labels = np.concatenate(moved, 0)
    np.clip(labels[:, 1:], 0, size, out=labels[:, 1:])
    return Sample(canvas, labels)


def mosaic_layout(tiles_hw: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    """Random tile origins of a 2s x 2s mosaic: 4 tiles round a centre ~ U(s/2, 3s/2) in x and y, or 9 tiles
    whose 3s x 3s layout is cropped at an offset ~ U(0, s) in x and y."""
    if len(tiles_hw) == 4:
        half = s // 2
        return mosaic4_origins(tiles_hw, tuple(rng.uniform(half, 2 * s - half, 2).astype(np.int64)))
    return mosaic9_origins(tiles_hw, s) - rng.uniform(0, s, 2).astype(np.int64)


# ---------------------------------------------------------------------------------------------- training policy


@dataclass(frozen=True)
class AugmentPolicy:
    """The training augmentations a hyperparameter dict asks for (missing keys mean 'off')."""

    warp: RandomPerspective
    photometric: Compose
    mosaic: float = 0.0
    mosaic9: float = 0.0
    mixup: float = 0.0

    @classmethod
    def from_hyp(cls, hyp: dict | None) -> AugmentPolicy:
        def get(key: str) -> float:
            return float((hyp or {}).get(key, 0.0))

        warp = RandomPerspective(*(get(k) for k in ("degrees", "translate", "scale", "shear", "perspective")))
        photometric = Compose(RandomHSV(get("hsv_h"), get("hsv_s"), get("hsv_v")),
                              RandomFlip(get("flipud"), get("fliplr")))
        return cls(warp, photometric, get("mosaic"), get("mosaic9"), get("mixup"))

    def mosaic_warp(self, s: int) -> RandomPerspective:
        """The warp of a 2s x 2s mosaic: same draws, cropped back to s x s."""
        return RandomPerspective(self.warp.degrees, self.warp.translate, self.warp.scale, self.warp.shear,
                                 self.warp.perspective, border=(-(s // 2), -(s // 2)))
