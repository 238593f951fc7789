"""Datasets and dataloaders with YOLOv5 semantics.

- ``LoadImagesAndLabels`` / ``create_dataloader``: training and validation images with YOLO labels. A label file
  is found by the images -> labels rule (``.../images/x.jpg`` -> ``.../labels/x.txt``); its rows are
  ``class x_center y_center width height`` normalized to [0, 1] (polygon rows ``class x1 y1 x2 y2 ...`` are
  reduced to their boxes). Scan results are cached in a JSON ``.cache`` file next to the labels folder and
  invalidated by a hash of the paths, sizes and modification times of all images and labels.
- ``LoadImages``: images and videos for inference; ``LoadStreams``: webcams and network streams, failing fast
  when a stream cannot be opened.

Images are decoded with ``cv2.imdecode(np.fromfile(...))`` (non-ASCII paths work) as 8-bit 3-channel BGR with the
EXIF orientation applied, whatever the file's bit depth or channel count.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import random
import threading
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
    BatchSampler, DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler, SequentialSampler,
)
from tqdm import tqdm

from utils.augmentations import (
    augment_hsv,
    letterbox,
    mixup,
    mosaic4_tile,
    mosaic9_origin,
    random_flip,
    random_perspective,
)
from utils.boxes import xywhn2xyxy, xyxy2xywh, xyxy2xywhn
from utils.general import LOGGER, UserInputError, is_url

IMG_FORMATS = ("bmp", "dng", "jpeg", "jpg", "mpo", "png", "tif", "tiff", "webp", "pfm")
VID_FORMATS = ("asf", "avi", "gif", "m4v", "mkv", "mov", "mp4", "mpeg", "mpg", "ts", "wmv")
CACHE_VERSION = 1
TQDM_BAR_FORMAT = "{l_bar}{bar:10}{r_bar}"
NUM_THREADS = min(8, max(1, (os.cpu_count() or 1)))
EXIF_ORIENTATION = 0x0112
MAX_CLASS_ID = 2**24  # larger ids are not exact in the float32 label arrays
# OpenCV's decoder warnings ("PNG input buffer is incomplete") would duplicate our one line per unreadable file
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


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
    """Label file of each image: the last ``/images/`` component becomes ``/labels/``, the extension ``.txt``."""
    images, labels = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return [labels.join(p.rsplit(images, 1)).rsplit(".", 1)[0] + ".txt" for p in img_paths]


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


def verify_image(im_file: str) -> tuple[int, int]:
    """Check that ``im_file`` is a complete, supported image of at least 10x10 pixels; return its (w, h)."""
    if os.path.getsize(im_file) == 0:
        raise ValueError("empty file")
    with Image.open(im_file) as im:
        im.verify()  # header and structure; invalidates ``im`` for pixel access
        fmt = (im.format or "").lower()
    with Image.open(im_file) as im:
        shape = exif_size(im)
    if fmt not in IMG_FORMATS:
        raise ValueError(f"unsupported image format {fmt!r}")
    if min(shape) < 10:
        raise ValueError(f"image size {shape} < 10 pixels")
    if fmt in ("jpeg", "jpg", "mpo") and not _jpeg_is_complete(im_file):
        raise ValueError("truncated JPEG (no end-of-image marker)")
    return shape


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
    corrupt: int = 0
    message: str = ""


def verify_image_label(im_file: str, lb_file: str, prefix: str = "") -> ScanResult:
    """Check an image and parse its label file; a missing label file makes a background image."""
    try:
        shape = verify_image(im_file)
    except Exception as e:  # PIL raises many exception types for broken files
        return ScanResult(None, None, corrupt=1, message=f"{prefix}WARNING {im_file}: ignoring corrupt image: {e}")
    if not os.path.isfile(lb_file):
        return ScanResult(np.zeros((0, 5), np.float32), shape, missing=1)
    try:
        text = Path(lb_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        return ScanResult(None, None, corrupt=1, message=f"{prefix}WARNING {lb_file}: unreadable label file: {e}")
    labels, problems = parse_labels(text)
    message = f"{prefix}WARNING {lb_file}: {'; '.join(problems)}" if problems else ""
    return ScanResult(labels, shape, found=1, empty=int(len(labels) == 0), message=message)


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
    images, msgs = {}, []
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
                bar.set_description_str(f"{desc} {_summary(counts)}", refresh=False)
                bar.update()
    return {"version": CACHE_VERSION, "counts": counts, "msgs": msgs, "images": images}


def _summary(counts: dict) -> str:
    return f"{counts['found']} images, {counts['missing'] + counts['empty']} backgrounds, {counts['corrupt']} corrupt"


def cache_path_for(path: str | Path | list, label_files: list[str]) -> Path:
    """``<list>.cache`` next to a .txt image list, else ``<labels folder>.cache`` (upstream's locations)."""
    last = Path(path[-1] if isinstance(path, (list, tuple)) else path)
    return (last if last.is_file() else Path(label_files[0]).parent).with_suffix(".cache")


# -------------------------------------------------------------------------------------------------------- dataset


class LoadImagesAndLabels(Dataset):
    """Images with YOLO labels for training (mosaic/mixup/perspective/HSV/flip augmentation) and validation.

    Items are (CHW RGB uint8 tensor, (n, 6) targets [0, class, x, y, w, h] normalized, image path, shapes) where
    shapes = ((h0, w0), ((h / h0, w / w0), (padw, padh))) for letterboxed items and None for mosaics.
    """

    def __init__(
        self,
        path: str | Path | list,
        img_size: int = 640,
        batch_size: int = 16,
        augment: bool = False,
        hyp: dict | None = None,
        rect: bool = False,
        image_weights: bool = False,
        cache_images: bool | str | None = None,
        single_cls: bool = False,
        stride: int = 32,
        pad: float = 0.0,
        min_items: int = 0,
        prefix: str = "",
        nc: int | None = None,
        rank: int = -1,
    ) -> None:
        self.img_size = img_size
        self.augment = augment
        self.hyp = hyp
        self.image_weights = image_weights
        self.rect = False if image_weights else rect
        self.mosaic = augment and not self.rect
        self.mosaic_border = [-img_size // 2, -img_size // 2]
        self.stride = stride
        self.path = path
        self.cache_mode = _cache_mode(cache_images)

        self.im_files = find_image_files(path, prefix)
        self.label_files = img2label_paths(self.im_files)
        cache = self._label_cache(cache_path_for(path, self.label_files), prefix, verbose=rank in (-1, 0))
        self._set_labels(cache["images"], prefix, augment, nc, single_cls, min_items)

        self.n = len(self.im_files)
        self.batch = np.floor(np.arange(self.n) / batch_size).astype(int)  # batch index of each image
        self.indices = np.arange(self.n)  # resampled by train.py for --image-weights
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

    def _set_labels(
        self, images: dict, prefix: str, augment: bool, nc: int | None, single_cls: bool, min_items: int
    ) -> None:
        """Fill ``im_files``, ``label_files``, ``labels`` and ``shapes`` from the scanned (valid) images."""
        self.im_files = [f for f in self.im_files if f in images]
        if not self.im_files:
            raise DatasetError(f"{prefix}no usable images in {self.path} (all corrupt)")
        self.label_files = img2label_paths(self.im_files)
        self.labels = [np.array(images[f]["labels"], dtype=np.float32).reshape(-1, 5) for f in self.im_files]
        self.shapes = np.array([images[f]["shape"] for f in self.im_files], dtype=np.int64)  # (w, h)
        if nc is not None:
            self.labels = [_drop_unknown_classes(lb, nc, f, prefix) for lb, f in zip(self.labels, self.label_files)]
        if single_cls:
            for lb in self.labels:
                lb[:, 0] = 0
        if augment and not sum(len(lb) for lb in self.labels):
            raise DatasetError(f"{prefix}all labels are empty in {self.path}, cannot train")
        if min_items:
            self._keep(np.array([len(lb) >= min_items for lb in self.labels]), prefix)

    def _keep(self, mask: np.ndarray, prefix: str) -> None:
        """Restrict the per-image lists to ``mask``."""
        LOGGER.info(f"{prefix}{int((~mask).sum())}/{len(mask)} images filtered from dataset")
        keep = np.nonzero(mask)[0]
        self.im_files = [self.im_files[i] for i in keep]
        self.label_files = [self.label_files[i] for i in keep]
        self.labels = [self.labels[i] for i in keep]
        self.shapes = self.shapes[keep]

    def _sort_by_aspect_ratio(self, img_size: int, stride: int, pad: float) -> None:
        """Order images by aspect ratio and give each batch the smallest stride-multiple shape that fits it."""
        aspect = self.shapes[:, 1] / self.shapes[:, 0]  # h / w
        order = aspect.argsort()
        self.im_files = [self.im_files[i] for i in order]
        self.label_files = [self.label_files[i] for i in order]
        self.labels = [self.labels[i] for i in order]
        self.shapes = self.shapes[order]
        aspect = aspect[order]
        shapes = []
        for b in range(self.batch[-1] + 1):
            ar = aspect[self.batch == b]
            shapes.append([ar.max(), 1] if ar.max() < 1 else [1, 1 / ar.min()] if ar.min() > 1 else [1, 1])
        self.batch_shapes = np.ceil(np.array(shapes) * img_size / stride + pad).astype(int) * stride  # (h, w)

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
        """Image i resized so that its long side is ``img_size``; returns (image, (h0, w0), (h, w)).

        Interpolation is INTER_LINEAR when augmenting or enlarging and INTER_AREA when shrinking for evaluation.
        """
        if self.ims[i] is not None:
            return self.ims[i], self.im_hw0[i], self.im_hw[i]
        im = self._read(i)
        h0, w0 = im.shape[:2]
        r = self.img_size / max(h0, w0)
        if r != 1:
            interp = cv2.INTER_LINEAR if (self.augment or r > 1) else cv2.INTER_AREA
            im = cv2.resize(im, (math.ceil(w0 * r), math.ceil(h0 * r)), interpolation=interp)
        return im, (h0, w0), im.shape[:2]

    # ---- items

    def __len__(self) -> int:
        return len(self.im_files)

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, str, tuple | None]:
        """Item ``index``; an (index, seed) pair (from ``SeededBatchSampler``) first seeds the augmentation draws."""
        if isinstance(index, tuple):
            index, seed = index
            random.seed(seed)
            np.random.seed(seed)
        index = self.indices[index]  # linear, shuffled, or resampled by image weights
        hyp = self.hyp
        if self.mosaic and random.random() < hyp["mosaic"]:
            img, labels = self._load_any_mosaic(index)
            shapes = None
            if random.random() < hyp["mixup"]:
                img, labels = mixup(img, labels, *self._load_any_mosaic(random.choice(self.indices)))
        else:
            img, labels, shapes = self._load_letterboxed(index)
        if len(labels):
            labels[:, 1:5] = xyxy2xywhn(labels[:, 1:5], w=img.shape[1], h=img.shape[0], clip=True, eps=1e-3)
        if self.augment:
            augment_hsv(img, hgain=hyp["hsv_h"], sgain=hyp["hsv_s"], vgain=hyp["hsv_v"])
            img, labels = random_flip(img, labels, hyp["flipud"], hyp["fliplr"])
        targets = torch.zeros((len(labels), 6))
        if len(labels):
            targets[:, 1:] = torch.from_numpy(labels)
        img = np.ascontiguousarray(img.transpose((2, 0, 1))[::-1])  # HWC BGR -> CHW RGB
        return torch.from_numpy(img), targets, self.im_files[index], shapes

    def _load_letterboxed(self, index: int) -> tuple[np.ndarray, np.ndarray, tuple]:
        """Resized image letterboxed to its batch shape (rect) or ``img_size``; labels as pixel xyxy."""
        img, (h0, w0), (h, w) = self.load_image(index)
        shape = self.batch_shapes[self.batch[index]] if self.rect else self.img_size
        img, ratio, pad = letterbox(img, shape, auto=False, scaleup=self.augment)
        shapes = (h0, w0), ((h / h0, w / w0), pad)  # to map predictions back to the original image
        labels = self.labels[index].copy()
        if labels.size:
            labels[:, 1:] = xywhn2xyxy(labels[:, 1:], ratio[0] * w, ratio[1] * h, padw=pad[0], padh=pad[1])
        if self.augment:
            img, labels = random_perspective(img, labels, **self._warp_hyp())
        return img, labels, shapes

    def _warp_hyp(self) -> dict:
        return {k: self.hyp[k] for k in ("degrees", "translate", "scale", "shear", "perspective")}

    def _load_any_mosaic(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """A 4-image mosaic, or a 9-image one with probability ``hyp['mosaic9']`` (default 0)."""
        p9 = self.hyp.get("mosaic9", 0.0)
        nine = p9 and random.random() < p9  # no extra random draw when unused: same draws as upstream
        return self.load_mosaic9(index) if nine else self.load_mosaic(index)

    def load_mosaic(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Image ``index`` and 3 random others tiled around a random centre, then randomly warped to img_size."""
        s = self.img_size
        yc, xc = (int(random.uniform(-x, 2 * s + x)) for x in self.mosaic_border)
        indices = [index] + random.choices(self.indices, k=3)
        random.shuffle(indices)
        canvas, all_labels = None, []
        for slot, i in enumerate(indices):
            img, _, (h, w) = self.load_image(i)
            if canvas is None:
                canvas = np.full((s * 2, s * 2, img.shape[2]), 114, dtype=np.uint8)
            (xa1, ya1, xa2, ya2), (xb1, yb1, xb2, yb2) = mosaic4_tile(slot, xc, yc, s, h, w)
            canvas[ya1:ya2, xa1:xa2] = img[yb1:yb2, xb1:xb2]
            all_labels.append(self._pixel_labels(i, w, h, xa1 - xb1, ya1 - yb1))
        labels = np.concatenate(all_labels, 0)
        np.clip(labels[:, 1:], 0, 2 * s, out=labels[:, 1:])
        return random_perspective(canvas, labels, border=self.mosaic_border, **self._warp_hyp())

    def load_mosaic9(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Image ``index`` and 8 random others tiled 3x3, a random 2s x 2s crop, then randomly warped."""
        s = self.img_size
        indices = [index] + random.choices(self.indices, k=8)
        random.shuffle(indices)
        canvas, all_labels, centre_hw, prev_hw = None, [], None, (-1, -1)
        for slot, i in enumerate(indices):
            img, _, (h, w) = self.load_image(i)
            if canvas is None:
                canvas = np.full((s * 3, s * 3, img.shape[2]), 114, dtype=np.uint8)
                centre_hw = (h, w)
            x0, y0 = mosaic9_origin(slot, s, (h, w), centre_hw, prev_hw)
            x1, y1 = max(x0, 0), max(y0, 0)
            canvas[y1:y0 + h, x1:x0 + w] = img[y1 - y0:, x1 - x0:]
            all_labels.append(self._pixel_labels(i, w, h, x0, y0))
            prev_hw = (h, w)
        yc, xc = (int(random.uniform(0, s)) for _ in self.mosaic_border)
        canvas = canvas[yc:yc + 2 * s, xc:xc + 2 * s]
        labels = np.concatenate(all_labels, 0)
        labels[:, [1, 3]] -= xc
        labels[:, [2, 4]] -= yc
        np.clip(labels[:, 1:], 0, 2 * s, out=labels[:, 1:])
        return random_perspective(canvas, labels, border=self.mosaic_border, **self._warp_hyp())

    def _pixel_labels(self, i: int, w: int, h: int, padw: float, padh: float) -> np.ndarray:
        """Labels of image i as pixel xyxy for a (w, h) copy placed at (padw, padh)."""
        labels = self.labels[i].copy()
        if labels.size:
            labels[:, 1:] = xywhn2xyxy(labels[:, 1:], w, h, padw, padh)
        return labels

    # ---- batching

    @staticmethod
    def collate_fn(batch: list) -> tuple[torch.Tensor, torch.Tensor, tuple, tuple]:
        """Stack images and concatenate targets, writing each target's image index into column 0."""
        ims, targets, paths, shapes = zip(*batch)
        for i, t in enumerate(targets):
            t[:, 0] = i
        return torch.stack(ims, 0), torch.cat(targets, 0), paths, shapes

    @staticmethod
    def collate_fn4(batch: list) -> tuple[torch.Tensor, torch.Tensor, tuple, tuple]:
        """Quad collate: every 4 items become one item, either the first upscaled 2x or a 2x2 tile of all four."""
        ims, targets, paths, shapes = zip(*batch)
        n = len(shapes) // 4
        below = torch.tensor([[0.0, 0, 0, 1, 0, 0]])  # y offset of the tile under the first
        right = torch.tensor([[0.0, 0, 1, 0, 0, 0]])  # x offset of the tile right of the first
        halve = torch.tensor([[1, 1, 0.5, 0.5, 0.5, 0.5]])
        quad_ims, quad_targets = [], []
        for i in range(0, 4 * n, 4):
            if random.random() < 0.5:
                big = F.interpolate(ims[i][None].float(), scale_factor=2.0, mode="bilinear", align_corners=False)
                quad_ims.append(big[0].type(ims[i].type()))
                quad_targets.append(targets[i])
            else:
                column0 = torch.cat((ims[i], ims[i + 1]), 1)
                column1 = torch.cat((ims[i + 2], ims[i + 3]), 1)
                quad_ims.append(torch.cat((column0, column1), 2))
                tiles = (targets[i], targets[i + 1] + below, targets[i + 2] + right, targets[i + 3] + below + right)
                quad_targets.append(torch.cat(tiles, 0) * halve)
        for i, t in enumerate(quad_targets):
            t[:, 0] = i
        return torch.stack(quad_ims, 0), torch.cat(quad_targets, 0), paths[:n], shapes[:n]


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
    """DataLoader over an endless ``SeededBatchSampler``: one iterator for all epochs, so workers start once and
    prefetch across epoch ends; each ``iter(loader)`` (one epoch) takes ``len(loader)`` batches from it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._endless = super().__iter__()

    def __iter__(self) -> Iterator:
        for _ in range(len(self)):
            yield next(self._endless)


def create_dataloader(
    path: str | Path | list,
    imgsz: int,
    batch_size: int,
    stride: int,
    single_cls: bool = False,
    hyp: dict | None = None,
    augment: bool = False,
    cache: bool | str | None = None,
    pad: float = 0.0,
    rect: bool = False,
    rank: int = -1,
    workers: int = 8,
    image_weights: bool = False,
    quad: bool = False,
    prefix: str = "",
    shuffle: bool = False,
    seed: int = 0,
    min_items: int = 0,
    nc: int | None = None,
    start_epoch: int = 0,
) -> tuple[DataLoader, LoadImagesAndLabels]:
    """Build the dataset and its DataLoader (DistributedSampler when ``rank != -1``).

    Shuffles and augmentation draws come from ``SeededBatchSampler``: a function of (``seed``, epoch, rank), the
    first epoch being ``start_epoch`` (a resumed run's), whatever the number of workers. Workers persist across
    epochs (InfiniteDataLoader) unless ``image_weights``: train.py then resamples ``dataset.indices`` between
    epochs, which fresh workers must see. ``nc``, when given, drops labels whose class id is >= nc.
    """
    if rect and shuffle:
        LOGGER.warning("WARNING --rect is incompatible with DataLoader shuffle, setting shuffle=False")
        shuffle = False
    dataset = LoadImagesAndLabels(
        path, imgsz, batch_size, augment=augment, hyp=hyp, rect=rect, image_weights=image_weights,
        cache_images=cache, single_cls=single_cls, stride=int(stride), pad=pad, min_items=min_items,
        prefix=prefix, nc=nc, rank=rank,
    )
    batch_size = min(batch_size, len(dataset))
    devices = max(torch.cuda.device_count(), 1)
    num_workers = min((os.cpu_count() or 1) // devices, batch_size if batch_size > 1 else 0, workers)
    if rank != -1:
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed)
    else:
        sampler = RandomSampler(dataset) if shuffle else SequentialSampler(dataset)
    batches = SeededBatchSampler(sampler, batch_size, seed, start_epoch, rank, endless=not image_weights)
    generator = torch.Generator().manual_seed(seed)  # workers' base seed, not a draw from the global torch RNG
    loader_class = DataLoader if image_weights else InfiniteDataLoader
    loader = loader_class(
        dataset,
        batch_sampler=batches,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        collate_fn=LoadImagesAndLabels.collate_fn4 if quad else LoadImagesAndLabels.collate_fn,
        generator=generator,
    )
    return loader, dataset


# ------------------------------------------------------------------------------------------------------ inference


def is_stream_source(source: str) -> bool:
    """True for a webcam index, a ``.streams`` list or a URL that is not an image/video file."""
    source = str(source)
    return source.isnumeric() or source.endswith(".streams") or (
        is_url(source) and _suffix(source.split("?")[0]) not in IMG_FORMATS + VID_FORMATS
    )


def _inference_files(path: str | Path | list) -> list[str]:
    """Image/video files from a file, folder, glob, .txt list or list of those."""
    if isinstance(path, (str, Path)) and str(path).endswith(".txt") and Path(path).is_file():
        path = [x.strip() for x in Path(path).read_text(encoding="utf-8").splitlines() if x.strip()]
    files = []
    for p in sorted(map(str, path)) if isinstance(path, (list, tuple)) else [str(path)]:
        if is_url(p):
            raise FileNotFoundError(f"{p} is a URL: downloading is not supported, give a local file")
        if "*" in p:
            files.extend(sorted(glob.glob(p, recursive=True)))
        elif os.path.isdir(p):
            files.extend(sorted(glob.glob(os.path.join(glob.escape(p), "*.*"))))
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise FileNotFoundError(f"{p} does not exist")
    media = [os.path.abspath(f) for f in files if _suffix(f) in IMG_FORMATS + VID_FORMATS]
    if not media:
        raise FileNotFoundError(f"no images or videos found in {path}; supported: {IMG_FORMATS + VID_FORMATS}")
    return media


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
        im = letterbox(im0, self.img_size, stride=self.stride, auto=self.auto)[0]
        return path, np.ascontiguousarray(im.transpose((2, 0, 1))[::-1]), im0, self.cap, info

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
        ims = np.stack([letterbox(x, self.img_size, stride=self.stride, auto=self.auto)[0] for x in im0])
        return self.sources, np.ascontiguousarray(ims[..., ::-1].transpose((0, 3, 1, 2))), im0, None, ""

    def close(self) -> None:
        """Stop the reader threads, then release the captures (never while a thread is still reading)."""
        self.running = False
        for t in self.threads:
            t.join(timeout=self.timeout)
        for cap in self.caps:
            cap.release()

    def __len__(self) -> int:
        return len(self.sources)
