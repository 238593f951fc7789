"""Safe import of upstream YOLOv5 ``.pt`` files (pickled model objects) into our checkpoint format.

Upstream pickles whole ``models.yolo.DetectionModel`` objects. We never import or run their classes:
``torch.load(weights_only=True)`` runs with an allow-list in which each known YOLOv5 / torch.nn class name
maps to an inert stand-in that only records the pickled attribute dict. Any other global (``os.system``,
``builtins.eval``, unknown classes) is refused. The recorded module tree is then walked to recover the
state_dict, the model YAML, class names and strides.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path, PurePosixPath

import torch

from utils.general import LOGGER, UserInputError

YOLOV5_CLASSES = {
    "models.yolo": ("DetectionModel", "Model", "Detect", "BaseModel"),
    "models.common": ("Conv", "DWConv", "Bottleneck", "BottleneckCSP", "C3", "C3x", "C3TR", "C3SPP", "C3Ghost",
                      "CrossConv", "SPP", "SPPF", "Focus", "GhostConv", "GhostBottleneck", "Concat", "Contract",
                      "Expand", "TransformerLayer", "TransformerBlock", "DWConvTranspose2d",
                      "BatchNorm2d"),  # ours (pickles of this repository's models); upstream uses torch's
    "models.experimental": ("CrossConv", "Sum", "MixConv2d", "Ensemble"),
    "torch.nn.modules.conv": ("Conv2d", "ConvTranspose2d"),
    "torch.nn.modules.batchnorm": ("BatchNorm2d",),
    "torch.nn.modules.activation": ("SiLU", "ReLU", "LeakyReLU", "Hardswish", "Sigmoid", "MultiheadAttention"),
    "torch.nn.modules.container": ("Sequential", "ModuleList"),
    "torch.nn.modules.pooling": ("MaxPool2d",),
    "torch.nn.modules.upsampling": ("Upsample",),
    "torch.nn.modules.linear": ("Linear", "Identity", "NonDynamicallyQuantizableLinear"),
}


class UpstreamCheckpointError(UserInputError):
    """An upstream-style .pt that cannot be read safely; the message names the file."""


class CapturedObject:
    """Inert stand-in for a pickled class: keeps the attribute dict it is given, runs nothing else."""

    state: dict

    def __setstate__(self, state) -> None:
        self.state = state if isinstance(state, dict) else {}


def _stand_in(module: str, name: str) -> type:
    return type(name, (CapturedObject,), {"__module__": module, "__qualname__": name})


def _path_stand_in(*parts: str) -> str:
    """pathlib.PosixPath(*parts) in a pickle becomes a plain string."""
    return str(PurePosixPath(*parts))


def allowed_globals() -> list:
    """(object, 'module.name') pairs for torch.serialization.safe_globals."""
    pairs = [(_stand_in(mod, n), f"{mod}.{n}") for mod, names in YOLOV5_CLASSES.items() for n in names]
    pairs += [(_path_stand_in, "pathlib.PosixPath"), (_path_stand_in, "pathlib.WindowsPath"),
              (_path_stand_in, "pathlib.Path")]
    return pairs


def state_dict_of(obj: CapturedObject, prefix: str = "") -> dict:
    """Rebuild a state_dict (parameters and persistent buffers, in registration order) from recorded modules."""
    state = obj.state
    out = {}
    for name, p in state.get("_parameters", {}).items():
        if p is not None:
            out[prefix + name] = p.detach()
    skip = state.get("_non_persistent_buffers_set", set())
    for name, b in state.get("_buffers", {}).items():
        if b is not None and name not in skip:
            out[prefix + name] = b
    for name, child in state.get("_modules", {}).items():
        if isinstance(child, CapturedObject):
            out.update(state_dict_of(child, f"{prefix}{name}."))
    return out


def convert_upstream_checkpoint(path: str | Path) -> dict:
    """Read an upstream YOLOv5 .pt safely; returns the fields of our checkpoint format but ``format`` (no training
    state), which utils.checkpoint adds."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"'{found[1]}'" if found else "an object outside the allow-list"
        raise UpstreamCheckpointError(f"{path}: refused to load: the file references {what}, which is not a tensor, "
                              "container or known YOLOv5 class (it could run code)") from None
    model = raw.get("ema") or raw.get("model") if isinstance(raw, dict) else None
    if not isinstance(model, CapturedObject) or "yaml" not in model.state:
        raise UpstreamCheckpointError(f"{path}: not a YOLOv5 checkpoint (no model object with a 'yaml' definition)")
    names = model.state.get("names", {})
    names = dict(enumerate(names)) if isinstance(names, (list, tuple)) else {int(k): v for k, v in names.items()}
    state = {k: v.float() if v.is_floating_point() else v for k, v in state_dict_of(model).items()}
    stride = model.state.get("stride")
    LOGGER.info(f"Converted upstream YOLOv5 checkpoint {path} ({len(state)} tensors, {len(names)} classes)")
    return {
        "yaml": model.state["yaml"],
        "model": state,
        "ema": None,
        "names": names,
        "nc": model.state["yaml"].get("nc", len(names)),
        "stride": stride.tolist() if isinstance(stride, torch.Tensor) else stride,
        "epoch": -1,
        "train_args": raw.get("opt"),
        "source": "upstream-yolov5",
    }


