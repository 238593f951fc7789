"""RepGhost blocks for YOLOv5.

Chen et al., "RepGhost: A Hardware-Efficient Ghost Module via Re-parameterization", 2022
(arXiv:2211.06088). A Ghost module concatenates a conv's output with cheap depthwise "ghost"
features; RepGhost *adds* them instead and trains the identity path as a BatchNorm branch, so at
inference the cheap depthwise conv and its parallel branches fold into one depthwise conv with
bias and the concatenation disappears.

Squeeze-excite, as in RepGhostNet (inherited from GhostNet): global average pool, 1x1 conv with
bias to ``make_divisible(cmid * se_ratio, 4)`` channels, ReLU, 1x1 conv with bias back to
``cmid``, hard-sigmoid gate (``relu6(x + 3) / 6``), channel-wise scale. RepGhostNet applies it on
the mid channels, after the strided depthwise conv, with ``se_ratio`` 0.25 where enabled.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import SEModule, make_divisible

from models.common import C3, BatchNorm2d, Conv, ConvBN, Reparameterizable, bn_as_conv, identity_kernel


class RepGhostModule(Reparameterizable):
    """Primary Conv, then ``act(cheap_dw(x1) + BN(x1) [+ x1])``: a sum, not a Ghost concatenation.

    The cheap depth-wise conv+BN and its fusion branches (a BatchNorm, optionally a plain identity) make up the
    re-parameterizable part: ``folded_kernel_bias()`` is the one depth-wise kernel and bias they equal, and
    :meth:`reparameterize` puts that conv in ``cheap`` (and folds the primary Conv's BatchNorm too).
    """

    def __init__(
        self,
        c1: int,
        c2: int,
        k: int = 1,
        dw_size: int = 3,
        stride: int = 1,
        act: bool = True,
        reparam_bn: bool = True,
        reparam_identity: bool = False,
    ):
        super().__init__()
        self.primary = Conv(c1, c2, k, stride, act=act)
        self.cheap = ConvBN(c2, c2, dw_size, 1, g=c2)
        self.fusion_bn = BatchNorm2d(c2) if reparam_bn else None
        self.fusion_identity = reparam_identity
        self.act = nn.SiLU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.primary(x)
        y = self.cheap(x1)
        if self.fusion_bn is not None:
            y = y + self.fusion_bn(x1)
        if self.fusion_identity:
            y = y + x1
        return self.act(y)

    def folded_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(self.cheap, nn.Conv2d):
            return self.cheap.weight, self.cheap.bias
        kernel, bias = self.cheap.folded_kernel_bias()
        channels, size = kernel.shape[0], kernel.shape[-1]
        if self.fusion_bn is not None:
            bn_kernel, bn_bias = bn_as_conv(self.fusion_bn, channels, size)
            kernel, bias = kernel + bn_kernel, bias + bn_bias
        if self.fusion_identity:
            kernel = kernel + identity_kernel(channels, channels, size, kernel)
        return kernel, bias

    def _fold(self) -> None:
        if not isinstance(self.cheap, nn.Conv2d):
            self._replace_by_conv("cheap", self.cheap.conv, drop=("fusion_bn",))
            self.fusion_identity = False


class RepGhostBottleneck(nn.Module):
    """RepGhostNet bottleneck: ghost1 (act) -> [strided dw conv+BN] -> [SE] -> ghost2 (linear) + residual."""

    def __init__(
        self,
        c1: int,
        cmid: int,
        c2: int,
        dw_kernel_size: int = 3,
        stride: int = 1,
        se_ratio: float = 0.0,
        shortcut: bool = True,
    ):
        super().__init__()
        self.ghost1 = RepGhostModule(c1, cmid, act=True)
        self.conv_dw = ConvBN(cmid, cmid, dw_kernel_size, stride, g=cmid) if stride > 1 else nn.Identity()
        self.se = squeeze_excite(cmid, se_ratio) if se_ratio > 0 else nn.Identity()
        self.ghost2 = RepGhostModule(cmid, c2, act=False)
        identity_fits = c1 == c2 and stride == 1
        self.shortcut = nn.Identity() if identity_fits else nn.Sequential(
            ConvBN(c1, c1, dw_kernel_size, stride, g=c1), ConvBN(c1, c2, 1)
        )
        self.add = shortcut or not identity_fits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ghost2(self.se(self.conv_dw(self.ghost1(x))))
        return y + self.shortcut(x) if self.add else y


def squeeze_excite(channels: int, se_ratio: float) -> SEModule:
    """RepGhostNet's SE: ReLU bottleneck of ``make_divisible(channels * se_ratio, 4)``, hard-sigmoid gate."""
    return SEModule(channels, rd_channels=make_divisible(channels * se_ratio, 4), gate_layer="hard_sigmoid")


def repghost_bottleneck_row(
    c1: int, c2: int, k: int = 3, s: int = 1, e: float = 1.0, se_ratio: float = 0.0
) -> RepGhostBottleneck:
    """YAML form ``[c2, k, s, e, se_ratio]`` of :class:`RepGhostBottleneck` with ``cmid = int(c2 * e)``."""
    return RepGhostBottleneck(c1, int(c2 * e), c2, k, s, se_ratio)


class C3RepGhost(C3):
    """C3 whose units are RepGhostBottlenecks ``c_ -> c_ -> c_`` (identity residual unless ``shortcut=False``)."""

    @staticmethod
    def unit(c: int, shortcut: bool, g: int) -> nn.Module:
        return RepGhostBottleneck(c, c, c, shortcut=shortcut)


YAML_MODULES = {
    "RepGhostModule": (RepGhostModule, "conv"),
    "RepGhostBottleneck": (repghost_bottleneck_row, "conv"),
    "C3RepGhost": (C3RepGhost, "csp"),
}
