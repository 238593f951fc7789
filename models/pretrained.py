"""Published checkpoints (ImageNet backbones, DAMO-YOLO necks) into the rows of a YOLOv5 model.

``load_backbone_weights(model, path)`` is what ``train.py --backbone-weights``, ``hubconf.custom`` and
``DetectionModel(backbone_weights=...)`` run. It

1. reads the file safely (``torch.load(weights_only=True)``; tensors and plain containers only, plus
   ``argparse.Namespace``, which the official training scripts store next to the weights),
2. unwraps the official containers (``model``, ``state_dict_ema`` before ``state_dict``, a bare state_dict) and
   strips DataParallel's ``module.`` prefixes,
3. asks every family in ``models/modules/`` which one wrote the file (``CHECKPOINT_FORMATS``, see
   :class:`CheckpointFormat`), and lets that family map the official names onto the model's rows,
4. refuses the whole file, loading nothing, on the first shape mismatch or on a tensor without a place,
5. copies the tensors, sets the family's BatchNorm eps on the loaded rows, runs the family's fix-ups, and logs
   one line: ``loaded A/B tensors from FILE into layers X-Y (skipped C: ...)``, where B counts the file's
   tensors that belong to the part being loaded (classifier heads excluded) and C = B - A.

A row module may also load a file itself (``load_backbone_file(path) -> BackboneLoad``): timm backbones do, through
timm's own loader.
"""

from __future__ import annotations

import argparse
import importlib
import pickle
import pkgutil
import re
import zipfile
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

import models.modules
from utils.general import LOGGER, UserInputError

SUMMARY = re.compile(r"loaded (\d+)/(\d+) tensors from (.+) into layers (\d+)-(\d+) \(skipped (\d+)(?:: (.*))?\)")
"""The summary line's form (scripts parse it)."""


class CheckpointError(UserInputError):
    """A checkpoint that cannot be loaded; the message names the file (and the first offending key)."""


@dataclass(frozen=True)
class CheckpointFormat:
    """How one family's published checkpoints map onto this project's modules.

    Attributes:
        name: the family as messages name it ('RepLKNet', 'RepVGG', ...).
        recognise: whether a state_dict (``module.`` stripped) was written by the family's official code.
        is_head: keys of the classifier and auxiliary heads, which a backbone never loads.
        map_keys: ``map_keys(keys, rows)`` -> {official key: 'I.name'}: where each official tensor goes, as the
            row index I in ``rows`` (the model's ``nn.Sequential`` of layers) and the tensor's name inside that
            row. Keys the model has no rows for are left out (they are reported as skipped); a key that maps
            to a name the row lacks is an error (a folded checkpoint into an unfolded model, say).
        bn_eps: the official BatchNorm eps, set on every BatchNorm of the loaded rows (YOLOv5 builds them with
            1e-3; ImageNet backbones were trained with PyTorch's 1e-5). None leaves them alone.
        after_load: fix-up run on each loaded row module (e.g. RevCol's alpha clamp).
        no_rows_hint: what to tell a user whose model has no rows of this family.
    """

    name: str
    recognise: Callable[[Mapping[str, torch.Tensor]], bool]
    is_head: Callable[[str], bool]
    map_keys: Callable[[Sequence[str], nn.Sequential], dict[str, str]]
    bn_eps: float | None = 1e-5
    after_load: Callable[[nn.Module], None] | None = None
    no_rows_hint: str = ""


@dataclass
class BackboneLoad:
    """What one load did: tensors loaded out of the file's backbone tensors, the rows they went to, why the rest
    were skipped (reason -> count)."""

    loaded: int
    total: int
    rows: list[int]
    skipped: dict[str, int] = field(default_factory=dict)
    source: str = ""

    def summary(self) -> str:
        first, last = (min(self.rows), max(self.rows)) if self.rows else (-1, -1)
        skipped = self.total - self.loaded
        reasons = ", ".join(f"{n} {why}" for why, n in self.skipped.items())
        return (f"loaded {self.loaded}/{self.total} tensors from {self.source} into layers {first}-{last} "
                f"(skipped {skipped}{': ' + reasons if skipped and reasons else ''})")


def checkpoint_formats() -> list[CheckpointFormat]:
    """Every family's ``CHECKPOINT_FORMATS`` from models/modules/, in module-name order."""
    formats: list[CheckpointFormat] = []
    for info in pkgutil.iter_modules(models.modules.__path__):
        family = importlib.import_module(f"models.modules.{info.name}")
        formats.extend(getattr(family, "CHECKPOINT_FORMATS", ()))
    return formats


# ------------------------------------------------------------------------------------------------- reading a file


def read_checkpoint_file(path: str | Path) -> object:
    """The unpickled content of ``path``, read without running code; one-line errors for everything else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found (nothing is downloaded: give a local file)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = found.group(1) if found else _first_line(e)
        raise CheckpointError(
            f"{path}: refused, it holds Python objects beyond tensors ({what}), and unpickling those can run code; "
            "save the weights alone as a state_dict (name -> tensor) from the environment that wrote the file") \
            from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint, truncated or corrupt ({_first_line(e)})") \
            from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


WRAPPER_KEYS = ("model", "state_dict_ema", "model_ema", "state_dict", "module")
"""Containers the official scripts wrap weights in, by preference: the EMA weights when a file has both."""


def unwrap_state_dict(content: object, source: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of an official checkpoint, ``module.`` prefixes stripped."""
    state = content
    for _ in range(3):  # e.g. {'model': {'state_dict': ...}} at most a few levels deep
        if not isinstance(state, Mapping) or _is_state_dict(state):
            break
        inner = next((state[k] for k in WRAPPER_KEYS if isinstance(state.get(k), Mapping) and state[k]), None)
        if inner is None:
            break
        state = inner
    if not isinstance(state, Mapping) or not _is_state_dict(state):
        raise CheckpointError(f"{source}: no state_dict found (looked for a name -> tensor mapping, also under "
                              f"{', '.join(repr(k) for k in WRAPPER_KEYS)})")
    tensors = {k: v for k, v in state.items() if torch.is_tensor(v)}
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


def _is_state_dict(mapping: Mapping) -> bool:
    values = list(mapping.values())
    return bool(values) and sum(torch.is_tensor(v) for v in values) >= 0.9 * len(values)


def identify_format(state: Mapping[str, torch.Tensor], source: str | Path,
                    formats: Sequence[CheckpointFormat] | None = None) -> CheckpointFormat:
    """The family whose official code wrote ``state``."""
    formats = checkpoint_formats() if formats is None else formats
    for fmt in formats:
        if fmt.recognise(state):
            return fmt
    first = ", ".join(list(state)[:3])
    raise CheckpointError(f"{source}: not a checkpoint of a known family ({', '.join(f.name for f in formats)}; "
                          f"timm files load into TimmBackbone rows); its first keys are {first}")


# ------------------------------------------------------------------------------------------------- loading


def load_backbone_weights(model: nn.Module, path: str | Path, log: bool = True) -> BackboneLoad:
    """Load a published checkpoint into the matching rows of ``model`` (a DetectionModel, or anything with a
    ``model`` attribute holding its ``nn.Sequential`` of rows). Loads everything or nothing."""
    rows: nn.Sequential = model.model
    own_loader = next((i for i, row in enumerate(rows) if hasattr(row, "load_backbone_file")), None)
    if own_loader is not None:
        result = rows[own_loader].load_backbone_file(path)
        result.rows, result.source = row_span(rows, [own_loader]), str(path)
    else:
        state = unwrap_state_dict(read_checkpoint_file(path), path)
        result = load_state_into_rows(rows, state, identify_format(state, path), path)
    if log:
        LOGGER.info(result.summary())
    return result


def load_state_into_rows(rows: nn.Sequential, state: Mapping[str, torch.Tensor], fmt: CheckpointFormat,
                         source: str | Path) -> BackboneLoad:
    """Map ``state`` with ``fmt`` onto ``rows``, check every tensor, then copy them (all or none)."""
    wanted = [k for k in state if not fmt.is_head(k)]
    try:
        mapping = fmt.map_keys(wanted, rows)
    except CheckpointError as e:  # the family's own refusal, which does not know the file
        raise CheckpointError(f"{source}: {e}") from None
    if not mapping:
        hint = f"; {fmt.no_rows_hint}" if fmt.no_rows_hint else ""
        raise CheckpointError(f"{source}: a {fmt.name} checkpoint, but the model has no rows it fits{hint}")
    own = rows.state_dict()
    for key, target in mapping.items():
        if target not in own:
            raise CheckpointError(f"{source}: {fmt.name} tensor '{key}' has no place in the model (looked for "
                                  f"layer '{target}'); {_why_no_place(key, target, own)}")
        if own[target].shape != state[key].shape:
            raise CheckpointError(f"{source}: {fmt.name} tensor '{key}' has shape {tuple(state[key].shape)}, the "
                                  f"model's '{target}' {tuple(own[target].shape)}; no tensor was loaded")
    with torch.no_grad():
        for key, target in mapping.items():
            own[target].copy_(state[key].to(own[target].dtype))
    loaded_rows = sorted({int(t.split(".", 1)[0]) for t in mapping.values()})
    for i in loaded_rows:
        _finish_row(rows[i], fmt)
    skipped = Counter(_skip_reason(k) for k in wanted if k not in mapping)
    return BackboneLoad(len(mapping), len(wanted), row_span(rows, loaded_rows), dict(skipped), str(source))


def row_span(rows: nn.Sequential, indices: Sequence[int]) -> list[int]:
    """``indices`` plus the layer indices a multi-output backbone row fills (its ``slots``: 0-4 for row 0)."""
    span = set(indices)
    for i in indices:
        span.update(range(i, i + len(getattr(rows[i], "slots", ()) or (None,))))
    return sorted(span)


FOLDED_NAMES = ("reparam", "fused")


def _why_no_place(key: str, target: str, own: Mapping[str, torch.Tensor]) -> str:
    """The likely reason a mapped tensor has no place: folded against training form, or another configuration."""
    row = target.split(".", 1)[0] + "."
    file_folded = any(word in key for word in FOLDED_NAMES)
    model_folded = not any(name.startswith(row) and "running_var" in name for name in own)
    if file_folded and not model_folded:
        return "the file holds the folded (deploy) form: load it into a folded model, or use the training-form file"
    if model_folded and not file_folded:
        return "the model is folded: load training-form weights before folding (model.fuse())"
    return "the model's configuration differs from the file's (variant, groups, squeeze-excite?)"


def _finish_row(row: nn.Module, fmt: CheckpointFormat) -> None:
    if fmt.bn_eps is not None:
        for m in row.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eps = fmt.bn_eps
    if fmt.after_load is not None:
        fmt.after_load(row)


def _skip_reason(key: str) -> str:
    """Skipped keys grouped by their first name ('stages.3.*: no row for them')."""
    return f"{key.split('.', 1)[0]}.* (no row for them)"


def freeze_loaded_rows(model: nn.Module, rows: Sequence[int]) -> list[str]:
    """Stop gradients to every parameter of the given layer indices; returns the frozen parameter names."""
    prefixes = tuple(f"model.{i}." for i in rows)
    frozen = []
    for name, p in model.named_parameters():
        if name.startswith(prefixes):
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


# ------------------------------------------------------------------------------------------------- helpers for families


def rows_of_type(rows: nn.Sequential, *types: type) -> list[tuple[int, nn.Module]]:
    """(index, module) of every row that is an instance of one of ``types``."""
    return [(i, row) for i, row in enumerate(rows) if isinstance(row, types)]


def rename_prefix(key: str, renames: Sequence[tuple[str, str]]) -> str:
    """``key`` with every ``(old, new)`` name component sequence replaced (matched on whole dotted components)."""
    dotted = f".{key}."
    for old, new in renames:
        dotted = dotted.replace(f".{old}.", f".{new}.")
    return dotted[1:-1]
