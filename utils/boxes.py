"""Box format conversions, clipping/rescaling and IoU variants (IoU, GIoU, DIoU, CIoU).

Formats: ``xyxy`` = corners (x1, y1, x2, y2); ``xywh`` = centre, width, height; a trailing ``n``
means normalised to [0, 1] by the image width/height. Conversions accept torch tensors or numpy
arrays of shape (..., 4) and return a new object; only ``xyxy2xywhn(clip=True)``, ``clip_boxes``
and ``scale_boxes`` write into the array they are given.

Every box is handled as two coordinate pairs: corners (``lo``, ``hi``) or (``centre``, ``size``),
so each conversion is one vectorised expression per pair.
"""

from __future__ import annotations

import math

import numpy as np
import torch

Boxes = torch.Tensor | np.ndarray


def _pairs(x: Boxes) -> tuple[Boxes, Boxes]:
    """Split (..., 4) boxes into their first and second (x, y) pair, as views."""
    return x[..., 0:2], x[..., 2:4]


def _join(first: Boxes, second: Boxes) -> Boxes:
    """Inverse of ``_pairs``: two (..., 2) halves -> (..., 4)."""
    if isinstance(first, torch.Tensor):
        return torch.cat((first, second), -1)
    return np.concatenate((first, second), -1)


def _per_axis(x: Boxes, sx: float, sy: float) -> Boxes:
    """The 4-vector (sx, sy, sx, sy) in ``x``'s array type, dtype and device, for broadcasting."""
    values = (sx, sy, sx, sy)
    if isinstance(x, torch.Tensor):
        return torch.tensor(values, dtype=x.dtype, device=x.device)
    return np.asarray(values, dtype=x.dtype)


def xyxy2xywh(x: Boxes) -> Boxes:
    """Corners (x1, y1, x2, y2) -> centre/size (x, y, w, h)."""
    lo, hi = _pairs(x)
    return _join((lo + hi) / 2, hi - lo)


def xywh2xyxy(x: Boxes) -> Boxes:
    """Centre/size (x, y, w, h) -> corners (x1, y1, x2, y2)."""
    centre, size = _pairs(x)
    half = size / 2
    return _join(centre - half, centre + half)


def xywhn2xyxy(x: Boxes, w: int = 640, h: int = 640, padw: float = 0, padh: float = 0) -> Boxes:
    """Normalised centre/size -> pixel corners in a (w, h) image placed at offset (padw, padh)."""
    return xywh2xyxy(x) * _per_axis(x, w, h) + _per_axis(x, padw, padh)


def xyxy2xywhn(x: Boxes, w: int = 640, h: int = 640, clip: bool = False, eps: float = 0.0) -> Boxes:
    """Pixel corners -> normalised centre/size.

    With ``clip`` the corners of ``x`` itself are first clipped (in place) to [0, w - eps] x [0, h - eps],
    so that the caller's array and the result describe the same boxes.
    """
    if clip:
        clip_boxes(x, (h - eps, w - eps))
    return xyxy2xywh(x) / _per_axis(x, w, h)


def clip_boxes(boxes: Boxes, shape: tuple) -> Boxes:
    """Clip xyxy ``boxes`` in place to an image of ``shape`` (height, width, ...); returns them.

    Only the four box columns are touched; x columns (0, 2) go to [0, width], y columns (1, 3) to
    [0, height]. Strided slices are views, so clipping them writes through.
    """
    for columns, limit in ((slice(0, 4, 2), shape[1]), (slice(1, 4, 2), shape[0])):
        view = boxes[..., columns]
        if isinstance(boxes, torch.Tensor):
            view.clamp_(0, limit)
        else:
            np.clip(view, 0, limit, out=view)
    return boxes


def _letterbox_geometry(img1_shape: tuple, img0_shape: tuple, ratio_pad: tuple | None) -> tuple[float, float, float]:
    """(gain, pad_x, pad_y) of the letterbox that turned ``img0_shape`` into ``img1_shape`` (both (h, w)).

    A recorded ``ratio_pad`` = ((gain_x, gain_y), (pad_x, pad_y)) wins; only its first gain is used.
    Otherwise the image is assumed scaled by the limiting side and centred.
    """
    if ratio_pad is not None:
        (gain, _), (pad_x, pad_y) = ratio_pad
        return gain, pad_x, pad_y
    gain = min(new / old for new, old in zip(img1_shape[:2], img0_shape[:2]))
    pad_y, pad_x = ((new - old * gain) / 2 for new, old in zip(img1_shape[:2], img0_shape[:2]))
    return gain, pad_x, pad_y


def scale_boxes(img1_shape: tuple, boxes: Boxes, img0_shape: tuple, ratio_pad: tuple | None = None) -> Boxes:
    """Map xyxy ``boxes`` in place from a letterboxed ``img1_shape`` back to the original ``img0_shape``.

    ``ratio_pad`` = ((gain, gain), (pad_w, pad_h)) as recorded by the letterbox; computed when omitted.
    The result is clipped to the original image.
    """
    gain, pad_x, pad_y = _letterbox_geometry(img1_shape, img0_shape, ratio_pad)
    boxes[..., 0:4:2] -= pad_x
    boxes[..., 1:4:2] -= pad_y
    boxes[..., 0:4] /= gain
    return clip_boxes(boxes, img0_shape)


def _corners_and_size(box: torch.Tensor, xywh: bool, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lo, hi, size) pairs of shape (..., 2) for boxes in either format.

    For xyxy input the height gets ``eps`` added, which keeps the aspect ratio of flat boxes finite.
    """
    first, second = _pairs(box)
    if xywh:
        half = second / 2
        return first - half, first + half, second
    width, height = (second - first).unbind(-1)
    return first, second, torch.stack((width, height + eps), -1)


def _overlap_area(lo1: torch.Tensor, hi1: torch.Tensor, lo2: torch.Tensor, hi2: torch.Tensor) -> torch.Tensor:
    """Area of the intersection of (broadcast) corner pairs, with a trailing size-1 axis."""
    extent = (torch.minimum(hi1, hi2) - torch.maximum(lo1, lo2)).clamp(min=0)
    return extent[..., :1] * extent[..., 1:]


def _aspect_penalty(size1: torch.Tensor, size2: torch.Tensor) -> torch.Tensor:
    """CIoU's aspect-ratio consistency term v = 4/pi^2 (atan(w2/h2) - atan(w1/h1))^2."""
    angle1 = torch.atan(size1[..., :1] / size1[..., 1:])
    angle2 = torch.atan(size2[..., :1] / size2[..., 1:])
    return (angle2 - angle1).square() * (4 / math.pi**2)


def bbox_iou(
    box1: torch.Tensor,
    box2: torch.Tensor,
    xywh: bool = True,
    GIoU: bool = False,  # noqa: N803 (upstream's keyword names)
    DIoU: bool = False,  # noqa: N803
    CIoU: bool = False,  # noqa: N803
    eps: float = 1e-7,
) -> torch.Tensor:
    """Element-wise (broadcast) IoU of boxes (..., 4), or its GIoU/DIoU/CIoU variant; returns (..., 1).

    GIoU subtracts the empty fraction of the enclosing box, DIoU the squared centre distance over the
    squared enclosing diagonal, CIoU additionally an aspect-ratio consistency term (Zheng et al., 2020)
    whose trade-off weight ``alpha`` is treated as a constant in backpropagation.
    """
    lo1, hi1, size1 = _corners_and_size(box1, xywh, eps)
    lo2, hi2, size2 = _corners_and_size(box2, xywh, eps)
    inter = _overlap_area(lo1, hi1, lo2, hi2)
    union = size1.prod(-1, keepdim=True) + size2.prod(-1, keepdim=True) - inter + eps
    iou = inter / union
    if not (GIoU or DIoU or CIoU):
        return iou
    hull = torch.maximum(hi1, hi2) - torch.minimum(lo1, lo2)  # enclosing box (w, h)
    if not (DIoU or CIoU):
        hull_area = hull.prod(-1, keepdim=True) + eps
        return iou - (hull_area - union) / hull_area
    centre_gap = (lo2 + hi2) - (lo1 + hi1)  # twice the centre offset
    distance = centre_gap.square().sum(-1, keepdim=True) / 4 / (hull.square().sum(-1, keepdim=True) + eps)
    if not CIoU:
        return iou - distance
    v = _aspect_penalty(size1, size2)
    with torch.no_grad():
        alpha = v / (v - iou + (1 + eps))
    return iou - distance - alpha * v


def box_iou(box1: torch.Tensor, box2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Pairwise IoU matrix (N, M) of xyxy boxes (N, 4) and (M, 4); ``eps`` keeps empty unions at 0."""
    lo1, hi1 = (p.unsqueeze(1) for p in _pairs(box1))
    lo2, hi2 = _pairs(box2)
    inter = _overlap_area(lo1, hi1, lo2, hi2)
    union = (hi1 - lo1).prod(-1, keepdim=True) + (hi2 - lo2).prod(-1, keepdim=True) - inter + eps
    return (inter / union).squeeze(-1)
