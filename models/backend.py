"""Inference on any exported model: our ``.pt`` checkpoints, TorchScript, ONNX (ONNX Runtime or OpenCV DNN) and
OpenVINO IR (a ``*_openvino_model`` folder, or the ``.xml`` inside it; INT8 exports included).

- ``InferenceBackend``: weights file -> decoded predictions (b, n, 5 + nc) in input pixels (val.py, detect.py).
- ``AutoShape``: the torch.hub wrapper: file paths, PIL images, numpy arrays (RGB) or lists of them in,
  letterbox, model, NMS, boxes scaled back to each original image, ``Detections`` out.
- ``Detections``: results with ``print()``, ``show()``, ``save()``, ``crop()``, ``render()``, ``pandas()``,
  ``tolist()`` and the boxes as ``xyxy``, ``xywh``, ``xyxyn``, ``xywhn`` (per image tensors, rows
  ``[box, conf, class]``).

Exported files carry ``stride`` and ``names`` (and the traced input ``shape``) as JSON: ONNX in the
``metadata`` entry of its metadata_props, TorchScript in the ``config.txt`` extra file (see export.py); an
OpenVINO folder as ``metadata.yaml`` beside the IR (upstream YOLOv5's layout, which this also reads).
"""

from __future__ import annotations

import ast
import copy
import functools
import importlib
import json
import os
import re
import sys
import warnings
from collections.abc import Iterable, Sequence
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
from utils.general import (
    LOGGER, ROOT, UserInputError, first_line, increment_path, is_url, make_divisible, yaml_load,
)
from utils.nms import non_max_suppression
from utils.plots import Annotator, colors, save_one_box
from utils.torch_utils import convs_channels_last, time_sync

SUFFIXES = (".pt", ".torchscript", ".onnx")
OPENVINO_SUFFIX = "_openvino_model"  # an OpenVINO export is the folder <name>_openvino_model/ holding <name>.xml/.bin
OPENVINO_METADATA_FILE = "metadata.yaml"
WEIGHTS_FORMATS = ".pt, .torchscript, .onnx, or an OpenVINO folder (*_openvino_model) or its .xml"
ONNX_METADATA_KEY = "metadata"
TORCHSCRIPT_METADATA_FILE = "config.txt"
DEFAULT_STRIDE = 32  # for foreign exports without metadata

# The closing timing line of detect.py, val.py and Detections.print(); SPEED_PATTERN reads its three numbers
# (pre-processing, inference, NMS; ms per image) and also those of upstream YOLOv5's "Speed: ..." line.
SPEED_FORMAT = "Time per image: {:.1f} ms preprocessing, {:.1f} ms inference, {:.1f} ms NMS; input {}"
SPEED_PATTERN = re.compile(r"([\d.]+) ?ms pre-?process(?:ing)?, ([\d.]+) ?ms inference, ([\d.]+) ?ms NMS")


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


def missing_package(module: str, package: str | None = None) -> str | None:
    """None when ``module`` imports; else one line saying it is missing and how to install ``package``."""
    try:
        importlib.import_module(module)
    except ImportError as e:
        return f"the {package or module} package is missing or broken ({first_line(e)}); install it with: " \
               f"pip install {package or module}"
    return None


def require(module: str, package: str | None = None, purpose: str = ""):
    """``module``, imported; a one-line UserInputError (naming ``purpose``) with the pip command when it fails."""
    if reason := missing_package(module, package):
        raise UserInputError(f"{purpose}: {reason}" if purpose else reason)
    return importlib.import_module(module)


@functools.cache
def openvino_core():
    """The one OpenVINO Core of this process, for every model read and compiled here.

    OpenVINO's CPU plugin, created by a Core's first compilation, gives the calling thread an alternate signal stack
    and, when the Core goes, frees it and puts back the one it found. Cores that go in another order than they came
    leave the thread on a freed stack, and the next signal handled there (Ctrl-C, or SIGCHLD once a DataLoader with
    workers has run) kills the process or corrupts its heap. A single Core, kept until exit, makes a single plugin."""
    return require("openvino", purpose="OpenVINO models").Core()


def weights_kind(weights: str | Path) -> str | None:
    """'.pt', '.torchscript', '.onnx' or 'openvino' (a *_openvino_model folder, any folder, or an .xml) for a
    weights path; None for anything else. Only the name is looked at, except that an existing folder is OpenVINO."""
    path = Path(weights)
    if path.suffix.lower() in SUFFIXES:
        return path.suffix.lower()
    if path.suffix.lower() == ".xml" or path.name.endswith(OPENVINO_SUFFIX) or path.is_dir():
        return "openvino"
    return None


def weights_rule(value) -> str | None:
    """Option rule for --weights of val.py and detect.py: every path is a model format InferenceBackend runs."""
    for path in map(str, value if isinstance(value, (list, tuple)) else [value]):
        if path and weights_kind(path) is None:
            return f"expected {WEIGHTS_FORMATS}"
    return None


def openvino_xml(weights: Path) -> Path:
    """The IR .xml of an OpenVINO export given as its folder or as the .xml itself."""
    if weights.suffix.lower() == ".xml":
        if not weights.is_file():
            raise CheckpointError(f"{weights}: OpenVINO IR file not found")
        return weights
    if not weights.is_dir():
        raise CheckpointError(f"{weights}: OpenVINO model folder not found")
    found = sorted(weights.glob("*.xml"))
    preferred = [f for f in found if f.stem + OPENVINO_SUFFIX == weights.name]
    if len(found) != 1 and len(preferred) != 1:
        what = "no .xml IR file" if not found else f"{len(found)} .xml files (pass the one to use)"
        raise CheckpointError(f"{weights}: {what} in this OpenVINO folder")
    return preferred[0] if len(preferred) == 1 else found[0]


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

    ``.pt`` models are folded (``fuse``) first, and on the CPU run channels-last (NHWC, oneDNN's preferred
    layout; see docs/BENCHMARKS.md); ``.torchscript`` and ``.onnx`` files and OpenVINO folders carry stride
    and names as metadata (``data``: a data YAML whose names are used for files without it). ``fp16`` runs half
    precision (CUDA only). ``dnn`` runs ONNX files with OpenCV DNN instead of ONNX Runtime. OpenVINO IR runs
    on the CPU in float32 (INT8 layers of quantized IR in int8), whatever ``device`` says for the output.
    ``static_shape`` is the (b, 3, h, w) input a fixed-shape export needs (None: any shape); larger or
    smaller batches are run in chunks of b.
    """

    def __init__(self, weights: str | Path, device: torch.device | str = "cpu", fp16: bool = False,
                 fuse: bool = True, dnn: bool = False, data: str | Path | None = None):
        super().__init__()
        w = Path(weights)
        self.kind = weights_kind(w)
        if self.kind is None:
            raise CheckpointError(f"{w}: unsupported weights format (use {WEIGHTS_FORMATS})")
        if self.kind != "openvino" and not w.is_file():
            raise CheckpointError(f"{w}: weights file not found")
        self.device = torch.device(device)
        self.fp16 = fp16 and self.device.type == "cuda"
        self.static_shape: tuple[int, ...] | None = None
        self.session = self.net = self.compiled = None  # ONNX Runtime session, OpenCV DNN net, OpenVINO model
        self.channels_last = self.kind == ".pt" and self.device.type == "cpu"
        if self.kind == ".pt":
            self.model = load_model(w, self.device, fuse=fuse)
            self.model.half() if self.fp16 else self.model.float()
            if self.channels_last:
                convs_channels_last(self.model)
            self.stride, self.names = int(self.model.stride.max()), self.model.names
            return
        loaders = {".torchscript": self._load_torchscript, ".onnx": lambda f: self._load_onnx(f, dnn),
                   "openvino": self._load_openvino}
        text = loaders[self.kind](w)
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

    def _load_openvino(self, w: Path) -> str | None:
        """Compile the IR for the CPU in float32 (bf16 is OpenVINO's default on some CPUs); returns the metadata."""
        require("openvino", purpose=f"{w} is an OpenVINO model")
        xml = openvino_xml(w)
        core = openvino_core()
        network = core.read_model(str(xml))
        config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": torch.get_num_threads()}
        self.compiled = core.compile_model(network, "CPU", config)
        shape = network.inputs[0].get_partial_shape()
        self.static_shape = tuple(int(d) for d in shape.to_shape()) if shape.is_static else None
        self.fp16 = False
        meta = xml.parent / OPENVINO_METADATA_FILE
        return json.dumps(yaml_load(meta)) if meta.is_file() else None

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
        host_input = im.detach().to("cpu", torch.float16 if self.fp16 else torch.float32).numpy()
        out = self.compiled(host_input)[0] if self.compiled is not None else self._run_onnx(host_input)
        return torch.as_tensor(np.asarray(out), device=self.device).to(torch.float32)

    def _run_onnx(self, host_input: np.ndarray) -> np.ndarray:
        """The first output of the ONNX graph (OpenCV DNN net or ONNX Runtime session) for a host array."""
        if self.net is None:
            return self.session.run(None, {self.input_name: host_input})[0]
        self.net.setInput(host_input)
        return self.net.forward()

    def warmup(self, imgsz: tuple = (1, 3, 640, 640)) -> None:
        """On CUDA, run once on a black batch so that kernel selection and allocations happen before timing."""
        if self.device.type != "cuda":
            return
        shape = tuple(self.static_shape or imgsz)
        self.forward(torch.full(shape, 0.0, device=self.device))


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


def mean_ms(watches: Iterable[Stopwatch], images: int) -> tuple[float, ...]:
    """Each stopwatch's total as milliseconds per image (``images`` counted as at least one)."""
    return tuple(1e3 * w.t / max(images, 1) for w in watches)


def speed_summary(ms: Sequence[float], shape) -> str:
    """The timing line (see SPEED_FORMAT) for (pre-processing, inference, NMS) ms per image and the input shape."""
    return SPEED_FORMAT.format(*ms, tuple(shape) if shape is not None else "?")


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
        prep, infer, nms = Stopwatch(), Stopwatch(), Stopwatch()
        with prep:
            originals, files = self._load_all(ims)
            x = self._input_batch(originals, size).to(device, dtype)
        with infer:
            raw = self.model(x, augment=augment)
        with nms:
            dets = non_max_suppression(raw[0] if isinstance(raw, (list, tuple)) else raw, self.conf, self.iou,
                                       self.classes, self.agnostic, self.multi_label, max_det=self.max_det)
            dets = [self._to_original(d, x.shape[2:], im) for d, im in zip(dets, originals)]
        times = mean_ms((prep, infer, nms), len(originals))
        return Detections(originals, dets, files, times, self.names, tuple(x.shape))

    @staticmethod
    def _load_all(ims) -> tuple[list[np.ndarray], list[str]]:
        """RGB arrays and file names of one image or a list/tuple of them."""
        batch = list(ims) if isinstance(ims, (list, tuple)) else [ims]
        loaded = [load_rgb(item, k) for k, item in enumerate(batch)]
        return [array for array, _ in loaded], [name for _, name in loaded]

    def _input_batch(self, originals: list[np.ndarray], size: int | tuple[int, int]) -> torch.Tensor:
        """Float (b, 3, h, w) batch in [0, 1]: every image letterboxed to one common shape."""
        common = self._batch_shape([im.shape[:2] for im in originals], size)
        hwc = torch.stack([torch.from_numpy(letterbox(im, common, auto=False)[0]) for im in originals])
        return hwc.permute(0, 3, 1, 2).contiguous().float().div_(255)

    @staticmethod
    def _to_original(det: torch.Tensor, input_hw, original: np.ndarray) -> torch.Tensor:
        """``det`` with its boxes moved (in place) from letterboxed input pixels to ``original``'s pixels."""
        scale_boxes(input_hw, det[:, :4], original.shape[:2])
        return det

    def _batch_shape(self, shapes: list[tuple[int, int]], size: int | tuple[int, int]) -> tuple[int, int]:
        """Common letterbox shape: each image scaled so its long side fits ``size``, rounded up to the stride."""
        static = getattr(self.model, "static_shape", None)
        if static:
            return tuple(static[2:])
        gains = [max((size, size) if isinstance(size, int) else size) / max(s) for s in shapes]
        h = max(int(s[0] * g) for s, g in zip(shapes, gains))
        w = max(int(s[1] * g) for s, g in zip(shapes, gains))
        return make_divisible(h, self.stride), make_divisible(w, self.stride)


def centre_form(det: torch.Tensor) -> torch.Tensor:
    """Detection rows [x1, y1, x2, y2, ...] -> [cx, cy, w, h, ...] (extra columns kept)."""
    return torch.cat((xyxy2xywh(det[:, :4]), det[:, 4:]), 1)


def normalised(det: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Detection rows with the four box columns divided by the image size (x by ``width``, y by ``height``)."""
    divisor = det.new_ones(det.shape[1])
    divisor[:4] = det.new_tensor((width, height)).repeat(2)
    return det / divisor


def viewer_available() -> bool:
    """Whether an image viewer can open a window: on Linux only with an X11 or Wayland display."""
    return not sys.platform.startswith("linux") or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def in_notebook() -> bool:
    """Whether this runs in a Jupyter kernel (images are then shown inline)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and "IPKernelApp" in shell.config


class Detections:
    """Detections on a batch of images: per image a tensor (n, 6) of [box, confidence, class] rows.

    ``times``: (pre-processing, inference, NMS) milliseconds per image; ``shape``: the model's input batch shape.
    """

    XYXY_COLUMNS = ("xmin", "ymin", "xmax", "ymax", "confidence", "class", "name")
    XYWH_COLUMNS = ("xcenter", "ycenter", "width", "height", "confidence", "class", "name")

    def __init__(self, ims: list[np.ndarray], pred: list[torch.Tensor], files: list[str],
                 times: Sequence[float] = (0.0, 0.0, 0.0), names: dict[int, str] | None = None,
                 shape: tuple | None = None):
        self.ims, self.pred, self.files = list(ims), list(pred), list(files)
        self.names = names or {}
        self.n, self.s, self.t = len(self.pred), shape, tuple(times)
        sizes = [im.shape[1::-1] for im in self.ims]  # (width, height) per image
        self.xyxy = self.pred
        self.xywh = [centre_form(det) for det in self.pred]
        self.xyxyn = [normalised(det, *wh) for det, wh in zip(self.xyxy, sizes)]
        self.xywhn = [normalised(det, *wh) for det, wh in zip(self.xywh, sizes)]

    def __len__(self) -> int:
        return self.n

    def __str__(self) -> str:
        report = []
        for number, (im, det) in enumerate(zip(self.ims, self.pred), start=1):
            found = ", ".join(class_counts(det, self.names)) or "(no detections)"
            report.append(f"image {number}/{self.n}: {im.shape[0]}x{im.shape[1]} {found}")
        report.append(speed_summary(self.t, self.s))
        return "\n".join(report)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} of {self.n} image(s)>\n{self}"

    def print(self) -> None:
        LOGGER.info(str(self))

    def render(self, labels: bool = True) -> list[np.ndarray]:
        """Copies of the images (RGB) with boxes, and class name + confidence labels when ``labels``."""
        return [self._draw(im, det, labels) for im, det in zip(self.ims, self.pred)]

    def _draw(self, im: np.ndarray, det: torch.Tensor, labels: bool) -> np.ndarray:
        canvas = Annotator(im.copy(), example=str(self.names))
        for row in det.flip(0).tolist():  # lowest confidence first, so the best boxes end up on top
            cls = int(row[5])
            canvas.box_label(row[:4], f"{self.names[cls]} {row[4]:.2f}" if labels else "", color=colors(cls))
        return canvas.result()

    def show(self, labels: bool = True) -> None:
        """Show the annotated images: inline in a notebook, else in the system's image viewer (PIL's
        ``Image.show``); where no window can open (no display), one warning instead."""
        notebook = in_notebook()
        if not notebook and not viewer_available():
            LOGGER.warning("WARNING Detections.show(): no display available (no $DISPLAY); use save() instead")
            return
        pictures = [Image.fromarray(picture) for picture in self.render(labels)]
        if notebook:
            from IPython.display import display

            for picture in pictures:
                display(picture)
            return
        for name, picture in zip(self.files, pictures):
            try:
                picture.show(title=name)
            except OSError as e:  # a viewer that fails to start
                LOGGER.warning(f"WARNING Detections.show(): {name} not shown: {e}")
                return

    def crop(self, save: bool = True, save_dir: str | Path = "runs/detect/exp", exist_ok: bool = False) -> list[dict]:
        """The region around every detection, image by image: dicts with ``box`` (xyxy), ``conf``, ``cls`` (tensors),
        ``label`` ('name 0.87') and ``im``, the RGB crop, cut as detect.py --save-crop cuts it. With ``save`` each
        crop is also written to save_dir/crops/<class>/<image>.jpg (numbered when taken; save_dir itself is
        incremented unless ``exist_ok``)."""
        folder = increment_path(save_dir, exist_ok=exist_ok, mkdir=True) if save else Path(save_dir)
        crops = []
        for im, det, name in zip(self.ims, self.pred, self.files):
            bgr = np.ascontiguousarray(im[..., ::-1])
            for row in det:
                box, conf, cls = row[:4], row[4], row[5]
                file = folder / "crops" / self.names[int(cls)] / f"{Path(name).stem}.jpg"
                crop = save_one_box(box.tolist(), bgr, file, save=save)
                crops.append({"box": box, "conf": conf, "cls": cls, "im": np.ascontiguousarray(crop[..., ::-1]),
                              "label": f"{self.names[int(cls)]} {float(conf):.2f}"})
        if save:
            LOGGER.info(f"Saved {len(crops)} crop{'s' * (len(crops) != 1)} to {folder / 'crops'}")
        return crops

    def save(self, labels: bool = True, save_dir: str | Path = "runs/detect/exp", exist_ok: bool = False) -> Path:
        """Write the annotated images to ``save_dir`` (incremented unless ``exist_ok``); returns the folder."""
        folder = increment_path(save_dir, exist_ok=exist_ok, mkdir=True)
        for name, picture in zip(self.files, self.render(labels)):
            Image.fromarray(picture).save(folder / name)
        LOGGER.info(f"Saved {self.n} image{'s' * (self.n > 1)} to {folder}")
        return folder

    def pandas(self) -> Detections:
        """A copy whose xyxy, xyxyn, xywh and xywhn are lists of DataFrames (one per image)."""
        import pandas as pd  # only here: keeps pandas out of the scripts' start-up

        def frame(rows: torch.Tensor, columns: tuple[str, ...]) -> pd.DataFrame:
            table = pd.DataFrame(rows[:, :5].tolist(), columns=list(columns[:5]))
            classes = rows[:, 5].long().tolist()
            table[columns[5]] = classes
            table[columns[6]] = [self.names[c] for c in classes]
            return table

        new = copy.copy(self)
        for key in ("xyxy", "xyxyn", "xywh", "xywhn"):
            columns = self.XYXY_COLUMNS if key.startswith("xyxy") else self.XYWH_COLUMNS
            setattr(new, key, [frame(rows, columns) for rows in getattr(self, key)])
        return new

    def tolist(self) -> list[Detections]:
        """One ``Detections`` per image."""
        return [Detections([im], [det], [name], self.t, self.names, self.s)
                for im, det, name in zip(self.ims, self.pred, self.files)]
