"""The YOLOv5 training schedule as a pure function of the iteration: learning rate per parameter group, momentum and
gradient accumulation, plus the weight decay scaled to the nominal batch size.

Conventions (YOLOv5's, which its published results and hyperparameter files assume):
- Parameter groups are 0 biases, 1 weights with decay, 2 normalisation weights (see ``smart_optimizer``).
- Gradients are accumulated to a nominal batch of 64 images; weight decay is scaled by the real images per step / 64.
  A hyperparameter file may set its own nominal batch with the optional key ``nbs`` (ours; upstream fixes 64).
- Warm-up over the first ``max(round(warmup_epochs * batches_per_epoch), 100)`` iterations ramps the learning rate of
  the weights from 0 (of the biases from ``warmup_bias_lr``) to ``lr0 * curve(epoch)``, the momentum from
  ``warmup_momentum`` to ``momentum``, and the accumulation from 1 step to 64 images.
- After warm-up the rate follows the epoch curve one epoch late: an epoch runs at ``lr0 * curve(epoch - 1)``,
  except the epoch in which warm-up ended, which keeps the rate warm-up reached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from utils.general import UserInputError

NOMINAL_BATCH = 64
MIN_WARMUP_ITERATIONS = 100


def lr_curve(epochs: int, lrf: float, cosine: bool = False):
    """The learning-rate multiplier per epoch: 1 at epoch 0 down to ``lrf`` at ``epochs``, linear or half-cosine."""
    if cosine:
        return lambda e: 1 + (lrf - 1) * (1 - math.cos(math.pi * e / epochs)) / 2
    return lambda e: lrf + (1 - lrf) * (1 - e / epochs)


def nominal_batch(hyp: dict) -> int:
    """The hyperparameters' nominal batch: their optional ``nbs`` (a positive whole number), else 64."""
    nbs = hyp.get("nbs", NOMINAL_BATCH)
    if isinstance(nbs, bool) or not isinstance(nbs, int) or nbs < 1:
        raise UserInputError(f"hyperparameters: 'nbs' must be a positive whole number of images, got {nbs!r}")
    return nbs


def accumulation(batch_size: int, nominal: int = NOMINAL_BATCH) -> int:
    """Batches whose gradients one optimizer step sums (at least 1), to approach the nominal batch."""
    return max(round(nominal / batch_size), 1)


def scaled_weight_decay(weight_decay: float, batch_size: int, nominal: int = NOMINAL_BATCH) -> float:
    """Weight decay per optimizer step for ``batch_size`` images per batch (the hyperparameter is per ``nominal``)."""
    return weight_decay * batch_size * accumulation(batch_size, nominal) / nominal


@dataclass(frozen=True)
class StepSettings:
    """What the optimizer uses at one iteration."""

    lr: tuple[float, float, float]  # per parameter group: biases, decayed weights, norm weights
    momentum: float
    accumulate: int


class Schedule:
    """Learning rates, momentum and accumulation of iteration ``ni = epoch * batches + batch index``."""

    def __init__(self, hyp: dict, epochs: int, batches: int, batch_size: int, cosine: bool = False):
        self.lr0, self.momentum = hyp["lr0"], hyp["momentum"]
        self.bias_start, self.momentum_start = hyp["warmup_bias_lr"], hyp["warmup_momentum"]
        self.curve = lr_curve(epochs, hyp["lrf"], cosine)
        self.batches, self.batch_size = batches, batch_size
        self.nominal = nominal_batch(hyp)
        self.warmup = max(round(hyp["warmup_epochs"] * batches), MIN_WARMUP_ITERATIONS)

    def curve_lr(self, epoch: int) -> float:
        """The rate the epoch curve gives epoch ``epoch``: one epoch late (epochs 0 and 1 both get curve(0))."""
        return self.lr0 * self.curve(max(epoch - 1, 0))

    def epoch_lr(self, epoch: int) -> float:
        """The rate of an iteration after warm-up: the curve's, or where warm-up left it in the epoch it ended."""
        return self.lr0 * self.curve(epoch) if epoch * self.batches <= self.warmup else self.curve_lr(epoch)

    def at(self, ni: int) -> StepSettings:
        epoch = ni // self.batches
        if ni > self.warmup:
            rate = self.epoch_lr(epoch)
            return StepSettings((rate, rate, rate), self.momentum, accumulation(self.batch_size, self.nominal))
        ramp = [0, self.warmup]
        target = self.lr0 * self.curve(epoch)
        bias = float(np.interp(ni, ramp, [self.bias_start, target]))
        weights = float(np.interp(ni, ramp, [0.0, target]))
        momentum = float(np.interp(ni, ramp, [self.momentum_start, self.momentum]))
        steps = np.interp(ni, ramp, [1, self.nominal / self.batch_size]).round()
        return StepSettings((bias, weights, weights), momentum, max(1, int(steps)))
