"""One inference backend for val.py and detect.py: our .pt checkpoints, TorchScript and ONNX (ONNX Runtime)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from utils.checkpoint import CheckpointError, load_model
from utils.general import LOGGER

SUFFIXES = (".pt", ".torchscript", ".onnx")


def read_metadata(text: str | None, source: Path) -> tuple[int, dict[int, str]]:
    """(stride, names) from the JSON metadata that export.py embeds."""
    if not text:
        raise CheckpointError(f"{source}: no stride/names metadata (export it with export.py)")
    meta = json.loads(text)
    return int(meta["stride"]), {int(k): v for k, v in meta["names"].items()}


class InferenceBackend(nn.Module):
    """Runs a detector from a weights file and returns the decoded predictions (b, n, 5 + nc), pixels.

    ``.pt`` models are folded (``fuse``) first; ``.torchscript`` and ``.onnx`` files carry stride and names
    as metadata. ``fp16`` runs half precision (CUDA only).
    """

    def __init__(self, weights: str | Path, device: torch.device | str = "cpu", fp16: bool = False, fuse: bool = True):
        super().__init__()
        w = Path(weights)
        self.device = torch.device(device)
        self.fp16 = fp16 and self.device.type == "cuda"
        self.kind = w.suffix
        if w.suffix not in SUFFIXES:
            raise CheckpointError(f"{w}: unsupported weights format (use one of {', '.join(SUFFIXES)})")
        if not w.is_file():
            raise CheckpointError(f"{w}: weights file not found")
        if w.suffix == ".pt":
            self.model = load_model(w, self.device, fuse=fuse)
            self.model.half() if self.fp16 else self.model.float()
            self.stride, self.names = int(self.model.stride.max()), self.model.names
        elif w.suffix == ".torchscript":
            extra = {"config.txt": ""}
            self.model = torch.jit.load(str(w), map_location=self.device, _extra_files=extra).eval()
            self.model.half() if self.fp16 else self.model.float()
            self.stride, self.names = read_metadata(extra["config.txt"], w)
        else:
            import onnxruntime

            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if self.device.type == "cuda" else [
                "CPUExecutionProvider"]
            self.session = onnxruntime.InferenceSession(str(w), providers=providers)
            self.input_name = self.session.get_inputs()[0].name
            meta = self.session.get_modelmeta().custom_metadata_map
            self.stride, self.names = read_metadata(meta.get("metadata"), w)
            shape = self.session.get_inputs()[0].shape
            self.static_shape = tuple(shape) if all(isinstance(s, int) for s in shape) else None
            self.fp16 = self.session.get_inputs()[0].type == "tensor(float16)"
        LOGGER.debug(f"Loaded {w} ({self.kind}), stride {self.stride}, {len(self.names)} classes")

    def forward(self, im: torch.Tensor, augment: bool = False, visualize: bool | Path = False) -> torch.Tensor:
        if self.kind == ".onnx":
            if self.static_shape and tuple(im.shape) != self.static_shape:
                raise ValueError(f"this ONNX model takes input shape {self.static_shape}, got {tuple(im.shape)}; "
                                 "export with --dynamic or use the matching --imgsz/--batch-size")
            x = im.cpu().numpy().astype(np.float16 if self.fp16 else np.float32)
            y = self.session.run(None, {self.input_name: x})[0]
            return torch.from_numpy(y).to(self.device).float()
        im = im.half() if self.fp16 else im.float()
        if self.kind == ".pt":
            y = self.model(im, augment=augment, visualize=visualize)
        else:
            y = self.model(im)
        return (y[0] if isinstance(y, (list, tuple)) else y).float()

    def warmup(self, imgsz: tuple = (1, 3, 640, 640)) -> None:
        """One forward pass on a blank image (allocations, lazy initialisation), CUDA only."""
        if self.device.type == "cuda":
            self.forward(torch.zeros(*imgsz, device=self.device))
