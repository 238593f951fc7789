"""RepLKNet: re-parameterized large-kernel depthwise convolutions, as a YOLOv5 backbone.

Ding, Zhang, Han, Ding, "Scaling Up Your Kernels to 31x31: Revisiting Large Kernel Design in CNNs",
CVPR 2022. Each RepLKBlock is a 1x1 -> large depthwise (31x31 ... 13x13, with a parallel 5x5 branch
that folds into it) -> 1x1 bottleneck; each ConvFFN a 1x1 -> GELU -> 1x1 feed-forward; both are
pre-BN residual blocks with stochastic depth. The large depthwise convolutions run through
:mod:`models.modules.large_kernel` (an exact FFT path on the CPU), or through the implementation
``LARGE_KERNEL_CONV_IMPL`` points at, as in the original code. ``CHECKPOINT_FORMATS`` maps the official
ImageNet checkpoints (``stem.*``, ``stages.*``, ``transitions.*``) onto the RepLKNet_Stem and RepLKNet_stage rows.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import sys

import torch
import torch.nn as nn
from timm.layers import DropPath
from torch.utils.checkpoint import checkpoint

from models.common import BatchNorm2d, Conv, ConvBN, Reparameterizable, fold_bn, make_conv, pad_kernel
from models.modules.large_kernel import LargeKernelDepthwiseConv2d
from models.pretrained import CheckpointFormat, rows_of_type

LOGGER = logging.getLogger(__name__)

# The original code's hook: a directory holding the module below (MegEngine's cutlass example
# ``19_large_depthwise_conv2d_torch_extension``), whose class is built as ``cls(channels, kernel, bias=...)``.
IMPL_ENV = "LARGE_KERNEL_CONV_IMPL"
IMPL_MODULE = "depthwise_conv2d_implicit_gemm"
IMPL_CLASS = "DepthWiseConv2dImplicitGEMM"
IMPL_MIN_KERNEL = 6  # as in the original: kernels larger than 5x5 only


def _external_depthwise_conv(channels: int, kernel_size: int, bias: bool) -> nn.Module | None:
    """The ``LARGE_KERNEL_CONV_IMPL`` depthwise conv, or None (with a warning) when it cannot be imported."""
    impl_dir = os.environ[IMPL_ENV]
    if impl_dir not in sys.path:
        sys.path.append(impl_dir)
    try:
        impl = getattr(importlib.import_module(IMPL_MODULE), IMPL_CLASS)
    except (ImportError, AttributeError) as error:
        LOGGER.warning(
            "%s=%s but %s.%s cannot be imported from it (%s); using the built-in large-kernel convolution",
            IMPL_ENV, impl_dir, IMPL_MODULE, IMPL_CLASS, error,
        )
        return None
    return impl(channels, kernel_size, bias=bias)


def large_kernel_conv(cin: int, cout: int, kernel_size: int, stride: int, groups: int, bias: bool) -> nn.Module:
    """A conv with padding ``kernel_size // 2`` for a large-kernel branch.

    'Same' stride-1 depthwise convs larger than 5x5 come from ``LARGE_KERNEL_CONV_IMPL`` when that is set
    and importable; otherwise a :class:`LargeKernelDepthwiseConv2d` (``nn.Conv2d`` with a fast depthwise path).
    """
    if IMPL_ENV in os.environ and cin == cout == groups and stride == 1 and kernel_size >= IMPL_MIN_KERNEL:
        external = _external_depthwise_conv(cin, kernel_size, bias)
        if external is not None:
            return external
    return LargeKernelDepthwiseConv2d(cin, cout, kernel_size, stride, kernel_size // 2, groups=groups, bias=bias)


def conv_bn_relu(cin: int, cout: int, k: int = 1, s: int = 1, g: int = 1) -> Conv:
    """RepLKNet's conv_bn_relu: Conv2d(bias=False) + BatchNorm2d + ReLU, padding k // 2."""
    return Conv(cin, cout, k, s, g=g, act=nn.ReLU())


@torch.no_grad()
def absorb_input_bn(bn: nn.BatchNorm2d, layer: ConvBN) -> None:
    """Fold ``bn`` (applied right before ``layer``, a 1x1 ConvBN) into ``layer``'s conv; ``layer``'s BN goes too.

    Exact because a 1x1 convolution sees no zero padding: W (s x + t) + b = (W s) x + (W t + b).
    """
    kernel, bias = layer.folded_kernel_bias()
    scale, shift = fold_bn(torch.ones_like(bn.running_var), bn)
    layer.conv = make_conv(layer.conv, kernel * scale.view(1, -1, 1, 1), bias + kernel.flatten(1) @ shift)
    layer.bn = None


class ReparamLargeKernelConv(Reparameterizable):
    """Large-kernel conv_bn (``lkb_origin``) plus a parallel small-kernel conv_bn (``small_conv``).

    :meth:`reparameterize` folds both into ``lkb_reparam``, one biased large-kernel conv that keeps the
    fast depthwise path. ``small_kernel_merged=True`` builds that folded form directly.
    """

    def __init__(
        self, cin: int, cout: int, k: int, stride: int, groups: int, small_kernel: int | None,
        small_kernel_merged: bool = False,
    ):
        super().__init__()
        if small_kernel is not None and small_kernel > k:
            raise ValueError(f"small_kernel {small_kernel} must not exceed the large kernel {k}")
        self.kernel_size = k
        self.lkb_origin = self.small_conv = self.lkb_reparam = None
        if small_kernel_merged:
            self.lkb_reparam = large_kernel_conv(cin, cout, k, stride, groups, bias=True)
            return
        self.lkb_origin = ConvBN(cin, cout, k, stride, k // 2, groups)
        self.lkb_origin.conv = large_kernel_conv(cin, cout, k, stride, groups, bias=False)
        if small_kernel is not None:
            self.small_conv = ConvBN(cin, cout, small_kernel, stride, small_kernel // 2, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lkb_reparam is not None:
            return self.lkb_reparam(x)
        out = self.lkb_origin(x)
        return out if self.small_conv is None else out + self.small_conv(x)

    def folded_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Kernel and bias of the single conv this module equals in eval mode."""
        if self.lkb_reparam is not None:
            return self.lkb_reparam.weight, self.lkb_reparam.bias
        kernel, bias = self.lkb_origin.folded_kernel_bias()
        if self.small_conv is not None:
            small_kernel, small_bias = self.small_conv.folded_kernel_bias()
            kernel, bias = kernel + pad_kernel(small_kernel, self.kernel_size), bias + small_bias
        return kernel, bias

    def _fold(self) -> None:
        self._replace_by_conv("lkb_reparam", self.lkb_origin.conv, drop=("lkb_origin", "small_conv"),
                              build=self._large_kernel_like)

    def _large_kernel_like(self, template: nn.Module, kernel: torch.Tensor, bias: torch.Tensor) -> nn.Module:
        """A biased large-kernel conv (same implementation choice as the branch) holding ``kernel`` and ``bias``."""
        conv = large_kernel_conv(
            template.in_channels, template.out_channels, self.kernel_size, template.stride[0], template.groups, True
        ).to(device=kernel.device, dtype=kernel.dtype)
        conv.weight.copy_(kernel)
        conv.bias.copy_(bias)
        return conv


class ConvFFN(Reparameterizable):
    """Pre-BN feed-forward block: x + DropPath(conv_bn 1x1 -> GELU -> conv_bn 1x1 (BN(x)))."""

    def __init__(self, cin: int, cinternal: int, cout: int, drop_path: float):
        super().__init__()
        self.preffn_bn = BatchNorm2d(cin)
        self.pw1 = ConvBN(cin, cinternal, 1)
        self.pw2 = ConvBN(cinternal, cout, 1)
        self.nonlinear = nn.GELU()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x if self.preffn_bn is None else self.preffn_bn(x)
        return x + self.drop_path(self.pw2(self.nonlinear(self.pw1(out))))

    def _fold(self) -> None:
        """The pre-BN goes into ``pw1`` (with ``pw1``'s own BN); ``pw2`` folds itself."""
        if self.preffn_bn is not None:
            absorb_input_bn(self.preffn_bn, self.pw1)
            self.preffn_bn = None


class RepLKBlock(Reparameterizable):
    """Pre-BN large-kernel block: x + DropPath(conv_bn 1x1 (ReLU (large depthwise (conv_bn_relu 1x1 (BN(x)))))."""

    def __init__(
        self, cin: int, cdw: int, k: int, small_kernel: int | None, drop_path: float, small_kernel_merged: bool = False
    ):
        super().__init__()
        self.prelkb_bn = BatchNorm2d(cin)
        self.pw1 = conv_bn_relu(cin, cdw, 1)
        self.large_kernel = ReparamLargeKernelConv(cdw, cdw, k, 1, cdw, small_kernel, small_kernel_merged)
        self.lk_nonlinear = nn.ReLU()
        self.pw2 = ConvBN(cdw, cin, 1)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x if self.prelkb_bn is None else self.prelkb_bn(x)
        out = self.pw2(self.lk_nonlinear(self.large_kernel(self.pw1(out))))
        return x + self.drop_path(out)

    def _fold(self) -> None:
        """The pre-BN goes into ``pw1`` (with ``pw1``'s own BN); the large-kernel conv and ``pw2`` fold themselves."""
        if self.prelkb_bn is not None:
            absorb_input_bn(self.prelkb_bn, self.pw1)
            self.prelkb_bn = None


class RepLKNetStage(nn.Module):
    """``num_blocks`` x [RepLKBlock, ConvFFN] at constant width, optionally with gradient checkpointing per block."""

    def __init__(
        self, channels: int, num_blocks: int, stage_lk_size: int, drop_path: float | list[float],
        small_kernel: int | None, dw_ratio: float = 1, ffn_ratio: float = 4, use_checkpoint: bool = False,
        small_kernel_merged: bool = False,
    ):
        super().__init__()
        rates = list(drop_path) if isinstance(drop_path, (list, tuple)) else [drop_path] * num_blocks
        if len(rates) != num_blocks:
            raise ValueError(f"{num_blocks} blocks but {len(rates)} drop-path rates")
        blocks = []
        for rate in rates:
            cdw = int(channels * dw_ratio)
            blocks.append(RepLKBlock(channels, cdw, stage_lk_size, small_kernel, rate, small_kernel_merged))
            blocks.append(ConvFFN(channels, int(channels * ffn_ratio), channels, rate))
        self.blocks = nn.ModuleList(blocks)
        self.use_checkpoint = use_checkpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        recompute = self.use_checkpoint and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
        return x


class RepLKNet_Stem(nn.Sequential):
    """Stem, stride 4: conv_bn_relu 3x3 s2, depthwise 3x3, 1x1, depthwise 3x3 s2 (all at ``channels[0]``)."""

    def __init__(self, cin: int, channels: list[int]):
        width = channels[0]
        super().__init__(
            conv_bn_relu(cin, width, 3, 2),
            conv_bn_relu(width, width, 3, 1, g=width),
            conv_bn_relu(width, width, 1),
            conv_bn_relu(width, width, 3, 2, g=width),
        )


class RepLKNetBackboneStage(nn.Module):
    """Stage ``stage_index`` (0-3) of RepLKNet: a RepLKNetStage, then (not after the last) a transition
    conv_bn_relu 1x1 to the next width and a depthwise conv_bn_relu 3x3 stride 2.

    Stage i gets its slice of ``linspace(0, drop_path_rate, sum(layers))`` as drop-path rates.
    """

    stage_index = 0

    def __init__(
        self, channels: list[int], large_kernel_sizes: list[int], layers: list[int], drop_path_rate: float = 0.3,
        small_kernel: int | None = 5, dw_ratio: float = 1, ffn_ratio: float = 4, use_checkpoint: bool = False,
    ):
        super().__init__()
        i = self.stage_index
        rates = torch.linspace(0, drop_path_rate, sum(layers), device="cpu").tolist()
        first = sum(layers[:i])
        self.stage = RepLKNetStage(
            channels[i], layers[i], large_kernel_sizes[i], rates[first : first + layers[i]], small_kernel,
            dw_ratio, ffn_ratio, use_checkpoint,
        )
        if i + 1 < len(layers):
            self.transition = nn.Sequential(
                conv_bn_relu(channels[i], channels[i + 1], 1),
                conv_bn_relu(channels[i + 1], channels[i + 1], 3, 2, g=channels[i + 1]),
            )
        else:
            self.transition = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.transition(self.stage(x))


class RepLKNet_stage1(RepLKNetBackboneStage):
    """RepLKNet stage 1 (on ``channels[0]``, output ``channels[1]`` at stride 8)."""

    stage_index = 0


class RepLKNet_stage2(RepLKNetBackboneStage):
    """RepLKNet stage 2 (on ``channels[1]``, output ``channels[2]`` at stride 16)."""

    stage_index = 1


class RepLKNet_stage3(RepLKNetBackboneStage):
    """RepLKNet stage 3 (on ``channels[2]``, output ``channels[3]`` at stride 32)."""

    stage_index = 2


class RepLKNet_stage4(RepLKNetBackboneStage):
    """RepLKNet stage 4 (on ``channels[3]``, no transition: stride 32)."""

    stage_index = 3


YAML_MODULES = {
    "RepLKNet_Stem": (RepLKNet_Stem, "fixed"),
    "RepLKNet_stage1": (RepLKNet_stage1, "fixed"),
    "RepLKNet_stage2": (RepLKNet_stage2, "fixed"),
    "RepLKNet_stage3": (RepLKNet_stage3, "fixed"),
    "RepLKNet_stage4": (RepLKNet_stage4, "fixed"),
}


# ------------------------------------------------------------------------------------------------- official checkpoints

OFFICIAL_STAGE = re.compile(r"(stages|transitions)\.(\d+)\.(.+)")
"""An official stage key: ``stages.{s}.<rest>`` or ``transitions.{s}.<rest>``."""


def _is_official_replknet(state: dict[str, torch.Tensor]) -> bool:
    """The official RepLKNet's names: a ``stem.*`` and pre-BN large-kernel blocks under ``stages.*``."""
    return "stem.0.conv.weight" in state and any(k.startswith("stages.") and ".prelkb_bn." in k for k in state)


def _is_classifier(key: str) -> bool:
    """The ImageNet classifier: the final BatchNorm ``norm.*`` and the linear ``head.*``."""
    return key.split(".", 1)[0] in ("norm", "head")


def _map_official_keys(keys: list[str], rows: nn.Sequential) -> dict[str, str]:
    """Official names onto the rows: ``stem.*`` -> the first RepLKNet_Stem row; ``stages.{s}.blocks.*`` and
    ``transitions.{s}.*`` -> ``.stage.blocks.*`` and ``.transition.*`` of the first stage row with stage_index s.

    ``stages.{s}.norm.*`` (written only with norm_intermediate_features, which this backbone does not build) and
    keys of stages the model has no row for stay unmapped, so the loader reports them as skipped.
    """
    stems = rows_of_type(rows, RepLKNet_Stem)
    stages: dict[int, int] = {}
    for i, row in rows_of_type(rows, RepLKNetBackboneStage):
        stages.setdefault(row.stage_index, i)
    mapping = {}
    for key in keys:
        if key.startswith("stem.") and stems:
            mapping[key] = f"{stems[0][0]}.{key[len('stem.'):]}"
            continue
        found = OFFICIAL_STAGE.fullmatch(key)
        if found is None or int(found[2]) not in stages:
            continue
        group, index, rest = found[1], stages[int(found[2])], found[3]
        if group == "transitions":
            mapping[key] = f"{index}.transition.{rest}"
        elif rest.startswith("blocks."):
            mapping[key] = f"{index}.stage.{rest}"
    return mapping


CHECKPOINT_FORMATS = (
    CheckpointFormat(
        name="RepLKNet",
        recognise=_is_official_replknet,
        is_head=_is_classifier,
        map_keys=_map_official_keys,
        bn_eps=1e-5,  # the official ImageNet training used PyTorch's default BatchNorm eps
        no_rows_hint="use a model whose backbone rows are RepLKNet_Stem and RepLKNet_stage1..4 "
        "(models/yolov5_RepLKNet.yaml)",
    ),
)
