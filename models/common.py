"""YOLOv5's building blocks, the folding primitives and the re-parameterization protocol every family follows.

Constructor signatures, attribute names and module nesting are YOLOv5's interface: model YAML rows call the
constructors, and upstream checkpoints load because the state_dict keys (``cv1.conv.weight``, ``m.0.cv2.bn.bias``,
...) come out the same. Inside, the blocks share a few generic pieces: one CSP block with a pluggable inner module
(:class:`CSPBlock`), one max-pool pyramid for any pool sizes (:class:`SPP`, of which SPPF is a case), and pixel
(un)shuffles for the space/depth rearrangements.

Re-parameterization (:class:`Reparameterizable`): a block that trains as conv + BatchNorm or with parallel branches
folds itself, in place, with ``reparameterize()``; ``BaseModel.fuse()`` calls it on every module (timm's blocks use
the same name). ``folded`` tells whether a block is folded, and ``folded_kernel_bias()`` gives the kernel and bias
of the one convolution a block is equivalent to. Families declare named size variants as ``VARIANTS`` dicts and
turn them into YAML constructors with :func:`variant_constructors`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F


def autopad(k: int | Sequence[int], p: int | Sequence[int] | None = None, d: int = 1) -> int | Sequence[int]:
    """``p`` when given; otherwise the padding that keeps the spatial size for an odd kernel ``k`` at dilation ``d``.

    A dilated kernel spans ``d * (k - 1) + 1`` pixels, half of which (rounded down) go on each side.
    """
    if p is not None:
        return p

    def half_span(size: int) -> int:
        return (d * (size - 1) + 1) // 2

    return half_span(k) if isinstance(k, int) else [half_span(size) for size in k]


def fold_bn(kernel: torch.Tensor, bn: nn.BatchNorm2d, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel and bias of ``bn(conv(x))`` for a conv with ``kernel`` (and optional ``bias``)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * scale
    if bias is not None:
        shift = shift + bias * scale
    return kernel * scale.reshape(-1, *([1] * (kernel.dim() - 1))), shift


def pad_kernel(kernel: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad a square kernel (..., k, k) to (..., size, size), centred."""
    p = (size - kernel.shape[-1]) // 2
    return F.pad(kernel, [p, p, p, p]) if p > 0 else kernel


def identity_kernel(channels: int, groups: int, size: int, like: torch.Tensor) -> torch.Tensor:
    """Kernel of a grouped conv that copies its input: a centred one-hot per output channel."""
    per_group = channels // groups
    kernel = torch.zeros(channels, per_group, size, size, dtype=like.dtype, device=like.device)
    idx = torch.arange(channels, device=like.device)
    kernel[idx, idx % per_group, size // 2, size // 2] = 1.0
    return kernel


def bn_as_conv(bn: nn.BatchNorm2d, groups: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel and bias of a conv equal to a lone BatchNorm (an identity branch with BN)."""
    return fold_bn(identity_kernel(bn.num_features, groups, size, bn.weight), bn)


def make_conv(template: nn.Conv2d, kernel: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    """A biased Conv2d with ``template``'s geometry (kernel size, stride, padding, groups) and the given weights."""
    conv = nn.Conv2d(
        template.in_channels, template.out_channels, template.kernel_size, template.stride,
        template.padding, template.dilation, template.groups, bias=True,
    ).to(device=kernel.device, dtype=kernel.dtype)
    conv.weight.data.copy_(kernel.detach())
    conv.bias.data.copy_(bias.detach())
    return conv


class _ChannelsLastBatchNormFunction(torch.autograd.Function):
    """Training-mode batch norm of a channels-last CPU tensor, with statistics from two PyTorch reductions.

    Forward: mean and biased variance as two reductions over the (N*H*W, C) matrix that NHWC memory is (the
    variance of the centred input, so no cancellation), then PyTorch's fused NHWC kernel in its inference form.
    Backward: PyTorch's fused training-mode backward, given those statistics.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float):
        rows = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])  # a view of the NHWC memory
        mean = rows.mean(0)
        var = (rows - mean).square_().mean(0)
        invstd = (var + eps).rsqrt()
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, var)
        return torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, False), mean, var

    @staticmethod
    def backward(ctx, grad, _grad_mean, _grad_var):
        x, weight, mean, invstd = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
        grads = torch.ops.aten.native_batch_norm_backward(
            grad.contiguous(memory_format=torch.channels_last), x, weight, None, None, mean, invstd, True, ctx.eps,
            mask)
        return (*grads, None)


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that stays accurate when training channels-last (NHWC) on the CPU.

    PyTorch's NHWC CPU kernel sums its training statistics in a way that loses precision on inputs with a large
    mean (yolov5s's gradients then differ from a float64 reference by 5e-2, against 1e-4 in NCHW); this module
    computes the mean and the variance of the centred input itself (1.4e-4) and otherwise runs PyTorch's fused
    kernels. Every other case
    (NCHW, CUDA, eval mode) is ``nn.BatchNorm2d`` itself. Same parameters, buffers and state_dict keys.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.track_running_stats and self.momentum is not None and x.device.type == "cpu"
                and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()):
            return super().forward(x)
        y, mean, var = _ChannelsLastBatchNormFunction.apply(x, self.weight, self.bias, self.eps)
        n = x.numel() // x.shape[1]  # >= 2: a 1x1 map is contiguous and takes nn.BatchNorm2d's path
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            self.running_mean.mul_(1 - self.momentum).add_(mean, alpha=self.momentum)
            self.running_var.mul_(1 - self.momentum).add_(var, alpha=self.momentum * n / (n - 1))
        return y


# ---------------------------------------------------------------------------------------------------------------------
# Re-parameterization protocol and variant declarations


class Reparameterizable(nn.Module):
    """Base of every block that trains as conv + BatchNorm or with parallel branches and folds for inference.

    - :meth:`reparameterize` folds the block in place, its children included; it is idempotent, runs without
      gradients and leaves the eval-mode output unchanged. Subclasses implement :meth:`_fold` for what they
      fold themselves; sub-modules that fold on their own are folded afterwards.
    - :attr:`folded`: True once no BatchNorm is left in the block. Every training-only branch carries one, so
      this also means that no parallel branch is left.
    - ``folded_kernel_bias()``: blocks equal to one convolution (or, for a RepGhost module, its cheap operation)
      return that convolution's kernel and bias, before folding (differentiable) as after it. Parents rely on it
      whether or not their children are folded yet.
    """

    @property
    def folded(self) -> bool:
        return not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.modules())

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold the block for inference (no-op when it is folded already)."""
        if self.folded:
            return
        self._fold()
        for module in list(self.modules())[1:]:
            if hasattr(module, "reparameterize"):
                module.reparameterize()

    def _fold(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not say how it folds")

    def _replace_by_conv(self, slot: str, template: nn.Module, drop: Iterable[str] = (),
                         build: Callable[[nn.Module, torch.Tensor, torch.Tensor], nn.Module] = make_conv) -> None:
        """Install ``build(template, *folded_kernel_bias())`` as attribute ``slot`` and set the training-only
        attributes ``drop`` to None (their state_dict entries disappear)."""
        conv = build(template, *self.folded_kernel_bias())
        for name in drop:
            setattr(self, name, None)
        setattr(self, slot, conv)


def variant_constructors(prefix: str, build: Callable[..., nn.Module],
                         variants: Mapping[str, Mapping[str, Any]]) -> dict[str, Callable[..., nn.Module]]:
    """One YAML constructor per entry of a family's ``VARIANTS`` (variant name -> constructor keyword arguments).

    ``{prefix}_{name}(c1=3, **overrides)`` returns ``build(c1, **variants[name], **overrides)``; overrides win.
    """

    def constructor_for(name: str) -> Callable[..., nn.Module]:
        def construct(c1: int = 3, **overrides) -> nn.Module:
            return build(c1, **{**variants[name], **overrides})

        construct.__name__ = construct.__qualname__ = f"{prefix}_{name}"
        construct.__module__ = build.__module__
        construct.__doc__ = f"The {name!r} variant of {build.__name__} on ``c1`` input channels."
        return construct

    return {f"{prefix}_{name}": constructor_for(name) for name in variants}


# ---------------------------------------------------------------------------------------------------------------------
# Convolutions


def activation_module(act: bool | nn.Module | None) -> nn.Module:
    """YOLOv5's ``act`` argument: ``True`` is SiLU, a module is used as given, anything else means none."""
    if isinstance(act, nn.Module):
        return act
    return nn.SiLU() if act is True else nn.Identity()


class ConvBN(Reparameterizable):
    """Bias-free ``Conv2d`` then ``BatchNorm2d``; folds into one biased ``Conv2d`` (``bn`` becomes None)."""

    def __init__(self, c1: int, c2: int, k: int | Sequence[int] = 1, s: int | Sequence[int] = 1, p=None, g: int = 1,
                 d: int = 1):
        super().__init__()
        geometry = {"stride": s, "padding": autopad(k, p, d), "dilation": d, "groups": g}
        self.conv = nn.Conv2d(c1, c2, k, bias=False, **geometry)
        self.bn = BatchNorm2d(self.conv.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y if self.bn is None else self.bn(y)

    def folded_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.bn is None:
            return self.conv.weight, self.conv.bias
        return fold_bn(self.conv.weight, self.bn, self.conv.bias)

    def _fold(self) -> None:
        self._replace_by_conv("conv", self.conv, drop=("bn",))


class Conv(ConvBN):
    """YOLOv5's Conv: :class:`ConvBN`, then an activation (SiLU unless ``act`` says otherwise)."""

    def __init__(self, c1: int, c2: int, k: int | Sequence[int] = 1, s: int | Sequence[int] = 1, p=None, g: int = 1,
                 d: int = 1, act: bool | nn.Module = True):
        super().__init__(c1, c2, k, s, p=p, g=g, d=d)
        self.act = activation_module(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


def repeated(n: int, make: Callable[[], nn.Module]) -> nn.Sequential:
    """``n`` separately built units in sequence."""
    return nn.Sequential(*[make() for _ in range(n)])


class ConvPair(nn.Module):
    """``cv2(cv1(x))`` through ``hidden`` channels, plus ``x`` when ``residual``.

    ``first`` and ``second`` are the remaining :class:`Conv` arguments (kernel, stride, padding, groups) of each.
    """

    def __init__(self, c1: int, c2: int, hidden: int, first: Sequence, second: Sequence, residual: bool):
        super().__init__()
        self.cv1 = Conv(c1, hidden, *first)
        self.cv2 = Conv(hidden, c2, *second)
        self.add = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return y + x if self.add else y


class DWConv(Conv):
    """Conv grouped as finely as the channel counts allow (``gcd(c1, c2)`` groups: depth-wise when equal)."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, d: int = 1, act: bool | nn.Module = True):
        groups = math.gcd(c1, c2)
        super().__init__(c1, c2, k, s, None, groups, d, act)


class Bottleneck(ConvPair):
    """ResNet-style bottleneck: 1x1 to ``int(c2 * e)`` channels, 3x3 (``g`` groups) to ``c2``; residual when
    ``shortcut`` and the shapes agree."""

    def __init__(self, c1: int, c2: int, shortcut: bool = True, g: int = 1, e: float = 0.5):
        super().__init__(c1, c2, int(c2 * e), (1, 1), (3, 1, None, g), shortcut and c1 == c2)


class CrossConv(ConvPair):
    """A k x k convolution factorised into (1 x k) then (k x 1), each with its stride component."""

    def __init__(self, c1: int, c2: int, k: int = 3, s: int = 1, g: int = 1, e: float = 1.0, shortcut: bool = False):
        super().__init__(c1, c2, int(c2 * e), ((1, k), (1, s)), ((k, 1), (s, 1), None, g), shortcut and c1 == c2)


# ---------------------------------------------------------------------------------------------------------------------
# Cross Stage Partial blocks


class CSPBlock(nn.Module):
    """Cross Stage Partial block (Wang et al., "CSPNet", CVPR workshops 2020), as YOLOv4 and YOLOv5 use it.

    ``hidden = int(c2 * e)``. The input takes two ways: the main path ends in the inner module ``m`` (built by
    ``inner(hidden)``), the bypass is the 1x1 layer ``cv2``. Both are concatenated, main path first, and merged
    to ``c2`` channels. Subclasses create their 1x1 layers in :meth:`build_paths` and say how the main path runs
    and how the concatenation is merged.
    """

    def __init__(self, c1: int, c2: int, e: float, inner: Callable[[int], nn.Module]):
        super().__init__()
        hidden = int(c2 * e)
        self.build_paths(c1, c2, hidden)
        self.m = inner(hidden)

    def build_paths(self, c1: int, c2: int, hidden: int) -> None:
        raise NotImplementedError

    def main_path(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def merge(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        both = torch.cat([self.main_path(x), self.cv2(x)], dim=1)
        return self.merge(both)


def bottleneck_unit(c: int, shortcut: bool, g: int) -> Bottleneck:
    """The inner unit of the CSP blocks: a full-width :class:`Bottleneck` on ``c`` channels."""
    return Bottleneck(c, c, shortcut, g, e=1.0)


class BottleneckCSP(CSPBlock, Reparameterizable):
    """The CSP bottleneck of YOLOv4 and early YOLOv5: Conv into the units, a plain 1x1 after them and on the
    bypass, BatchNorm + SiLU on the concatenation, Conv to ``c2``.

    Folding moves each half of the concatenation's BatchNorm into the plain 1x1 conv that feeds it.
    """

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1, e: float = 0.5):
        super().__init__(c1, c2, e, lambda c: repeated(n, lambda: bottleneck_unit(c, shortcut, g)))

    def build_paths(self, c1: int, c2: int, hidden: int) -> None:
        self.cv1 = Conv(c1, hidden)
        self.cv2, self.cv3 = (nn.Conv2d(cin, hidden, 1, bias=False) for cin in (c1, hidden))
        self.cv4 = Conv(2 * hidden, c2)
        self.bn = BatchNorm2d(2 * hidden)
        self.act = nn.SiLU()

    def main_path(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(self.m(self.cv1(x)))

    def merge(self, y: torch.Tensor) -> torch.Tensor:
        return self.cv4(self.act(y if self.bn is None else self.bn(y)))

    def _fold(self) -> None:
        scale, shift = fold_bn(torch.ones_like(self.bn.weight).view(-1, 1, 1, 1), self.bn)
        for part, name in enumerate(("cv3", "cv2")):  # the concatenation's order
            conv = getattr(self, name)
            rows = slice(part * conv.out_channels, (part + 1) * conv.out_channels)
            setattr(self, name, make_conv(conv, conv.weight * scale[rows], shift[rows]))
        self.bn = None


class C3(CSPBlock):
    """YOLOv5's CSP block with three Convs: ``cv1`` into the inner units, ``cv2`` as bypass, ``cv3`` merging.

    Variants change only the inner module: override :meth:`unit` (one of ``n`` units in sequence) or
    :meth:`inner_module` (the whole inner module).
    """

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1, e: float = 0.5):
        super().__init__(c1, c2, e, lambda c: self.inner_module(c, n, shortcut, g))

    unit = staticmethod(bottleneck_unit)

    def inner_module(self, c: int, n: int, shortcut: bool, g: int) -> nn.Module:
        return repeated(n, lambda: self.unit(c, shortcut, g))

    def build_paths(self, c1: int, c2: int, hidden: int) -> None:
        self.cv1, self.cv2 = Conv(c1, hidden), Conv(c1, hidden)
        self.cv3 = Conv(2 * hidden, c2)

    def main_path(self, x: torch.Tensor) -> torch.Tensor:
        return self.m(self.cv1(x))

    def merge(self, y: torch.Tensor) -> torch.Tensor:
        return self.cv3(y)


class C3x(C3):
    """C3 with cross-convolution units (3x1 after 1x3)."""

    @staticmethod
    def unit(c: int, shortcut: bool, g: int) -> nn.Module:
        return CrossConv(c, c, 3, 1, g, 1.0, shortcut)


class C3TR(C3):
    """C3 whose inner module is a 4-head :class:`TransformerBlock` of ``n`` layers."""

    def inner_module(self, c: int, n: int, shortcut: bool, g: int) -> nn.Module:
        return TransformerBlock(c, c, 4, n)


class C3Ghost(C3):
    """C3 with :class:`GhostBottleneck` units."""

    @staticmethod
    def unit(c: int, shortcut: bool, g: int) -> nn.Module:
        return GhostBottleneck(c, c)


class C3SPP(C3):
    """C3 whose inner module is an :class:`SPP` with pool sizes ``k`` (so it takes ``k`` where C3 takes ``n``)."""

    def __init__(self, c1: int, c2: int, k: Sequence[int] = (5, 9, 13), shortcut: bool = True, g: int = 1,
                 e: float = 0.5):
        CSPBlock.__init__(self, c1, c2, e, lambda c: SPP(c, c, k))


# ---------------------------------------------------------------------------------------------------------------------
# Transformer


class TransformerLayer(nn.Module):
    """Multi-head self-attention and a linear feed-forward (two bias-free layers, no activation), each added to
    its input; no LayerNorm. Tokens come as (sequence, batch, c)."""

    def __init__(self, c: int, num_heads: int):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(c, c, bias=False) for _ in range(3))
        self.ma = nn.MultiheadAttention(embed_dim=c, num_heads=num_heads)
        self.fc1, self.fc2 = (nn.Linear(c, c, bias=False) for _ in range(2))

    def attention(self, tokens: torch.Tensor) -> torch.Tensor:
        query, key, value = (projection(tokens) for projection in (self.q, self.k, self.v))
        return self.ma(query, key, value, need_weights=False)[0]

    def feed_forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(tokens))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for sublayer in (self.attention, self.feed_forward):
            x = x + sublayer(x)
        return x


class TransformerBlock(nn.Module):
    """Transformer over the pixels of a feature map (Dosovitskiy et al., "An Image is Worth 16x16 Words", 2021).

    A Conv adapts the width when ``c1 != c2``; each pixel becomes a token, a learned linear position embedding is
    added, ``num_layers`` :class:`TransformerLayer` run, and the tokens fold back into the map.
    """

    def __init__(self, c1: int, c2: int, num_heads: int, num_layers: int):
        super().__init__()
        self.conv = Conv(c1, c2) if c1 != c2 else nn.Identity()
        self.linear = nn.Linear(c2, c2)
        self.tr = repeated(num_layers, lambda: TransformerLayer(c2, num_heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        height, width = x.shape[-2:]
        tokens = x.flatten(2).movedim(-1, 0)  # (h * w, batch, channels)
        tokens = self.tr(tokens + self.linear(tokens))
        return tokens.movedim(0, -1).unflatten(-1, (height, width))


# ---------------------------------------------------------------------------------------------------------------------
# Ghost blocks


class GhostConv(nn.Module):
    """Ghost convolution (Han et al., "GhostNet", CVPR 2020): a Conv makes half of ``c2``, a cheap 5x5 depth-wise
    Conv on that half makes the other half; both halves are concatenated."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, g: int = 1, act: bool | nn.Module = True):
        super().__init__()
        self.cv1 = Conv(c1, c2 // 2, k, s, g=g, act=act)
        intrinsic = self.cv1.conv.out_channels
        self.cv2 = DWConv(intrinsic, intrinsic, 5, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        intrinsic = self.cv1(x)
        ghosts = self.cv2(intrinsic)
        return torch.cat((intrinsic, ghosts), dim=1)


class GhostBottleneck(nn.Module):
    """GhostNet bottleneck: GhostConv to ``c2 // 2``, linear GhostConv to ``c2``, plus the input.

    With ``s == 2`` a linear depth-wise k x k Conv downsamples between the two GhostConvs, and the residual path
    becomes a linear depth-wise k x k Conv (stride 2) and a linear 1x1 Conv to ``c2``.
    """

    def __init__(self, c1: int, c2: int, k: int = 3, s: int = 1):
        super().__init__()
        resample = partial(DWConv, k=k, s=s, act=False) if s == 2 else None

        def resampled(c: int) -> nn.Module:
            return nn.Identity() if resample is None else resample(c, c)

        half = c2 // 2
        self.conv = nn.Sequential(GhostConv(c1, half), resampled(half), GhostConv(half, c2, act=False))
        self.shortcut = nn.Identity() if resample is None else nn.Sequential(resample(c1, c1), Conv(c1, c2, act=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.shortcut(x)
# ---------------------------------------------------------------------------------------------------------------------
# Spatial pyramid pooling


class SPP(nn.Module):
    """Spatial pyramid pooling (He et al., "SPPNet", 2015, in YOLOv3's stride-1 form), for any odd pool sizes.

    ``cv1`` (1x1) halves the channels; its output and its max-pools at sizes ``k`` (stride 1, size-preserving)
    are concatenated in that order, and ``cv2`` (1x1) maps them to ``c2``. The pools run as one chain
    (:func:`pool_chain`), each taken from the previous one.
    """

    def __init__(self, c1: int, c2: int, k: Sequence[int] = (5, 9, 13)):
        super().__init__()
        self.steps, self.position = pool_chain(tuple(k))
        self.cv1 = Conv(c1, c1 // 2)
        self.cv2 = Conv((1 + len(self.steps)) * self.cv1.conv.out_channels, c2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chain = [self.cv1(x)]
        for size in self.steps:
            chain.append(F.max_pool2d(chain[-1], size, 1, size // 2))
        return self.cv2(torch.cat([chain[0], *(chain[1 + p] for p in self.position)], 1))


class SPPF(SPP):
    """SPP as three chained pools of size ``k``: the pool sizes ``k``, ``2k - 1`` and ``3k - 2`` (k = 5 gives
    SPP's default 5, 9, 13, with the same output)."""

    def __init__(self, c1: int, c2: int, k: int = 5):
        super().__init__(c1, c2, [j * (k - 1) + 1 for j in (1, 2, 3)])


def pool_chain(sizes: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """How to compute stride-1 'same' max-pools of several odd ``sizes`` as one chain of pools.

    A max-pool of size ``a`` after one of size ``b`` is exactly a max-pool of size ``a + b - 1`` (the windows
    compose, and at the borders both clip to the map). So the pools are taken in increasing size, each from the
    previous one. Returns (the chain's pool sizes, for each requested size its position in the chain).
    """
    if any(s < 1 or s % 2 == 0 for s in sizes):
        raise ValueError(f"pool sizes must be odd and positive to keep the map size, got {tuple(sizes)}")
    ascending = sorted(range(len(sizes)), key=lambda i: sizes[i])
    steps, reach = [], 1
    for i in ascending:
        steps.append(sizes[i] - reach + 1)
        reach = sizes[i]
    position = [0] * len(sizes)
    for rank, i in enumerate(ascending):
        position[i] = rank
    return tuple(steps), tuple(position)


# ---------------------------------------------------------------------------------------------------------------------
# Tensor plumbing: concatenation and space / depth rearrangements


class Concat(nn.Module):
    """Concatenation of a list of tensors along ``dimension`` (a YAML row with several inputs)."""

    def __init__(self, dimension: int = 1):
        super().__init__()
        self.d = dimension

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(x, dim=self.d)


def _space_to_depth(x: torch.Tensor, gain: int, phase_order: tuple[int, int, int]) -> torch.Tensor:
    """Each ``gain`` x ``gain`` cell of pixels becomes channels, grouped by pixel phase.

    ``pixel_unshuffle`` orders the output channels as (channel, row phase, column phase); ``phase_order`` is the
    permutation of those three axes wanted instead, slowest first (0 channel, 1 row phase, 2 column phase).
    """
    y = F.pixel_unshuffle(x, gain)
    axes = y.unflatten(1, (x.shape[1], gain, gain))
    return axes.permute(0, *(1 + a for a in phase_order), 4, 5).flatten(1, 3)


class PixelRearrange(nn.Module):
    """Base of :class:`Contract` and :class:`Expand`: moves ``gain`` x ``gain`` pixel cells to or from channels."""

    def __init__(self, gain: int = 2):
        super().__init__()
        self.gain = gain


class Contract(PixelRearrange):
    """Space-to-depth by ``gain``: (b, c, h, w) -> (b, c * gain**2, h / gain, w / gain), channels grouped by
    pixel phase (row phase slowest)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _space_to_depth(x, self.gain, (1, 2, 0))


class Expand(PixelRearrange):
    """Depth-to-space by ``gain``, the inverse of :class:`Contract`: (b, c, h, w) -> (b, c / gain**2, h * gain,
    w * gain)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        phases = self.gain * self.gain
        by_channel = x.unflatten(1, (phases, x.shape[1] // phases)).transpose(1, 2).flatten(1, 2)
        return F.pixel_shuffle(by_channel, self.gain)


class Focus(nn.Module):
    """YOLOv5's early stem: the four pixel phases of each 2 x 2 cell stacked as channels (column phase slowest),
    then a Conv."""

    phase_order = (2, 1, 0)  # for _space_to_depth: column phase, row phase, channel

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, p=None, g: int = 1, act: bool | nn.Module = True):
        super().__init__()
        stacked = 4 * c1
        self.conv = Conv(stacked, c2, k, s, p=p, g=g, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stacked = _space_to_depth(x, 2, self.phase_order)
        return self.conv(stacked)
