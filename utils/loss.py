"""YOLOv5 training loss: CIoU box regression, IoU-targeted objectness BCE and class BCE."""

from __future__ import annotations

import torch
import torch.nn as nn

from utils.boxes import bbox_iou
from utils.torch_utils import de_parallel

# neighbour cells a target also trains: itself, left, up, right, down (as offsets subtracted from xy)
NEIGHBOUR_OFFSETS = ((0, 0), (1, 0), (0, 1), (-1, 0), (0, -1))


def smooth_BCE(eps: float = 0.1) -> tuple[float, float]:  # noqa: N802 (upstream's name)
    """Positive and negative BCE targets under label smoothing ``eps`` (arXiv:1902.04103)."""
    return 1.0 - 0.5 * eps, 0.5 * eps


class FocalLoss(nn.Module):
    """Focal loss (Lin et al., 2017) around a ``BCEWithLogitsLoss``: BCE * alpha_t * (1 - p_t) ** gamma."""

    def __init__(self, loss_fcn: nn.BCEWithLogitsLoss, gamma: float = 1.5, alpha: float = 0.25):
        super().__init__()
        self.loss_fcn = loss_fcn
        self.gamma = gamma
        self.alpha = alpha
        self.reduction = loss_fcn.reduction
        self.loss_fcn.reduction = "none"  # reduced here, after weighting each element

    def forward(self, pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
        loss = self.loss_fcn(pred, true)
        prob = torch.sigmoid(pred)
        p_t = true * prob + (1 - true) * (1 - prob)
        alpha_t = true * self.alpha + (1 - true) * (1 - self.alpha)
        loss = loss * alpha_t * (1.0 - p_t) ** self.gamma
        if self.reduction == "mean":
            return loss.mean()
        return loss.sum() if self.reduction == "sum" else loss


class ComputeLoss:
    """Loss of a YOLOv5 DetectionModel (``model.hyp`` gives the gains; ``model.model[-1]`` is Detect)."""

    def __init__(self, model: nn.Module, autobalance: bool = False):
        model = de_parallel(model)
        device = next(model.parameters()).device
        hyp = model.hyp
        bce_cls = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([hyp["cls_pw"]], device=device))
        bce_obj = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([hyp["obj_pw"]], device=device))
        if hyp["fl_gamma"] > 0:
            bce_cls, bce_obj = FocalLoss(bce_cls, hyp["fl_gamma"]), FocalLoss(bce_obj, hyp["fl_gamma"])
        self.bce_cls, self.bce_obj = bce_cls, bce_obj
        self.cp, self.cn = smooth_BCE(eps=hyp.get("label_smoothing", 0.0))
        detect = model.model[-1]
        self.balance = [4.0, 1.0, 0.4] if detect.nl == 3 else [4.0, 1.0, 0.25, 0.06, 0.02]
        self.ssi = list(detect.stride).index(16) if autobalance else 0  # level whose balance stays 1
        self.gr = 1.0  # objectness target = (1 - gr) + gr * IoU
        self.hyp, self.autobalance = hyp, autobalance
        self.na, self.nc, self.nl = detect.na, detect.nc, detect.nl
        self.anchors = detect.anchors  # (nl, na, 2) in grid units
        self.device = device

    def __call__(self, preds: list[torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss of raw head maps ``preds`` (nl x (bs, na, ny, nx, no)) against ``targets`` (n, 6).

        Returns (total loss * batch size, detached [box, obj, cls] loss items).
        """
        lbox = torch.zeros(1, device=self.device)
        lobj = torch.zeros(1, device=self.device)
        lcls = torch.zeros(1, device=self.device)
        tcls, tbox, indices, anchors = self.build_targets(preds, targets)
        for i, pi in enumerate(preds):
            b, a, gj, gi = indices[i]
            tobj = torch.zeros(pi.shape[:4], dtype=pi.dtype, device=self.device)
            if len(b):
                pxy, pwh, _, pcls = pi[b, a, gj, gi].split((2, 2, 1, self.nc), 1)
                pbox = torch.cat((pxy.sigmoid() * 2 - 0.5, (pwh.sigmoid() * 2) ** 2 * anchors[i]), 1)
                iou = bbox_iou(pbox, tbox[i], CIoU=True).squeeze(-1)
                lbox += (1.0 - iou).mean()
                iou = iou.detach().clamp(0).type(tobj.dtype)
                tobj[b, a, gj, gi] = (1.0 - self.gr) + self.gr * iou
                if self.nc > 1:  # a single class needs no class loss
                    t = torch.full_like(pcls, self.cn)
                    t[torch.arange(len(b), device=self.device), tcls[i]] = self.cp
                    lcls += self.bce_cls(pcls, t)
            obj_loss = self.bce_obj(pi[..., 4], tobj)
            lobj += obj_loss * self.balance[i]
            if self.autobalance:
                self.balance[i] = self.balance[i] * 0.9999 + 0.0001 / obj_loss.detach().item()
        if self.autobalance:
            self.balance = [x / self.balance[self.ssi] for x in self.balance]
        lbox *= self.hyp["box"]
        lobj *= self.hyp["obj"]
        lcls *= self.hyp["cls"]
        bs = preds[0].shape[0]
        return (lbox + lobj + lcls) * bs, torch.cat((lbox, lobj, lcls)).detach()

    def build_targets(self, preds: list[torch.Tensor], targets: torch.Tensor) -> tuple[list, list, list, list]:
        """Assign targets (n, 6) [image, cls, xywh normalised] to anchors and grid cells of every level.

        A target is matched to each anchor whose width and height ratios (both ways) stay below
        ``anchor_t`` and is assigned to its own cell plus the two nearest neighbouring cells (the
        centre may then move by up to 0.5 cell outside the cell, hence ``sigmoid * 2 - 0.5``).
        Returns per level: classes, boxes (xy offset from the cell corner, wh; grid units),
        indices (image, anchor, gj, gi) and matched anchors.
        """
        g = 0.5  # neighbour is used when the centre lies within g of that cell edge
        offsets = torch.tensor(NEIGHBOUR_OFFSETS, device=self.device).float() * g
        n = targets.shape[0]
        anchor_idx = torch.arange(self.na, device=self.device).float().view(self.na, 1).repeat(1, n)
        # (na, n, 7): [image, cls, x, y, w, h, anchor] per (anchor, target) pair
        pairs = torch.cat((targets.repeat(self.na, 1, 1), anchor_idx[..., None]), 2)
        gain = torch.ones(7, device=self.device)
        tcls, tbox, indices, anch = [], [], [], []
        for i in range(self.nl):
            anchors, shape = self.anchors[i], preds[i].shape
            gain[2:6] = torch.tensor(shape, device=self.device)[[3, 2, 3, 2]].float()  # grid x, y, x, y
            t = pairs * gain
            if n:
                ratio = t[..., 4:6] / anchors[:, None]
                t = t[torch.max(ratio, 1 / ratio).max(2)[0] < self.hyp["anchor_t"]]
                t, shift = self._add_neighbours(t, gain[[2, 3]], offsets, g)
            else:
                t, shift = pairs[0], 0
            bc, gxy, gwh, a = t.chunk(4, 1)
            a, (b, c) = a.long().view(-1), bc.long().T
            gij = (gxy - shift).long()
            gi, gj = gij.T
            indices.append((b, a, gj.clamp_(0, shape[2] - 1), gi.clamp_(0, shape[3] - 1)))
            tbox.append(torch.cat((gxy - gij, gwh), 1))
            anch.append(anchors[a])
            tcls.append(c)
        return tcls, tbox, indices, anch

    @staticmethod
    def _add_neighbours(
        t: torch.Tensor, grid_size: torch.Tensor, offsets: torch.Tensor, g: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Repeat matched pairs ``t`` for their nearest x and y neighbour cells; returns (rows, xy shift)."""
        gxy = t[:, 2:4]
        gxy_inverse = grid_size - gxy
        left, up = ((gxy % 1 < g) & (gxy > 1)).T
        right, down = ((gxy_inverse % 1 < g) & (gxy_inverse > 1)).T
        use = torch.stack((torch.ones_like(left), left, up, right, down))
        rows = t.repeat((5, 1, 1))[use]
        shift = (torch.zeros_like(gxy)[None] + offsets[:, None])[use]
        return rows, shift
