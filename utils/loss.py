"""Training loss of a YOLOv5 detection head: CIoU box regression, objectness and classification.

The loss runs in two stages:

1. Assignment (``ComputeLoss.assign``): every target is compared with every anchor of every level at
   once. A (level, anchor, target) pair is kept when the target's size is within ``anchor_t`` of the
   anchor's in both directions; each kept pair trains its own grid cell and the one or two neighbouring
   cells that the centre lies closest to. The result is one flat list of entries, ordered by level,
   then neighbour group (own, left, up, right, down), then anchor, then target.
2. Loss: the head's outputs at the entries' cells are gathered, decoded to boxes and scored with CIoU.
   The detached, non-negative CIoU is the objectness target of the cell (when several entries name the
   same cell the last one wins); all other cells aim at 0. Class scores use (smoothed) one-hot targets.
   Each term is averaged per level, the objectness term weighted per level, and the three sums scaled
   by the hyperparameter gains.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from utils.boxes import bbox_iou
from utils.torch_utils import de_parallel

# Objectness weight per level, finest first: fine grids have many more empty cells.
OBJ_LEVEL_WEIGHTS = {3: (4.0, 1.0, 0.4), 5: (4.0, 1.0, 0.25, 0.06, 0.02)}

# Cells a matched pair trains, in assignment order, as unit steps (dx, dy) from the centre's cell: the cell
# itself, then left, up, right, down. A neighbour counts when the centre lies in the half of its cell next to
# that neighbour (and not in the outermost cell); its index is the centre moved half a cell towards it.
NEIGHBOUR_STEPS = ((0, 0), (-1, 0), (0, -1), (1, 0), (0, 1))


def smooth_BCE(eps: float = 0.1) -> tuple[float, float]:  # YOLOv5's public name
    """Targets (positive, negative) of a binary cross-entropy with label smoothing ``eps`` (arXiv:1902.04103)."""
    half = eps / 2
    return 1.0 - half, half


def focal_weight(logits: torch.Tensor, target: torch.Tensor, gamma: float, alpha: float = 0.25) -> torch.Tensor:
    """Element-wise focal-loss factor alpha_t * (1 - p_t) ** gamma (Lin et al., 2017) for soft targets in [0, 1]."""
    prob = logits.sigmoid()
    p_t = target * prob + (1 - target) * (1 - prob)  # probability given to the target
    a_t = alpha * target + (1 - alpha) * (1 - target)
    return a_t * torch.pow(1.0 - p_t, gamma)


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return values
    return values.mean() if reduction == "mean" else values.sum()


class FocalLoss(nn.Module):
    """Focal version of a ``BCEWithLogitsLoss``: its element-wise loss times ``focal_weight``.

    The wrapped criterion supplies ``weight``, ``pos_weight`` and ``reduction``; it is not modified.
    """

    def __init__(self, loss_fcn: nn.BCEWithLogitsLoss, gamma: float = 1.5, alpha: float = 0.25):
        super().__init__()
        self.loss_fcn, self.gamma, self.alpha = loss_fcn, gamma, alpha

    def forward(self, pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
        base = self.loss_fcn
        bce = F.binary_cross_entropy_with_logits(pred, true, base.weight, pos_weight=base.pos_weight, reduction="none")
        return _reduce(bce * focal_weight(pred, true, self.gamma, self.alpha), base.reduction)


def _binary_loss(pos_weight: float, gamma: float, device: torch.device) -> nn.Module:
    """Element-wise BCE-with-logits criterion, focal when ``gamma`` > 0."""
    bce = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([pos_weight], device=device), reduction="none")
    return FocalLoss(bce, gamma) if gamma > 0 else bce


class Assignment(NamedTuple):
    """Target entries of all levels, ordered by level; ``counts`` gives how many belong to each level."""

    level: torch.Tensor  # (N,) level index
    image: torch.Tensor  # (N,) image in the batch
    anchor: torch.Tensor  # (N,) anchor index within the level
    row: torch.Tensor  # (N,) grid row (y), clamped to the grid
    col: torch.Tensor  # (N,) grid column (x), clamped to the grid
    cls: torch.Tensor  # (N,) class
    box: torch.Tensor  # (N, 4) centre minus cell index, then width and height; grid units
    anchor_wh: torch.Tensor  # (N, 2) matched anchor size, grid units
    counts: list[int]


def _half_cell_masks(gxy: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """(nl, 5, n) masks of the cells in ``NEIGHBOUR_STEPS`` that each centre ``gxy`` (nl, n, 2) trains."""

    def near(distance: torch.Tensor) -> torch.Tensor:  # in the half cell closest to that side, not the edge cell
        return (distance % 1 < 0.5) & (distance > 1)

    low = near(gxy).transpose(1, 2)  # towards x = 0 (left) and y = 0 (up)
    high = near(grid[:, None] - gxy).transpose(1, 2)  # towards the right and bottom edges
    own = torch.ones_like(low[:, :1])
    return torch.cat((own, low, high), 1)


def _segment_means(values: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Mean of each consecutive segment of ``values`` (split along dim 0); 0 for an empty segment."""
    return torch.stack([part.mean() if part.numel() else part.sum() for part in values.split(counts)])


def _last_entry_per_cell(cell: torch.Tensor) -> torch.Tensor:
    """Positions of the entries that are the last to name their cell (distinct cells, deterministic)."""
    order = torch.sort(cell, stable=True).indices
    ranked = cell[order]
    last = torch.ones_like(ranked, dtype=torch.bool)
    last[:-1] = ranked[1:] != ranked[:-1]
    return order[last]


def _decode_boxes(raw: torch.Tensor, anchor_wh: torch.Tensor) -> torch.Tensor:
    """xywh boxes (grid units, relative to the cell corner) from raw (N, 4) xywh logits."""
    xy = raw[:, :2].sigmoid() * 2 - 0.5  # the centre may leave its cell by half a cell
    wh = (raw[:, 2:4].sigmoid() * 2).square() * anchor_wh  # 0 to 4 anchors
    return torch.cat((xy, wh), 1)


class ComputeLoss:
    """Loss of a YOLOv5 model: ``model.hyp`` gives the gains and options, ``model.model[-1]`` is the Detect head.

    ``loss, items = compute_loss(preds, targets)`` with the head's training-mode outputs ``preds``
    (per level (bs, na, ny, nx, 5 + nc)) and ``targets`` (n, 6) rows (image, class, x, y, w, h; normalised).
    ``loss`` (shape (1,)) is the sum of the three terms times the batch size; ``items`` are the detached
    (box, objectness, class) terms. With ``autobalance`` the level weights adapt to each level's objectness
    loss, keeping the stride-16 level at 1.
    """

    def __init__(self, model: nn.Module, autobalance: bool = False):
        model = de_parallel(model)
        device = next(model.parameters()).device
        head = model.model[-1]
        self.hyp = hyp = model.hyp
        self.na, self.nc, self.nl = head.na, head.nc, head.nl
        self.anchors = head.anchors  # (nl, na, 2) grid units
        gamma = hyp.get("fl_gamma", 0.0)
        self.bce_cls = _binary_loss(hyp.get("cls_pw", 1.0), gamma, device)
        self.bce_obj = _binary_loss(hyp.get("obj_pw", 1.0), gamma, device)
        self.cls_pos, self.cls_neg = smooth_BCE(hyp.get("label_smoothing", 0.0))
        weights = OBJ_LEVEL_WEIGHTS[3] if self.nl == 3 else OBJ_LEVEL_WEIGHTS[5]
        if self.nl > len(weights):
            raise ValueError(f"no objectness level weights defined for a head with {self.nl} levels")
        self.balance = list(weights[: self.nl])
        self.autobalance = autobalance
        self.reference_level = [float(s) for s in head.stride].index(16.0) if autobalance else 0

    def __call__(self, preds: list[torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Total loss * batch size and the detached [box, obj, cls] terms (see the class docstring)."""
        found = self.assign(preds, targets)
        gathered = torch.cat([p[idx] for p, idx in zip(preds, self._level_indices(found))])
        iou = bbox_iou(_decode_boxes(gathered[:, :4], found.anchor_wh), found.box, CIoU=True).squeeze(-1)
        dtype = torch.promote_types(gathered.dtype, torch.float32)
        box = _segment_means(1.0 - iou, found.counts).to(dtype)
        obj = self._objectness(preds, found, iou.detach()).to(dtype)
        cls = self._classification(gathered[:, 5:], found).to(dtype)
        weights = torch.tensor(self.balance, dtype=dtype, device=obj.device)
        if self.autobalance:
            self._update_balance(obj.detach().tolist())
        gains = torch.tensor([self.hyp["box"], self.hyp["obj"], self.hyp["cls"]], device=obj.device)
        items = torch.stack((box.sum(), (obj * weights).sum(), cls.sum())) * gains.to(dtype)
        return items.sum().reshape(1) * preds[0].shape[0], items.detach()

    def build_targets(self, preds: list[torch.Tensor], targets: torch.Tensor) -> tuple[list, list, list, list]:
        """Per level: classes, boxes (centre minus cell index, then wh; grid units), indices (image, anchor,
        row, column) and matched anchor sizes of the entries ``assign`` makes."""
        found = self.assign(preds, targets)
        split = [list(t.split(found.counts)) for t in (found.cls, found.box, found.anchor_wh)]
        return split[0], split[1], self._level_indices(found), split[2]

    def assign(self, preds: list[torch.Tensor], targets: torch.Tensor) -> Assignment:
        """Match ``targets`` (n, 6) to anchors and cells of all levels in one batched computation."""
        dev, dtype = targets.device, targets.dtype
        grid = torch.tensor([p.shape[3:1:-1] for p in preds], device=dev)  # (nl, 2): columns, rows
        grid_f = grid.to(dtype)
        gxy = targets[None, :, 2:4] * grid_f[:, None]  # (nl, n, 2) centres in grid units
        gwh = targets[None, :, 4:6] * grid_f[:, None]
        anchors = self.anchors.to(dev)
        ratio = gwh[:, None] / anchors[:, :, None]  # (nl, na, n, 2)
        fits = torch.maximum(ratio, 1 / ratio).amax(-1) < self.hyp["anchor_t"]
        keep = _half_cell_masks(gxy, grid_f)[:, :, None] & fits[:, None]  # (nl, 5, na, n)
        level, step, anchor, target = keep.nonzero(as_tuple=True)  # row-major: the assignment order
        centre = gxy[level, target]
        steps = torch.tensor(NEIGHBOUR_STEPS, dtype=centre.dtype, device=dev)
        cell = (centre + 0.5 * steps[step]).long()
        cell = torch.minimum(cell.clamp(min=0), grid[level] - 1)
        return Assignment(
            level=level,
            image=targets[target, 0].long(),
            anchor=anchor,
            row=cell[:, 1],
            col=cell[:, 0],
            cls=targets[target, 1].long(),
            box=torch.cat((centre - cell, gwh[level, target]), 1),
            anchor_wh=anchors[level, anchor],
            counts=keep.flatten(1).sum(1).tolist(),
        )

    @staticmethod
    def _level_indices(found: Assignment) -> list[tuple[torch.Tensor, ...]]:
        """(image, anchor, row, column) index tensors of each level."""
        columns = (found.image, found.anchor, found.row, found.col)
        return list(zip(*(t.split(found.counts) for t in columns)))

    def _objectness(self, preds: list[torch.Tensor], found: Assignment, iou: torch.Tensor) -> torch.Tensor:
        """Per-level mean objectness loss over all cells, the targets' cells aiming at their clamped CIoU."""
        logits = torch.cat([p[..., 4].reshape(-1) for p in preds])
        sizes = [p[..., 4].numel() for p in preds]
        shapes = torch.tensor([p.shape[1:4] for p in preds], device=logits.device)  # (nl, 3): na, ny, nx
        starts = torch.tensor([0, *sizes[:-1]], device=logits.device).cumsum(0)
        na, ny, nx = shapes[found.level].unbind(1)
        cell = starts[found.level] + ((found.image * na + found.anchor) * ny + found.row) * nx + found.col
        target = torch.zeros_like(logits)
        winners = _last_entry_per_cell(cell)
        target[cell[winners]] = iou[winners].clamp(min=0).to(target.dtype)
        return _segment_means(self.bce_obj(logits, target), sizes)

    def _classification(self, logits: torch.Tensor, found: Assignment) -> torch.Tensor:
        """Per-level mean class BCE over entries x classes; zero for a single-class model."""
        if self.nc == 1:
            return logits.new_zeros(self.nl)
        true = F.one_hot(found.cls, self.nc).bool()
        target = torch.where(true, self.cls_pos, self.cls_neg).to(logits.dtype)
        return _segment_means(self.bce_cls(logits, target), found.counts)

    def _update_balance(self, level_obj_loss: list[float]) -> None:
        """Move each level weight slowly towards 1 / its objectness loss, relative to the reference level."""
        adapted = [w * 0.9999 + 0.0001 / loss for w, loss in zip(self.balance, level_obj_loss)]
        self.balance = [w / adapted[self.reference_level] for w in adapted]
