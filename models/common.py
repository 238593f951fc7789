"""Standard YOLOv5 building blocks and the shared folding primitives.

Blocks keep upstream YOLOv5's constructor signatures and attribute names (``cv1``, ``cv2``, ``m``,
...), so state_dict keys match upstream checkpoints. Every module that can fold for inference
implements :meth:`reparameterize` (timm's name); :meth:`models.yolo.BaseModel.fuse` calls it on
every module of a network.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def autopad(k: int | tuple, p: int | tuple | None = None, d: int = 1) -> int | list:
    """Padding that keeps the spatial size ('same') for kernel ``k`` and dilation ``d``."""
    if d > 1:
        k = d * (k - 1) + 1 if isinstance(k, int) else [d * (x - 1) + 1 for x in k]
    if p is None:
        p = k // 2 if isinstance(k, int) else [x // 2 for x in k]
    return p


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


class ConvBN(nn.Module):
    """``Conv2d(bias=False)`` followed by ``BatchNorm2d``; folds into one biased ``Conv2d``."""

    def __init__(self, c1: int, c2: int, k: int | tuple = 1, s: int = 1, p=None, g: int = 1, d: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p, d), groups=g, dilation=d, bias=False)
        self.bn = BatchNorm2d(c2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) if hasattr(self, "bn") else self.conv(x)

    def folded_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The kernel and bias this layer is equivalent to (in eval mode)."""
        if not hasattr(self, "bn"):
            return self.conv.weight, self.conv.bias
        return fold_bn(self.conv.weight, self.bn, self.conv.bias)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold the BatchNorm into the convolution (idempotent)."""
        if hasattr(self, "bn"):
            self.conv = make_conv(self.conv, *self.folded_kernel_bias())
            del self.bn


class Conv(ConvBN):
    """YOLOv5 Conv: Conv2d + BatchNorm2d + activation (SiLU by default, ``act=False`` for none)."""

    def __init__(self, c1: int, c2: int, k: int | tuple = 1, s: int = 1, p=None, g: int = 1, d: int = 1, act=True):
        super().__init__(c1, c2, k, s, p, g, d)
        self.act = nn.SiLU() if act is True else act if isinstance(act, nn.Module) else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


class DWConv(Conv):
    """Depth-wise convolution (groups = gcd of the channel counts)."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, d: int = 1, act=True):
        super().__init__(c1, c2, k, s, g=math.gcd(c1, c2), d=d, act=act)


class Bottleneck(nn.Module):
    """Standard bottleneck: 1x1 then 3x3 Conv, with a residual when shapes allow."""

    def __init__(self, c1: int, c2: int, shortcut: bool = True, g: int = 1, e: float = 0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_, c2, 3, 1, g=g)
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class BottleneckCSP(nn.Module):
    """CSP bottleneck of Cross Stage Partial Networks (YOLOv4/v5 v1-v5 style)."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1, e: float = 0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = nn.Conv2d(c1, c_, 1, 1, bias=False)
        self.cv3 = nn.Conv2d(c_, c_, 1, 1, bias=False)
        self.cv4 = Conv(2 * c_, c2, 1, 1)
        self.bn = BatchNorm2d(2 * c_)
        self.act = nn.SiLU()
        self.m = nn.Sequential(*(Bottleneck(c_, c_, shortcut, g, e=1.0) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y1 = self.cv3(self.m(self.cv1(x)))
        y2 = self.cv2(x)
        return self.cv4(self.act(self.bn(torch.cat((y1, y2), 1))))


class C3(nn.Module):
    """CSP bottleneck with three convolutions (the YOLOv5 v6 workhorse)."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1, e: float = 0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c1, c_, 1, 1)
        self.cv3 = Conv(2 * c_, c2, 1)
        self.m = nn.Sequential(*(Bottleneck(c_, c_, shortcut, g, e=1.0) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class CrossConv(nn.Module):
    """Cross convolution: (1 x k) then (k x 1)."""

    def __init__(self, c1: int, c2: int, k: int = 3, s: int = 1, g: int = 1, e: float = 1.0, shortcut: bool = False):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, (1, k), (1, s))
        self.cv2 = Conv(c_, c2, (k, 1), (s, 1), g=g)
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3x(C3):
    """C3 whose bottlenecks are cross convolutions."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1, e: float = 0.5):
        super().__init__(c1, c2, n, shortcut, g, e)
        c_ = int(c2 * e)
        self.m = nn.Sequential(*(CrossConv(c_, c_, 3, 1, g, 1.0, shortcut) for _ in range(n)))


class TransformerLayer(nn.Module):
    """Transformer layer without LayerNorm (as in YOLOv5's C3TR)."""

    def __init__(self, c: int, num_heads: int):
        super().__init__()
        self.q = nn.Linear(c, c, bias=False)
        self.k = nn.Linear(c, c, bias=False)
        self.v = nn.Linear(c, c, bias=False)
        self.ma = nn.MultiheadAttention(embed_dim=c, num_heads=num_heads)
        self.fc1 = nn.Linear(c, c, bias=False)
        self.fc2 = nn.Linear(c, c, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ma(self.q(x), self.k(x), self.v(x))[0] + x
        return self.fc2(self.fc1(x)) + x


class TransformerBlock(nn.Module):
    """Vision transformer block over the flattened feature map with a learned position embedding."""

    def __init__(self, c1: int, c2: int, num_heads: int, num_layers: int):
        super().__init__()
        self.conv = Conv(c1, c2) if c1 != c2 else None
        self.linear = nn.Linear(c2, c2)
        self.tr = nn.Sequential(*(TransformerLayer(c2, num_heads) for _ in range(num_layers)))
        self.c2 = c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is not None:
            x = self.conv(x)
        b, _, h, w = x.shape
        p = x.flatten(2).permute(2, 0, 1)
        return self.tr(p + self.linear(p)).permute(1, 2, 0).reshape(b, self.c2, h, w)


class C3TR(C3):
    """C3 whose bottlenecks are a TransformerBlock."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1, e: float = 0.5):
        super().__init__(c1, c2, n, shortcut, g, e)
        c_ = int(c2 * e)
        self.m = TransformerBlock(c_, c_, 4, n)


class SPP(nn.Module):
    """Spatial pyramid pooling (YOLOv3-SPP): parallel max-pools of several sizes."""

    def __init__(self, c1: int, c2: int, k: tuple = (5, 9, 13)):
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_ * (len(k) + 1), c2, 1, 1)
        self.m = nn.ModuleList(nn.MaxPool2d(kernel_size=x, stride=1, padding=x // 2) for x in k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        return self.cv2(torch.cat([x] + [m(x) for m in self.m], 1))


class C3SPP(C3):
    """C3 whose bottleneck is an SPP."""

    def __init__(self, c1: int, c2: int, k: tuple = (5, 9, 13), shortcut: bool = True, g: int = 1, e: float = 0.5):
        super().__init__(c1, c2, 1, shortcut, g, e)
        c_ = int(c2 * e)
        self.m = SPP(c_, c_, k)


class SPPF(nn.Module):
    """Fast SPP: three chained max-pools of size k, equivalent to SPP(k=(5, 9, 13)) for k=5."""

    def __init__(self, c1: int, c2: int, k: int = 5):
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_ * 4, c2, 1, 1)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))


class Focus(nn.Module):
    """Space-to-depth (2x2 pixels to channels) followed by a Conv (YOLOv5 v1-v5 stem)."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, p=None, g: int = 1, act=True):
        super().__init__()
        self.conv = Conv(c1 * 4, c2, k, s, p, g, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat((x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]), 1))


class GhostConv(nn.Module):
    """Ghost convolution (GhostNet): half the channels from a conv, half from a cheap 5x5 depthwise."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, g: int = 1, act=True):
        super().__init__()
        c_ = c2 // 2
        self.cv1 = Conv(c1, c_, k, s, None, g, act=act)
        self.cv2 = Conv(c_, c_, 5, 1, None, c_, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv1(x)
        return torch.cat((y, self.cv2(y)), 1)


class GhostBottleneck(nn.Module):
    """Ghost bottleneck (GhostNet); a strided variant downsamples both paths."""

    def __init__(self, c1: int, c2: int, k: int = 3, s: int = 1):
        super().__init__()
        c_ = c2 // 2
        self.conv = nn.Sequential(
            GhostConv(c1, c_, 1, 1),
            DWConv(c_, c_, k, s, act=False) if s == 2 else nn.Identity(),
            GhostConv(c_, c2, 1, 1, act=False),
        )
        self.shortcut = (
            nn.Sequential(DWConv(c1, c1, k, s, act=False), Conv(c1, c2, 1, 1, act=False)) if s == 2 else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.shortcut(x)


class C3Ghost(C3):
    """C3 whose bottlenecks are GhostBottlenecks."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1, e: float = 0.5):
        super().__init__(c1, c2, n, shortcut, g, e)
        c_ = int(c2 * e)
        self.m = nn.Sequential(*(GhostBottleneck(c_, c_) for _ in range(n)))


class Contract(nn.Module):
    """Space-to-depth by ``gain``: (b, c, h, w) -> (b, c * gain**2, h / gain, w / gain)."""

    def __init__(self, gain: int = 2):
        super().__init__()
        self.gain = gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        s = self.gain
        x = x.view(b, c, h // s, s, w // s, s).permute(0, 3, 5, 1, 2, 4).contiguous()
        return x.view(b, c * s * s, h // s, w // s)


class Expand(nn.Module):
    """Depth-to-space by ``gain``: (b, c, h, w) -> (b, c / gain**2, h * gain, w * gain)."""

    def __init__(self, gain: int = 2):
        super().__init__()
        self.gain = gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        s = self.gain
        x = x.view(b, s, s, c // s**2, h, w).permute(0, 3, 4, 1, 5, 2).contiguous()
        return x.view(b, c // s**2, h * s, w * s)


class Concat(nn.Module):
    """Concatenate a list of tensors along ``dimension``."""

    def __init__(self, dimension: int = 1):
        super().__init__()
        self.d = dimension

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(x, self.d)
