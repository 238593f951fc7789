"""Shared helpers for the test-suite."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn as nn

SHARED = Path(__file__).resolve().parents[2] / "shared"
ROOT = Path(__file__).resolve().parents[1]


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial affine parameters and running statistics."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=g) + 0.5
            m.bias.data = torch.randn(n, generator=g) * 0.2
            m.running_mean = torch.randn(n, generator=g) * 0.2
            m.running_var = torch.rand(n, generator=g) + 0.5
    return model


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b|."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def fold_error(model: nn.Module, x: torch.Tensor) -> float:
    """Relative error between eval outputs before and after ``reparameterize``/``fuse`` of a copy."""
    model = model.eval()
    with torch.no_grad():
        before = model(x)
        folded = copy.deepcopy(model)
        if hasattr(folded, "fuse"):
            folded.fuse()
        else:
            reparameterize_all(folded)
        after = folded.eval()(x)
    before = before[0] if isinstance(before, (tuple, list)) else before
    after = after[0] if isinstance(after, (tuple, list)) else after
    return rel_error(after, before)


def reparameterize_all(model: nn.Module) -> nn.Module:
    """Fold every module that can fold, parent first (what ``model.fuse()`` does)."""
    for m in list(model.modules()):
        if hasattr(m, "reparameterize"):
            m.reparameterize()
    return model


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
