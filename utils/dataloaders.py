"""Datasets and dataloaders with YOLOv5 semantics.

- ``LoadImagesAndLabels`` / ``create_dataloader``: training and validation images with YOLO labels. A label file
  is found by the images -> labels rule (``.../images/x.jpg`` -> ``.../labels/x.txt``); its rows are
  ``class x_center y_center width height`` normalized to [0, 1] (polygon rows ``class x1 y1 x2 y2 ...`` are
  reduced to their boxes). Scan results are cached in a JSON ``.cache`` file next to the labels folder and
  invalidated by a hash of the paths, sizes and modification times of all images and labels.
- A training item is a mosaic (with optional mixup) or a letterboxed image, then warped, colour-jittered and
  flipped by the transforms of ``utils.augmentations`` (``AugmentPolicy``), all drawing from one generator seeded
  per item; validation items are letterboxed only.
- ``LoadImages``: images and videos for inference; ``LoadStreams``: webcams and network streams, failing fast
  when a stream cannot be opened.

Images are decoded with ``cv2.imdecode(np.fromfile(...))`` (non-ASCII paths work) as 8-bit 3-channel BGR with the
EXIF orientation applied, whatever the file's bit depth or channel count.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import math
import os
import random
import threading
from collections import Counter
from collections.abc import Iterator
from multiprocessing.pool import ThreadPool
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import psutil
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    RandomSampler,
    Sampler,
    SequentialSampler,
)
from tqdm import tqdm

from utils.augmentations import (
    AugmentPolicy,
    Sample,
    blend,
    draw_mixup_weight,
    letterbox,
    mosaic_layout,
    paste_tiles,
)
from utils.boxes import xywhn2xyxy, xyxy2xywh, xyxy2xywhn
from utils.general import LOGGER, TQDM_BAR_FORMAT, UserInputError, is_url

IMG_FORMATS = ("bmp", "dng", "jpeg", "jpg", "mpo", "png", "tif", "tiff", "webp", "pfm")
VID_FORMATS = ("asf", "avi", "gif", "m4v", "mkv", "mov", "mp4", "mpeg", "mpg", "ts", "wmv")
CACHE_VERSION = 2  # 2: the scan counts each skipped or repaired file under a reason
NUM_THREADS = min(8, max(1, (os.cpu_count() or 1)))
EXIF_ORIENTATION = 0x0112
MAX_CLASS_ID = 2**24  # larger ids are not exact in the float32 label arrays
# OpenCV's decoder warnings ("PNG input buffer is incomplete") would duplicate our one line per unreadable file
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


# Why the scan left an image out, repaired its labels, or converted its pixels; counted in the scan summary
CORRUPT_IMAGE, UNREADABLE_LABELS = "corrupt image", "unreadable label file"
LABEL_DIRECTORY = "label path is a directory"
ROWS_REJECTED, DUPLICATES, UNKNOWN_CLASSES = "rows rejected", "duplicate rows removed", "class ids >= nc dropped"
CONVERTED = "converted to 8-bit colour"
LEFT_OUT = (CORRUPT_IMAGE, UNREADABLE_LABELS, LABEL_DIRECTORY)
REPAIRED = (ROWS_REJECTED, DUPLICATES, UNKNOWN_CLASSES)


class DatasetError(UserInputError):
    """A dataset with nothing usable in it (no images, only corrupt ones, no labels to train on); one line."""


# ----------------------------------------------------------------------------------------------------- files


def imread(path: str | Path, flags: int = cv2.IMREAD_COLOR) -> np.ndarray | None:
    """Read an image like ``cv2.imread`` (BGR, EXIF orientation applied) but from any path; None if unreadable."""
    try:
        buffer = np.fromfile(str(path), np.uint8)
    except OSError:
        return None
    return cv2.imdecode(buffer, flags) if buffer.size else None


def img2label_paths(img_paths: list[str]) -> list[str]:
    """Label file of each image: in its path the last folder named ``images`` becomes ``labels`` and the suffix
    becomes ``.txt``; an image outside any ``images`` folder has its label file next to it."""
    return [_label_path(p) for p in img_paths]


def _label_path(image: str) -> str:
    before, found, after = image.rpartition(f"{os.sep}images{os.sep}")
    swapped = f"{before}{os.sep}labels{os.sep}{after}" if found else image
    return str(Path(swapped).with_suffix(".txt"))


def _suffix(path: str) -> str:
    return path.rsplit(".", 1)[-1].lower()


def find_image_files(path: str | Path | list, prefix: str = "") -> list[str]:
    """Sorted absolute image paths from folders (recursive), ``.txt`` lists of images, or a list of both.

    In a list file, lines starting with ``./`` are relative to the list's folder, other relative lines to the
    current directory (as upstream).
    """
    files = []
    for p in path if isinstance(path, (list, tuple)) else [path]:
        p = Path(p)
        if p.is_dir():
            files += glob.glob(os.path.join(glob.escape(str(p)), "**", "*.*"), recursive=True)
        elif p.is_file():
            parent = str(p.parent) + os.sep
            lines = p.read_text(encoding="utf-8").strip().splitlines()
            files += [x.replace("./", parent, 1) if x.startswith("./") else x for x in map(str.strip, lines) if x]
        else:
            raise FileNotFoundError(f"{prefix}{p} does not exist")
    images = sorted(os.path.abspath(f) for f in files if _suffix(f) in IMG_FORMATS)
    if not images:
        raise DatasetError(f"{prefix}no images found in {path}")
    return images


# ----------------------------------------------------------------------------------------------- verification


def exif_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) as displayed, i.e. swapped when the EXIF orientation is a 90-degree rotation."""
    w, h = img.size
    try:
        orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # malformed EXIF block: ignore it like cv2 does
        orientation = 1
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _jpeg_is_complete(path: str) -> bool:
    """True when the file ends with the JPEG end-of-image marker (trailing zero padding allowed)."""
    with open(path, "rb") as f:
        f.seek(max(os.path.getsize(path) - 64, 0))
        return f.read().rstrip(b"\x00").endswith(b"\xff\xd9")


def _is_8bit_rgb(im: Image.Image) -> bool:
    """Whether an opened image decodes straight to 8-bit colour (not grayscale, alpha, a palette or 16-bit)."""
    raw_modes = [str(getattr(tile, "args", None) or tile[3]) for tile in getattr(im, "tile", None) or []]
    return im.mode in ("RGB", "YCbCr") and not any(";16" in mode for mode in raw_modes)


def verify_image(im_file: str) -> tuple[tuple[int, int], bool]:
    """Check that ``im_file`` is a complete, supported image of at least 10x10 pixels; return its (w, h) and
    whether decoding converts it to 8-bit colour."""
    if os.path.getsize(im_file) == 0:
        raise ValueError("empty file")
    with Image.open(im_file) as im:
        im.verify()  # header and structure; invalidates ``im`` for pixel access
        fmt = (im.format or "").lower()
    with Image.open(im_file) as im:
        converted = not _is_8bit_rgb(im)  # before exif_size, which may decode the image (and drop its tiles)
        shape = exif_size(im)
    if fmt not in IMG_FORMATS:
        raise ValueError(f"unsupported image format {fmt!r}")
    if min(shape) < 10:
        raise ValueError(f"image size {shape} < 10 pixels")
    if fmt in ("jpeg", "jpg", "mpo") and not _jpeg_is_complete(im_file):
        raise ValueError("truncated JPEG (no end-of-image marker)")
    return shape, converted


def _parse_row(fields: list[str]) -> tuple[list[float] | None, str]:
    """One label row -> ([class, x, y, w, h], '') or (None, reason it is rejected)."""
    try:
        values = [float(v) for v in fields]
    except ValueError:
        return None, f"non-numeric value in {' '.join(fields)!r}"
    if not all(math.isfinite(v) for v in values):
        return None, "non-finite value"
    if not (len(values) == 5 or (len(values) >= 7 and len(values) % 2 == 1)):
        return None, f"{len(values)} columns (expected 5, or a class and polygon x y pairs)"
    cls, coords = values[0], np.array(values[1:])
    if cls < 0 or cls != int(cls) or cls > MAX_CLASS_ID:
        return None, f"class {fields[0]} is not an integer in [0, {MAX_CLASS_ID}]"
    if coords.min() < 0 or coords.max() > 1:
        return None, "coordinates outside [0, 1] (labels must be normalized)"
    if len(coords) > 4:  # polygon -> extent box
        xy = coords.reshape(-1, 2)
        coords = xyxy2xywh(np.concatenate((xy.min(0), xy.max(0))))
    return [cls, *coords.tolist()], ""


def parse_labels(text: str) -> tuple[np.ndarray, list[str]]:
    """YOLO label text -> ((n, 5) float32 [class, x, y, w, h], problems); bad rows and duplicates are dropped."""
    rows, problems = [], []
    for lineno, line in enumerate(text.splitlines(), 1):
        if fields := line.split():
            row, problem = _parse_row(fields)
            if row is None:
                problems.append(f"line {lineno} ignored: {problem}")
            else:
                rows.append(row)
    labels = np.array(rows, dtype=np.float32).reshape(-1, 5)
    _, first = np.unique(labels, axis=0, return_index=True)
    if len(first) < len(labels):
        problems.append(f"{len(labels) - len(first)} duplicate labels removed")
        labels = labels[np.sort(first)]
    return labels, problems


class ScanResult(NamedTuple):
    """Outcome of checking one image/label pair; the counters follow upstream's (missing, found, empty, corrupt)."""

    labels: np.ndarray | None
    shape: tuple[int, int] | None
    missing: int = 0
    found: int = 0
    empty: int = 0
    corrupt: int = 0  # the image is left out (a broken image, or a label path that cannot be read)
    message: str = ""
    reasons: tuple[str, ...] = ()  # what was wrong or repaired: LEFT_OUT, REPAIRED or CONVERTED entries


def _left_out(reason: str, message: str) -> ScanResult:
    return ScanResult(None, None, corrupt=1, message=message, reasons=(reason,))


def verify_image_label(im_file: str, lb_file: str, prefix: str = "") -> ScanResult:
    """Check an image and parse its label file; a missing label file makes a background image."""
    try:
        shape, converted = verify_image(im_file)
    except Exception as e:  # PIL raises many exception types for broken files
        return _left_out(CORRUPT_IMAGE, f"{prefix}WARNING {im_file}: ignoring corrupt image: {e}")
    if os.path.isdir(lb_file):
        return _left_out(LABEL_DIRECTORY, f"{prefix}WARNING {lb_file}: is a directory, not a label file; "
                                          "image left out")
    conversion = (CONVERTED,) if converted else ()
    if not os.path.isfile(lb_file):
        return ScanResult(np.zeros((0, 5), np.float32), shape, missing=1, reasons=conversion)
    try:
        text = Path(lb_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        return _left_out(UNREADABLE_LABELS, f"{prefix}WARNING {lb_file}: unreadable label file: {e}; image left out")
    labels, problems = parse_labels(text)
    message = f"{prefix}WARNING {lb_file}: {'; '.join(problems)}" if problems else ""
    repairs = tuple(r for r, found in ((ROWS_REJECTED, any(" ignored: " in p for p in problems)),
                                       (DUPLICATES, any(p.endswith("duplicate labels removed") for p in problems)))
                    if found)
    return ScanResult(labels, shape, found=1, empty=int(len(labels) == 0), message=message,
                      reasons=repairs + conversion)


# -------------------------------------------------------------------------------------------------- label cache


def files_hash(paths: list[str]) -> str:
    """Hash of paths with their sizes and modification times (absent files included as such)."""
    digest = hashlib.sha256()
    for p in paths:
        try:
            st = os.stat(p)
            digest.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{p}\0absent\n".encode())
    return digest.hexdigest()


def load_label_cache(path: Path, expected_hash: str) -> dict | None:
    """The cache at ``path`` if it exists, parses, and matches the version and hash; else None."""
    try:
        cache = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(cache, dict) or cache.get("version") != CACHE_VERSION or cache.get("hash") != expected_hash:
        return None
    return cache


def save_label_cache(path: Path, cache: dict, prefix: str = "") -> None:
    """Write the cache atomically (temporary file + rename); warn when the folder is not writable."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(cache), encoding="utf-8")
        os.replace(tmp, path)
        LOGGER.info(f"{prefix}New cache created: {path}")
    except OSError as e:
        tmp.unlink(missing_ok=True)
        LOGGER.warning(f"{prefix}WARNING cache directory {path.parent} is not writable: {e}")


def scan_labels(im_files: list[str], label_files: list[str], desc: str, prefix: str = "") -> dict:
    """Verify every image/label pair (threaded, with a progress bar) into a cache dict (without its hash)."""
    counts = dict(found=0, missing=0, empty=0, corrupt=0)
    images, msgs, reasons = {}, [], Counter()
    with ThreadPool(NUM_THREADS) as pool:
        results = pool.imap(lambda pair: verify_image_label(*pair, prefix), zip(im_files, label_files))
        with tqdm(total=len(im_files), desc=desc, bar_format=TQDM_BAR_FORMAT) as bar:
            for im_file, result in zip(im_files, results):
                for key in counts:
                    counts[key] += getattr(result, key)
                if result.labels is not None:
                    images[im_file] = {"shape": list(result.shape), "labels": result.labels.tolist()}
                if result.message:
                    msgs.append(result.message)
                reasons.update(result.reasons)
                bar.set_description_str(f"{desc} {_summary(counts)}", refresh=False)
                bar.update()
    return {"version": CACHE_VERSION, "counts": counts, "reasons": dict(reasons), "msgs": msgs, "images": images}


def _summary(counts: dict) -> str:
    """'<usable> images (<without boxes>), <corrupt> corrupt': a missing or an empty label file makes a background
    image, a corrupt image or unreadable label file leaves the image out."""
    usable, background = counts["found"] + counts["missing"], counts["missing"] + counts["empty"]
    return f"{usable} images ({background} without boxes), {counts['corrupt']} corrupt"


def reasons_summary(reasons: dict) -> str:
    """'left out: corrupt image 4, ...; labels repaired: rows rejected 2, ...; converted to 8-bit colour: 3' for the
    reasons with a count (files per reason; a label file can be repaired for two reasons)."""
    groups = (("left out", LEFT_OUT), ("labels repaired", REPAIRED))
    parts = [f"{title}: " + ", ".join(f"{r} {reasons[r]}" for r in names if reasons.get(r))
             for title, names in groups if any(reasons.get(r) for r in names)]
    if reasons.get(CONVERTED):
        parts.append(f"{CONVERTED}: {reasons[CONVERTED]}")
    return "; ".join(parts)


def cache_path_for(path: str | Path | list, label_files: list[str]) -> Path:
    """``<list>.cache`` next to a .txt image list, else ``<labels folder>.cache`` (upstream's locations)."""
    last = Path(path[-1] if isinstance(path, (list, tuple)) else path)
    return (last if last.is_file() else Path(label_files[0]).parent).with_suffix(".cache")


# -------------------------------------------------------------------------------------------------------- dataset


class LoadImagesAndLabels(Dataset):
    """Images with YOLO labels for training (mosaic, mixup, warp, colour and flip augmentation) and validation.

    Items are (CHW RGB uint8 tensor, (n, 6) targets [0, class, x, y, w, h] normalized, image path, shapes) where
    shapes = ((h0, w0), ((h / h0, w / w0), (padw, padh))) for letterboxed items and None for mosaics. An index may
    be an (index, seed) pair, as ``SeededBatchSampler`` gives: the item's random draws then depend on that seed only.
    With ``rect``, images are sorted by aspect ratio and each batch is letterboxed to its own ``batch_shapes`` entry.
    """

    def __init__(
        self,
        path: str | Path | list,
        *,
        img_size: int = 640,
        stride: int = 32,
        batch_size: int = 16,
        rect: bool = False,
        pad: float = 0.0,
        augment: bool = False,
        hyp: dict | None = None,
        image_weights: bool = False,
        single_cls: bool = False,
        min_items: int = 0,
        nc: int | None = None,
        cache_images: bool | str | None = None,
        prefix: str = "",
        rank: int = -1,
    ) -> None:
        self.path, self.img_size, self.stride, self.hyp = path, img_size, stride, hyp
        self.augment, self.image_weights = augment, image_weights
        self.rect = rect and not image_weights  # resampled images would break the per-batch shapes
        self.mosaic = augment and not self.rect
        self.policy = AugmentPolicy.from_hyp(hyp)
        self.mosaic_warp = self.policy.mosaic_warp(img_size)
        self.cache_mode = _cache_mode(cache_images)

        self.im_files = find_image_files(path, prefix)
        self.label_files = img2label_paths(self.im_files)
        cache = self._label_cache(cache_path_for(path, self.label_files), prefix, verbose=rank in (-1, 0))
        reasons = Counter(cache["reasons"])
        reasons[UNKNOWN_CLASSES] += self._set_labels(cache["images"], prefix, nc, single_cls, min_items)
        if rank in (-1, 0) and (summary := reasons_summary(reasons)):
            LOGGER.info(f"{prefix}Scan summary: {summary}")

        self.n = len(self.im_files)
        self.batch = np.arange(self.n) // batch_size  # batch number of each image (in rect order)
        self.indices = np.arange(self.n)  # item -> image; train.py resamples it for --image-weights
        if self.rect:
            self._sort_by_aspect_ratio(img_size, stride, pad)

        self.ims: list[np.ndarray | None] = [None] * self.n
        self.im_hw0: list[tuple[int, int] | None] = [None] * self.n
        self.im_hw: list[tuple[int, int] | None] = [None] * self.n
        self.npy_files = [Path(f).with_suffix(".npy") for f in self.im_files]
        if self.cache_mode:
            self._cache_images(prefix)

    # ---- labels

    def _label_cache(self, cache_path: Path, prefix: str, verbose: bool) -> dict:
        """Load the label cache when valid, else scan and save it; log the summary and warnings."""
        expected = files_hash(self.label_files + self.im_files)
        cache = load_label_cache(cache_path, expected)
        desc = f"{prefix}Scanning {cache_path.parent / cache_path.stem}..."
        if cache is None:
            cache = scan_labels(self.im_files, self.label_files, desc, prefix)
            cache["hash"] = expected
            save_label_cache(cache_path, cache, prefix)
        elif verbose:
            total = len(self.im_files)
            tqdm(None, desc=f"{desc} {_summary(cache['counts'])}", total=total, initial=total,
                 bar_format=TQDM_BAR_FORMAT).close()
        for msg in cache["msgs"]:
            LOGGER.warning(msg)
        if cache["counts"]["found"] == 0:
            LOGGER.warning(f"{prefix}WARNING no labels found in {cache_path}")
        return cache

    def _set_labels(self, images: dict, prefix: str, nc: int | None, single_cls: bool, min_items: int) -> int:
        """Fill ``im_files``, ``label_files``, ``labels`` and ``shapes`` from the scanned (valid) images; returns
        how many label files had rows of classes >= ``nc`` (dropped)."""
        self.im_files = [f for f in self.im_files if f in images]
        if not self.im_files:
            raise DatasetError(f"{prefix}no usable images in {self.path} (all corrupt)")
        self.label_files = img2label_paths(self.im_files)
        self.labels = [np.array(images[f]["labels"], dtype=np.float32).reshape(-1, 5) for f in self.im_files]
        self.shapes = np.array([images[f]["shape"] for f in self.im_files], dtype=np.int64)  # (w, h)
        before = [len(lb) for lb in self.labels]
        if nc is not None:
            self.labels = [_drop_unknown_classes(lb, nc, f, prefix) for lb, f in zip(self.labels, self.label_files)]
        unknown_class_files = sum(len(lb) < n for lb, n in zip(self.labels, before))
        if single_cls:
            for lb in self.labels:
                lb[:, 0] = 0
        if self.augment and not sum(len(lb) for lb in self.labels):
            raise DatasetError(f"{prefix}all labels are empty in {self.path}, cannot train")
        if min_items:
            counts = np.array([len(lb) for lb in self.labels])
            self._select(np.flatnonzero(counts >= min_items))
            LOGGER.info(f"{prefix}--min-items {min_items}: left out {int((counts < min_items).sum())} of "
                        f"{len(counts)} images with fewer labels")
        return unknown_class_files

    def _select(self, order: np.ndarray) -> None:
        """Keep and reorder the per-image lists to ``order`` (indices into them)."""
        per_image = (self.im_files, self.label_files, self.labels)
        self.im_files, self.label_files, self.labels = ([items[i] for i in order] for items in per_image)
        self.shapes = self.shapes[order]

    def _sort_by_aspect_ratio(self, img_size: int, stride: int, pad: float) -> None:
        """Order images by aspect ratio (h / w) and give each batch the smallest (h, w), in multiples of
        ``stride`` plus ``pad`` strides, that holds all its images letterboxed at ``img_size``."""
        self._select((self.shapes[:, 1] / self.shapes[:, 0]).argsort())
        aspect = self.shapes[:, 1] / self.shapes[:, 0]
        starts = np.flatnonzero(np.diff(self.batch, prepend=-1))  # first image of every batch
        tallest, widest = np.maximum.reduceat(aspect, starts), np.minimum.reduceat(aspect, starts)
        # all landscape: full width and the tallest's height; all portrait: full height and the widest's width;
        # a batch with both kinds stays square
        relative_hw = np.stack((np.where(tallest < 1, tallest, 1.0), np.where(widest > 1, 1 / widest, 1.0)), 1)
        self.batch_shapes = (np.ceil(relative_hw * img_size / stride + pad) * stride).astype(int)

    # ---- images

    def _cache_images(self, prefix: str) -> None:
        """Preload resized images into RAM, or write decoded originals as .npy files next to the images."""
        if self.cache_mode == "ram" and not self._ram_fits(prefix):
            return
        task = self._cache_to_disk if self.cache_mode == "disk" else self.load_image
        nbytes = 0
        with ThreadPool(NUM_THREADS) as pool, tqdm(total=self.n, bar_format=TQDM_BAR_FORMAT) as bar:
            for i, loaded in pool.imap(lambda i: (i, task(i)), range(self.n)):
                if self.cache_mode == "disk":
                    nbytes += self.npy_files[i].stat().st_size
                else:
                    self.ims[i], self.im_hw0[i], self.im_hw[i] = loaded
                    nbytes += loaded[0].nbytes
                bar.set_description_str(f"{prefix}Caching images ({nbytes / 2**30:.2f}GB {self.cache_mode})", False)
                bar.update()

    def _ram_fits(self, prefix: str, margin: float = 0.1) -> bool:
        """Whether the resized images (estimated from the scanned sizes) fit in the available memory."""
        gains = self.img_size / self.shapes.max(1)
        need = float((self.shapes.prod(1) * gains**2 * 3).sum())
        available = psutil.virtual_memory().available
        if need * (1 + margin) < available:
            return True
        LOGGER.warning(f"{prefix}WARNING not caching images: {need / 2**30:.1f}GB RAM needed, "
                       f"{available / 2**30:.1f}GB available")
        return False

    def _cache_to_disk(self, i: int) -> None:
        npy = self.npy_files[i]
        if not npy.exists() or npy.stat().st_mtime_ns < os.stat(self.im_files[i]).st_mtime_ns:
            np.save(npy, self._read(i), allow_pickle=False)

    def _read(self, i: int) -> np.ndarray:
        """Decoded original image i (from its .npy when caching on disk)."""
        npy = self.npy_files[i]
        if self.cache_mode == "disk" and npy.exists():
            return np.load(npy, allow_pickle=False)
        im = imread(self.im_files[i])
        if im is None:
            raise FileNotFoundError(f"image not found or unreadable: {self.im_files[i]}")
        return im

    def load_image(self, i: int) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
        """Image i with its long side resized to ``img_size`` (see ``fit_long_side``): (image, (h0, w0), (h, w))."""
        if self.ims[i] is not None:
            return self.ims[i], self.im_hw0[i], self.im_hw[i]
        original = self._read(i)
        resized = fit_long_side(original, self.img_size, average_when_shrinking=not self.augment)
        return resized, original.shape[:2], resized.shape[:2]

    def _pixel_labels(self, i: int, size_wh: tuple[float, float], offset: tuple[float, float] = (0, 0)) -> np.ndarray:
        """Labels of image i as (class, pixel xyxy) for a copy of it of ``size_wh`` placed at ``offset``."""
        labels = self.labels[i].copy()
        if len(labels):
            labels[:, 1:] = xywhn2xyxy(labels[:, 1:], *size_wh, *offset)
        return labels

    # ---- items

    def __len__(self) -> int:
        return len(self.im_files)

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, str, tuple | None]:
        index, seed = index if isinstance(index, tuple) else (index, None)
        rng = _item_generator(seed)
        i = self.indices[index]
        if self.mosaic and rng.random() < self.policy.mosaic:
            sample, shapes = self._mosaic_with_mixup(i, rng), None
        else:
            sample, shapes = self._letterboxed(i, rng)
        if self.augment:
            sample = self.policy.photometric(sample, rng)
        return _to_item(sample, self.im_files[i], shapes)

    def _letterboxed(self, i: int, rng: np.random.Generator) -> tuple[Sample, tuple]:
        """Image i letterboxed to its batch's shape (rect) or to ``img_size``, warped when augmenting; with the
        shapes val.py needs to map predictions back: ((h0, w0), ((h / h0, w / w0), (padw, padh)))."""
        image, original_hw, (h, w) = self.load_image(i)
        image, (gain_x, gain_y), pad = letterbox(image, self._letterbox_shape(i), auto=False, scaleup=self.augment)
        sample = Sample(image, self._pixel_labels(i, (gain_x * w, gain_y * h), pad))
        if self.augment:
            sample = self.policy.warp(sample, rng)
        return sample, (original_hw, ((h / original_hw[0], w / original_hw[1]), pad))

    def _letterbox_shape(self, i: int) -> int | np.ndarray:
        """(h, w) of image i's batch under rect, else the square ``img_size``."""
        return self.batch_shapes[self.batch[i]] if self.rect else self.img_size

    def _mosaic_with_mixup(self, i: int, rng: np.random.Generator) -> Sample:
        """A mosaic around image i, blended with probability ``mixup`` with a mosaic around a random image."""
        sample = self._mosaic(i, rng)
        if rng.random() < self.policy.mixup:
            sample = blend(sample, self._mosaic(rng.choice(self.indices), rng), draw_mixup_weight(rng))
        return sample

    def _mosaic(self, i: int, rng: np.random.Generator) -> Sample:
        """Image i and 3 random others (8 with probability ``mosaic9``) in random order, tiled on a 2s x 2s canvas
        (s = img_size, see ``mosaic_layout``), then warped and cropped to s x s."""
        count = 9 if rng.random() < self.policy.mosaic9 else 4
        tiles = []
        for j in rng.permutation(np.append(rng.choice(self.indices, count - 1), i)):
            image, _, (h, w) = self.load_image(j)
            tiles.append(Sample(image, self._pixel_labels(j, (w, h))))
        origins = mosaic_layout(np.array([tile.hw for tile in tiles]), self.img_size, rng)
        return self.mosaic_warp(paste_tiles(tiles, origins, 2 * self.img_size), rng)

    # ---- batching

    @staticmethod
    def collate_fn(batch: list) -> tuple[torch.Tensor, torch.Tensor, tuple, tuple]:
        """Stack the images; concatenate the targets with column 0 set to the index of their image in the batch."""
        images, targets, paths, shapes = zip(*batch)
        numbered = [torch.cat((torch.full_like(t[:, :1], k), t[:, 1:]), 1) for k, t in enumerate(targets)]
        return torch.stack(images), torch.cat(numbered), paths, shapes

    @staticmethod
    def collate_fn4(batch: list) -> tuple[torch.Tensor, torch.Tensor, tuple, tuple]:
        """Quad collate (--quad): every 4 consecutive items become one item twice their size (``_quad_item``);
        a remainder of fewer than 4 items is dropped."""
        groups = [batch[k:k + 4] for k in range(0, len(batch) - 3, 4)]
        return LoadImagesAndLabels.collate_fn([_quad_item(group) for group in groups])


QUAD_TILE_OFFSETS = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])  # (x, y) of tiles 0-3, in tiles


def _quad_item(group: list) -> tuple[torch.Tensor, torch.Tensor, str, tuple | None]:
    """One item from 4: with probability 1/2 the first image upscaled 2x (bilinear), else a 2x2 grid of all four
    (column-major: first column items 0 and 1, second column items 2 and 3) with their boxes moved along."""
    images, targets, paths, shapes = zip(*group)
    if random.random() < 0.5:
        big = F.interpolate(images[0][None].float(), scale_factor=2.0, mode="bilinear", align_corners=False)[0]
        return big.to(images[0].dtype), targets[0], paths[0], shapes[0]
    grid = torch.cat((torch.cat(images[:2], 1), torch.cat(images[2:], 1)), 2)
    moved = []
    for t, offset in zip(targets, QUAD_TILE_OFFSETS):
        t = t.clone()
        t[:, 2:4] = (t[:, 2:4] + offset) / 2
        t[:, 4:6] /= 2
        moved.append(t)
    return grid, torch.cat(moved), paths[0], shapes[0]


def fit_long_side(im: np.ndarray, size: int, average_when_shrinking: bool) -> np.ndarray:
    """``im`` scaled so that its long side is ``size``, each side rounded up.

    Shrinking uses INTER_AREA (pixel averaging, no aliasing) when ``average_when_shrinking`` (evaluation), else
    INTER_LINEAR, which training uses for speed and which any enlargement uses.
    """
    h0, w0 = im.shape[:2]
    gain = size / max(h0, w0)
    if gain == 1:
        return im
    method = cv2.INTER_AREA if gain < 1 and average_when_shrinking else cv2.INTER_LINEAR
    return cv2.resize(im, (math.ceil(w0 * gain), math.ceil(h0 * gain)), interpolation=method)


def _item_generator(seed: int | None) -> np.random.Generator:
    """The generator of one item's random draws.

    A seeded item (from ``SeededBatchSampler``) also reseeds Python's global generator, which the quad collate
    draws from, so whole batches depend on the seeds alone. An unseeded item takes its seed from NumPy's global
    generator (so ``np.random.seed`` makes a run reproducible).
    """
    if seed is None:
        return np.random.default_rng(np.random.randint(2**31))
    random.seed(seed)
    return np.random.default_rng(seed)


def _to_item(sample: Sample, path: str, shapes: tuple | None) -> tuple[torch.Tensor, torch.Tensor, str, tuple | None]:
    """(CHW RGB uint8 tensor, (n, 6) targets [0, class, normalized xywh], path, shapes) from a BGR sample."""
    h, w = sample.hw
    labels = sample.labels
    targets = torch.zeros((len(labels), 6))
    if len(labels):
        targets[:, 1] = torch.from_numpy(labels[:, 0])
        targets[:, 2:] = torch.from_numpy(xyxy2xywhn(labels[:, 1:5], w=w, h=h, clip=True, eps=1e-3))
    return torch.from_numpy(bgr_to_chw_rgb(sample.image)), targets, path, shapes


def bgr_to_chw_rgb(image: np.ndarray) -> np.ndarray:
    """A contiguous CHW RGB copy of an HWC BGR image (the layout models take)."""
    return np.ascontiguousarray(image[..., ::-1].transpose(2, 0, 1))


def _cache_mode(cache: bool | str | None) -> str | None:
    """Normalize ``--cache``: None/False -> None, True/'ram' -> 'ram', 'disk' -> 'disk'."""
    if cache in (None, False, ""):
        return None
    if cache is True or cache == "ram":
        return "ram"
    if cache == "disk":
        return "disk"
    raise ValueError(f"cache must be 'ram', 'disk' or None, got {cache!r}")


def _drop_unknown_classes(labels: np.ndarray, nc: int, label_file: str, prefix: str) -> np.ndarray:
    """Remove rows whose class id is >= ``nc``, warning with the label file's name."""
    bad = labels[:, 0] >= nc
    if bad.any():
        LOGGER.warning(f"{prefix}WARNING {label_file}: {int(bad.sum())} labels with class id >= nc={nc} dropped")
    return labels[~bad]


def epoch_seeds(seed: int, epoch: int, rank: int = -1) -> tuple[int, int, int]:
    """Seeds of one training epoch, a function of (seed, epoch, rank) alone: (global RNGs, shuffle, items)."""
    return tuple(int(s) for s in np.random.SeedSequence([seed % 2**64, epoch, rank + 1]).generate_state(3))


class SeededBatchSampler(Sampler):
    """Batches of (index, item seed) pairs, one pass per epoch, every random draw a function of (seed, epoch, rank).

    Before each pass the shuffle is reseeded for that epoch (``DistributedSampler.set_epoch`` under DDP) and every
    item gets its own seed, with which ``LoadImagesAndLabels`` seeds its augmentation. A batch's content therefore
    depends neither on the number of workers nor on how far they prefetched, and a run resumed at epoch k draws what
    the uninterrupted run drew. ``endless`` chains the passes (one iterator for all epochs).
    """

    def __init__(self, sampler: Sampler, batch_size: int, seed: int, start_epoch: int, rank: int, endless: bool):
        self.batches = BatchSampler(sampler, batch_size, drop_last=False)
        self.seed, self.epoch, self.rank, self.endless = seed, start_epoch, rank, endless

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        while True:
            _, shuffle_seed, item_seed = epoch_seeds(self.seed, self.epoch, self.rank)
            sampler = self.batches.sampler
            if isinstance(sampler, DistributedSampler):
                sampler.set_epoch(self.epoch)
            elif isinstance(sampler, RandomSampler):
                sampler.generator = torch.Generator().manual_seed(shuffle_seed)
            item_seeds = iter(np.random.SeedSequence(item_seed).generate_state(len(sampler)).tolist())
            self.epoch += 1
            for batch in self.batches:
                yield [(i, next(item_seeds)) for i in batch]
            if not self.endless:
                return


class InfiniteDataLoader(DataLoader):
    """DataLoader over an endless ``SeededBatchSampler``: its workers start once and keep prefetching across epoch
    ends. Each ``iter(loader)`` is one epoch: the next ``len(loader)`` batches of the one underlying stream."""

    _stream: Iterator | None = None

    def __iter__(self) -> Iterator:
        if self._stream is None:
            self._stream = super().__iter__()
        return itertools.islice(self._stream, len(self))


def _worker_count(batch_size: int, requested: int) -> int:
    """Loader processes: as requested, at most the CPUs per local device and the batch size; none for batches of 1."""
    cpus_per_device = (os.cpu_count() or 1) // max(torch.cuda.device_count(), 1)
    return 0 if batch_size <= 1 else min(cpus_per_device, batch_size, requested)


def _image_sampler(dataset: Dataset, rank: int, shuffle: bool, seed: int) -> Sampler:
    """This process's share of the images under DDP (``rank`` != -1), else all of them, shuffled or in order."""
    if rank == -1:
        return RandomSampler(dataset) if shuffle else SequentialSampler(dataset)
    return DistributedSampler(dataset, shuffle=shuffle, seed=seed)


def create_dataloader(
    path: str | Path | list,
    imgsz: int,
    batch_size: int,
    stride: int,
    single_cls: bool = False,
    *,
    augment: bool = False,
    hyp: dict | None = None,
    rect: bool = False,
    pad: float = 0.0,
    shuffle: bool = False,
    seed: int = 0,
    start_epoch: int = 0,
    rank: int = -1,
    workers: int = 8,
    cache: bool | str | None = None,
    image_weights: bool = False,
    quad: bool = False,
    min_items: int = 0,
    nc: int | None = None,
    prefix: str = "",
) -> tuple[DataLoader, LoadImagesAndLabels]:
    """Build the dataset and its DataLoader (DistributedSampler when ``rank != -1``).

    Shuffles and augmentation draws come from ``SeededBatchSampler``: a function of (``seed``, epoch, rank), the
    first epoch being ``start_epoch`` (a resumed run's), whatever the number of workers. Workers persist across
    epochs (InfiniteDataLoader) unless ``image_weights``: train.py then resamples ``dataset.indices`` between
    epochs, which fresh workers must see. ``nc``, when given, drops labels whose class id is >= nc.
    """
    if rect and shuffle:
        LOGGER.warning("WARNING --rect batches keep their aspect-ratio order; not shuffling")
        shuffle = False
    dataset = LoadImagesAndLabels(
        path, img_size=imgsz, stride=int(stride), batch_size=batch_size, rect=rect, pad=pad, augment=augment,
        hyp=hyp, image_weights=image_weights, single_cls=single_cls, min_items=min_items, nc=nc,
        cache_images=cache, prefix=prefix, rank=rank,
    )
    batch_size = min(batch_size, len(dataset))
    sampler = _image_sampler(dataset, rank, shuffle, seed)
    loader_type = DataLoader if image_weights else InfiniteDataLoader
    loader = loader_type(
        dataset,
        batch_sampler=SeededBatchSampler(sampler, batch_size, seed, start_epoch, rank, endless=not image_weights),
        num_workers=_worker_count(batch_size, workers),
        collate_fn=LoadImagesAndLabels.collate_fn4 if quad else LoadImagesAndLabels.collate_fn,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(seed),  # the workers' base seed, independent of torch's global RNG
    )
    return loader, dataset


# ------------------------------------------------------------------------------------------------------ inference


def is_stream_source(source: str) -> bool:
    """True for a webcam index, a ``.streams`` list or a URL that is not an image/video file."""
    source = str(source)
    return source.isnumeric() or source.endswith(".streams") or (
        is_url(source) and _suffix(source.split("?")[0]) not in IMG_FORMATS + VID_FORMATS
    )


MEDIA_FORMATS = IMG_FORMATS + VID_FORMATS


def _source_entry_files(entry: str) -> list[str]:
    """Files one source entry names: itself, a folder's files (not its subfolders; hidden files skipped) or the
    matches of a pattern containing ``*`` (``**`` recursive)."""
    if is_url(entry):
        raise FileNotFoundError(f"{entry} is a URL: downloading is not supported, give a local file")
    path = Path(entry)
    if path.is_file():
        return [entry]
    if path.is_dir():
        return sorted(str(f) for f in path.iterdir() if f.is_file() and not f.name.startswith("."))
    if "*" not in entry:
        raise FileNotFoundError(f"{entry} does not exist")
    return sorted(glob.glob(entry, recursive=True))


def _inference_files(path: str | Path | list) -> list[str]:
    """Absolute paths of the images and videos named by a file, folder, pattern, .txt list, or a list of those."""
    if isinstance(path, (str, Path)) and str(path).endswith(".txt") and Path(path).is_file():
        path = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    entries = sorted(map(str, path)) if isinstance(path, (list, tuple)) else [str(path)]
    media = [os.path.abspath(f) for entry in entries for f in _source_entry_files(entry) if _suffix(f) in MEDIA_FORMATS]
    if not media:
        raise FileNotFoundError(f"no images or videos found in {path}; supported: {MEDIA_FORMATS}")
    return media


def _model_input(im0: np.ndarray, size: int | list, stride: int, auto: bool) -> np.ndarray:
    """An original BGR image letterboxed for inference, as a CHW RGB array."""
    return bgr_to_chw_rgb(letterbox(im0, size, stride=stride, auto=auto)[0])


class LoadImages:
    """Iterate images and video frames for inference.

    Yields (path, letterboxed CHW RGB array, original BGR image, cv2.VideoCapture or None, info string).
    Video frames are read every ``vid_stride`` frames. An unreadable image or video is skipped with one warning
    naming it and listed in ``skipped``.
    """

    def __init__(self, path: str | Path | list, img_size: int = 640, stride: int = 32, auto: bool = True,
                 vid_stride: int = 1) -> None:
        self.files = _inference_files(path)
        self.video_flag = [_suffix(f) in VID_FORMATS for f in self.files]
        self.nf = len(self.files)
        self.img_size, self.stride, self.auto, self.vid_stride = img_size, stride, auto, vid_stride
        self.mode = "image"
        self.cap: cv2.VideoCapture | None = None
        self.frame = self.frames = 0
        self.count = 0
        self.skipped: list[str] = []

    def __iter__(self) -> LoadImages:
        self.count = 0
        return self

    def __next__(self) -> tuple[str, np.ndarray, np.ndarray, cv2.VideoCapture | None, str]:
        while self.count < self.nf:
            path = self.files[self.count]
            if not self.video_flag[self.count]:
                self.mode = "image"
                self.count += 1
                im0 = imread(path)
                if im0 is None:
                    self._skip(path, "image unreadable (corrupt, truncated or empty)")
                    continue
                return self._item(path, im0, f"image {self.count}/{self.nf} {path}: ")
            if self.cap is None and not self._open_video(path):
                self._skip(path, "video unreadable")
                self.count += 1
                continue
            im0 = self._read_frame()
            if im0 is not None:
                self.frame += 1
                info = f"video {self.count + 1}/{self.nf} ({self.frame}/{self.frames}) {path}: "
                return self._item(path, im0, info)
            self.cap.release()  # video ended: go on with the next file
            self.cap = None
            self.count += 1
        raise StopIteration

    def _item(self, path: str, im0: np.ndarray, info: str) -> tuple:
        return path, _model_input(im0, self.img_size, self.stride, self.auto), im0, self.cap, info

    def _skip(self, path: str, why: str) -> None:
        LOGGER.warning(f"WARNING {path}: {why}, skipped")
        self.skipped.append(path)

    def _read_frame(self) -> np.ndarray | None:
        """Next frame (every ``vid_stride``-th) of the open video; None at its end."""
        grabbed = all([self.cap.grab() for _ in range(self.vid_stride)])
        ok, im0 = self.cap.retrieve() if grabbed else (False, None)
        return im0 if ok else None

    def _open_video(self, path: str) -> bool:
        """Open video ``path`` for reading; False if OpenCV cannot open it."""
        cap = cv2.VideoCapture(path)
        if not cap.isOpened():
            cap.release()
            return False
        self.mode, self.cap, self.frame = "video", cap, 0
        self.frames = int(self.cap.get(cv2.CAP_PROP_FRAME_COUNT) / self.vid_stride)
        return True

    def __len__(self) -> int:
        return self.nf


def _open_capture(source: str | int, timeout: float) -> cv2.VideoCapture:
    """Open a webcam index or stream URL within ``timeout`` seconds, or raise ConnectionError naming it."""
    ms = int(timeout * 1000)
    params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms]
    opened: list[cv2.VideoCapture] = []
    worker = threading.Thread(target=lambda: opened.append(cv2.VideoCapture(source, cv2.CAP_ANY, params)),
                              daemon=True)
    worker.start()
    worker.join(timeout)
    if not opened or not opened[0].isOpened():
        kind = "webcam" if isinstance(source, int) else "stream"
        raise ConnectionError(f"could not open {kind} {source} within {timeout:g}s (offline, wrong address, or no "
                              f"such device)")
    return opened[0]


class LoadStreams:
    """Read the latest frames of one or more webcams/streams in background threads, for inference.

    Yields (sources, letterboxed (n, 3, h, w) RGB batch, list of original BGR frames, None, ''). A source that
    cannot be opened within ``timeout`` seconds raises ConnectionError immediately instead of hanging.
    """

    def __init__(self, sources: str = "0", img_size: int = 640, stride: int = 32, auto: bool = True,
                 vid_stride: int = 1, timeout: float = 5.0) -> None:
        path = Path(str(sources))
        self.sources = path.read_text(encoding="utf-8").split() if path.suffix == ".streams" and path.is_file() \
            else [str(sources)]
        self.img_size, self.stride, self.vid_stride, self.timeout = img_size, stride, vid_stride, timeout
        self.caps = [_open_capture(int(s) if s.isnumeric() else s, timeout) for s in self.sources]
        self.frames = [self._first_frame(cap, s) for cap, s in zip(self.caps, self.sources)]
        self.running = True
        self.threads = [threading.Thread(target=self._update, args=(i,), daemon=True) for i in range(len(self.caps))]
        for t in self.threads:
            t.start()
        shapes = {letterbox(f, img_size, stride=stride, auto=auto)[0].shape for f in self.frames}
        self.auto = auto and len(shapes) == 1  # a common shape allows minimal padding

    def _first_frame(self, cap: cv2.VideoCapture, source: str) -> np.ndarray:
        ok, frame = cap.read()
        if not ok:
            raise ConnectionError(f"stream {source} opened but gave no frame within {self.timeout:g}s")
        return frame

    def _update(self, i: int) -> None:
        """Keep frame i current: grab every frame, decode every ``vid_stride``-th."""
        cap, n = self.caps[i], 0
        while self.running and cap.isOpened():
            if not cap.grab():
                LOGGER.warning(f"WARNING stream {self.sources[i]} stopped responding")
                break
            n += 1
            if n % self.vid_stride == 0:
                ok, frame = cap.retrieve()
                if ok:
                    self.frames[i] = frame
        self.running = False

    def __iter__(self) -> Iterator:
        return self

    def __next__(self) -> tuple[list[str], np.ndarray, list[np.ndarray], None, str]:
        if not self.running:
            self.close()
            raise StopIteration
        im0 = [f.copy() for f in self.frames]
        batch = np.stack([_model_input(frame, self.img_size, self.stride, self.auto) for frame in im0])
        return self.sources, batch, im0, None, ""

    def close(self) -> None:
        """Stop the reader threads, then release the captures (never while a thread is still reading)."""
        self.running = False
        for t in self.threads:
            t.join(timeout=self.timeout)
        for cap in self.caps:
            cap.release()

    def __len__(self) -> int:
        return len(self.sources)
