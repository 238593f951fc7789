"""AutoBatch (``--batch-size -1``): the training batch size that fills a share of the GPU's free memory.

A copy of the model runs a forward and backward pass (under autocast, as training does) at a few small batch sizes;
the peak memory of each is measured, a straight line (memory = slope * batch + base) is fitted through them, and the
batch whose predicted peak reaches ``fraction`` of the memory this process may use is chosen. On a CPU there is no
memory to fit to: AutoBatch says so and returns the default batch size.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn as nn

from utils.general import LOGGER, colorstr
from utils.torch_utils import de_parallel

TRIAL_BATCHES = (1, 2, 4, 8, 16)
MAX_BATCH = 1024
PREFIX = colorstr("AutoBatch: ")


def choose_batch(batches: list[int], peaks: list[float], budget: float, default: int,
                 failed_at: int | None = None) -> tuple[int, str]:
    """The batch whose fitted peak memory reaches ``budget`` bytes, from measured (batch, peak bytes) pairs;
    returns (batch, how it was found). Never above a batch size that ran out of memory (``failed_at``), never
    below 1; ``default`` when the measurements cannot be fitted."""
    if failed_at is not None and len(batches) < 2:
        return 1, f"batch size {failed_at} ran out of memory; using batch size 1"
    if len(batches) < 2:
        return default, f"fewer than 2 trial batches ran; using the default batch size {default}"
    slope, base = np.polyfit(np.asarray(batches, float), np.asarray(peaks, float), 1)
    if not np.isfinite(slope) or slope <= 0:
        return default, f"memory does not grow with the batch size here; using the default batch size {default}"
    batch = math.floor((budget - base) / slope + 1e-6)  # the tolerance absorbs the fit's rounding
    if failed_at is not None:
        batch = min(batch, max(b for b in batches if b < failed_at))
    batch = int(np.clip(batch, 1, MAX_BATCH))
    predicted = (slope * batch + base) / 2**30
    return batch, f"batch size {batch}, about {predicted:.2f}G of the {budget / 2**30:.2f}G it may use"


def trial_peak(model: nn.Module, imgsz: int, batch: int, device: torch.device) -> float | None:
    """Peak CUDA memory (bytes) of one forward and backward pass at ``batch``; None when it runs out of memory."""
    torch.cuda.reset_peak_memory_stats(device)
    try:
        x = torch.zeros(batch, 3, imgsz, imgsz, device=device)
        with torch.autocast("cuda"):
            outputs = model(x)
            loss = sum(y.float().sum() for y in (outputs if isinstance(outputs, (list, tuple)) else [outputs]))
        loss.backward()
        return float(torch.cuda.max_memory_allocated(device))
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        model.zero_grad(set_to_none=True)
        x = outputs = loss = None
        torch.cuda.empty_cache()


def autobatch(model: nn.Module, imgsz: int, device: torch.device, fraction: float = 0.8, default: int = 16,
              measure=trial_peak) -> int:
    """The training batch size for ``model`` at ``imgsz`` on ``device``: ``fraction`` of the memory this process
    may use (its own cache plus the device's free memory), or ``default`` on a CPU or when measuring fails."""
    if device.type != "cuda":
        LOGGER.info(f"{PREFIX}needs a CUDA device to measure memory; training with batch size {default}")
        return default
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    budget = fraction * (free + torch.cuda.memory_reserved(device))
    probe = copy.deepcopy(de_parallel(model)).train()  # the training model's batch-norm statistics stay untouched
    batches, peaks, failed_at = [], [], None
    for batch in TRIAL_BATCHES:
        peak = measure(probe, imgsz, batch, device)
        if peak is None:
            failed_at = batch
            break
        batches.append(batch)
        peaks.append(peak)
    del probe
    torch.cuda.empty_cache()
    batch, how = choose_batch(batches, peaks, budget, default, failed_at)
    LOGGER.info(f"{PREFIX}{how} ({fraction:.0%} of {(budget / fraction) / 2**30:.2f}G, of {total / 2**30:.2f}G on "
                f"CUDA:{device.index or 0}) at --img {imgsz}")
    return batch
