"""Inference on any exported model: our ``.pt`` checkpoints, TorchScript and ONNX (ONNX Runtime or OpenCV DNN).

- ``InferenceBackend``: weights file -> decoded predictions (b, n, 5 + nc) in input pixels (val.py, detect.py).
- ``AutoShape``: the torch.hub wrapper: file paths, PIL images, numpy arrays (RGB) or lists of them in,
  letterbox, model, NMS, boxes scaled back to each original image, ``Detections`` out.
- ``Detections``: results with ``print()``, ``save()``, ``render()``, ``pandas()``, ``tolist()`` and the boxes as
  ``xyxy``, ``xywh``, ``xyxyn``, ``xywhn`` (per image tensors, rows ``[box, conf, class]``).

Exported files carry ``stride`` and ``names`` (and the traced input ``shape``) as JSON: ONNX in the
``metadata`` entry of its metadata_props, TorchScript in the ``config.txt`` extra file (see export.py).
"""

from __future__ import annotations

import ast
import copy
import json
import warnings
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn as nn
from PIL import Image, ImageOps

from utils.augmentations import letterbox
from utils.boxes import scale_boxes, xyxy2xywh
from models.loading import load_model
from utils.checkpoint import CheckpointError
from utils.general import LOGGER, ROOT, UserInputError, increment_path, is_url, make_divisible, yaml_load
from utils.nms import non_max_suppression
from utils.plots import Annotator, colors
from utils.torch_utils import convs_channels_last, time_sync

SUFFIXES = (".pt", ".torchscript", ".onnx")
ONNX_METADATA_KEY = "metadata"
TORCHSCRIPT_METADATA_FILE = "config.txt"
DEFAULT_STRIDE = 32  # for foreign exports without metadata


def read_metadata(text: str | None, source: Path) -> dict:
    """The JSON metadata that export.py embeds -> dict with int ``stride`` and {int: str} ``names``."""
    if not text:
        raise CheckpointError(f"{source}: no stride/names metadata (export it with export.py, or pass --data)")
    meta = json.loads(text)
    return {**meta, "stride": int(meta["stride"]), "names": {int(k): v for k, v in meta["names"].items()}}


def onnx_metadata_text(props: dict[str, str]) -> str | None:
    """Our ``metadata`` JSON, or the same built from upstream YOLOv5's separate ``stride``/``names`` entries."""
    if ONNX_METADATA_KEY in props:
        return props[ONNX_METADATA_KEY]
    if "stride" in props and "names" in props:  # upstream writes names as a Python dict literal
        return json.dumps({"stride": int(props["stride"]), "names": ast.literal_eval(props["names"])})
    return None


def names_from_data(data: str | Path) -> dict[int, str]:
    """Class names of a data YAML (path as given, or under the repository root or data/), without building it."""
    for path in (Path(data), ROOT / data, ROOT / "data" / data):
        if path.is_file():
            names = yaml_load(path).get("names")
            break
    else:
        raise UserInputError(f"--data {data}: data YAML not found")
    if isinstance(names, list):
        names = dict(enumerate(names))
    if not isinstance(names, dict) or not names:
        raise UserInputError(f"--data {data}: no 'names' list or mapping")
    return {int(k): str(v) for k, v in names.items()}


class InferenceBackend(nn.Module):
    """Runs a detector from a weights file and returns the decoded predictions (b, n, 5 + nc), pixels.

    ``.pt`` models are folded (``fuse``) first, and on the CPU run channels-last (NHWC, measured 1.27-1.61x
    faster for yolov5s, see docs/BENCHMARKS.md); ``.torchscript`` and ``.onnx`` files carry stride and names
    as metadata (``data``: a data YAML whose names are used for files without it). ``fp16`` runs half
    precision (CUDA only). ``dnn`` runs ONNX files with OpenCV DNN instead of ONNX Runtime.
    ``static_shape`` is the (b, 3, h, w) input a fixed-shape export needs (None: any shape); larger or
    smaller batches are run in chunks of b.
    """

    def __init__(self, weights: str | Path, device: torch.device | str = "cpu", fp16: bool = False,
                 fuse: bool = True, dnn: bool = False, data: str | Path | None = None):
        super().__init__()
        w = Path(weights)
        if w.suffix not in SUFFIXES:
            raise CheckpointError(f"{w}: unsupported weights format (use one of {', '.join(SUFFIXES)})")
        if not w.is_file():
            raise CheckpointError(f"{w}: weights file not found")
        self.device = torch.device(device)
        self.fp16 = fp16 and self.device.type == "cuda"
        self.kind = w.suffix
        self.static_shape: tuple[int, ...] | None = None
        self.session = self.net = None  # ONNX: an ONNX Runtime session, or an OpenCV DNN net with ``dnn``
        self.channels_last = self.kind == ".pt" and self.device.type == "cpu"
        if self.kind == ".pt":
            self.model = load_model(w, self.device, fuse=fuse)
            self.model.half() if self.fp16 else self.model.float()
            if self.channels_last:
                convs_channels_last(self.model)
            self.stride, self.names = int(self.model.stride.max()), self.model.names
            return
        text = self._load_torchscript(w) if self.kind == ".torchscript" else self._load_onnx(w, dnn)
        if text is None and data is not None:
            LOGGER.warning(f"WARNING {w} has no metadata: names from {data}, stride {DEFAULT_STRIDE}")
            text = json.dumps({"stride": DEFAULT_STRIDE, "names": names_from_data(data)})
        meta = read_metadata(text, w)
        self.stride, self.names = meta["stride"], meta["names"]
        if self.kind == ".torchscript" and "shape" in meta and not meta.get("dynamic"):
            self.static_shape = tuple(meta["shape"])  # e.g. upstream's traces keep the grids of one shape
        LOGGER.debug(f"Loaded {w} ({self.kind}), stride {self.stride}, {len(self.names)} classes")

    def _load_torchscript(self, w: Path) -> str | None:
        extra = {TORCHSCRIPT_METADATA_FILE: ""}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated in favour of torch.export
            self.model = torch.jit.load(str(w), map_location=self.device, _extra_files=extra).eval()
        self.model.half() if self.fp16 else self.model.float()
        return extra[TORCHSCRIPT_METADATA_FILE] or None

    def _load_onnx(self, w: Path, dnn: bool) -> str | None:
        """ONNX Runtime session (or OpenCV DNN net); sets the input shape/precision, returns the metadata text."""
        if dnn:
            import onnx

            proto = onnx.load(str(w), load_external_data=False)
            self.net = cv2.dnn.readNetFromONNX(str(w))
            dims = [d.dim_value or d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim]
            props = {p.key: p.value for p in proto.metadata_props}
            self.fp16 = False  # OpenCV DNN takes float32 input
        else:
            import onnxruntime

            wanted = ["CUDAExecutionProvider"] if self.device.type == "cuda" else []
            providers = [p for p in wanted if p in onnxruntime.get_available_providers()] + ["CPUExecutionProvider"]
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()  # as many threads as PyTorch would use
            self.session = onnxruntime.InferenceSession(str(w), options, providers=providers)
            node = self.session.get_inputs()[0]
            self.input_name, dims = node.name, node.shape
            props = self.session.get_modelmeta().custom_metadata_map
            self.fp16 = node.type == "tensor(float16)"
        self.static_shape = tuple(dims) if all(isinstance(d, int) and d > 0 for d in dims) else None
        return onnx_metadata_text(props)

    def forward(self, im: torch.Tensor, augment: bool = False, visualize: bool | Path = False) -> torch.Tensor:
        """Decoded predictions; ``augment`` (TTA) and ``visualize`` apply to ``.pt`` models only."""
        if self.kind == ".pt":
            im = im.half() if self.fp16 else im.float()
            if self.channels_last:
                im = im.contiguous(memory_format=torch.channels_last)
            y = self.model(im, augment=augment, visualize=visualize)
            return (y[0] if isinstance(y, (list, tuple)) else y).float()
        if self.static_shape is None:
            return self._run(im)
        b, _, h, w = self.static_shape
        if tuple(im.shape[2:]) != (h, w):
            raise ValueError(f"this {self.kind} model takes {h}x{w} images, got {tuple(im.shape[2:])}; "
                             "export with --dynamic or use the matching --imgsz")
        outputs = []
        for chunk in im.split(b):
            n = len(chunk)
            padded = torch.cat((chunk, chunk.new_zeros(b - n, *chunk.shape[1:]))) if n < b else chunk
            outputs.append(self._run(padded)[:n])
        return torch.cat(outputs)

    def _run(self, im: torch.Tensor) -> torch.Tensor:
        """One call of the exported graph on a batch it accepts."""
        if self.kind == ".torchscript":
            y = self.model(im.half() if self.fp16 else im.float())
            return (y[0] if isinstance(y, (list, tuple)) else y).float()
        x = im.detach().cpu().numpy().astype(np.float16 if self.fp16 else np.float32)
        if self.net is not None:
            self.net.setInput(x)
            y = self.net.forward()
        else:
            y = self.session.run(None, {self.input_name: x})[0]
        return torch.from_numpy(np.asarray(y)).to(self.device).float()

    def warmup(self, imgsz: tuple = (1, 3, 640, 640)) -> None:
        """One forward pass on a blank image (allocations, lazy initialisation), CUDA only."""
        if self.device.type == "cuda":
            self.forward(torch.zeros(*(self.static_shape or imgsz), device=self.device))


class Stopwatch:
    """Accumulates wall time over ``with`` blocks (CUDA-synchronised): ``t`` in total, ``dt`` the last block."""

    def __init__(self):
        self.t = self.dt = 0.0

    def __enter__(self):
        self.start = time_sync()
        return self

    def __exit__(self, *exc):
        self.dt = time_sync() - self.start
        self.t += self.dt


def class_counts(det: torch.Tensor, names: dict[int, str]) -> list[str]:
    """['2 circles', '1 star'] for detections [xyxy, conf, cls], in class order."""
    classes, counts = det[:, 5].unique(return_counts=True)
    return [f"{n} {names[int(c)]}{'s' * (n > 1)}" for c, n in zip(classes.tolist(), counts.tolist())]


# ------------------------------------------------------------------------------------------------ torch.hub wrapper


def load_rgb(im, index: int = 0) -> tuple[np.ndarray, str]:
    """(HWC uint8 RGB array, file name) from a path, a PIL image or an array (HWC or CHW, RGB, or grey)."""
    name = f"image{index}.jpg"
    if isinstance(im, (str, Path)):
        if is_url(str(im)):
            raise UserInputError(f"{im}: URLs are not downloaded; pass a local file, an array or a PIL image")
        if not Path(im).is_file():
            raise UserInputError(f"{im}: image file not found")
        im, name = Image.open(im), Path(im).name
    if isinstance(im, Image.Image):
        name = Path(getattr(im, "filename", "") or name).with_suffix(".jpg").name
        im = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    im = np.asarray(im)
    if im.ndim == 3 and im.shape[0] < 5 <= im.shape[2]:  # CHW, as a dataloader gives
        im = im.transpose(1, 2, 0)
    im = im[..., None] if im.ndim == 2 else im
    im = np.repeat(im, 3, 2) if im.shape[2] == 1 else im[..., :3]
    return np.ascontiguousarray(im), name


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where (and in which precision) a DetectionModel or an InferenceBackend wants its input."""
    p = next(model.parameters(), None)
    device = getattr(model, "device", None) or (p.device if p is not None else torch.device("cpu"))
    return torch.device(device), p.dtype if p is not None else torch.float32


class AutoShape(nn.Module):
    """Model wrapper for torch.hub: images in any common form -> ``Detections``; tensors pass through raw.

    Numpy arrays and PIL images are RGB (flip OpenCV's BGR first: ``cv2.imread(f)[..., ::-1]``). The NMS
    settings are attributes: ``conf``, ``iou``, ``agnostic``, ``multi_label``, ``classes``, ``max_det``.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval()
        self.names = model.names
        self.stride = int(torch.as_tensor(model.stride).max())
        self.conf, self.iou, self.agnostic, self.multi_label = 0.25, 0.45, False, False
        self.classes: list[int] | None = None
        self.max_det = 1000

    @torch.no_grad()
    def forward(self, ims, size: int | tuple[int, int] = 640, augment: bool = False):
        """Detect in ``ims`` (one image or a list) letterboxed to fit ``size``; a tensor returns the raw output."""
        device, dtype = model_device_dtype(self.model)
        if isinstance(ims, torch.Tensor):
            return self.model(ims.to(device, dtype), augment=augment)
        timers = Stopwatch(), Stopwatch(), Stopwatch()
        with timers[0]:
            images, files = zip(*(load_rgb(im, i) for i, im in enumerate(ims if isinstance(ims, (list, tuple))
                                                                          else [ims])))
            shape = self._batch_shape([im.shape[:2] for im in images], size)
            batch = np.stack([letterbox(im, shape, auto=False)[0] for im in images]).transpose(0, 3, 1, 2)
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(device, dtype) / 255
        with timers[1]:
            y = self.model(x, augment=augment)
            y = y[0] if isinstance(y, (list, tuple)) else y
        with timers[2]:
            preds = non_max_suppression(y, self.conf, self.iou, self.classes, self.agnostic, self.multi_label,
                                        max_det=self.max_det)
            for det, im in zip(preds, images):
                scale_boxes(x.shape[2:], det[:, :4], im.shape[:2])
        return Detections(list(images), preds, list(files), timers, self.names, tuple(x.shape))

    def _batch_shape(self, shapes: list[tuple[int, int]], size: int | tuple[int, int]) -> tuple[int, int]:
        """Common letterbox shape: each image scaled so its long side fits ``size``, rounded up to the stride."""
        static = getattr(self.model, "static_shape", None)
        if static:
            return tuple(static[2:])
        gains = [max((size, size) if isinstance(size, int) else size) / max(s) for s in shapes]
        h = max(int(s[0] * g) for s, g in zip(shapes, gains))
        w = max(int(s[1] * g) for s, g in zip(shapes, gains))
        return make_divisible(h, self.stride), make_divisible(w, self.stride)


class Detections:
    """Detections on a batch of images: per image a tensor (n, 6) of [box, confidence, class] rows."""

    XYXY_COLUMNS = ("xmin", "ymin", "xmax", "ymax", "confidence", "class", "name")
    XYWH_COLUMNS = ("xcenter", "ycenter", "width", "height", "confidence", "class", "name")

    def __init__(self, ims: list[np.ndarray], pred: list[torch.Tensor], files: list[str], timers=None,
                 names: dict[int, str] | None = None, shape: tuple | None = None):
        self.ims, self.pred, self.files = ims, pred, files
        self.names = names or {}
        self.n = len(pred)
        self.s = shape
        self.t = tuple(x.t / max(self.n, 1) * 1e3 for x in timers) if timers else (0.0, 0.0, 0.0)
        gains = [torch.tensor([im.shape[1], im.shape[0]] * 2 + [1, 1], device=p.device) for im, p in zip(ims, pred)]
        self.xyxy = pred
        self.xywh = [xyxy2xywh(p) for p in pred]
        self.xyxyn = [p / g for p, g in zip(self.xyxy, gains)]
        self.xywhn = [p / g for p, g in zip(self.xywh, gains)]

    def __len__(self) -> int:
        return self.n

    def __str__(self) -> str:
        lines = []
        for i, (im, det) in enumerate(zip(self.ims, self.pred)):
            counts = ", ".join(class_counts(det, self.names)) or "(no detections)"
            lines.append(f"image {i + 1}/{self.n}: {im.shape[0]}x{im.shape[1]} {counts}")
        lines.append(f"Speed: %.1fms pre-process, %.1fms inference, %.1fms NMS per image at shape {self.s}" % self.t)
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} of {self.n} image(s)>\n{self}"

    def print(self) -> None:
        LOGGER.info(str(self))

    def render(self, labels: bool = True) -> list[np.ndarray]:
        """Copies of the images (RGB) with boxes, and class name + confidence labels when ``labels``."""
        out = []
        for im, det in zip(self.ims, self.pred):
            annotator = Annotator(im.copy(), example=str(self.names))
            for *box, conf, cls in reversed(det.tolist()):
                label = f"{self.names[int(cls)]} {conf:.2f}" if labels else ""
                annotator.box_label(box, label, color=colors(int(cls)))
            out.append(annotator.result())
        return out

    def save(self, labels: bool = True, save_dir: str | Path = "runs/detect/exp", exist_ok: bool = False) -> Path:
        """Write the annotated images to ``save_dir`` (incremented unless ``exist_ok``); returns the folder."""
        save_dir = increment_path(save_dir, exist_ok=exist_ok, mkdir=True)
        for im, name in zip(self.render(labels), self.files):
            Image.fromarray(im).save(save_dir / name)
        LOGGER.info(f"Saved {self.n} image{'s' * (self.n > 1)} to {save_dir}")
        return save_dir

    def pandas(self) -> Detections:
        """A copy whose xyxy, xyxyn, xywh and xywhn are lists of DataFrames (one per image)."""
        import pandas as pd  # only here: keeps pandas out of the scripts' start-up

        new = copy.copy(self)
        for key, columns in (("xyxy", self.XYXY_COLUMNS), ("xyxyn", self.XYXY_COLUMNS),
                             ("xywh", self.XYWH_COLUMNS), ("xywhn", self.XYWH_COLUMNS)):
            frames = []
            for boxes in getattr(self, key):
                rows = [[*r[:5], int(r[5]), self.names[int(r[5])]] for r in boxes.tolist()]
                frames.append(pd.DataFrame(rows, columns=list(columns)))
            setattr(new, key, frames)
        return new

    def tolist(self) -> list[Detections]:
        """One ``Detections`` per image."""
        out = []
        for i in range(self.n):
            single = Detections([self.ims[i]], [self.pred[i]], [self.files[i]], names=self.names, shape=self.s)
            single.t = self.t
            out.append(single)
        return out
