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

Two uses of the same blocks: the YOLO integration (SiLU, :class:`C3RepGhost` units, the yolov5*_RepGhost YAMLs)
and the official RepGhostNet (:class:`RepGhostNet`, ReLU, a multi-output backbone row ``repghostnet_<width>``),
into which the official ImageNet checkpoints load (``CHECKPOINT_FORMATS``: training and converted forms).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from types import MappingProxyType

import torch
import torch.nn as nn
from timm.layers import SEModule, make_divisible

from models.common import (
    C3,
    BatchNorm2d,
    Conv,
    ConvBN,
    Reparameterizable,
    activation_module,
    bn_as_conv,
    identity_kernel,
    variant_constructors,
)
from models.pretrained import CheckpointFormat, rows_of_type


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
        act: bool | nn.Module = True,
        reparam_bn: bool = True,
        reparam_identity: bool = False,
    ):
        super().__init__()
        self.primary = Conv(c1, c2, k, stride, act=copy.deepcopy(act))
        self.cheap = ConvBN(c2, c2, dw_size, 1, g=c2)
        self.fusion_bn = BatchNorm2d(c2) if reparam_bn else None
        self.fusion_identity = reparam_identity
        self.act = activation_module(act)  # True: SiLU (the YOLO integration); the official RepGhostNet uses ReLU

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

    def fold_cheap(self) -> None:
        """Fold only the cheap operation and its fusion branches into one biased depth-wise conv: the official
        deploy form, whose primary conv keeps its BatchNorm."""
        if not isinstance(self.cheap, nn.Conv2d):
            with torch.no_grad():
                self._replace_by_conv("cheap", self.cheap.conv, drop=("fusion_bn",))
            self.fusion_identity = False

    def _fold(self) -> None:
        self.fold_cheap()


class RepGhostBottleneck(nn.Module):
    """RepGhostNet bottleneck: ghost1 (act) -> [strided dw conv+BN] -> [SE] -> ghost2 (linear) + residual.

    ``act`` is ghost1's activation (True: SiLU, as the YOLO integration; ``nn.ReLU()`` for the official network).
    """

    def __init__(
        self,
        c1: int,
        cmid: int,
        c2: int,
        dw_kernel_size: int = 3,
        stride: int = 1,
        se_ratio: float = 0.0,
        shortcut: bool = True,
        act: bool | nn.Module = True,
    ):
        super().__init__()
        self.ghost1 = RepGhostModule(c1, cmid, act=act)
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


# ------------------------------------------------------------------------------------------------- RepGhostNet

# RepGhostNet 1.0x, stage by stage: (dw kernel, mid channels, out channels, SE ratio, stride) per bottleneck. The
# paper's Table (GhostNet's layout with RepGhost's narrower mid widths); mid/out/SE/stride agree with the shapes
# of the published key lists. The kernel of a stride-1 block with an identity shortcut owns no weights (it is only
# used by the strided dw conv and the projection shortcut).
REPGHOSTNET_STAGES = (
    ((3, 8, 16, 0.0, 1),),
    ((3, 24, 24, 0.0, 2),),
    ((3, 36, 24, 0.0, 1),),
    ((5, 36, 40, 0.25, 2),),
    ((5, 60, 40, 0.25, 1),),
    ((3, 120, 80, 0.0, 2),),
    ((3, 100, 80, 0.0, 1), (3, 120, 80, 0.0, 1), (3, 120, 80, 0.0, 1), (3, 240, 112, 0.25, 1),
     (3, 336, 112, 0.25, 1)),
    ((5, 336, 160, 0.25, 2),),
    ((5, 480, 160, 0.0, 1), (5, 480, 160, 0.25, 1), (5, 480, 160, 0.0, 1), (5, 480, 160, 0.25, 1)),
)
STEM_CHANNELS, LAST_CHANNELS = 16, 960  # stem 3x3 s2 conv; the final 1x1 ConvBnAct (blocks.9)
FEATURE_BLOCKS = (0, 2, 4, 6, 9)  # the last block at each stride 2, 4, 8, 16, 32
ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU}

VARIANTS = MappingProxyType({  # variant -> RepGhostNet keyword arguments (the published widths)
    "0_5x": {"width": 0.5},
    "0_58x": {"width": 0.58},
    "0_8x": {"width": 0.8},
    "1_0x": {"width": 1.0},
    "1_11x": {"width": 1.11},
    "1_3x": {"width": 1.3},
    "1_5x": {"width": 1.5},
    "2_0x": {"width": 2.0},
})


def activation_by_name(act: str | nn.Module) -> nn.Module:
    """``'relu'`` / ``'silu'`` (YAML-friendly) or a module, returned as a fresh module."""
    if isinstance(act, nn.Module):
        return copy.deepcopy(act)
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {', '.join(ACTIVATIONS)} or an nn.Module, got {act!r}")
    return ACTIVATIONS[act]()


class RepGhostNet(nn.Module):
    """The official RepGhostNet feature extractor as a multi-output backbone row (strides 2, 4, 8, 16, 32).

    ``stem`` (3x3 s2 Conv), ``blocks.0-8`` (stages of :class:`RepGhostBottleneck`, SE enabled as published) and
    ``blocks.9`` (1x1 Conv to ``960 * width``), every width ``make_divisible(c * width, 4)``. Returns the outputs
    of blocks 0, 2, 4, 6 and 9. ``act`` is the network's activation (stem, ghost1, blocks.9; SE keeps ReLU):
    ``'relu'`` as published, ``'silu'`` as the YOLO integration. ``deploy=True`` builds the official converted
    form (each RepGhost module's cheap operation already one biased depth-wise conv, see
    :meth:`RepGhostModule.fold_cheap`), into which the official deploy checkpoints load.
    """

    def __init__(self, c1: int = 3, width: float = 1.0, act: str | nn.Module = "relu", deploy: bool = False):
        super().__init__()
        if not (isinstance(width, (int, float)) and 0 < width < 100):
            raise ValueError(f"width must be a positive multiplier, got {width!r}")

        def channels(c: int) -> int:
            return make_divisible(c * width, 4)

        c = channels(STEM_CHANNELS)
        self.stem = Conv(c1, c, 3, 2, act=activation_by_name(act))
        stages = []
        for stage in REPGHOSTNET_STAGES:
            units = []
            for k, mid, out, se_ratio, stride in stage:
                units.append(RepGhostBottleneck(c, channels(mid), channels(out), k, stride, se_ratio,
                                                act=activation_by_name(act)))
                c = channels(out)
            stages.append(nn.Sequential(*units))
        stages.append(nn.Sequential(Conv(c, channels(LAST_CHANNELS), 1, act=activation_by_name(act))))
        self.blocks = nn.ModuleList(stages)
        if deploy:
            for m in self.modules():
                if isinstance(m, RepGhostModule):
                    m.fold_cheap()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        outputs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in FEATURE_BLOCKS:
                outputs.append(x)
        return outputs


VARIANT_PREFIX = "repghostnet"  # the published network's name, not the file's
BACKBONES = variant_constructors(VARIANT_PREFIX, RepGhostNet, VARIANTS)  # repghostnet_1_0x(c1=3, **overrides), ...


# ------------------------------------------------------------------------------------------------- official checkpoints

# Official name pieces -> ours, applied in order to ".key." (whole dotted components). The deploy form's
# "cheap_operation.{weight,bias}" is a plain conv; the training form's is "cheap_operation.{0,1}" (conv, BN).
_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^\.conv_stem\.", ".stem.conv."),
    (r"^\.bn1\.", ".stem.bn."),
    (r"\.primary_conv\.0\.", ".primary.conv."),
    (r"\.primary_conv\.1\.", ".primary.bn."),
    (r"\.cheap_operation\.0\.", ".cheap.conv."),
    (r"\.cheap_operation\.1\.", ".cheap.bn."),
    (r"\.cheap_operation\.", ".cheap."),
    (r"\.fusion_bn\.0\.", ".fusion_bn."),
    (r"\.conv_dw\.", ".conv_dw.conv."),
    (r"\.bn_dw\.", ".conv_dw.bn."),
    (r"\.se\.conv_reduce\.", ".se.fc1."),
    (r"\.se\.conv_expand\.", ".se.fc2."),
    (r"\.shortcut\.0\.", ".shortcut.0.conv."),
    (r"\.shortcut\.1\.", ".shortcut.0.bn."),
    (r"\.shortcut\.2\.", ".shortcut.1.conv."),
    (r"\.shortcut\.3\.", ".shortcut.1.bn."),
    (r"^(\.blocks\.\d+\.\d+)\.bn1\.", r"\1.bn."),
)
_RENAME_PATTERNS = tuple((re.compile(old), new) for old, new in _RENAMES)
_GHOST_KEY = re.compile(r"^blocks\.\d+\.\d+\.ghost1\.primary_conv\.0\.weight$")


def official_to_ours(key: str) -> str:
    """Our name (inside a :class:`RepGhostNet`) of an official RepGhostNet state_dict key.

    The shortcut's four entries are renamed one at a time: each pattern sees the key as left by the previous ones,
    and no renamed piece matches a later pattern.
    """
    dotted = f".{key}."
    for pattern, new in _RENAME_PATTERNS:
        dotted = pattern.sub(new, dotted)
    return dotted[1:-1]


def _is_repghostnet(state, deploy: bool) -> bool:
    if "conv_stem.weight" not in state or not any(_GHOST_KEY.match(k) for k in state):
        return False
    return any(k.endswith("cheap_operation.weight") for k in state) == deploy


def _is_head(key: str) -> bool:
    return key.startswith(("conv_head.", "classifier."))


def _map_keys(keys: Sequence[str], rows: nn.Sequential) -> dict[str, str]:
    """Every official key onto the first RepGhostNet row (none when the model has no such row)."""
    found = rows_of_type(rows, RepGhostNet)
    if not found:
        return {}
    i = found[0][0]
    return {k: f"{i}.{official_to_ours(k)}" for k in keys}


_NO_ROWS = "build the model with a repghostnet_* backbone row (e.g. models/yolov5s_RepGhostNet.yaml)"
CHECKPOINT_FORMATS = (
    CheckpointFormat("RepGhostNet", lambda state: _is_repghostnet(state, deploy=False), _is_head, _map_keys,
                     bn_eps=1e-5, no_rows_hint=_NO_ROWS),
    CheckpointFormat("RepGhostNet (deploy)", lambda state: _is_repghostnet(state, deploy=True), _is_head, _map_keys,
                     bn_eps=1e-5, no_rows_hint=_NO_ROWS + " built with deploy=True"),
)
"""The official training form (``state_dict_ema`` preferred) loads into an unfolded row, the official converted
(deploy) form into a row built with ``deploy=True``; both with PyTorch's BatchNorm eps."""


YAML_MODULES = {
    "RepGhostModule": (RepGhostModule, "conv"),
    "RepGhostBottleneck": (repghost_bottleneck_row, "conv"),
    "C3RepGhost": (C3RepGhost, "csp"),
    **{name: (constructor, "backbone") for name, constructor in BACKBONES.items()},
}
