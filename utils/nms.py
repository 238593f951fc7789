"""Non-maximum suppression of raw YOLOv5 detections (upstream semantics, without a time limit)."""

from __future__ import annotations

import torch
import torchvision

from utils.boxes import xywh2xyxy

MAX_NMS = 30000  # most candidate boxes per image passed to torchvision's NMS (highest confidence first)
PREFIX_FACTOR, PREFIX_GROWTH = 8, 4  # NMS first on the 8 * max_det most confident candidates, then 4x more


def _label_rows(labels: torch.Tensor, width: int, like: torch.Tensor) -> torch.Tensor:
    """Prediction-format rows (xywh, obj=1, one-hot class) for a-priori labels (n, 5) [cls, xywh]."""
    rows = torch.zeros((len(labels), width), dtype=like.dtype, device=like.device)
    rows[:, :4] = labels[:, 1:5]
    rows[:, 4] = 1.0
    rows[torch.arange(len(labels), device=like.device), labels[:, 0].long() + 5] = 1.0
    return rows


def _candidates(x: torch.Tensor, nc: int, conf_thres: float, multi_label: bool) -> torch.Tensor:
    """Rows (xywh, obj, cls scores..., mask) -> candidates (k, 6 + nm) [xyxy, conf, cls, mask...].

    conf = obj * cls score; ``multi_label`` keeps every class above ``conf_thres`` for a box,
    otherwise only the best class is kept (if above ``conf_thres``).
    """
    box, scores, mask = xywh2xyxy(x[:, :4]), x[:, 5 : 5 + nc] * x[:, 4:5], x[:, 5 + nc :]
    if multi_label:
        i, j = (scores > conf_thres).nonzero(as_tuple=False).T
        return torch.cat((box[i], scores[i, j, None], j[:, None].to(x.dtype), mask[i]), 1)
    conf, j = scores.max(1, keepdim=True)
    keep = conf.view(-1) > conf_thres
    return torch.cat((box, conf, j.to(x.dtype), mask), 1)[keep]


def _suppress(x: torch.Tensor, iou_thres: float, agnostic: bool, max_det: int) -> torch.Tensor:
    """Class-wise (or class-agnostic) greedy NMS of candidates [xyxy, conf, cls, ...]; the best ``max_det`` kept.

    Greedy NMS decides each box from the boxes kept before it in confidence order only, so NMS over the
    ``k`` most confident candidates keeps exactly the full run's survivors among them. Once those number
    ``max_det``, the boxes after them cannot change the result: NMS runs on growing prefixes until one yields
    ``max_det`` boxes or all candidates are used. The candidates are sorted stably, as torchvision's NMS sorts
    its input, so a prefix is also a prefix of the order NMS works in when scores tie. Survivors come in
    confidence order, ties in candidate order.
    """
    x = x[x[:, 4].argsort(descending=True, stable=True)[:MAX_NMS]]
    groups = torch.zeros_like(x[:, 5]) if agnostic else x[:, 5]
    k = PREFIX_FACTOR * max_det
    while True:
        k = min(k, len(x))
        keep = torchvision.ops.batched_nms(x[:k, :4], x[:k, 4], groups[:k], iou_thres).sort().values
        if len(keep) >= max_det or k == len(x):
            return x[keep[:max_det]]
        k *= PREFIX_GROWTH


def non_max_suppression(
    prediction: torch.Tensor | list | tuple,
    conf_thres: float = 0.25,
    iou_thres: float = 0.45,
    classes: list[int] | None = None,
    agnostic: bool = False,
    multi_label: bool = False,
    labels: list | tuple = (),
    max_det: int = 300,
    nm: int = 0,
) -> list[torch.Tensor]:
    """NMS on model output (bs, n, 5 + nc + nm) [xywh, obj, cls scores, masks] (pixels).

    Returns one (k, 6 + nm) tensor [x1, y1, x2, y2, conf, cls, masks] per image, sorted by confidence.
    ``labels`` optionally holds per-image a-priori labels (n, 5) [cls, xywh] added as confident
    candidates (autolabelling); ``classes`` keeps only those classes.
    """
    if not 0 <= conf_thres <= 1 or not 0 <= iou_thres <= 1:
        raise ValueError(f"conf_thres {conf_thres} and iou_thres {iou_thres} must lie in [0, 1]")
    if isinstance(prediction, (list, tuple)):  # (inference output, raw maps) from a model in eval mode
        prediction = prediction[0]
    nc = prediction.shape[2] - nm - 5
    multi_label &= nc > 1
    candidate_mask = prediction[..., 4] > conf_thres
    wanted = None if classes is None else torch.tensor(classes, device=prediction.device)
    output = []
    for xi, x in enumerate(prediction):
        x = x[candidate_mask[xi]]
        if labels and len(labels[xi]):
            x = torch.cat((x, _label_rows(labels[xi], prediction.shape[2], x)), 0)
        x = _candidates(x, nc, conf_thres, multi_label)
        if wanted is not None:
            x = x[(x[:, 5:6] == wanted).any(1)]
        output.append(_suppress(x, iou_thres, agnostic, max_det) if len(x) else x)
    return output
