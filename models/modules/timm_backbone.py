"""Any timm model as a multi-output YOLOv5 backbone.

Wightman, "PyTorch Image Models" (timm), https://github.com/huggingface/pytorch-image-models.
``timm.create_model(..., features_only=True)`` turns a classification network into a feature
extractor returning one map per stage; the YAML parser places each map at the layer index of its
stride. Nothing is ever downloaded: weights come from an optional local state-dict file, else the
backbone starts from random initialization. timm's re-parameterizable blocks (RepVGG, MobileOne,
RepGhost, ...) implement ``reparameterize()``, so ``model.fuse()`` folds them like this project's own.

YAML row: ``[-1, 1, TimmBackbone, [repvgg_a0]]`` or ``[-1, 1, TimmBackbone, [resnet18, [1, 2, 3, 4], path/to.pt]]``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
import torch.nn as nn

LOGGER = logging.getLogger("yolov5")


def _feature_key(key: str, known: set[str]) -> str | None:
    """The name of a classification-model state-dict entry in timm's feature-extractor wrapper.

    The wrappers keep names, flatten top-level sequentials ('stages.0.x' -> 'stages_0.x') or nest
    the whole model ('x' -> 'model.x'); entries the extractor lacks (the classifier) map to None.
    """
    for candidate in (key, key.replace(".", "_", 1), f"model.{key}"):
        if candidate in known:
            return candidate
    return None


class TimmBackbone(nn.Module):
    """``timm.create_model(model_name, features_only=True)``; forward returns the list of stage outputs.

    Args:
        c1: input channels (``in_chans``).
        model_name: a timm model name, e.g. 'repvgg_a0', 'resnet18', 'repghostnet_100'.
        out_indices: which stages to return (timm's default: all, usually strides 2-32).
        weights: optional local state-dict file, of the timm classification model or of this
            feature extractor (loaded with ``torch.load(weights_only=True)``).
        **kwargs: passed on to ``timm.create_model`` (e.g. ``drop_path_rate``).
    """

    def __init__(self, c1: int, model_name: str, out_indices: Sequence[int] | None = None,
                 weights: str | Path | None = None, **kwargs):
        super().__init__()
        if out_indices is not None:
            kwargs["out_indices"] = tuple(out_indices)
        self.model = timm.create_model(model_name, features_only=True, pretrained=False, in_chans=c1, **kwargs)
        self.channels: list[int] = self.model.feature_info.channels()
        self.strides: list[int] = self.model.feature_info.reduction()
        if weights:
            self.load_weights(weights)
        else:
            LOGGER.info(f"TimmBackbone: {model_name} randomly initialized (no weights file given)")

    def load_weights(self, path: str | Path) -> None:
        """Load a local state-dict file; every tensor of the extractor must be in it."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"TimmBackbone: weights file '{path}' not found")
        state = torch.load(path, map_location="cpu", weights_only=True)
        known = set(self.model.state_dict())
        mapped = {_feature_key(k, known): v for k, v in state.items()}
        mapped.pop(None, None)
        missing = sorted(known - set(mapped))
        if missing:
            raise ValueError(f"TimmBackbone: weights file '{path}' lacks {len(missing)} tensors, e.g. {missing[:3]}")
        self.model.load_state_dict(mapped)
        LOGGER.info(f"TimmBackbone: loaded {len(mapped)} tensors from {path}")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.model(x))


YAML_MODULES = {"TimmBackbone": (TimmBackbone, "backbone")}
