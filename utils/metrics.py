"""Detection metrics: AP per class (COCO-style 101-point), prediction matching, confusion matrix, fitness."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from utils.boxes import box_iou
from utils.plots import plot_confusion_matrix, plot_mc_curve, plot_pr_curve

FITNESS_WEIGHTS = (0.0, 0.0, 0.1, 0.9)  # over [P, R, mAP@0.5, mAP@0.5:0.95]


def fitness(x: np.ndarray) -> np.ndarray:
    """Model fitness per row of metrics [P, R, mAP@0.5, mAP@0.5:0.95, ...]: 0.1 mAP@0.5 + 0.9 mAP@0.5:0.95."""
    return (np.asarray(x)[:, :4] * np.array(FITNESS_WEIGHTS)).sum(1)


def smooth(y: np.ndarray, f: float = 0.05) -> np.ndarray:
    """Box-filter ``y`` over a window of fraction ``f`` of its length (odd size, ends padded by edge values)."""
    window = round(len(y) * f * 2) // 2 + 1
    pad = np.ones(window // 2)
    padded = np.concatenate((pad * y[0], y, pad * y[-1]))
    return np.convolve(padded, np.ones(window) / window, mode="valid")


def compute_ap(recall: np.ndarray, precision: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Average precision of one precision-recall curve (points in decreasing-confidence order).

    The precision envelope (running maximum from the right) is sampled at 101 recall points
    0, 0.01, ..., 1 and integrated with the trapezoidal rule. Returns (ap, envelope, recall), the
    latter two with the sentinel end points (recall 0 -> precision 1, recall 1 -> precision 0).
    """
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([1.0], precision, [0.0]))
    mpre = np.flip(np.maximum.accumulate(np.flip(mpre)))
    x = np.linspace(0, 1, 101)
    return float(np.trapezoid(np.interp(x, mrec, mpre), x)), mpre, mrec


def _as_name_dict(names: dict | list | tuple) -> dict:
    return dict(names) if isinstance(names, dict) else dict(enumerate(names))


def ap_per_class(
    tp: np.ndarray,
    conf: np.ndarray,
    pred_cls: np.ndarray,
    target_cls: np.ndarray,
    plot: bool = False,
    save_dir: str | Path = ".",
    names: dict | list | tuple = (),
    eps: float = 1e-16,
    prefix: str = "",
) -> tuple[np.ndarray, ...]:
    """Per-class AP at every IoU threshold, and P, R, F1 at the confidence maximising the mean F1.

    ``tp`` (n, t) bool: prediction correct at each of t IoU thresholds; ``conf``, ``pred_cls`` (n,);
    ``target_cls`` (m,) classes of all labels. Only classes present in ``target_cls`` are reported.
    Returns (tp, fp, p, r, f1, ap (k, t), unique_classes) for the k classes present.
    """
    order = np.argsort(-conf)
    tp, conf, pred_cls = tp[order], conf[order], pred_cls[order]
    unique_classes, n_labels = np.unique(target_cls, return_counts=True)
    nc = unique_classes.shape[0]
    px, pr_curves = np.linspace(0, 1, 1000), []
    ap, p, r = np.zeros((nc, tp.shape[1])), np.zeros((nc, 1000)), np.zeros((nc, 1000))
    for ci, c in enumerate(unique_classes):
        is_c = pred_cls == c
        if is_c.sum() == 0 or n_labels[ci] == 0:
            continue
        fp_cum = (1 - tp[is_c]).cumsum(0)
        tp_cum = tp[is_c].cumsum(0)
        recall = tp_cum / (n_labels[ci] + eps)
        precision = tp_cum / (tp_cum + fp_cum)
        r[ci] = np.interp(-px, -conf[is_c], recall[:, 0], left=0)  # confidence axis is decreasing
        p[ci] = np.interp(-px, -conf[is_c], precision[:, 0], left=1)
        for j in range(tp.shape[1]):
            ap[ci, j], mpre, mrec = compute_ap(recall[:, j], precision[:, j])
            if plot and j == 0:
                pr_curves.append(np.interp(px, mrec, mpre))
    f1 = 2 * p * r / (p + r + eps)
    if plot:
        all_names = _as_name_dict(names)
        present = dict(enumerate(v for k, v in all_names.items() if k in unique_classes))
        save_dir = Path(save_dir)
        plot_pr_curve(px, pr_curves, ap, save_dir / f"{prefix}PR_curve.png", present)
        for curve, label, stem in ((f1, "F1", "F1"), (p, "Precision", "P"), (r, "Recall", "R")):
            mean_curve = smooth(curve.mean(0), 0.05)
            plot_mc_curve(px, curve, mean_curve, save_dir / f"{prefix}{stem}_curve.png", present, label)
    best = smooth(f1.mean(0), 0.1).argmax()
    p, r, f1 = p[:, best], r[:, best], f1[:, best]
    tp = (r * n_labels).round()
    fp = (tp / (p + eps) - tp).round()
    return tp, fp, p, r, f1, ap, unique_classes.astype(int)


def _greedy_matches(iou: torch.Tensor, allowed: torch.Tensor, label_prefers_iou: bool = False) -> np.ndarray:
    """Unique (label, detection) index pairs (k, 2) among the ``allowed`` ones, upstream's greedy order.

    Pairs are sorted by decreasing IoU and each detection keeps its best label. Each label then keeps
    its best remaining pair by IoU (``label_prefers_iou``, the confusion matrix) or, as upstream's
    val.py does, its first remaining pair in detection order (detections come sorted by confidence).
    """
    label_idx, det_idx = torch.where(allowed)
    matches = torch.stack((label_idx, det_idx), 1).cpu().numpy()
    ious = iou[label_idx, det_idx].cpu().numpy()
    if len(matches) > 1:
        order = ious.argsort()[::-1]
        matches, ious = matches[order], ious[order]
        first = np.unique(matches[:, 1], return_index=True)[1]
        matches, ious = matches[first], ious[first]
        if label_prefers_iou:
            matches = matches[ious.argsort()[::-1]]
        matches = matches[np.unique(matches[:, 0], return_index=True)[1]]
    return matches.reshape(-1, 2)


def process_batch(detections: torch.Tensor, labels: torch.Tensor, iouv: torch.Tensor) -> torch.Tensor:
    """Which detections are correct at each IoU threshold.

    ``detections`` (n, 6) [xyxy, conf, cls]; ``labels`` (m, 5) [cls, xyxy]; ``iouv`` (t,) thresholds.
    A detection is correct at a threshold when it is uniquely matched to a label of its class with
    IoU >= threshold. Returns a bool tensor (n, t).
    """
    correct = np.zeros((detections.shape[0], iouv.shape[0]), dtype=bool)
    iou = box_iou(labels[:, 1:], detections[:, :4])
    same_class = labels[:, 0:1] == detections[:, 5]
    for i, threshold in enumerate(iouv):
        matches = _greedy_matches(iou, (iou >= threshold) & same_class)
        correct[matches[:, 1], i] = True
    return torch.tensor(correct, dtype=torch.bool, device=iouv.device)


class ConfusionMatrix:
    """(nc + 1) x (nc + 1) detection confusion matrix: rows predicted, columns true; the last is background."""

    def __init__(self, nc: int, conf: float = 0.25, iou_thres: float = 0.45):
        self.matrix = np.zeros((nc + 1, nc + 1))
        self.nc = nc
        self.conf = conf
        self.iou_thres = iou_thres

    def process_batch(self, detections: torch.Tensor | None, labels: torch.Tensor) -> None:
        """Accumulate one image: ``detections`` (n, 6) [xyxy, conf, cls] or None, ``labels`` (m, 5) [cls, xyxy].

        With ``detections=None`` (nothing predicted), ``labels`` may be the (m,) label classes.
        Unmatched labels count as background false negatives, unmatched detections as background
        false positives (also on images without any match, where upstream counts none).
        """
        if detections is None:
            classes = labels if labels.dim() == 1 else labels[:, 0]
            np.add.at(self.matrix, (self.nc, classes.int().cpu().numpy()), 1)
            return
        detections = detections[detections[:, 4] > self.conf]
        gt_classes = labels[:, 0].int().cpu().numpy()
        det_classes = detections[:, 5].int().cpu().numpy()
        iou = box_iou(labels[:, 1:], detections[:, :4])
        label_idx, det_idx = _greedy_matches(iou, iou > self.iou_thres, label_prefers_iou=True).T
        np.add.at(self.matrix, (det_classes[det_idx], gt_classes[label_idx]), 1)
        missed = np.setdiff1d(np.arange(len(gt_classes)), label_idx)
        np.add.at(self.matrix, (self.nc, gt_classes[missed]), 1)
        spurious = np.setdiff1d(np.arange(len(det_classes)), det_idx)
        np.add.at(self.matrix, (det_classes[spurious], self.nc), 1)

    def tp_fp(self) -> tuple[np.ndarray, np.ndarray]:
        """True and false positives per class (background excluded)."""
        tp = self.matrix.diagonal()
        fp = self.matrix.sum(1) - tp
        return tp[:-1], fp[:-1]

    def plot(self, save_dir: str | Path = "", names: dict | list | tuple = (), normalize: bool = True) -> None:
        """Save ``confusion_matrix.png`` in ``save_dir`` (columns normalised to sum 1 when ``normalize``)."""
        names = list(_as_name_dict(names).values())
        plot_confusion_matrix(self.matrix, Path(save_dir) / "confusion_matrix.png", names, normalize)
