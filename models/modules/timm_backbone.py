"""Any timm model as a multi-output YOLOv5 backbone.

Wightman, "PyTorch Image Models" (timm), https://github.com/huggingface/pytorch-image-models.
``timm.create_model(..., features_only=True)`` turns a classification network into a feature
extractor returning one map per stage; the YAML parser places each map at the layer index of its
stride. timm's re-parameterizable blocks (RepVGG, MobileOne, RepGhost, ...) implement
``reparameterize()``, so ``model.fuse()`` folds them like this project's own.

Weights: nothing is ever downloaded. A local timm checkpoint (the state_dict of
``timm.create_model(name)``, as .safetensors, .pth or .bin, bare or in a training checkpoint's wrapper)
is loaded by timm's own pretrained-weights mechanism (``pretrained_cfg_overlay=dict(file=...)``: its
checkpoint filter, classifier handling and first-conv adaptation to ``in_chans``), named either by the
YAML row or by ``train.py --backbone-weights`` (:meth:`TimmBackbone.load_backbone_file`). Without a
file the backbone starts from random initialization.

YAML row: ``[-1, 1, TimmBackbone, [repvgg_a0]]`` or ``[-1, 1, TimmBackbone, [resnet18, [1, 2, 3, 4], path/to.pth]]``;
a relative path is looked up from the working directory, then from the repository root.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import timm
import torch
import torch.nn as nn

from models.pretrained import BackboneLoad, CheckpointError, read_checkpoint_file, unwrap_state_dict

LOGGER = logging.getLogger("yolov5")
ROOT = Path(__file__).resolve().parents[2]  # the repository root: the second place a relative weights path is sought


def _feature_key(key: str, known: set[str]) -> str | None:
    """The name of a classification-model state-dict entry in timm's feature-extractor wrapper.

    The wrappers keep names, flatten top-level sequentials ('stages.0.x' -> 'stages_0.x') or nest
    the whole model ('x' -> 'model.x'); entries the extractor lacks (the classifier) map to None.
    """
    for candidate in (key, key.replace(".", "_", 1), f"model.{key}"):
        if candidate in known:
            return candidate
    return None


def _names(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """A pretrained_cfg entry that may be one module name or several, as a tuple."""
    if not value:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0].strip() if lines else type(e).__name__


def resolve_weights_path(path: str | Path) -> Path:
    """An existing local weights file: ``path`` as given, else (if relative) under the repository root."""
    given = Path(path).expanduser()
    candidates = [given] if given.is_absolute() else [given, ROOT / given]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    where = "" if given.is_absolute() else f" (looked in {Path.cwd()} and {ROOT})"
    raise CheckpointError(f"{path}: timm weights file not found{where}; nothing is downloaded, give a local "
                          ".safetensors, .pth or .bin file")


class TimmBackbone(nn.Module):
    """``timm.create_model(model_name, features_only=True)``; forward returns the list of stage outputs.

    Args:
        c1: input channels (``in_chans``).
        model_name: a timm model name, e.g. 'repvgg_a0', 'resnet18', 'repghostnet_100'.
        out_indices: which stages to return (timm's default: all, usually strides 2-32).
        weights: optional local timm checkpoint of the classification model, loaded by
            :meth:`load_backbone_file`.
        **kwargs: passed on to ``timm.create_model`` (e.g. ``drop_path_rate``).
    """

    def __init__(self, c1: int, model_name: str, out_indices: Sequence[int] | None = None,
                 weights: str | Path | None = None, **kwargs):
        super().__init__()
        if out_indices is not None:
            kwargs["out_indices"] = tuple(out_indices)
        self.model_name = model_name
        self.create_kwargs = dict(in_chans=c1, **kwargs)
        self.model = self._create()
        self.keeps_bn_eps = False  # True once a file is loaded: its BatchNorm eps must stay (not YOLOv5's 1e-3)
        self.channels: list[int] = self.model.feature_info.channels()
        self.strides: list[int] = self.model.feature_info.reduction()
        if weights:
            result = self.load_backbone_file(weights)
            skipped = ", ".join(f"{n} {why}" for why, n in result.skipped.items())
            LOGGER.info(f"TimmBackbone: {model_name} loaded {result.loaded}/{result.total} tensors from "
                        f"{result.source}{f' (skipped {skipped})' if skipped else ''}")
        else:
            LOGGER.info(f"TimmBackbone: {model_name} randomly initialized (no weights file given)")

    def _create(self, file: Path | None = None) -> nn.Module:
        """timm's feature extractor; with ``file``, filled by timm's pretrained loading from that file alone."""
        if file is None:
            return timm.create_model(self.model_name, features_only=True, pretrained=False, **self.create_kwargs)
        overlay = {"file": str(file), "url": "", "hf_hub_id": ""}  # no remote source left to fall back on
        return timm.create_model(self.model_name, features_only=True, pretrained=True,
                                 pretrained_cfg_overlay=overlay, **self.create_kwargs)

    def load_backbone_file(self, path: str | Path) -> BackboneLoad:
        """Load a local timm checkpoint into this extractor through timm's own loader; all or nothing.

        The file is checked first (every extractor tensor present with its shape; the first bad key is named),
        then timm builds a fresh extractor from it, and its tensors and BatchNorm eps replace this one's.
        Returns loaded/total counts over the file's tensors, classifier excluded (rows/source: the caller's).
        """
        file = resolve_weights_path(path)
        state = unwrap_state_dict(read_checkpoint_file(file), file)
        plan = self._plan(state, file)
        try:
            fresh = self._create(file)
        except Exception as e:  # noqa: BLE001  timm's loader raises whatever torch or safetensors raised
            raise CheckpointError(f"{file}: timm could not load it into {self.model_name} ({_first_line(e)}); "
                                  "no tensor was loaded") from None
        self._check_taken(fresh.state_dict(), state, plan, file)
        self.model.load_state_dict(fresh.state_dict())
        eps = {name: m.eps for name, m in fresh.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
        for name, m in self.model.named_modules():
            if name in eps:
                m.eps = eps[name]  # the eps the weights were trained with (YOLOv5's initialization sets 1e-3)
        self.keeps_bn_eps = True
        head = tuple(f"{name}." for name in _names(self._pretrained_cfg_value("classifier")))
        wanted = [k for k in state if not k.startswith(head)]
        skipped = Counter(f"{k.split('.', 1)[0]}.* (not in the feature extractor)" for k in wanted if k not in plan)
        return BackboneLoad(sum(k in plan for k in wanted), len(wanted), [], dict(skipped), str(file))

    def _pretrained_cfg_value(self, key: str):
        """An entry of the model's pretrained_cfg (the extractor's own, else timm's registry entry)."""
        own = getattr(self.model, "pretrained_cfg", None) or {}
        if own.get(key):
            return own[key]
        registered = timm.models.get_pretrained_cfg(self.model_name)
        return getattr(registered, key, None) if registered is not None else None

    def _adapted_keys(self) -> set[str]:
        """File keys timm reshapes on loading: the first conv's weight when ``in_chans`` is not 3."""
        if self.create_kwargs["in_chans"] == 3:
            return set()
        return {f"{name}.weight" for name in _names(self._pretrained_cfg_value("first_conv"))}

    def _plan(self, state: Mapping[str, torch.Tensor], file: Path) -> dict[str, str]:
        """{file key: extractor key}; refuses a file whose shapes differ or that lacks extractor tensors."""
        own = self.model.state_dict()
        known, adapted = set(own), self._adapted_keys()
        plan: dict[str, str] = {}
        for key, tensor in state.items():
            target = _feature_key(key, known)
            if target is None:
                continue
            if own[target].shape != tensor.shape and key not in adapted:
                raise CheckpointError(
                    f"{file}: tensor '{key}' has shape {tuple(tensor.shape)}, the {self.model_name} extractor's "
                    f"'{target}' {tuple(own[target].shape)} (a checkpoint of another model?); no tensor was loaded")
            plan[key] = target
        taken = set(plan.values())
        missing = [k for k in own if k not in taken and not k.endswith("num_batches_tracked")]
        if missing:
            raise CheckpointError(
                f"{file}: lacks {len(missing)} tensors of the {self.model_name} extractor, the first '{missing[0]}' "
                "(a checkpoint of another model?); no tensor was loaded")
        return plan

    def _check_taken(self, loaded: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor],
                     plan: Mapping[str, str], file: Path) -> None:
        """Every planned tensor arrived as stored (timm's extractors load non-strictly, skipping what they miss)."""
        adapted = self._adapted_keys()
        for key, target in plan.items():
            if key not in adapted and not torch.equal(loaded[target], state[key].to(loaded[target].dtype)):
                raise CheckpointError(
                    f"{file}: timm did not load '{key}' as stored (not the state_dict of timm.create_model"
                    f"('{self.model_name}')?); no tensor was loaded")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.model(x))


YAML_MODULES = {"TimmBackbone": (TimmBackbone, "backbone")}


def without_weights_files(model_dict: dict) -> dict:
    """A copy of a model dict whose TimmBackbone rows name no weights file: for rebuilding a model whose weights
    come from a checkpoint anyway (the file may have moved since training)."""
    copied = copy.deepcopy(model_dict)
    for row in copied.get("backbone", []) + copied.get("head", []):
        if isinstance(row, list) and len(row) == 4 and row[2] == "TimmBackbone" and isinstance(row[3], list):
            args = row[3]
            if args and isinstance(args[-1], dict):
                args[-1].pop("weights", None)
            if len(args) > 2 and not isinstance(args[2], dict):
                args[2] = None
    return copied
