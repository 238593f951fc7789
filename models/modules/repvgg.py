"""RepVGG blocks, stages and whole backbones for YOLOv5.

Ding, Zhang, Ma, Han, Ding and Sun, "RepVGG: Making VGG-style ConvNets Great Again", CVPR 2021
(arXiv:2101.03697). A RepVGG block trains with three parallel branches (3x3 conv+BN, 1x1 conv+BN
and, when shapes allow, a BN-only identity) and folds them into a single 3x3 conv with bias for
inference, giving a plain VGG-style stack of 3x3 convs and ReLUs.

Backbones follow the paper: a stride-2 stem block with ``min(64, 64a)`` channels, then four stages
of ``64a, 128a, 256a, 512b`` channels whose first block has stride 2. The g2/g4 variants use grouped
convs on blocks 2, 4, ..., 26 (blocks counted from 1 after the stem); D2se adds squeeze-excitation
(reduction 16) after the branch sum of every block, stem included, as timm's ``repvgg_d2se`` does.

"Custom L2" (from the authors' training code): instead of weight decay on a block's 3x3 and 1x1
kernels, penalise ``sum(ring(K3)**2) + sum((t3*c(K3) + t1*K1)**2 / (t3**2 + t1**2))``, where
``c(K3)`` is the 3x3 kernel's centre, ``ring`` the rest of it, and ``t = gamma / sqrt(var + eps)``
each branch's (detached) BN scale: plain L2 on the ring, normalised L2 on the centre of the
equivalent kernel. The training loss adds ``0.5 * weight_decay * repvgg_custom_l2(model)`` and the
optimizer gives the parameters of :func:`repvgg_custom_l2_parameters` no weight decay.

Official checkpoints (``CHECKPOINT_FORMATS``): training-form files load into a RepVGGBackbone row, deploy-form
files (``rbr_reparam``) into a folded one; the official BatchNorms use eps 1e-5.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from types import MappingProxyType

import torch
import torch.nn as nn
from timm.layers import SEModule

from models.common import BatchNorm2d, ConvBN, Reparameterizable, bn_as_conv, pad_kernel, variant_constructors
from models.pretrained import CheckpointFormat, rename_prefix, rows_of_type

GROUPED_LAYERS = range(2, 27, 2)  # block indices (stem excluded, from 1) that g2/g4 variants group
STAGE_PLANES = (64, 128, 256, 512)
A_DEPTHS, B_DEPTHS, D_DEPTHS = (2, 4, 14, 1), (4, 6, 16, 1), (8, 14, 24, 1)

# variant -> RepVGGBackbone keyword arguments: blocks per stage, width multipliers, groups on GROUPED_LAYERS,
# squeeze-excite
VARIANTS = MappingProxyType({
    "a0": {"depths": A_DEPTHS, "widths": (0.75, 0.75, 0.75, 2.5)},
    "a1": {"depths": A_DEPTHS, "widths": (1, 1, 1, 2.5)},
    "a2": {"depths": A_DEPTHS, "widths": (1.5, 1.5, 1.5, 2.75)},
    "b0": {"depths": B_DEPTHS, "widths": (1, 1, 1, 2.5)},
    "b1": {"depths": B_DEPTHS, "widths": (2, 2, 2, 4)},
    "b1g2": {"depths": B_DEPTHS, "widths": (2, 2, 2, 4), "groups": 2},
    "b1g4": {"depths": B_DEPTHS, "widths": (2, 2, 2, 4), "groups": 4},
    "b2": {"depths": B_DEPTHS, "widths": (2.5, 2.5, 2.5, 5)},
    "b2g2": {"depths": B_DEPTHS, "widths": (2.5, 2.5, 2.5, 5), "groups": 2},
    "b2g4": {"depths": B_DEPTHS, "widths": (2.5, 2.5, 2.5, 5), "groups": 4},
    "b3": {"depths": B_DEPTHS, "widths": (3, 3, 3, 5)},
    "b3g2": {"depths": B_DEPTHS, "widths": (3, 3, 3, 5), "groups": 2},
    "b3g4": {"depths": B_DEPTHS, "widths": (3, 3, 3, 5), "groups": 4},
    "d2se": {"depths": D_DEPTHS, "widths": (2.5, 2.5, 2.5, 5), "use_se": True},
})


def bn_scale(bn: nn.BatchNorm2d) -> torch.Tensor:
    """Per-channel factor ``gamma / sqrt(var + eps)`` a BatchNorm multiplies its input by, as (C, 1, 1, 1)."""
    return (bn.weight / torch.sqrt(bn.running_var + bn.eps)).reshape(-1, 1, 1, 1)


class RepVGGBlock(Reparameterizable):
    """``ReLU(SE(conv_bn kxk(x) + conv_bn 1x1(x) [+ BN(x)]))``; folds into one kxk conv with bias.

    The BN identity branch exists only when ``cin == cout`` and ``stride == 1``; SE is optional.
    """

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, padding: int = 1, groups: int = 1,
                 use_se: bool = False):
        super().__init__()
        if padding < k // 2:
            raise ValueError(f"padding {padding} must be at least k // 2 = {k // 2} to centre the 1x1 branch")
        self.dense = ConvBN(cin, cout, k, stride, padding, groups)
        self.pointwise = ConvBN(cin, cout, 1, stride, padding - k // 2, groups)
        self.identity = BatchNorm2d(cout) if cin == cout and stride == 1 else None
        self.se = SEModule(cout, rd_channels=cout // 16) if use_se else nn.Identity()
        self.act = nn.ReLU(inplace=True)
        self.fused: nn.Conv2d | None = None  # the folded conv, once the branches are merged

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.se(self.branch_sum(x)))

    def branch_sum(self, x: torch.Tensor) -> torch.Tensor:
        """The pre-activation sum of the branches (or the fused conv's output)."""
        if self.fused is not None:
            return self.fused(x)
        out = self.dense(x) + self.pointwise(x)
        return out if self.identity is None else out + self.identity(x)

    def folded_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Kernel and bias of the single conv equal to the branch sum in eval mode (differentiable)."""
        if self.fused is not None:
            return self.fused.weight, self.fused.bias
        size, groups = self.dense.conv.kernel_size[0], self.dense.conv.groups
        kernel, bias = self.dense.folded_kernel_bias()
        kernel_1x1, bias_1x1 = self.pointwise.folded_kernel_bias()
        kernel, bias = kernel + pad_kernel(kernel_1x1, size), bias + bias_1x1
        if self.identity is not None:
            kernel_id, bias_id = bn_as_conv(self.identity, groups, size)
            kernel, bias = kernel + kernel_id, bias + bias_id
        return kernel, bias

    def _fold(self) -> None:
        self._replace_by_conv("fused", self.dense.conv, drop=("dense", "pointwise", "identity"))

    def custom_l2(self) -> torch.Tensor:
        """The paper's custom L2 penalty on this block's equivalent kernel (see the module docstring)."""
        kernel_kxk, kernel_1x1 = self.dense.conv.weight, self.pointwise.conv.weight
        scale_kxk, scale_1x1 = bn_scale(self.dense.bn).detach(), bn_scale(self.pointwise.bn).detach()
        c = kernel_kxk.shape[-1] // 2
        centre = kernel_kxk[:, :, c:c + 1, c:c + 1]
        ring = kernel_kxk.square().sum() - centre.square().sum()
        equivalent_centre = centre * scale_kxk + kernel_1x1 * scale_1x1
        return ring + (equivalent_centre.square() / (scale_kxk.square() + scale_1x1.square())).sum()


def branched_blocks(model: nn.Module) -> list[RepVGGBlock]:
    """Every RepVGGBlock of ``model`` that has not been folded yet."""
    return [m for m in model.modules() if isinstance(m, RepVGGBlock) and not m.folded]


def repvgg_custom_l2(model: nn.Module) -> torch.Tensor:
    """Sum of the custom L2 penalty over the model's unfolded RepVGG blocks (0 when there are none).

    Add ``0.5 * weight_decay * repvgg_custom_l2(model)`` to the loss and exclude
    :func:`repvgg_custom_l2_parameters` from the optimizer's weight decay.
    """
    terms = [block.custom_l2() for block in branched_blocks(model)]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def repvgg_custom_l2_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The kxk and 1x1 kernels the custom L2 regularises (they must get no ordinary weight decay)."""
    return [p for block in branched_blocks(model) for p in (block.dense.conv.weight, block.pointwise.conv.weight)]


class RepVGGStage(nn.Sequential):
    """``n`` RepVGG blocks; the first maps ``c1 -> c2`` with ``stride``, the rest keep ``c2`` (and get identities).

    ``groups`` is one value for every block or a sequence of ``n`` values.
    """

    def __init__(self, c1: int, c2: int, n: int = 1, stride: int = 2, groups: int | Sequence[int] = 1,
                 use_se: bool = False):
        groups = [groups] * n if isinstance(groups, int) else list(groups)
        if len(groups) != n:
            raise ValueError(f"got {len(groups)} group counts for {n} blocks")
        super().__init__(*(
            RepVGGBlock(c2 if i else c1, c2, 3, 1 if i else stride, 1, g, use_se) for i, g in enumerate(groups)
        ))


class RepVGGBackbone(nn.Module):
    """Whole RepVGG feature extractor: returns the stem's and the four stages' maps (strides 2, 4, 8, 16, 32)."""

    def __init__(self, c1: int = 3, depths: Sequence[int] = A_DEPTHS, widths: Sequence[float] = (0.75, 0.75, 0.75, 2.5),
                 groups: int = 1, use_se: bool = False):
        super().__init__()
        self.channels = [min(64, int(64 * widths[0]))] + [int(p * w) for p, w in zip(STAGE_PLANES, widths)]
        stages = [RepVGGBlock(c1, self.channels[0], 3, 2, 1, use_se=use_se)]
        first_layer = 1
        for cin, cout, n in zip(self.channels, self.channels[1:], depths):
            layer_groups = [groups if i in GROUPED_LAYERS else 1 for i in range(first_layer, first_layer + n)]
            stages.append(RepVGGStage(cin, cout, n, 2, layer_groups, use_se))
            first_layer += n
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        return outputs


BACKBONES = variant_constructors("repvgg", RepVGGBackbone, VARIANTS)  # repvgg_a0(c1=3), ...


def repvgg_backbone(c1: int = 3, variant: str = "a0") -> RepVGGBackbone:
    """A named RepVGG variant (``a0`` ... ``d2se``, see ``VARIANTS``) taking ``c1`` input channels."""
    return BACKBONES[f"repvgg_{variant}"](c1)


YAML_MODULES = {
    "RepVGGBlock": (RepVGGBlock, "conv"),
    "RepVGGStage": (RepVGGStage, "csp"),
    **{name: (constructor, "backbone") for name, constructor in BACKBONES.items()},
}


# ------------------------------------------------------------------------------------------------- official checkpoints

OFFICIAL_BLOCK = re.compile(r"stage(0|[1-4]\.\d+)\.((?:rbr_dense|rbr_1x1|rbr_identity|rbr_reparam|se)\..+)")
"""An official block key, ``stage0.<branch>.*`` or ``stage{s}.{j}.<branch>.*``: (block, rest)."""

OFFICIAL_NAMES = (("rbr_dense", "dense"), ("rbr_1x1", "pointwise"), ("rbr_identity", "identity"),
                  ("rbr_reparam", "fused"), ("se.down", "se.fc1"), ("se.up", "se.fc2"))
"""The official block's child names -> RepVGGBlock's (its SE is timm's SEModule, ``fc1``/``fc2``)."""


def _is_official_repvgg(state: dict[str, torch.Tensor]) -> bool:
    """The official RepVGG's names: a stem block ``stage0`` in training (``rbr_dense``) or deploy form."""
    return "stage0.rbr_dense.conv.weight" in state or "stage0.rbr_reparam.weight" in state


def _is_classifier(key: str) -> bool:
    """The ImageNet classifier, ``linear.*``."""
    return key.startswith("linear.")


def _map_official_keys(keys: list[str], rows: nn.Sequential) -> dict[str, str]:
    """Official names onto the first RepVGGBackbone row: ``stage0.*`` -> ``stages.0.*``, ``stage{s}.{j}.*`` ->
    ``stages.{s}.{j}.*``, branches renamed by ``OFFICIAL_NAMES``. Deploy keys (``rbr_reparam``) go to the folded
    block's ``fused`` conv, so they fit a folded model only. Keys of no block stay unmapped (reported as skipped)."""
    backbones = rows_of_type(rows, RepVGGBackbone)
    if not backbones:
        return {}
    index = backbones[0][0]
    mapping = {}
    for key in keys:
        found = OFFICIAL_BLOCK.fullmatch(key)
        if found is not None:
            mapping[key] = f"{index}.stages.{found[1]}.{rename_prefix(found[2], OFFICIAL_NAMES)}"
    return mapping


CHECKPOINT_FORMATS = (
    CheckpointFormat(
        name="RepVGG",
        recognise=_is_official_repvgg,
        is_head=_is_classifier,
        map_keys=_map_official_keys,
        bn_eps=1e-5,  # the official ImageNet training used PyTorch's default BatchNorm eps
        no_rows_hint="official RepVGG weights fit only a whole-backbone row (repvgg_a0 ... repvgg_d2se, e.g. "
        "models/yolov5_RepVGG-A0.yaml); RepVGGBlock/RepVGGStage rows in a YOLOv5 backbone (yolov5s_RepVGG.yaml) "
        "have no published checkpoint",
    ),
)
