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
from utils.general import increment_path

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


def _label_tab(corner, text_size, gap: int) -> tuple:
    """Rectangle (x1, y1, x2, y2) of the filled tab that carries a box's label.

    The tab is as wide as the text and ``gap`` pixels taller, and hangs from the box's top-left
    ``corner``: above the box while it fits inside the image, otherwise just inside the box.
    """
    (x, y), (width, height) = corner, text_size
    height += gap
    top = y - height if y >= height else y
    return x, top, x + width, top + height


class Annotator:
    """Draws boxes and labels on an image (HWC uint8), with OpenCV (in place) or PIL."""

    def __init__(self, im, line_width: int | None = None, font_size: int | None = None, pil: bool = False,
                 example: str = "abc"):
        self.pil = pil or not _is_ascii(example)  # OpenCV cannot render non-ASCII text
        if not self.pil and not im.flags["C_CONTIGUOUS"]:
            raise ValueError("OpenCV drawing writes into the array in place, so it must be C-contiguous "
                             "(pass np.ascontiguousarray(im))")
        self.im = Image.fromarray(im) if self.pil and not isinstance(im, Image.Image) else im
        height, width = (self.im.height, self.im.width) if self.pil else im.shape[:2]
        mean_side = (height + width) / 2
        self.lw = line_width or max(round(0.003 * mean_side), 2)
        if self.pil:
            self.draw = ImageDraw.Draw(self.im)
            self.font = ImageFont.load_default(size=max(font_size or max(round(0.035 * mean_side), 12), 1))

    def box_label(self, box, label: str = "", color=(128, 128, 128), txt_color=(255, 255, 255)) -> None:
        """Draw an xyxy ``box`` with ``label`` on a filled tab above it (inside when it would leave the image)."""
        if self.pil:
            self._box_label_pil(box, label, color, txt_color)
        else:
            self._box_label_cv2(box, label, color, txt_color)

    def _box_label_pil(self, box, label, color, txt_color) -> None:
        corners = [float(v) for v in box[:4]]
        self.draw.rectangle(corners, width=self.lw, outline=tuple(color))
        if not label:
            return
        ink_left, ink_top, ink_right, ink_bottom = self.font.getbbox(label)
        tab = _label_tab(corners[:2], (ink_right - ink_left + 1, ink_bottom - ink_top), gap=1)
        self.draw.rectangle(tab, fill=tuple(color))
        self.draw.text((tab[0], tab[1] - ink_top), label, fill=tuple(txt_color), font=self.font)

    def _box_label_cv2(self, box, label, color, txt_color) -> None:
        x1, y1, x2, y2 = (int(v) for v in box[:4])
        cv2.rectangle(self.im, (x1, y1), (x2, y2), color, thickness=self.lw, lineType=cv2.LINE_AA)
        if not label:
            return
        font_scale, stroke = self.lw / 3, max(self.lw - 1, 1)
        text_size = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, fontScale=font_scale, thickness=stroke)[0]
        left, top, right, bottom = _label_tab((x1, y1), text_size, gap=3)
        cv2.rectangle(self.im, (left, top), (right, bottom), color, cv2.FILLED, cv2.LINE_AA)
        cv2.putText(self.im, label, (left, bottom - 2), cv2.FONT_HERSHEY_SIMPLEX, font_scale, txt_color,
                    thickness=stroke, lineType=cv2.LINE_AA)

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
        x, y = (int(v) for v in xy[:2])
        if self.pil:
            self.draw.text((x, y), text, fill=tuple(txt_color), font=self.font)
            return
        font_scale = self.lw / 3
        (_, text_h), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
        cv2.putText(self.im, text, (x, y + text_h), cv2.FONT_HERSHEY_SIMPLEX, font_scale, txt_color, 1, cv2.LINE_AA)

    def result(self) -> np.ndarray:
        """The annotated image as a numpy array."""
        return np.asarray(self.im)


def imwrite(path: str | Path, im: np.ndarray) -> None:
    """cv2.imwrite that also works for non-ASCII paths."""
    ok, buffer = cv2.imencode(Path(path).suffix or ".jpg", im)
    if not ok:
        raise OSError(f"could not encode image {path}")
    buffer.tofile(str(path))


def crop_region(xyxy, image_hw: tuple[int, int], gain: float = 1.02, pad: int = 10,
                square: bool = False) -> tuple[slice, slice]:
    """(rows, columns) slices of the region around box ``xyxy``: each side scaled by ``gain`` and grown by
    ``pad`` pixels about the box centre (both sides equal to the longer one first when ``square``), then
    limited to an image of size ``image_hw``; the edges are truncated to whole pixels."""
    corners = np.asarray(xyxy, dtype=np.float64).reshape(2, 2)  # [[x1, y1], [x2, y2]]
    centre, extent = corners.mean(0), corners[1] - corners[0]
    if square:
        extent = np.full(2, extent.max())
    half = (extent * gain + pad) / 2
    limits = np.asarray(image_hw[1::-1], dtype=np.float64)  # (width, height)
    (left, top), (right, bottom) = (np.clip(centre + sign * half, 0, limits).astype(int) for sign in (-1, 1))
    return slice(top, bottom), slice(left, right)


def save_one_box(xyxy, im: np.ndarray, file: Path, gain: float = 1.02, pad: int = 10, square: bool = False,
                 save: bool = True) -> np.ndarray:
    """The part of BGR image ``im`` around box ``xyxy`` (see ``crop_region``).

    With ``save`` the crop is also written as a JPEG at ``file``, numbered when that name is taken (x.jpg, x2.jpg, ...).
    """
    rows, columns = crop_region(xyxy, im.shape[:2], gain, pad, square)
    crop = im[rows, columns]
    if save:
        target = increment_path(Path(file).with_suffix(".jpg"))
        target.parent.mkdir(parents=True, exist_ok=True)
        imwrite(target, crop)
    return crop


def output_to_target(output: list[torch.Tensor], max_det: int = 300) -> np.ndarray:
    """NMS output (per image (n, 6) [xyxy, conf, cls]) -> plot_images targets (k, 7) [image, cls, xywh, conf]."""
    kept = [det[:max_det, :6].detach().float().cpu() for det in output]
    if not kept:
        return np.zeros((0, 7), dtype=np.float32)
    dets = torch.cat(kept)
    image = torch.repeat_interleave(torch.arange(len(kept)), torch.tensor([len(d) for d in kept]))
    columns = (image[:, None].float(), dets[:, 5:6], xyxy2xywh(dets[:, :4]), dets[:, 4:5])
    return torch.cat(columns, 1).numpy()


def _mosaic(images: np.ndarray, grid: int) -> np.ndarray:
    """Tile CHW images (0-255) into a white (grid * h, grid * w) uint8 mosaic, filling columns first."""
    n, channels, h, w = images.shape
    canvas = np.full((grid * grid, channels, h, w), 255, dtype=np.uint8)
    canvas[:n] = images
    # image k sits in column k // grid and row k % grid
    return canvas.reshape(grid, grid, channels, h, w).transpose(1, 3, 0, 4, 2).reshape(grid * h, grid * w, channels)


def _as_numpy(x) -> np.ndarray:
    return x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _mosaic_boxes(targets: np.ndarray, origins: np.ndarray, tile: tuple[int, int], scale: float) -> np.ndarray:
    """Mosaic-pixel xyxy boxes of target rows [image, cls, x, y, w, h(, conf)]; ``origins`` (n, 2) per tile.

    Coordinates count as normalised when none exceeds 1.01 (labels); otherwise they are pixels of the
    un-resized image (predictions) and follow the mosaic's down-scaling.
    """
    tile_h, tile_w = tile
    boxes = xywh2xyxy(targets[:, 2:6].astype(np.float64))
    if boxes.max(initial=0.0) <= 1.01:
        boxes *= (tile_w, tile_h, tile_w, tile_h)
    elif scale < 1:
        boxes *= scale
    return boxes + np.tile(origins[targets[:, 0].astype(int)], 2)


def _tile_origins(n: int, grid: int, tile: tuple[int, int]) -> np.ndarray:
    """Top-left (x, y) of the first ``n`` tiles of a mosaic filled column by column."""
    k = np.arange(n)
    return np.stack((k // grid * tile[1], k % grid * tile[0]), 1)


def _shrink_to_fit(mosaic: np.ndarray, grid: int, tile: tuple[int, int], max_size: int):
    """Resize the mosaic so that no tile side exceeds max_size / grid; returns (mosaic, tile, scale)."""
    scale = max_size / grid / max(tile)
    if scale >= 1:
        return mosaic, tile, scale
    tile = tuple(math.ceil(scale * side) for side in tile)
    return cv2.resize(mosaic, (tile[1] * grid, tile[0] * grid)), tile, scale


def plot_images(images, targets, paths=None, fname: str | Path = "images.jpg", names=None,
                max_size: int = 1920, max_subplots: int = 16) -> np.ndarray:
    """Save a mosaic of a batch with its boxes: ``targets`` (n, 6) labels or (n, 7) predictions; returns the
    mosaic (RGB, HWC).

    Target rows are [image index, cls, x, y, w, h(, conf)], xywh normalised or in pixels; predictions
    are drawn when conf > 0.25. Images fill the grid column by column; the mosaic's longer side is
    at most ``max_size``.
    """
    images = _as_numpy(images)[:max_subplots].astype(np.float32)
    if images.max(initial=0) <= 1:
        images = images * 255
    n, grid = len(images), math.ceil(len(images) ** 0.5)
    mosaic, tile, scale = _shrink_to_fit(_mosaic(images, grid), grid, images.shape[2:], max_size)
    text_px = int(0.01 * grid * sum(tile))
    canvas = Annotator(mosaic, line_width=round(text_px / 10), font_size=text_px, pil=True, example=str(names))
    origins = _tile_origins(n, grid, tile)
    for (x, y), path in zip(origins.tolist(), paths or [None] * n):
        canvas.rectangle([x, y, x + tile[1], y + tile[0]], outline=(255, 255, 255), width=2)
        if path is not None:
            canvas.text((x + 5, y + 5), Path(path).name[:40], txt_color=(220, 220, 220))  # file name, 40 chars max
    targets = _as_numpy(targets)
    if len(targets):
        targets = targets[targets[:, 0] < n]
        _draw_targets(canvas, targets, _mosaic_boxes(targets, origins, tile, scale), names)
    Path(fname).parent.mkdir(parents=True, exist_ok=True)
    canvas.im.save(fname)
    return np.asarray(canvas.im)


def _draw_targets(annotator: Annotator, targets: np.ndarray, boxes: np.ndarray, names) -> None:
    """Draw label rows (6 columns) as they are and prediction rows (7, last = conf) above 0.25, with the score."""
    predicted = targets.shape[1] > 6
    for target, box in zip(targets, boxes):
        cls = int(target[1])
        text = str(names[cls] if names else cls)
        if predicted:
            if target[6] <= 0.25:
                continue
            text = f"{text} {target[6]:.1f}"
        annotator.box_label(box, text, color=colors(cls))


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


def _class_counts(ax, classes: np.ndarray, names: list) -> None:
    """Bar chart of instances per class, each bar in its class colour; named ticks for 1-29 names."""
    counts = np.bincount(classes.astype(int), minlength=len(names))
    ax.bar(np.arange(len(counts)), counts, width=0.8, color=[tuple(v / 255 for v in colors(c)) for c in range(len(counts))])
    ax.set_ylabel("instances")
    if 0 < len(names) < 30:
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=10)
    else:
        ax.set_xlabel("classes")


def plot_labels(labels: np.ndarray, names=(), save_dir: str | Path = Path("")) -> None:
    """Label statistics, ``labels`` (n, 5) [cls, xywh normalised]: labels.jpg and labels_correlogram.jpg.

    labels.jpg: instances per class, the label boxes overlaid at a common centre, and 2-D histograms of
    centres and of sizes.
    """
    save_dir = Path(save_dir)
    LOGGER.info(f"Writing label statistics to {save_dir / 'labels.jpg'}")
    labels = np.asarray(labels, dtype=np.float64)
    fig = Figure(figsize=(8, 8), tight_layout=True)
    counts_ax, boxes_ax, centres_ax, sizes_ax = fig.subplots(2, 2).ravel()
    _class_counts(counts_ax, labels[:, 0], list(names.values()) if isinstance(names, dict) else list(names))
    boxes_ax.imshow(_label_boxes_image(labels))
    boxes_ax.axis("off")
    for ax, (x, y), axis_names in ((centres_ax, (1, 2), ("x", "y")), (sizes_ax, (3, 4), ("width", "height"))):
        ax.hist2d(labels[:, x], labels[:, y], bins=50, cmap="Blues", cmin=1)
        ax.set(xlabel=axis_names[0], ylabel=axis_names[1])
    for ax in (counts_ax, boxes_ax, centres_ax, sizes_ax):
        _hide_spines(ax)
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


def _curve_figure(px: np.ndarray, curves: np.ndarray, labels: list[str], summary: np.ndarray | None,
                  summary_label: str, axis_labels: tuple[str, str], title: str, save_path: Path) -> None:
    """Thin per-class curves (named when 1-20 classes, plain grey beyond) and a thick blue summary curve."""
    fig = Figure(figsize=(9, 6), tight_layout=True)
    ax = fig.subplots()
    named = 0 < len(curves) < 21
    for curve, label in zip(curves, labels):
        ax.plot(px, curve, linewidth=1, **({"label": label} if named else {"color": "grey"}))
    if summary is not None:
        ax.plot(px, summary, linewidth=3, color="blue", label=summary_label)
    ax.set(xlabel=axis_labels[0], ylabel=axis_labels[1], xlim=(0, 1), ylim=(0, 1), title=title)
    if ax.get_legend_handles_labels()[1]:
        ax.legend(bbox_to_anchor=(1.04, 1), loc="upper left")
    fig.savefig(save_path, dpi=250)


def plot_pr_curve(px: np.ndarray, py: np.ndarray, ap: np.ndarray, save_path: Path, names: dict) -> None:
    """Precision envelopes ``py`` (k, len(px)) against recall ``px``, one per class, and their mean.

    The legend gives each class's AP@0.5 (``ap[:, 0]``) and their mean, mAP@0.5.
    """
    py = np.asarray(py, dtype=np.float64).reshape(-1, len(px))
    labels = [f"{names.get(i, i)} {ap[i, 0]:.3f}" for i in range(len(py))]
    summary = py.mean(0) if len(py) else None
    map50 = ap[:, 0].mean() if len(ap) else 0.0
    _curve_figure(px, py, labels, summary, f"all classes {map50:.3f} mAP@0.5", ("Recall", "Precision"),
                  "Precision-Recall Curve", save_path)


def plot_mc_curve(px: np.ndarray, py: np.ndarray, mean_curve: np.ndarray, save_path: Path, names: dict,
                  ylabel: str = "Metric", xlabel: str = "Confidence") -> None:
    """Metric-confidence curves (k, len(px)) per class and their smoothed mean ``mean_curve`` with its peak."""
    peak = int(np.argmax(mean_curve))
    labels = [f"{names.get(i, i)}" for i in range(len(py))]
    _curve_figure(px, py, labels, mean_curve, f"all classes {mean_curve[peak]:.2f} at {px[peak]:.3f}",
                  (xlabel, ylabel), f"{ylabel}-Confidence Curve", save_path)


def plot_confusion_matrix(matrix: np.ndarray, save_path: Path, names: list, normalize: bool = True) -> None:
    """Heat map of a (nc + 1)^2 confusion matrix (rows predicted, columns true), cells < 0.005 left blank.

    With ``normalize`` each column (true class) is divided by its total. Cell values are printed for
    fewer than 30 classes; class names label the axes when there is one per class (fewer than 99).
    """
    size = matrix.shape[0]
    shown = matrix / (matrix.sum(0, keepdims=True) + 1e-9) if normalize else matrix.astype(np.float64)
    shown = np.where(shown < 0.005, np.nan, shown)
    fig = Figure(figsize=(12, 9), tight_layout=True)
    ax = fig.subplots()
    fig.colorbar(ax.imshow(shown, cmap="Blues", vmin=0.0, aspect="auto"), ax=ax)
    filled = np.argwhere(~np.isnan(shown))
    if size <= 30 and len(filled):
        bright = 0.5 * np.nanmax(shown)
        for r, c in filled:
            ax.text(c, r, f"{shown[r, c]:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if shown[r, c] > bright else "black")
    if len(names) == size - 1 and 0 < len(names) < 99:
        ticks = [*names, "background"]
        ax.set_xticks(range(size), ticks, rotation=90)
        ax.set_yticks(range(size), ticks)
    ax.set(xlabel="True", ylabel="Predicted", title="Confusion Matrix")
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
