"""Detection metrics: AP per class (COCO-style 101-point), prediction matching, confusion matrix, fitness.

Conventions (pinned by the behaviour fixture ``ap.pt``):
- predictions are ranked by decreasing confidence; per class, recall = cumulative TP / labels and
  precision = cumulative TP / predictions so far;
- AP integrates the precision envelope (the best precision at any higher recall) sampled at 101
  recall points with the trapezoid rule;
- P, R and F1 are read off curves against a 1000-point confidence grid at the confidence where the
  box-filtered class-mean F1 peaks.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from utils.boxes import box_iou
from utils.plots import plot_confusion_matrix, plot_mc_curve, plot_pr_curve

FITNESS_WEIGHTS = (0.0, 0.0, 0.1, 0.9)  # over [P, R, mAP@0.5, mAP@0.5:0.95]
CONF_GRID = np.linspace(0, 1, 1000)  # confidences at which the P/R/F1 curves are sampled
RECALL_GRID = np.linspace(0, 1, 101)  # recall points of the AP integral


def fitness(x: np.ndarray) -> np.ndarray:
    """Model fitness per row of metrics [P, R, mAP@0.5, mAP@0.5:0.95, ...]: 0.1 mAP@0.5 + 0.9 mAP@0.5:0.95."""
    return np.asarray(x)[:, :4] @ np.asarray(FITNESS_WEIGHTS)


def smooth(y: np.ndarray, f: float = 0.05) -> np.ndarray:
    """Centred moving average of ``y`` over an odd window of about ``f * len(y)`` points (101 for 1000, 0.1).

    The series is extended at both ends by repeating its end values, so the output has ``y``'s length.
    """
    half = (round(len(y) * f * 2) // 2 + 1) // 2
    window = 2 * half + 1
    return np.convolve(np.pad(y, half, mode="edge"), np.full(window, 1.0 / window), mode="valid")


def _envelope(values: np.ndarray) -> np.ndarray:
    """Running maximum taken from the end: element i becomes max(values[i:])."""
    return np.maximum.accumulate(values[::-1])[::-1]


def compute_ap(recall: np.ndarray, precision: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Average precision of one precision-recall curve (points in decreasing-confidence order).

    The curve is closed with (recall 0, precision 1) and (recall 1, precision 0); its precision envelope
    is sampled at 101 recall points 0, 0.01, ..., 1 and integrated with the trapezoidal rule.
    Returns (ap, envelope, recall), the latter two including the closing points.
    """
    closed_recall = np.concatenate(([0.0], recall, [1.0]))
    envelope = _envelope(np.concatenate(([1.0], precision, [0.0])))
    samples = np.interp(RECALL_GRID, closed_recall, envelope)
    return float(np.trapezoid(samples, RECALL_GRID)), envelope, closed_recall


class ClassCurves(NamedTuple):
    """Per-class results of ``class_curves`` for the C classes that have labels."""

    classes: np.ndarray  # (C,) int, sorted
    n_labels: np.ndarray  # (C,) labels per class
    ap: np.ndarray  # (C, T) AP at each IoU threshold
    precision: np.ndarray  # (C, len(CONF_GRID)) precision against confidence, first threshold
    recall: np.ndarray  # (C, len(CONF_GRID)) recall against confidence, first threshold
    pr: np.ndarray  # (C, len(CONF_GRID)) precision envelope against recall CONF_GRID, first threshold


def _ranked_stats(tp: np.ndarray, conf: np.ndarray, pred_cls: np.ndarray, classes: np.ndarray, n_labels: np.ndarray,
                  eps: float):
    """Predictions of the labelled ``classes`` grouped by class, each group in decreasing confidence.

    Returns (classes, conf, recall, precision) of the kept predictions in that order; recall and
    precision are (n, T) running values that restart at the first prediction of each class.
    """
    by_conf = np.argsort(-conf)
    order = by_conf[np.argsort(pred_cls[by_conf], kind="stable")]
    order = order[np.isin(pred_cls[order], classes)]
    cls, hits = pred_cls[order], tp[order].astype(np.int64)
    group_start = np.ones(len(cls), dtype=bool)
    group_start[1:] = cls[1:] != cls[:-1]
    first_row = np.flatnonzero(group_start)[np.cumsum(group_start) - 1]  # first row of each row's class
    running = np.concatenate((np.zeros((1, hits.shape[1]), np.int64), hits.cumsum(0)))
    true_pos = running[1:] - running[first_row]
    seen = (np.arange(len(cls)) - first_row + 1)[:, None]
    row_labels = n_labels[np.searchsorted(classes, cls)][:, None]
    return cls, conf[order], true_pos / (row_labels + eps), true_pos / seen


def class_curves(tp, conf, pred_cls, target_cls, eps: float = 1e-16) -> ClassCurves:
    """AP and confidence curves of every labelled class from per-prediction correctness.

    ``tp`` (n, T) bool: prediction correct at each IoU threshold; ``conf``, ``pred_cls`` (n,);
    ``target_cls`` (m,) the class of every label. A labelled class without predictions gets zeros;
    predictions of unlabelled classes are ignored. Above a class's highest confidence its recall
    curve is 0 and its precision curve 1; below the lowest both keep their last value.
    """
    tp, conf, pred_cls, target_cls = (np.asarray(a) for a in (tp, conf, pred_cls, target_cls))
    classes, n_labels = np.unique(target_cls, return_counts=True)
    cls, conf, recall, precision = _ranked_stats(tp, conf, pred_cls, classes, n_labels, eps)
    shape = (len(classes), len(CONF_GRID))
    out = ClassCurves(classes.astype(int), n_labels, np.zeros((len(classes), tp.shape[1])), np.zeros(shape),
                      np.zeros(shape), np.zeros(shape))
    lo, hi = np.searchsorted(cls, classes, "left"), np.searchsorted(cls, classes, "right")
    for i, rows in enumerate(slice(a, b) for a, b in zip(lo, hi)):
        if rows.start == rows.stop:
            continue
        falling_conf = -conf[rows]  # increasing, as np.interp needs
        out.precision[i] = np.interp(-CONF_GRID, falling_conf, precision[rows, 0], left=1)
        out.recall[i] = np.interp(-CONF_GRID, falling_conf, recall[rows, 0], left=0)
        for j in range(tp.shape[1]):
            out.ap[i, j], envelope, closed_recall = compute_ap(recall[rows, j], precision[rows, j])
            if j == 0:
                out.pr[i] = np.interp(CONF_GRID, closed_recall, envelope)
    return out


def best_f1_index(f1: np.ndarray) -> int:
    """Index into CONF_GRID where the class-mean F1, smoothed over 101 grid points, is largest (first on ties)."""
    mean = f1.mean(0) if len(f1) else np.zeros(f1.shape[1])
    return int(smooth(mean, 0.1).argmax())


def _plot_class_curves(curves: ClassCurves, f1: np.ndarray, save_dir: Path, names, prefix: str) -> None:
    """PR curve and the F1/P/R-confidence curves of ``class_curves`` results."""
    names = dict(names) if isinstance(names, dict) else dict(enumerate(names))
    labelled = dict(enumerate(names.get(c, str(c)) for c in curves.classes.tolist()))
    plot_pr_curve(CONF_GRID, curves.pr, curves.ap, save_dir / f"{prefix}PR_curve.png", labelled)
    for values, ylabel, stem in ((f1, "F1", "F1"), (curves.precision, "Precision", "P"), (curves.recall, "Recall", "R")):
        mean = smooth(values.mean(0), 0.05) if len(values) else np.zeros(len(CONF_GRID))
        plot_mc_curve(CONF_GRID, values, mean, save_dir / f"{prefix}{stem}_curve.png", labelled, ylabel)


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
    Returns (tp, fp, p, r, f1, ap (k, t), unique_classes) for the k classes present; tp and fp are the
    counts implied by P and R at the chosen confidence.
    """
    curves = class_curves(tp, conf, pred_cls, target_cls, eps)
    f1_curves = 2 * curves.precision * curves.recall / (curves.precision + curves.recall + eps)
    if plot:
        _plot_class_curves(curves, f1_curves, Path(save_dir), names, prefix)
    at = best_f1_index(f1_curves)
    p, r, f1 = curves.precision[:, at], curves.recall[:, at], f1_curves[:, at]
    true_pos = np.round(r * curves.n_labels)
    false_pos = np.round(true_pos / (p + eps) - true_pos)
    return true_pos, false_pos, p, r, f1, curves.ap, curves.classes


def _best_row(score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column of ``score`` (rows, cols): the largest value and its row, the last row on ties."""
    best, flipped_row = score.flip(0).max(0)
    return best, score.shape[0] - 1 - flipped_row


def _label_choices(iou: torch.Tensor, allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each detection's preferred label: the allowed one with the highest IoU (labels x detections input).

    Returns (best IoU, label index, whether any label was allowed), one entry per detection.
    """
    best, label = _best_row(torch.where(allowed, iou, torch.full_like(iou, -torch.inf)))
    return best, label, allowed.any(0)


def process_batch(detections: torch.Tensor, labels: torch.Tensor, iouv: torch.Tensor) -> torch.Tensor:
    """Which detections are correct at each IoU threshold.

    ``detections`` (n, 6) [xyxy, conf, cls], sorted by decreasing confidence; ``labels`` (m, 5) [cls, xyxy];
    ``iouv`` (t,) thresholds. Each detection claims its same-class label of highest IoU; at threshold
    u the claim counts when that IoU >= u, and a label accepts only the first counting claim in
    detection order. So a detection is correct at u when its own IoU reaches u and no earlier
    detection claiming the same label reached it. Returns a bool tensor (n, t).
    """
    n, m = detections.shape[0], labels.shape[0]
    if n == 0 or m == 0:
        return torch.zeros((n, iouv.shape[0]), dtype=torch.bool, device=iouv.device)
    thresholds = iouv.to(detections.device)
    iou = box_iou(labels[:, 1:], detections[:, :4])
    allowed = (labels[:, :1] == detections[:, 5]) & (iou >= thresholds.min())
    best, label, _ = _label_choices(iou, allowed)
    per_label = torch.full((n + 1, m), -torch.inf, dtype=best.dtype, device=iou.device)  # row d + 1: IoU of detection d's claim
    per_label[torch.arange(1, n + 1), label] = best
    earlier = per_label.cummax(0).values[:-1].gather(1, label[:, None])  # best claim on the label before d
    return ((best[:, None] >= thresholds) & (earlier < thresholds)).to(iouv.device)


def _confusion_pairs(iou: torch.Tensor, iou_thres: float) -> tuple[np.ndarray, np.ndarray]:
    """Matched (label, detection) indices for the confusion matrix, class-agnostic.

    Each detection claims its label of highest IoU (> ``iou_thres``); each label keeps the claim of
    highest IoU, the later detection on ties.
    """
    m, n = iou.shape
    if m == 0 or n == 0:
        return np.zeros(0, dtype=int), np.zeros(0, dtype=int)
    best, label, claimed = _label_choices(iou, iou > iou_thres)
    claims = torch.nn.functional.one_hot(label, m).T.bool() & claimed  # (m, n)
    _, det = _best_row(torch.where(claims, best, torch.full_like(best, -torch.inf)).T)
    kept = claims.any(1)
    return torch.nonzero(kept).flatten().cpu().numpy(), det[kept].cpu().numpy()


class ConfusionMatrix:
    """(nc + 1) x (nc + 1) detection confusion matrix: rows predicted, columns true; the last is background."""

    def __init__(self, nc: int, conf: float = 0.25, iou_thres: float = 0.45):
        self.nc, self.conf, self.iou_thres = nc, conf, iou_thres
        self.matrix = np.zeros((nc + 1,) * 2)  # the extra row/column is the background class

    def _count(self, predicted: np.ndarray, true: np.ndarray) -> None:
        """Add one to the cell (predicted[k], true[k]) for every k."""
        size = self.nc + 1
        self.matrix += np.bincount(predicted * size + true, minlength=size * size).reshape(size, size)

    def process_batch(self, detections: torch.Tensor | None, labels: torch.Tensor) -> None:
        """Accumulate one image: ``detections`` (n, 6) [xyxy, conf, cls] or None, ``labels`` (m, 5) [cls, xyxy].

        With ``detections=None`` (nothing predicted), ``labels`` may be the (m,) label classes.
        Unmatched labels count as background false negatives, unmatched detections as background
        false positives (also on images without any match, where upstream counts none).
        """
        background = self.nc
        if detections is None:
            true = (labels if labels.dim() == 1 else labels[:, 0]).int().cpu().numpy()
            self._count(np.full_like(true, background), true)
            return
        detections = detections[detections[:, 4] > self.conf]
        true = labels[:, 0].int().cpu().numpy()
        predicted = detections[:, 5].int().cpu().numpy()
        label_idx, det_idx = _confusion_pairs(box_iou(labels[:, 1:], detections[:, :4]), self.iou_thres)
        missed = np.setdiff1d(np.arange(len(true)), label_idx)
        spurious = np.setdiff1d(np.arange(len(predicted)), det_idx)
        self._count(
            np.concatenate((predicted[det_idx], np.full(len(missed), background), predicted[spurious])),
            np.concatenate((true[label_idx], true[missed], np.full(len(spurious), background))),
        )

    def tp_fp(self) -> tuple[np.ndarray, np.ndarray]:
        """True and false positives per class (background excluded)."""
        hits = np.diag(self.matrix)[:-1]
        return hits, self.matrix.sum(1)[:-1] - hits

    def plot(self, save_dir: str | Path = "", names: dict | list | tuple = (), normalize: bool = True) -> None:
        """Save ``confusion_matrix.png`` in ``save_dir`` (columns normalised to sum 1 when ``normalize``)."""
        names = list(names.values()) if isinstance(names, dict) else list(names)
        plot_confusion_matrix(self.matrix, Path(save_dir) / "confusion_matrix.png", names, normalize)
