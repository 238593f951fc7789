"""From checkpoint data to models: build a DetectionModel from a checkpoint, load one for inference, and move the
matching tensors of one state_dict into another model (fine-tuning, other class counts, the hub)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from models.modules.timm_backbone import without_weights_files
from models.yolo import DetectionModel
from utils.checkpoint import load_checkpoint
from utils.general import LOGGER


def build_model(ckpt: dict, use_ema: bool = True) -> DetectionModel:
    """A DetectionModel with the checkpoint's definition and weights (the EMA weights when present)."""
    model = DetectionModel(without_weights_files(ckpt["yaml"]), verbose=False)  # the checkpoint holds the weights
    state = ckpt.get("ema") if use_ema and ckpt.get("ema") is not None else ckpt["model"]
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)
    model.names = {int(k): v for k, v in ckpt["names"].items()}
    return model


def load_model(weights: str | Path, device: torch.device | str = "cpu", fuse: bool = True) -> DetectionModel:
    """Load weights for inference: eval mode, float32, folded (``fuse``) and on ``device``."""
    model = build_model(load_checkpoint(weights)).to(device).eval()
    return model.fuse() if fuse else model


def transfer_weights(model: nn.Module, state: dict, source: str | Path, exclude: tuple = ()) -> int:
    """Copy into ``model`` every tensor of ``state`` whose name and shape match (and whose name holds none of
    ``exclude``), in float32; logs and returns how many of the model's tensors were set."""
    own = model.state_dict()
    matched = {k: v.float() if v.is_floating_point() else v for k, v in state.items()
               if k in own and v.shape == own[k].shape and not any(x in k for x in exclude)}
    model.load_state_dict(matched, strict=False)
    LOGGER.info(f"weights: {len(matched)} of the model's {len(own)} tensors taken from {source}")
    return len(matched)
