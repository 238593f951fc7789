"""Efficient RepGFPN blocks (the DAMO-YOLO neck) for YOLOv5.

Xu et al., "DAMO-YOLO: A Report on Real-Time Object Detection Design", 2022 (arXiv:2211.15444),
whose Efficient RepGFPN refines the generalized FPN of Jiang et al., "GiraffeDet: A Heavy-Neck
Paradigm for Object Detection", ICLR 2022: queen-fusion nodes that merge same-level, upper and
lower features through ``CSPStage`` blocks of re-parameterizable ``RepConv`` units.

Attribute names follow DAMO-YOLO's neck (``rbr_dense``/``rbr_1x1``, ``conv1``..``conv3``,
``convs``), so its training-form weights map onto these modules key for key. ``CHECKPOINT_FORMATS``
loads the ``neck.*`` tensors of a DAMO-YOLO detector checkpoint into a model whose neck rows follow
GiraffeNeckV2's data flow (``models/yolov5_GFPN-damo-{t,s,m,l}.yaml``); see :func:`damo_neck_rows`.

SPP inside ``CSPStage`` (``spp=True``): DAMO-YOLO inserts pooling (max-pools 5, 9, 13 on the
input, concatenated with it, then a 1x1 ConvBNAct back to ``mid`` channels) after block
``(n - 1) // 2`` of the chain. Its reference code also appends the pooled map to the
concatenation while sizing ``conv3`` for ``n`` block outputs only, so ``spp=True`` fails there
(every shipped DAMO-YOLO config uses ``spp=False``). Here the pooled map *replaces* the output of
the block it follows, both in the chain and in the concatenation, so ``conv3`` keeps
``mid * n + first`` input channels for any ``n``.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from types import MappingProxyType

import torch
import torch.nn as nn

from models.common import Concat, ConvBN, Reparameterizable, pad_kernel
from models.pretrained import CheckpointError, CheckpointFormat

ACTIVATIONS = MappingProxyType({
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,  # x * sigmoid(x)
    "lrelu": partial(nn.LeakyReLU, 0.1),
    "hardsigmoid": nn.Hardsigmoid,
    "identity": nn.Identity,
})


def get_activation(name: str | None) -> nn.Module:
    """A fresh activation module from its DAMO-YOLO name (``None`` means identity)."""
    if name is None:
        return nn.Identity()
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose from {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


class ConvBNAct(ConvBN):
    """Conv (padding ``(k - 1) // 2``, no bias) + BatchNorm + activation given by name."""

    def __init__(self, c1: int, c2: int, k: int, stride: int = 1, groups: int = 1, act: str | None = "silu"):
        super().__init__(c1, c2, k, stride, (k - 1) // 2, groups)
        self.act = get_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


class RepConv(Reparameterizable):
    """``act(conv_bn_kxk(x) + conv_bn_1x1(x))``, no identity branch; folds to one k x k conv in ``rbr_dense``."""

    def __init__(self, c1: int, c2: int, k: int = 3, stride: int = 1, act: str | None = "relu"):
        super().__init__()
        self.rbr_dense = ConvBN(c1, c2, k, stride)
        self.rbr_1x1 = ConvBN(c1, c2, 1, stride)
        self.act = get_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.rbr_dense(x)
        if self.rbr_1x1 is not None:
            y = y + self.rbr_1x1(x)
        return self.act(y)

    def folded_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Kernel and bias of the single conv equal to both branches (eval mode)."""
        if self.rbr_1x1 is None:
            return self.rbr_dense.weight, self.rbr_dense.bias
        kernel, bias = self.rbr_dense.folded_kernel_bias()
        kernel_1x1, bias_1x1 = self.rbr_1x1.folded_kernel_bias()
        return kernel + pad_kernel(kernel_1x1, kernel.shape[-1]), bias + bias_1x1

    def _fold(self) -> None:
        self._replace_by_conv("rbr_dense", self.rbr_dense.conv, drop=("rbr_1x1",))


class BasicBlock_3x3_Reverse(nn.Module):  # noqa: N801 (DAMO-YOLO's name)
    """Residual ``x + conv1(conv2(x))``: ``conv2`` a RepConv to ``hidden``, ``conv1`` a 3x3 ConvBNAct back."""

    def __init__(self, c1: int, hidden_ratio: float, c2: int, act: str | None = "relu", shortcut: bool = True):
        super().__init__()
        if c1 != c2:
            raise ValueError(f"BasicBlock_3x3_Reverse keeps the channel count ({c1} != {c2})")
        hidden = int(c1 * hidden_ratio)
        self.conv2 = RepConv(c1, hidden, 3, act=act)
        self.conv1 = ConvBNAct(hidden, c2, 3, act=act)
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(self.conv2(x))
        return x + y if self.shortcut else y


class PoolPyramid(nn.Module):
    """DAMO-YOLO's SPP: ``[x, maxpool_k(x) for k in pool_sizes]`` concatenated, then a 1x1 ConvBNAct to ``c``."""

    def __init__(self, c: int, pool_sizes: tuple[int, ...] = (5, 9, 13), act: str | None = "silu"):
        super().__init__()
        self.pools = nn.ModuleList(nn.MaxPool2d(k, stride=1, padding=k // 2) for k in pool_sizes)
        self.conv = ConvBNAct(c * (len(pool_sizes) + 1), c, 1, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([x, *(pool(x) for pool in self.pools)], 1))


class CSPStage(nn.Module):
    """Efficient RepGFPN merge node: CSP split, a chain of ``n`` reverse blocks, concat of every stage output."""

    def __init__(
        self, c1: int, c2: int, n: int = 1, hidden_ratio: float = 1.0, act: str | None = "silu", spp: bool = False
    ):
        super().__init__()
        first = c2 // 2
        mid = c2 - first
        self.conv1 = ConvBNAct(c1, first, 1, act=act)
        self.conv2 = ConvBNAct(c1, mid, 1, act=act)
        self.convs = nn.Sequential(*(BasicBlock_3x3_Reverse(mid, hidden_ratio, mid, act) for _ in range(n)))
        self.spp = PoolPyramid(mid, act=act) if spp else None
        self.spp_after = (n - 1) // 2
        self.conv3 = ConvBNAct(mid * n + first, c2, 1, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [self.conv1(x)]
        y = self.conv2(x)
        for i, block in enumerate(self.convs):
            y = block(y)
            if self.spp is not None and i == self.spp_after:
                y = self.spp(y)
            outputs.append(y)
        return self.conv3(torch.cat(outputs, 1))


YAML_MODULES = {
    "CSPStage": (CSPStage, "csp"),
    "RepConv": (RepConv, "conv"),
    "ConvBNAct": (ConvBNAct, "conv"),
}


# ------------------------------------------------------------------------------------------------ DAMO-YOLO checkpoints

DAMO_FLOW = MappingProxyType({
    "merge_3": ("x0", "bu_conv13(x1)"),
    "merge_4": ("x1", "bu_conv24(x2)", "up(merge_3)"),
    "merge_5": ("x2", "up(merge_4)"),
    "merge_7": ("merge_4", "bu_conv57(merge_5)"),
    "merge_6": ("merge_3", "bu_conv46(merge_4)", "bu_conv76(merge_7)"),
})
"""GiraffeNeckV2's forward: each merge node's concatenated inputs, in order; x2, x1, x0 are the backbone's P3, P4, P5.
The dict's order is the only order in which the nodes can run (each needs the ones before it)."""


def _source(rows: nn.Sequential, i: int, f: int) -> int:
    """The row index that a ``from`` entry ``f`` of row ``i`` names (negative: counted back from ``i``)."""
    return f if f >= 0 else i + f


def _match(rows: nn.Sequential, j: int, term: str, names: dict[str, int]) -> bool:
    """Whether row ``j`` computes ``term`` of :data:`DAMO_FLOW`; binds the names it meets in ``names``
    (a name bound before must be the same row)."""
    op, _, arg = term.partition("(")
    row = rows[j]
    if arg:  # 'up(x)' or 'bu_convNN(x)': a one-input row, then its input
        if op == "up":
            ok = isinstance(row, nn.Upsample) and row.scale_factor in (2, 2.0) and row.mode == "nearest"
        else:
            ok = isinstance(row, ConvBNAct) and row.conv.stride == (2, 2) and row.conv.kernel_size == (3, 3)
        ok = ok and isinstance(row.f, int) and _match(rows, _source(rows, j, row.f), arg[:-1], names)
    else:  # a merge node or a backbone input: a CSPStage matched already, or any other row
        ok = isinstance(row, CSPStage) == op.startswith("merge")
    if ok and op != "up":
        ok = names.setdefault(op, j) == j
    return ok


def damo_neck_rows(rows: nn.Sequential) -> dict[str, int]:
    """DAMO-YOLO module name ('merge_3', 'bu_conv13', ...) -> row index, for a model whose neck is GiraffeNeckV2.

    The model's CSPStage rows are the merge nodes in DAMO's forward order (merge_3, merge_4, merge_5, merge_7,
    merge_6); each must read a Concat whose inputs, traced through Upsample and stride-2 3x3 ConvBNAct rows
    (the bu_convs), are those of :data:`DAMO_FLOW`, with the same three backbone rows throughout.
    Returns {} for a model without CSPStage rows; raises a one-line CheckpointError for any other neck. Widths,
    depth and hidden_ratio are checked by the loader through the tensor shapes; the activation is not stored in a
    checkpoint, so it is the YAML's to match (DAMO-YOLO-T/S use ReLU, M/L SiLU).
    """
    merges = [i for i, row in enumerate(rows) if isinstance(row, CSPStage)]
    if not merges:
        return {}
    if len(merges) != len(DAMO_FLOW):
        raise CheckpointError(f"a DAMO-YOLO neck has {len(DAMO_FLOW)} CSPStage merge nodes, the model has "
                              f"{len(merges)} (layers {merges}); build the neck as in models/yolov5_GFPN-damo-s.yaml")
    names = dict(zip(DAMO_FLOW, merges))
    for (name, terms), i in zip(DAMO_FLOW.items(), merges):
        cat = _source(rows, i, rows[i].f) if isinstance(rows[i].f, int) else None
        froms = getattr(rows[cat], "f", None) if cat is not None and isinstance(rows[cat], Concat) else None
        ok = isinstance(froms, list) and len(froms) == len(terms) and all(
            _match(rows, _source(rows, cat, f), term, names) for f, term in zip(froms, terms))
        if not ok:
            raise CheckpointError(f"layer {i} is not DAMO-YOLO's {name} = {name}(cat[{', '.join(terms)}]) "
                                  "(x2, x1, x0: P3, P4, P5); build the neck as in models/yolov5_GFPN-damo-s.yaml")
    return {k: v for k, v in names.items() if not k.startswith("x")}


def _map_damo_neck(keys: list[str], rows: nn.Sequential) -> dict[str, str]:
    """``neck.<module>.<rest>`` -> ``'<row of module>.<rest>'`` (our blocks keep DAMO's attribute names)."""
    where = damo_neck_rows(rows)
    mapping = {}
    for key in keys:
        module, _, rest = key.removeprefix("neck.").partition(".")
        if module in where:
            mapping[key] = f"{where[module]}.{rest}"
    return mapping


def _is_damo_detector(state: Mapping[str, torch.Tensor]) -> bool:
    """A DAMO-YOLO detector's state_dict (its GiraffeNeckV2 under ``neck.``)."""
    return any(k.startswith("neck.merge_3.") for k in state) and any(k.startswith("neck.bu_conv13.") for k in state)


CHECKPOINT_FORMATS = (
    CheckpointFormat(
        name="DAMO-YOLO",
        recognise=_is_damo_detector,
        is_head=lambda key: not key.startswith("neck."),  # backbone.* (TinyNAS) and head.* (ZeroHead) are not ours
        map_keys=_map_damo_neck,
        bn_eps=1e-3,  # DAMO-YOLO builds every BatchNorm with eps 1e-3
        no_rows_hint="only its GFPN neck loads, into a model whose neck is DAMO-YOLO's GiraffeNeckV2 "
        "(models/yolov5_GFPN-damo-{t,s,m,l}.yaml)",
    ),
)
