"""Benchmark: nn.Conv2d against models.modules.large_kernel for depthwise 'same' convolutions on the CPU.

Usage:
    python -m benchmarks large-kernel                 # layer table and whole-model table
    python -m benchmarks large-kernel --runs 3 --no-model
    python -m benchmarks large-kernel --threads 1 --clock cpu   # CPU time: steadier on a loaded machine

Prints Markdown tables of median milliseconds (several interleaved runs, 2 threads by default).
On a shared machine wall-clock figures are noisy; the speed-up ratios, measured in the same run, less so.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn as nn

from benchmarks.common import interleaved_medians, markdown_row, markdown_rule
from models.modules.large_kernel import LargeKernelDepthwiseConv2d, conv_method
from models.yolo import DetectionModel

# (channels, height/width, kernel): RepLKNet-31B's first stage at 640 px, then a grid of kernel and map sizes.
LAYER_CASES = [(128, 160, 31)] + [(128, size, k) for size in (40, 80) for k in (7, 13, 27, 31)]
MODEL_YAML = "yolov5_RepLKNet.yaml"
LAYER_HEADER = ["depthwise conv (stride 1, 'same')", "nn.Conv2d fwd", "ours fwd", "speed-up", "nn.Conv2d fwd+bwd",
                "ours fwd+bwd", "speed-up", "fwd rel. err"]
MODEL_HEADER = ["model", "fast path off (nn.Conv2d)", "fast path on", "speed-up"]


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def median_ms(fns: dict[str, Callable[[], object]], runs: int, clock: Callable[[], float]) -> dict[str, float]:
    """Median milliseconds of each function on ``clock`` after one warm-up call, runs interleaved."""
    return {name: 1000 * t for name, t in interleaved_medians(fns, runs, warmup=1, clock=clock).items()}


def forward_backward(conv: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """One training step of ``conv`` alone: forward, then backward of a fixed random output gradient."""
    x = x.detach().requires_grad_()
    grad = torch.randn_like(x)

    def step() -> None:
        conv.zero_grad(set_to_none=True)
        x.grad = None
        conv(x).backward(grad)

    return step


def layer_row(channels: int, size: int, k: int, runs: int, clock: Callable[[], float]) -> str:
    reference = nn.Conv2d(channels, channels, k, padding=k // 2, groups=channels)
    ours = LargeKernelDepthwiseConv2d.depthwise(channels, k, bias=True)
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(1, channels, size, size)
    with torch.no_grad():
        error = ((ours(x) - reference(x)).abs().max() / reference(x).abs().max()).item()
        fwd = median_ms({"ref": lambda: reference(x), "ours": lambda: ours(x)}, runs, clock)
    step = median_ms({"ref": forward_backward(reference, x), "ours": forward_backward(ours, x)}, runs, clock)
    return (
        f"| 1x{channels}x{size}x{size}, {k}x{k} | {fwd['ref']:.1f} | {fwd['ours']:.1f} "
        f"| {fwd['ref'] / fwd['ours']:.1f}x | {step['ref']:.1f} | {step['ours']:.1f} "
        f"| {step['ref'] / step['ours']:.1f}x | {error:.1e} |"
    )


def model_rows(runs: int, clock: Callable[[], float]) -> list[str]:
    model = DetectionModel(MODEL_YAML).eval()
    rows = []
    for size in (320, 640):
        x = torch.zeros(1, 3, size, size)
        with torch.no_grad():
            fast = median_ms({"ours": lambda: model(x)}, runs, clock)["ours"]
            with conv_method(model, "direct"):
                slow = median_ms({"ref": lambda: model(x)}, runs, clock)["ref"]
        rows.append(f"| {MODEL_YAML} @{size}, batch 1, eval | {slow:.0f} | {fast:.0f} | {slow / fast:.1f}x |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks large-kernel", description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per measurement (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="wall-clock or process CPU time")
    parser.add_argument("--no-model", action="store_true", help="skip the whole-model table")
    opt = parser.parse_args(argv)
    torch.set_num_threads(opt.threads)
    torch.manual_seed(0)

    clock = CLOCKS[opt.clock]
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, {opt.clock} time, median of {opt.runs} runs (ms)\n")
    print(markdown_row(LAYER_HEADER), markdown_rule("l" + "r" * (len(LAYER_HEADER) - 1)), sep="\n")
    for case in LAYER_CASES:
        print(layer_row(*case, opt.runs, clock), flush=True)
    if not opt.no_model:
        print("", markdown_row(MODEL_HEADER), markdown_rule("lrrr"), sep="\n")
        for row in model_rows(opt.runs, clock):
            print(row, flush=True)
    return 0
