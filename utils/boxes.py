"""Box format conversions, clipping/rescaling and IoU variants (IoU, GIoU, DIoU, CIoU).

Formats: ``xyxy`` = corners (x1, y1, x2, y2); ``xywh`` = centre, width, height; a trailing ``n``
means normalised to [0, 1] by the image width/height. Conversions accept torch tensors or numpy
arrays of shape (..., 4) and never modify their input.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torchvision

Boxes = torch.Tensor | np.ndarray


def _copy(x: Boxes) -> Boxes:
    return x.clone() if isinstance(x, torch.Tensor) else np.copy(x)


def xyxy2xywh(x: Boxes) -> Boxes:
    """Corners (x1, y1, x2, y2) -> centre/size (x, y, w, h)."""
    y = _copy(x)
    y[..., 0] = (x[..., 0] + x[..., 2]) / 2
    y[..., 1] = (x[..., 1] + x[..., 3]) / 2
    y[..., 2] = x[..., 2] - x[..., 0]
    y[..., 3] = x[..., 3] - x[..., 1]
    return y


def xywh2xyxy(x: Boxes) -> Boxes:
    """Centre/size (x, y, w, h) -> corners (x1, y1, x2, y2)."""
    y = _copy(x)
    y[..., 0] = x[..., 0] - x[..., 2] / 2
    y[..., 1] = x[..., 1] - x[..., 3] / 2
    y[..., 2] = x[..., 0] + x[..., 2] / 2
    y[..., 3] = x[..., 1] + x[..., 3] / 2
    return y


def xywhn2xyxy(x: Boxes, w: int = 640, h: int = 640, padw: float = 0, padh: float = 0) -> Boxes:
    """Normalised centre/size -> pixel corners in a (w, h) image placed at offset (padw, padh)."""
    y = _copy(x)
    y[..., 0] = w * (x[..., 0] - x[..., 2] / 2) + padw
    y[..., 1] = h * (x[..., 1] - x[..., 3] / 2) + padh
    y[..., 2] = w * (x[..., 0] + x[..., 2] / 2) + padw
    y[..., 3] = h * (x[..., 1] + x[..., 3] / 2) + padh
    return y


def xyxy2xywhn(x: Boxes, w: int = 640, h: int = 640, clip: bool = False, eps: float = 0.0) -> Boxes:
    """Pixel corners -> normalised centre/size; ``clip`` first clips the corners to (w - eps, h - eps)."""
    if clip:
        x = clip_boxes(_copy(x), (h - eps, w - eps))
    y = _copy(x)
    y[..., 0] = ((x[..., 0] + x[..., 2]) / 2) / w
    y[..., 1] = ((x[..., 1] + x[..., 3]) / 2) / h
    y[..., 2] = (x[..., 2] - x[..., 0]) / w
    y[..., 3] = (x[..., 3] - x[..., 1]) / h
    return y


def clip_boxes(boxes: Boxes, shape: tuple) -> Boxes:
    """Clip xyxy ``boxes`` in place to an image of ``shape`` (height, width, ...); returns them."""
    height, width = shape[0], shape[1]
    if isinstance(boxes, torch.Tensor):
        boxes[..., 0].clamp_(0, width)
        boxes[..., 1].clamp_(0, height)
        boxes[..., 2].clamp_(0, width)
        boxes[..., 3].clamp_(0, height)
    else:
        boxes[..., [0, 2]] = boxes[..., [0, 2]].clip(0, width)
        boxes[..., [1, 3]] = boxes[..., [1, 3]].clip(0, height)
    return boxes


def scale_boxes(img1_shape: tuple, boxes: Boxes, img0_shape: tuple, ratio_pad: tuple | None = None) -> Boxes:
    """Map xyxy ``boxes`` in place from a letterboxed ``img1_shape`` back to the original ``img0_shape``.

    ``ratio_pad`` = ((gain, gain), (pad_w, pad_h)) as recorded by the letterbox; computed when omitted.
    """
    if ratio_pad is None:
        gain = min(img1_shape[0] / img0_shape[0], img1_shape[1] / img0_shape[1])
        pad = (img1_shape[1] - img0_shape[1] * gain) / 2, (img1_shape[0] - img0_shape[0] * gain) / 2
    else:
        gain, pad = ratio_pad[0][0], ratio_pad[1]
    boxes[..., [0, 2]] -= pad[0]
    boxes[..., [1, 3]] -= pad[1]
    boxes[..., :4] /= gain
    return clip_boxes(boxes, img0_shape)


def _sides(box: torch.Tensor, xywh: bool, eps: float) -> tuple[torch.Tensor, ...]:
    """(x1, y1, x2, y2, w, h), each of shape (..., 1); xyxy heights are clamped to ``eps``."""
    if xywh:
        x, y, w, h = box.chunk(4, -1)
        return x - w / 2, y - h / 2, x + w / 2, y + h / 2, w, h
    x1, y1, x2, y2 = box.chunk(4, -1)
    return x1, y1, x2, y2, x2 - x1, (y2 - y1).clamp(eps)


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
    whose trade-off weight ``alpha`` is treated as a constant.
    """
    ax1, ay1, ax2, ay2, aw, ah = _sides(box1, xywh, eps)
    bx1, by1, bx2, by2, bw, bh = _sides(box2, xywh, eps)
    inter = (ax2.minimum(bx2) - ax1.maximum(bx1)).clamp(0) * (ay2.minimum(by2) - ay1.maximum(by1)).clamp(0)
    union = aw * ah + bw * bh - inter + eps
    iou = inter / union
    if not (GIoU or DIoU or CIoU):
        return iou
    enclose_w = ax2.maximum(bx2) - ax1.minimum(bx1)
    enclose_h = ay2.maximum(by2) - ay1.minimum(by1)
    if GIoU and not (DIoU or CIoU):
        enclose_area = enclose_w * enclose_h + eps
        return iou - (enclose_area - union) / enclose_area
    diagonal2 = enclose_w**2 + enclose_h**2 + eps
    centre_dist2 = ((bx1 + bx2 - ax1 - ax2) ** 2 + (by1 + by2 - ay1 - ay2) ** 2) / 4
    if not CIoU:
        return iou - centre_dist2 / diagonal2
    v = (4 / math.pi**2) * (torch.atan(bw / bh) - torch.atan(aw / ah)).pow(2)
    with torch.no_grad():
        alpha = v / (v - iou + (1 + eps))
    return iou - (centre_dist2 / diagonal2 + v * alpha)


def box_iou(box1: torch.Tensor, box2: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU matrix (N, M) of xyxy boxes (N, 4) and (M, 4)."""
    return torchvision.ops.box_iou(box1, box2)
