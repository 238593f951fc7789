"""Plots: box annotation, image-batch mosaics, label statistics, training results and metric curves.

Figures are drawn on ``matplotlib.figure.Figure`` objects (rendered by the Agg backend, no pyplot
state) and images with OpenCV or PIL (PIL's built-in default font; no font is downloaded).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import cv2
import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from utils.boxes import xywh2xyxy, xyxy2xywh

LOGGER = logging.getLogger("yolov5")

PALETTE = (  # class colours (RGB hex), upstream's order
    "FF3838", "FF9D97", "FF701F", "FFB21D", "CFD231", "48F90A", "92CC17", "3DDB86", "1A9334", "00D4BB",
    "2C99A8", "00C2FF", "344593", "6473FF", "0018EC", "8438FF", "520085", "CB38FF", "FF95C8", "FF37C7",
)
RESULTS_COLUMNS = (1, 2, 3, 4, 5, 8, 9, 10, 6, 7)  # results.csv columns in subplot order (train row, val row)


def colors(i: int, bgr: bool = False) -> tuple[int, int, int]:
    """Colour of class ``i`` from the 20-colour palette, as RGB (or BGR for OpenCV)."""
    h = PALETTE[int(i) % len(PALETTE)]
    rgb = tuple(int(h[k : k + 2], 16) for k in (0, 2, 4))
    return rgb[::-1] if bgr else rgb


def _is_ascii(text) -> bool:
    return all(ord(ch) < 128 for ch in str(text))


class Annotator:
    """Draws boxes and labels on an image (HWC uint8), with OpenCV (in place) or PIL."""

    def __init__(self, im, line_width: int | None = None, font_size: int | None = None, pil: bool = False,
                 example: str = "abc"):
        self.pil = pil or not _is_ascii(example)  # OpenCV cannot render non-ASCII text
        if self.pil:
            self.im = im if isinstance(im, Image.Image) else Image.fromarray(im)
            self.draw = ImageDraw.Draw(self.im)
            size = font_size or max(round(sum(self.im.size) / 2 * 0.035), 12)
            self.font = ImageFont.load_default(size=max(size, 1))
            width, height = self.im.size
        else:
            if not im.flags["C_CONTIGUOUS"]:
                raise ValueError("Annotator needs a contiguous image; use np.ascontiguousarray(im)")
            self.im = im
            height, width = im.shape[:2]
        self.lw = line_width or max(round((height + width) / 2 * 0.003), 2)

    def box_label(self, box, label: str = "", color=(128, 128, 128), txt_color=(255, 255, 255)) -> None:
        """Draw an xyxy ``box`` with ``label`` on a filled tab above it (inside when it would leave the image)."""
        if self.pil:
            self._box_label_pil(box, label, color, txt_color)
        else:
            self._box_label_cv2(box, label, color, txt_color)

    def _box_label_pil(self, box, label, color, txt_color) -> None:
        box = [float(v) for v in box]
        self.draw.rectangle(box, width=self.lw, outline=tuple(color))
        if label:
            left, top, right, bottom = self.font.getbbox(label)
            w, h = right - left, bottom - top
            outside = box[1] - h >= 0
            y0 = box[1] - h if outside else box[1]
            self.draw.rectangle((box[0], y0, box[0] + w + 1, y0 + h + 1), fill=tuple(color))
            self.draw.text((box[0], y0 - top), label, fill=tuple(txt_color), font=self.font)

    def _box_label_cv2(self, box, label, color, txt_color) -> None:
        p1, p2 = (int(box[0]), int(box[1])), (int(box[2]), int(box[3]))
        cv2.rectangle(self.im, p1, p2, color, thickness=self.lw, lineType=cv2.LINE_AA)
        if label:
            thickness = max(self.lw - 1, 1)
            scale = self.lw / 3
            w, h = cv2.getTextSize(label, 0, fontScale=scale, thickness=thickness)[0]
            outside = p1[1] - h >= 3
            tab_corner = (p1[0] + w, p1[1] - h - 3 if outside else p1[1] + h + 3)
            cv2.rectangle(self.im, p1, tab_corner, color, -1, cv2.LINE_AA)
            origin = (p1[0], p1[1] - 2 if outside else p1[1] + h + 2)
            cv2.putText(self.im, label, origin, 0, scale, txt_color, thickness=thickness, lineType=cv2.LINE_AA)

    def rectangle(self, xy, fill=None, outline=None, width: int = 1) -> None:
        """Plain rectangle [x1, y1, x2, y2]."""
        if self.pil:
            self.draw.rectangle([float(v) for v in xy], fill=fill, outline=outline, width=width)
            return
        p1, p2 = (int(xy[0]), int(xy[1])), (int(xy[2]), int(xy[3]))
        if fill is not None:
            cv2.rectangle(self.im, p1, p2, fill, -1)
        if outline is not None:
            cv2.rectangle(self.im, p1, p2, outline, width)

    def text(self, xy, text: str, txt_color=(255, 255, 255)) -> None:
        """Text with its top-left corner at ``xy``."""
        if self.pil:
            self.draw.text(xy, text, fill=tuple(txt_color), font=self.font)
            return
        h = cv2.getTextSize(text, 0, fontScale=self.lw / 3, thickness=1)[0][1]
        cv2.putText(self.im, text, (int(xy[0]), int(xy[1]) + h), 0, self.lw / 3, txt_color, 1, cv2.LINE_AA)

    def result(self) -> np.ndarray:
        """The annotated image as a numpy array."""
        return np.asarray(self.im)


def output_to_target(output: list[torch.Tensor], max_det: int = 300) -> np.ndarray:
    """NMS output (per image (n, 6) [xyxy, conf, cls]) -> plot_images targets (k, 7) [image, cls, xywh, conf]."""
    rows = []
    for i, det in enumerate(output):
        box, conf, cls = det[:max_det, :6].detach().cpu().float().split((4, 1, 1), 1)
        rows.append(torch.cat((torch.full_like(conf, i), cls, xyxy2xywh(box), conf), 1))
    return torch.cat(rows, 0).numpy() if rows else np.zeros((0, 7), dtype=np.float32)


def _mosaic(images: np.ndarray, grid: int) -> np.ndarray:
    """Tile CHW images (0-255) column by column into a white grid x grid uint8 mosaic."""
    _, _, h, w = images.shape
    mosaic = np.full((grid * h, grid * w, 3), 255, dtype=np.uint8)
    for i, im in enumerate(images):
        x, y = w * (i // grid), h * (i % grid)
        mosaic[y : y + h, x : x + w] = im.transpose(1, 2, 0)
    return mosaic


def plot_images(images, targets, paths=None, fname: str | Path = "images.jpg", names=None,
                max_size: int = 1920, max_subplots: int = 16) -> None:
    """Save a mosaic of a batch with its boxes: ``targets`` (n, 6) labels or (n, 7) predictions.

    Target rows are [image index, cls, x, y, w, h(, conf)], xywh normalised or in pixels; predictions
    are drawn when conf > 0.25.
    """
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().float().numpy()
    if isinstance(targets, torch.Tensor):
        targets = targets.detach().cpu().numpy()
    images = images[:max_subplots].astype(np.float32)
    if images.max(initial=0) <= 1:
        images = images * 255
    bs, _, h, w = images.shape
    grid = math.ceil(bs**0.5)
    mosaic = _mosaic(images, grid)
    scale = max_size / grid / max(h, w)
    if scale < 1:
        h, w = math.ceil(scale * h), math.ceil(scale * w)
        mosaic = cv2.resize(mosaic, (w * grid, h * grid))
    font_size = int((h + w) * grid * 0.01)
    annotator = Annotator(mosaic, line_width=round(font_size / 10), font_size=font_size, pil=True, example=str(names))
    for i in range(bs):
        x, y = w * (i // grid), h * (i % grid)
        annotator.rectangle([x, y, x + w, y + h], None, (255, 255, 255), width=2)
        if paths:
            annotator.text((x + 5, y + 5), Path(paths[i]).name[:40], txt_color=(220, 220, 220))
        if len(targets):
            _draw_targets(annotator, targets[targets[:, 0] == i], (x, y), (w, h), scale, names)
    Path(fname).parent.mkdir(parents=True, exist_ok=True)
    annotator.im.save(fname)


def _draw_targets(annotator: Annotator, rows: np.ndarray, origin, size, scale: float, names) -> None:
    """Boxes of one mosaic tile: rows [image, cls, xywh(, conf)], tile at ``origin`` of ``size`` (w, h)."""
    boxes = xywh2xyxy(rows[:, 2:6].astype(np.float64))
    is_labels = rows.shape[1] == 6
    if len(boxes):
        if boxes.max() <= 1.01:  # normalised
            boxes[:, [0, 2]] *= size[0]
            boxes[:, [1, 3]] *= size[1]
        elif scale < 1:  # pixels of the un-resized tile
            boxes *= scale
    boxes[:, [0, 2]] += origin[0]
    boxes[:, [1, 3]] += origin[1]
    for row, box in zip(rows, boxes):
        cls = int(row[1])
        name = names[cls] if names else cls
        if is_labels or row[6] > 0.25:
            label = f"{name}" if is_labels else f"{name} {row[6]:.1f}"
            annotator.box_label(box, label, color=colors(cls))


def plot_results(file: str | Path = "path/to/results.csv", dir: str | Path = "") -> None:  # noqa: A002
    """Plot every results*.csv next to ``file`` (or in ``dir``) as a 2x5 grid, saved as results.png."""
    import pandas as pd  # imported here: pandas and scipy add ~0.3 s to the start-up of val.py and detect.py
    from scipy.ndimage import gaussian_filter1d

    save_dir = Path(file).parent if file else Path(dir)
    files = sorted(save_dir.glob("results*.csv"))
    if not files:
        raise FileNotFoundError(f"No results*.csv files found in {save_dir.resolve()}")
    fig = Figure(figsize=(12, 6), tight_layout=True)
    axes = fig.subplots(2, 5).ravel()
    for f in files:
        data = pd.read_csv(f)
        columns = [c.strip() for c in data.columns]
        epochs = data.values[:, 0]
        for ax, j in zip(axes, RESULTS_COLUMNS):
            y = data.values[:, j].astype(float)
            ax.plot(epochs, y, marker=".", label=f.stem, linewidth=2, markersize=8)
            ax.plot(epochs, gaussian_filter1d(y, sigma=3), ":", label="smooth", linewidth=2)
            ax.set_title(columns[j], fontsize=12)
    axes[1].legend()
    fig.savefig(save_dir / "results.png", dpi=200)


def _hide_spines(ax) -> None:
    for side in ("top", "right", "left", "bottom"):
        ax.spines[side].set_visible(False)


def _label_boxes_image(labels: np.ndarray, size: int = 2000, n: int = 1000) -> np.ndarray:
    """Up to ``n`` label boxes drawn centred on a white square, coloured by class."""
    boxes = xywh2xyxy(np.concatenate((np.full((len(labels), 2), 0.5), labels[:, 3:5]), 1)) * size
    img = Image.fromarray(np.full((size, size, 3), 255, dtype=np.uint8))
    draw = ImageDraw.Draw(img)
    for cls, box in zip(labels[:n, 0], boxes[:n]):
        draw.rectangle(box.tolist(), width=1, outline=colors(cls))
    return np.asarray(img)


def plot_labels(labels: np.ndarray, names=(), save_dir: str | Path = Path("")) -> None:
    """Label statistics, ``labels`` (n, 5) [cls, xywh normalised]: labels.jpg and labels_correlogram.jpg."""
    save_dir = Path(save_dir)
    LOGGER.info(f"Plotting labels to {save_dir / 'labels.jpg'}... ")
    labels = np.asarray(labels, dtype=np.float64)
    classes, nc = labels[:, 0], int(labels[:, 0].max(initial=0) + 1)
    names = list(names.values()) if isinstance(names, dict) else list(names)
    fig = Figure(figsize=(8, 8), tight_layout=True)
    ax = fig.subplots(2, 2).ravel()
    bars = ax[0].hist(classes, bins=np.linspace(0, nc, nc + 1) - 0.5, rwidth=0.8)[2]
    for i, bar in enumerate(bars):
        bar.set_color([v / 255 for v in colors(i)])
    ax[0].set_ylabel("instances")
    if 0 < len(names) < 30:
        ax[0].set_xticks(range(len(names)))
        ax[0].set_xticklabels(names, rotation=90, fontsize=10)
    else:
        ax[0].set_xlabel("classes")
    ax[1].imshow(_label_boxes_image(labels))
    ax[1].axis("off")
    for a, (i, j, xlabel, ylabel) in zip(ax[2:], ((1, 2, "x", "y"), (3, 4, "width", "height"))):
        a.hist2d(labels[:, i], labels[:, j], bins=50, cmap="Blues", cmin=1)
        a.set_xlabel(xlabel)
        a.set_ylabel(ylabel)
    for a in ax:
        _hide_spines(a)
    fig.savefig(save_dir / "labels.jpg", dpi=200)
    _plot_correlogram(labels[:, 1:], save_dir / "labels_correlogram.jpg")


def _plot_correlogram(boxes: np.ndarray, path: Path) -> None:
    """Lower-triangle grid of x, y, width, height: histograms on the diagonal, 2-D histograms below."""
    titles = ("x", "y", "width", "height")
    fig = Figure(figsize=(8, 8), tight_layout=True)
    axes = fig.subplots(4, 4)
    for r in range(4):
        for c in range(4):
            ax = axes[r, c]
            if c > r:
                ax.axis("off")
                continue
            if c == r:
                ax.hist(boxes[:, c], bins=50, color="steelblue")
            else:
                ax.hist2d(boxes[:, c], boxes[:, r], bins=50, cmap="Blues", cmin=1)
            ax.set_xlabel(titles[c] if r == 3 else "")
            ax.set_ylabel(titles[r] if c == 0 else "")
    fig.savefig(path, dpi=200)


def plot_pr_curve(px: np.ndarray, py: list[np.ndarray], ap: np.ndarray, save_path: Path, names: dict) -> None:
    """Precision-recall curve per class (when fewer than 21 classes) and averaged, with mAP@0.5 in the legend."""
    fig = Figure(figsize=(9, 6), tight_layout=True)
    ax = fig.subplots()
    py = np.stack(py, axis=1) if py else np.zeros((len(px), 0))
    if 0 < len(names) < 21:
        for i, y in enumerate(py.T):
            ax.plot(px, y, linewidth=1, label=f"{names[i]} {ap[i, 0]:.3f}")
    else:
        ax.plot(px, py, linewidth=1, color="grey")
    if py.shape[1]:
        ax.plot(px, py.mean(1), linewidth=3, color="blue", label=f"all classes {ap[:, 0].mean():.3f} mAP@0.5")
    _finish_curve(ax, "Recall", "Precision", "Precision-Recall Curve")
    fig.savefig(save_path, dpi=250)


def plot_mc_curve(px: np.ndarray, py: np.ndarray, mean_curve: np.ndarray, save_path: Path, names: dict,
                  ylabel: str = "Metric", xlabel: str = "Confidence") -> None:
    """Metric-confidence curves (k, len(px)) per class and their smoothed mean ``mean_curve`` with its peak."""
    fig = Figure(figsize=(9, 6), tight_layout=True)
    ax = fig.subplots()
    if 0 < len(names) < 21:
        for i, y in enumerate(py):
            ax.plot(px, y, linewidth=1, label=f"{names[i]}")
    else:
        ax.plot(px, py.T, linewidth=1, color="grey")
    best = mean_curve.argmax()
    label = f"all classes {mean_curve[best]:.2f} at {px[best]:.3f}"
    ax.plot(px, mean_curve, linewidth=3, color="blue", label=label)
    _finish_curve(ax, xlabel, ylabel, f"{ylabel}-Confidence Curve")
    fig.savefig(save_path, dpi=250)


def _finish_curve(ax, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(bbox_to_anchor=(1.04, 1), loc="upper left")
    ax.set_title(title)


def plot_confusion_matrix(matrix: np.ndarray, save_path: Path, names: list, normalize: bool = True) -> None:
    """Heat map of a (nc + 1)^2 confusion matrix (rows predicted, columns true), cells < 0.005 left blank."""
    nc = matrix.shape[0] - 1
    array = matrix / ((matrix.sum(0).reshape(1, -1) + 1e-9) if normalize else 1)
    array[array < 0.005] = np.nan
    fig = Figure(figsize=(12, 9), tight_layout=True)
    ax = fig.subplots()
    image = ax.imshow(array, cmap="Blues", vmin=0.0, aspect="auto")
    fig.colorbar(image, ax=ax)
    if nc < 30:
        for (r, c), value in np.ndenumerate(array):
            if not np.isnan(value):
                ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if value > 0.5 * np.nanmax(array) else "black")
    if 0 < len(names) < 99 and len(names) == nc:
        ticks = list(names) + ["background"]
        ax.set_xticks(range(nc + 1), ticks, rotation=90)
        ax.set_yticks(range(nc + 1), ticks)
    ax.set_xlabel("True")
    ax.set_ylabel("Predicted")
    ax.set_title("Confusion Matrix")
    fig.savefig(save_path, dpi=250)


def feature_visualization(x: torch.Tensor, module_type: str, stage: int, n: int = 32,
                          save_dir: Path = Path("runs/detect/exp")) -> None:
    """Save the first ``n`` channel maps of a stage's output (first image) as PNG, and all of them as .npy."""
    if "Detect" in module_type:
        return
    _, channels, height, width = x.shape
    if height <= 1 or width <= 1:
        return
    path = Path(save_dir) / f"stage{stage}_{module_type.split('.')[-1]}_features.png"
    maps = x[0].detach().cpu().float()
    n = min(n, channels)
    fig = Figure(tight_layout=True)
    axes = np.atleast_1d(fig.subplots(math.ceil(n / 8), 8)).ravel()
    fig.subplots_adjust(wspace=0.05, hspace=0.05)
    for ax in axes:
        ax.axis("off")
    for i in range(n):
        axes[i].imshow(maps[i].numpy())
    LOGGER.info(f"Saving {path}... ({n}/{channels})")
    fig.savefig(path, dpi=300, bbox_inches="tight")
    np.save(str(path.with_suffix(".npy")), maps.numpy())
