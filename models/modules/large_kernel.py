"""Fast 'same'-padded depthwise convolution with large kernels on the CPU.

PyTorch's CPU depthwise convolution (oneDNN) gets slow for kernels much larger than 13x13, its
backward pass more so, which makes RepLKNet's 31x31 kernels the bottleneck of the whole network
(figures in docs/BENCHMARKS.md). For stride 1, dilation 1 and 'same' zero padding the convolution is a
per-channel cross-correlation, so it can be computed exactly through the FFT: the cost no longer
grows with the kernel area. A custom autograd Function keeps the spectra of the input and kernel
for the backward pass, which then needs one forward and two inverse FFTs (input gradient: the
output gradient correlated with the flipped kernel; weight gradient: the input correlated with the
output gradient, summed over the batch in the frequency domain).

:func:`depthwise_conv2d` picks the FFT or ``F.conv2d`` per call from size thresholds
taken from ``python -m benchmarks large-kernel`` on a 2-core AVX-512 CPU. ``F.conv2d`` is always used on CUDA (cuDNN),
for dtypes other than float32/float64 and while tracing, scripting, compiling, exporting or FLOP
counting, so exported graphs and counts show standard convolutions. :class:`LargeKernelDepthwiseConv2d` is an
``nn.Conv2d`` (same parameters and state_dict keys) whose forward uses it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

METHODS = ("auto", "fft", "direct")

# oneDNN's direct depthwise kernel is fast up to 13x13; beyond that the FFT wins by 10-30x.
FFT_MIN_KERNEL_INFERENCE = 15
# With gradients (three more transforms for the backward) the FFT wins from 9x9 on, 2-10x at 13x13.
FFT_MIN_KERNEL_TRAINING = 9


def fast_fft_length(n: int) -> int:
    """Smallest even integer >= ``n`` whose only prime factors are 2, 3 and 5 (a fast real-FFT length)."""
    m = (n + 1) // 2
    while True:
        rest = m
        for p in (2, 3, 5):
            while rest % p == 0:
                rest //= p
        if rest == 1:
            return 2 * m
        m += 1


def _window(
    spectrum: torch.Tensor, size: tuple[int, int], top: int, left: int, height: int, width: int
) -> torch.Tensor:
    """A height x width window at (top, left) of the inverse 2-D real FFT (rows cropped before the last pass)."""
    rows = torch.fft.ifft(spectrum, dim=-2)[..., top : top + height, :]
    return torch.fft.irfft(rows, n=size[1], dim=-1)[..., left : left + width]


class _FFTDepthwiseConv2d(torch.autograd.Function):
    """y = depthwise 'same' cross-correlation of x (B, C, H, W) with weight (C, kh, kw), through the FFT."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.float32)
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        (h, w), (kh, kw) = x.shape[-2:], weight.shape[-2:]
        # Cross-correlation with w is convolution with w flipped. Both zero-padded (bottom/right) to at least
        # (h + kh // 2, w + kw // 2), the circular convolution c equals the linear one where the output
        # window y = c[kh // 2 : kh // 2 + h, kw // 2 : kw // 2 + w] reads it (nothing wraps into it).
        size = (fast_fft_length(h + kh // 2), fast_fft_length(w + kw // 2))
        x_f, kernel_f = torch.fft.rfft2(x, s=size), torch.fft.rfft2(weight.flip(-2, -1), s=size)
        ctx.save_for_backward(x_f, kernel_f)
        ctx.size, ctx.shape = size, (h, w, kh, kw)
        return _window(x_f * kernel_f, size, kh // 2, kw // 2, h, w)

    @staticmethod
    @once_differentiable
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x_f, kernel_f = ctx.saved_tensors
        (h, w, kh, kw), size = ctx.shape, ctx.size
        # The gradient of c is grad_out placed at the output window; with it, both gradients are top-left
        # windows of correlations (spectra times a conjugate; conj_physical, as a lazy conj() makes mul 5x slower).
        grad_c = F.pad(grad_out, (kw // 2, size[1] - w - kw // 2, kh // 2, size[0] - h - kh // 2))
        g_f = torch.fft.rfft2(grad_c)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = _window(g_f * torch.conj_physical(kernel_f), size, 0, 0, h, w)
        if ctx.needs_input_grad[1]:
            grad_w = _window((g_f * torch.conj_physical(x_f)).sum(0), size, 0, 0, kh, kw).flip(-2, -1)
        return grad_x, grad_w


def _exporting() -> bool:
    """True while a graph is traced, scripted, compiled, exported or watched by a dispatch mode such as
    FlopCounterMode: those must see the standard convolution."""
    return (
        is_in_torch_dispatch_mode()
        or torch.jit.is_tracing()
        or torch.jit.is_scripting()
        or torch.onnx.is_in_onnx_export()
        or torch.compiler.is_compiling()
    )


def _fft_pays_off(kernel_size: int, needs_grad: bool) -> bool:
    """The measured dispatch rule between the FFT path and oneDNN's direct convolution."""
    return kernel_size >= (FFT_MIN_KERNEL_TRAINING if needs_grad else FFT_MIN_KERNEL_INFERENCE)


def _crop_to_reach(weight: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Drop kernel taps that can only ever see padding (a kernel wider than 2 * size - 1)."""
    kh, kw = weight.shape[-2:]
    dh, dw = max(0, (kh - (2 * height - 1)) // 2), max(0, (kw - (2 * width - 1)) // 2)
    return weight[..., dh : kh - dh, dw : kw - dw]


def depthwise_conv2d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, method: str = "auto"
) -> torch.Tensor:
    """Equal to ``F.conv2d(x, weight, bias, stride=1, padding=k // 2, groups=C)`` for odd kernels.

    ``weight`` is (C, 1, kh, kw). ``method``: ``"auto"`` (measured choice), ``"fft"`` (FFT on the CPU
    wherever the dtype allows) or ``"direct"`` (plain ``F.conv2d``, the reference).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    kh, kw = weight.shape[-2:]
    if kh % 2 == 0 or kw % 2 == 0 or weight.shape[1] != 1 or weight.shape[0] != x.shape[1]:
        expected = f"odd depthwise kernels (C, 1, kh, kw) for C = {x.shape[1]}"
        raise ValueError(f"expected {expected}, got {tuple(weight.shape)}")
    usable = x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and x.dim() == 4 and not _exporting()
    if method == "direct" or not usable:
        return F.conv2d(x, weight, bias, padding=(kh // 2, kw // 2), groups=x.shape[1])
    weight = _crop_to_reach(weight, *x.shape[-2:])
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if method == "fft" or _fft_pays_off(max(weight.shape[-2:]), needs_grad):
        y = _FFTDepthwiseConv2d.apply(x, weight.flatten(0, 1))
        return y if bias is None else y + bias.view(1, -1, 1, 1)
    return F.conv2d(x, weight, bias, padding=(weight.shape[-2] // 2, weight.shape[-1] // 2), groups=x.shape[1])


class LargeKernelDepthwiseConv2d(nn.Conv2d):
    """Drop-in ``nn.Conv2d`` whose 'same'-padded stride-1 depthwise case uses :func:`depthwise_conv2d`.

    Any other geometry (strides, dilation, groups != channels, even kernels, other padding) runs
    ``nn.Conv2d`` unchanged. ``method`` is a plain attribute; see :func:`conv_method`.
    """

    def __init__(self, *args, method: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.method = method

    @classmethod
    def depthwise(
        cls, channels: int, kernel_size: int, bias: bool = False, method: str = "auto"
    ) -> LargeKernelDepthwiseConv2d:
        """A 'same'-padded stride-1 depthwise conv with ``channels`` channels."""
        return cls(channels, channels, kernel_size, 1, kernel_size // 2, groups=channels, bias=bias, method=method)

    @property
    def is_same_depthwise(self) -> bool:
        """Whether this conv's geometry is the one :func:`depthwise_conv2d` accelerates."""
        kh, kw = self.kernel_size
        return (
            self.groups == self.in_channels == self.out_channels
            and self.stride == (1, 1)
            and self.dilation == (1, 1)
            and self.padding_mode == "zeros"
            and kh % 2 == 1
            and kw % 2 == 1
            and self.padding == (kh // 2, kw // 2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_same_depthwise:
            return super().forward(x)
        return depthwise_conv2d(x, self.weight, self.bias, self.method)


@contextmanager
def conv_method(model: nn.Module, method: str) -> Iterator[nn.Module]:
    """Temporarily set ``method`` on every :class:`LargeKernelDepthwiseConv2d` of ``model``.

    ``with conv_method(model, "direct"): ...`` forces plain ``nn.Conv2d`` (the fast path off).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    convs = [m for m in model.modules() if isinstance(m, LargeKernelDepthwiseConv2d)]
    previous = [m.method for m in convs]
    for m in convs:
        m.method = method
    try:
        yield model
    finally:
        for m, old in zip(convs, previous):
            m.method = old
