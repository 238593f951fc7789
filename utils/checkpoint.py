"""Checkpoints: one safe format (loadable with ``torch.load(weights_only=True)``), atomic writes, safe loading
(models/loading.py builds models from them).

A checkpoint is a dict of plain data:
    format      'yolov5-rep/1'
    yaml        the model dict (the YAML it was built from, with nc/anchors as trained)
    model       state_dict of the trained model (float32)
    ema         state_dict of the EMA model or None; ``updates`` its update count
    names, nc, stride
    optimizer, scaler   state dicts (absent in stripped checkpoints)
    epoch, best_fitness, train_args, hyp, rng, versions, date
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from utils.general import LOGGER, ROOT, UserInputError, first_line
from utils.upstream import UpstreamCheckpointError, convert_upstream_checkpoint

FORMAT = "yolov5-rep/1"
TRAIN_RUNS = ROOT / "runs/train"  # train.py's default --project, where newest_best() looks


class CheckpointError(UserInputError):
    """A weights file that cannot be used; the message names the file."""


def save_checkpoint(ckpt: dict, path: str | Path) -> None:
    """Write atomically: a temporary file in the same folder, flushed to disk, then renamed over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def newest_best(runs: str | Path | None = None) -> Path:
    """The most recently written ``*/weights/best.pt`` under ``runs`` (default: train.py's project folder), named in
    the log: what val.py, detect.py and export.py use when no --weights is given."""
    runs = Path(runs or TRAIN_RUNS)
    found = sorted(runs.glob("*/weights/best.pt"), key=os.path.getmtime)
    if not found:
        raise UserInputError(f"--weights: none given and no {runs / '*/weights/best.pt'} exists yet; train a "
                             f"model first (python train.py) or pass --weights")
    LOGGER.info(f"weights: {found[-1]} (the newest best.pt; --weights chooses another)")
    return found[-1]


def fill_weights(opt) -> None:
    """Command-line ``fill`` of val.py, detect.py and export.py: no --weights means the newest best.pt."""
    if not opt.weights:
        opt.weights = str(newest_best())


def load_checkpoint(path: str | Path) -> dict:
    """Load one of our checkpoints safely; upstream YOLOv5 pickles are converted by the restricted importer."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        try:
            return {"format": FORMAT, **convert_upstream_checkpoint(path)}
        except UpstreamCheckpointError as e:
            raise CheckpointError(str(e)) from None
    except Exception as e:  # a damaged or foreign file can make the unpickler raise almost anything
        reason = first_line(e)
        raise CheckpointError(f"{path}: not a readable checkpoint ({reason})") from None
    if not isinstance(ckpt, dict) or "yaml" not in ckpt or "model" not in ckpt:
        raise CheckpointError(f"{path}: not a YOLOv5 checkpoint (no model definition inside)")
    return ckpt


def model_state(model: nn.Module) -> dict:
    """A detached, contiguous float32 CPU copy of a model's state_dict (channels-last weights stored as NCHW)."""
    return {k: v.detach().float().cpu().contiguous() if v.is_floating_point() else v.detach().cpu()
            for k, v in model.state_dict().items()}


def rng_state() -> dict:
    """Python, NumPy and torch RNG states as plain data (weights_only-loadable)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the states saved by :func:`rng_state`."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def plain_data(x):
    """Paths and other objects -> str, recursively, so the checkpoint stays loadable with weights_only=True."""
    if isinstance(x, dict):
        return {k: plain_data(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain_data(v) for v in x]
    return x if x is None or isinstance(x, (bool, int, float, str, torch.Tensor)) else str(x)


def make_checkpoint(model: nn.Module, **extra) -> dict:
    """The common part of every checkpoint for ``model`` (a DetectionModel), plus ``extra`` fields."""
    if "train_args" in extra:
        extra["train_args"] = plain_data(extra["train_args"])
    return {
        "format": FORMAT,
        "yaml": model.yaml,
        "model": model_state(model),
        "names": dict(model.names),
        "nc": model.yaml["nc"],
        "stride": model.stride.tolist(),
        "versions": {"torch": str(torch.__version__), "format": FORMAT},
        "date": datetime.now().isoformat(),
        **extra,
    }


def strip_optimizer(path: str | Path) -> None:
    """Drop training state from a finished checkpoint (keeps EMA weights as the model) to shrink it."""
    ckpt = load_checkpoint(path)
    if ckpt.get("ema") is not None:
        ckpt["model"] = ckpt["ema"]
    for key in ("ema", "optimizer", "scheduler", "scaler", "rng", "updates"):
        ckpt[key] = None
    ckpt["model"] = {k: v.half() if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    ckpt["epoch"] = -1
    save_checkpoint(ckpt, path)
    LOGGER.info(f"Optimizer stripped from {path}, {Path(path).stat().st_size / 1e6:.1f}MB")
