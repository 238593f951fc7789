"""The fast large-kernel depthwise convolution equals nn.Conv2d (outputs and gradients) and dispatches sensibly."""

from __future__ import annotations

import io
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from models.modules import large_kernel
from models.modules.large_kernel import LargeKernelDepthwiseConv2d, conv_method, depthwise_conv2d, fast_fft_length
from tests.helpers import rel_error

TOL = 1e-4


def reference_and_ours(batch: int, channels: int, size: tuple, k: int, bias: bool, method: str, seed: int = 0):
    """Outputs and (input, weight, bias) gradients of nn.Conv2d and of depthwise_conv2d, same data."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, *size, generator=g)
    w = torch.randn(channels, 1, k, k, generator=g) / k
    b = torch.randn(channels, generator=g) if bias else None
    grad_out = torch.randn(batch, channels, *size, generator=g)

    def reference(*args):
        return F.conv2d(*args, padding=k // 2, groups=channels)

    results = []
    for fn in (reference, lambda *args: depthwise_conv2d(*args, method=method)):
        leaves = [t.clone().requires_grad_() for t in (x, w) + ((b,) if bias else ())]
        y = fn(*leaves) if bias else fn(*leaves, None)
        results.append((y, *torch.autograd.grad(y, leaves, grad_out)))
    return results


@pytest.mark.parametrize("k", [7, 9, 13, 15, 21, 27, 31])
@pytest.mark.parametrize(("batch", "channels", "size", "bias"), [(2, 3, (20, 28), True), (3, 4, (16, 16), False),
                                                              (2, 2, (5, 9), True), (1, 6, (33, 17), False)])
def test_fft_path_equals_conv2d(k, batch, channels, size, bias):
    reference, ours = reference_and_ours(batch, channels, size, k, bias, method="fft")
    for name, a, b in zip(("output", "grad input", "grad weight", "grad bias"), ours, reference):
        assert a.shape == b.shape
        assert rel_error(a, b) < TOL, name


@settings(max_examples=25, deadline=None)
@given(k=st.sampled_from([7, 11, 17, 25, 31]), batch=st.integers(1, 3), channels=st.integers(1, 5),
       h=st.integers(1, 40), w=st.integers(1, 40), bias=st.booleans(), method=st.sampled_from(["fft", "auto"]))
def test_any_shape_equals_conv2d(k, batch, channels, h, w, bias, method):
    reference, ours = reference_and_ours(batch, channels, (h, w), k, bias, method, seed=h * 41 + w)
    for a, b in zip(ours, reference):
        assert rel_error(a, b) < TOL


def test_float64_is_exact_to_double_precision():
    x, w = torch.randn(2, 3, 24, 30, dtype=torch.float64), torch.randn(3, 1, 31, 31, dtype=torch.float64)
    assert rel_error(depthwise_conv2d(x, w, method="fft"), F.conv2d(x, w, padding=15, groups=3)) < 1e-12


def test_kernel_taps_beyond_reach_get_zero_gradient():
    """A 31x31 kernel on a 4x6 map: only the central 7x11 taps ever touch the input."""
    x = torch.randn(1, 2, 4, 6)
    w = torch.randn(2, 1, 31, 31, requires_grad=True)
    depthwise_conv2d(x, w, method="fft").square().sum().backward()
    inside = torch.zeros_like(w, dtype=torch.bool)
    inside[..., 12:19, 10:21] = True
    assert w.grad[~inside].abs().max() == 0
    assert w.grad[inside].abs().min() > 0


def test_module_is_a_drop_in_conv2d():
    reference = nn.Conv2d(8, 8, 31, padding=15, groups=8)
    ours = LargeKernelDepthwiseConv2d.depthwise(8, 31, bias=True)
    assert list(ours.state_dict()) == list(reference.state_dict())
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(2, 8, 24, 24)
    with torch.no_grad():
        assert rel_error(ours(x), reference(x)) < TOL


@pytest.mark.parametrize("geometry", [dict(stride=2, padding=15, groups=4), dict(padding=15, groups=1),
                                      dict(padding=3, groups=4), dict(padding=30, dilation=2, groups=4)])
def test_other_geometries_run_plain_conv2d(geometry):
    reference = nn.Conv2d(4, 4, 31, **geometry)
    ours = LargeKernelDepthwiseConv2d(4, 4, 31, **geometry, method="fft")
    ours.load_state_dict(reference.state_dict())
    assert not ours.is_same_depthwise
    x = torch.randn(1, 4, 40, 40)
    assert torch.equal(ours(x), reference(x))


@pytest.fixture
def fft_calls(monkeypatch):
    """Counts calls of the FFT autograd Function."""
    calls = []
    original = large_kernel._FFTDepthwiseConv2d.apply

    def counting_apply(*args):
        calls.append(args[0].shape)
        return original(*args)

    monkeypatch.setattr(large_kernel._FFTDepthwiseConv2d, "apply", counting_apply)
    return calls


def test_auto_dispatch_follows_measured_thresholds(fft_calls):
    x = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        depthwise_conv2d(x, torch.randn(4, 1, 13, 13))  # oneDNN's direct kernel is fast here
        assert not fft_calls
        depthwise_conv2d(x, torch.randn(4, 1, 31, 31))
        assert len(fft_calls) == 1
    depthwise_conv2d(x, torch.randn(4, 1, 13, 13, requires_grad=True))  # training: the backward decides
    assert len(fft_calls) == 2
    depthwise_conv2d(x, torch.randn(4, 1, 31, 31), method="direct")
    assert len(fft_calls) == 2


def test_conv_method_switches_and_restores(fft_calls):
    model = nn.Sequential(LargeKernelDepthwiseConv2d.depthwise(4, 31), LargeKernelDepthwiseConv2d.depthwise(4, 27))
    x = torch.randn(1, 4, 12, 12)
    with torch.no_grad(), conv_method(model, "direct"):
        model(x)
        assert {m.method for m in model} == {"direct"}
    assert not fft_calls and {m.method for m in model} == {"auto"}
    with torch.no_grad():
        model(x)
    assert len(fft_calls) == 2
    with pytest.raises(ValueError):
        LargeKernelDepthwiseConv2d.depthwise(4, 31, method="winograd")


def test_rejects_what_it_cannot_compute():
    with pytest.raises(ValueError):
        depthwise_conv2d(torch.randn(1, 4, 8, 8), torch.randn(4, 1, 8, 8))  # even kernel
    with pytest.raises(ValueError):
        depthwise_conv2d(torch.randn(1, 4, 8, 8), torch.randn(4, 2, 7, 7))  # not depthwise


def test_traced_and_onnx_graphs_hold_a_standard_conv():
    import onnx
    import onnxruntime as ort
    model = LargeKernelDepthwiseConv2d.depthwise(4, 31, bias=True).eval()
    x = torch.randn(1, 4, 20, 20)
    traced = torch.jit.trace(model, x)
    assert "aten::_convolution" in str(traced.graph) and "fft" not in str(traced.graph)
    buffer = io.BytesIO()
    torch.onnx.export(model, (x,), buffer, dynamo=False, input_names=["x"])
    graph = onnx.load_from_string(buffer.getvalue()).graph
    assert [n.op_type for n in graph.node] == ["Conv"]
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        assert rel_error(torch.from_numpy(session.run(None, {"x": x.numpy()})[0]), model(x)) < TOL


def test_flop_counter_sees_the_full_conv():
    x, w = torch.randn(1, 4, 8, 8), torch.randn(4, 1, 31, 31)
    counts = []
    for method in ("direct", "auto"):
        counter = FlopCounterMode(display=False)
        with counter:
            depthwise_conv2d(x, w, method=method)
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] == 2 * 4 * 8 * 8 * 31 * 31


def test_autocast_and_low_precision_inputs():
    x, w = torch.randn(2, 4, 24, 24), torch.randn(4, 1, 31, 31, requires_grad=True)
    reference = F.conv2d(x, w, padding=15, groups=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = depthwise_conv2d(x, w, method="fft")
    assert y.dtype == torch.float32 and rel_error(y, reference) < TOL
    y.sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()
    y16 = depthwise_conv2d(x.bfloat16(), w.detach().bfloat16(), method="fft")  # no bf16 FFT on CPU: conv2d
    assert y16.dtype == torch.bfloat16 and rel_error(y16.float(), reference) < 2e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_uses_cudnn_and_matches():
    x, w = torch.randn(2, 4, 24, 24, device="cuda"), torch.randn(4, 1, 31, 31, device="cuda", requires_grad=True)
    y = depthwise_conv2d(x, w)
    assert rel_error(y, F.conv2d(x, w, padding=15, groups=4)) < TOL
    with torch.autocast("cuda", dtype=torch.float16):
        assert depthwise_conv2d(x, w).dtype == torch.float16


def test_fast_fft_length():
    for n in range(1, 300):
        m = fast_fft_length(n)
        assert m >= n and m % 2 == 0 and m < 1.25 * n + 2
        rest = m
        for p in (2, 3, 5):
            while rest % p == 0:
                rest //= p
        assert rest == 1


def test_fft_is_much_faster_than_onednn_for_31x31():
    """Single-thread CPU time (robust to a shared machine); the measured ratio is about 20x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x, w = torch.randn(1, 32, 64, 64), torch.randn(32, 1, 31, 31)
        seconds = {}
        with torch.no_grad():
            for method in ("direct", "fft", "direct", "fft"):
                start = time.thread_time()
                depthwise_conv2d(x, w, method=method)
                seconds[method] = min(seconds.get(method, float("inf")), time.thread_time() - start)
    finally:
        torch.set_num_threads(threads)
    assert seconds["fft"] * 4 < seconds["direct"]
