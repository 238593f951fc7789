"""The CUDA paths in one command: short AMP trainings, val.py and detect.py in float16, ONNX Runtime's CUDA provider,
a TensorRT export, and the large-kernel depthwise convolution on cuDNN.

Steps, each in its own subprocess or guarded call (a failure or a missing package is a row of the report, never the
end of the run):
    train      train.py on --device 0 (automatic mixed precision is on for CUDA) per --models YAML, --epochs epochs
    val-half   val.py --half with the first model's best.pt          detect-half  detect.py --half, same weights
    ort-cuda   export.py --include onnx, then batch-1 latency with CUDAExecutionProvider (skipped when absent)
    tensorrt   export.py --include engine when tensorrt imports (skipped when not; "not available" with
               export.py's one-line error when it refuses)
    large-kernel  cuDNN's depthwise nn.Conv2d (float32 and float16) against the FFT formulation of
               models.modules.large_kernel on the GPU, per layer of benchmarks/large_kernel.py's cases

Usage (about five minutes on one GPU with the defaults):
    python -m benchmarks gpu
    python -m benchmarks gpu --models yolov5s.yaml --epochs 1 --img 256 --no-large-kernel

Writes <project>/report.md (default runs/benchmarks/gpu/) with every figure and what was skipped and why. Without
a CUDA device it stops at once with a one-line error (exit status 2). Exits 1 when a step failed, else 0.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from benchmarks.common import OUTPUT_FOLDER, header_lines, markdown_table, run_logged, write_text
from utils.general import LOGGER, UserInputError, first_line

DEFAULT_MODELS = ["yolov5s.yaml", "yolov5s_RepVGG.yaml", "yolov5n_RepGhost.yaml", "yolov5s_GFPN.yaml",
                  "yolov5_RepLKNet-tiny.yaml", "yolov5_RevCol.yaml"]
NO_CUDA = ("no CUDA device: torch.cuda.is_available() is False; python -m benchmarks gpu runs on a machine with an "
           "NVIDIA GPU")
SPEED = re.compile(r"[\d.]+ ?ms pre-?process(?:ing)?, [\d.]+ ?ms inference, [\d.]+ ?ms NMS")
STEP_HEADER = ["step", "status", "figures", "detail"]


def step(name: str, status: str, figures: str = "", detail: str = "") -> dict:
    """One report row; status is ok, failed, skipped or not available."""
    return {"step": name, "status": status, "figures": figures, "detail": detail}


def error_line(text: str, code: int) -> str:
    """The last line of a command's output that reads like an error, else its exit code."""
    lines = [line.strip() for line in text.splitlines() if "Error" in line or "ERROR" in line]
    return lines[-1] if lines else f"exit code {code}"


def guarded(name: str, fn: Callable[[], dict]) -> dict:
    """``fn()``'s row, or a failed row naming the exception: no step ends the run."""
    try:
        return fn()
    except Exception as e:
        return step(name, "failed", detail=f"{type(e).__name__}: {first_line(e)}")


# ------------------------------------------------------------------------------------------------- subprocesses


def command_step(name: str, command: list[str], log: Path, done: str | None = None) -> tuple[dict, str]:
    """Run ``command`` logged; a row with its wall time (ok when it exits 0 and prints ``done``) and the output."""
    LOGGER.info(f"{name}: {' '.join(command[1:])}")
    code, seconds, peak_mib, text = run_logged(command, log)
    ok = code == 0 and (done is None or done in text)
    figures = f"{seconds:.1f} s wall, peak RSS {peak_mib / 1024:.2f} GiB"
    return step(name, "ok" if ok else "failed", figures, "" if ok else error_line(text, code)), text


def last_line_with(text: str, start: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith(start)]
    return re.sub(r"\s+", " ", lines[-1]) if lines else ""


def train_step(cfg: str, opt: argparse.Namespace) -> tuple[dict, Path]:
    """train.py on the GPU (AMP); the row with the final validation line, and the run's best.pt."""
    stem = Path(cfg).stem
    command = [sys.executable, "train.py", "--cfg", cfg, "--data", str(opt.data), "--img", str(opt.img), "--epochs",
               str(opt.epochs), "--batch-size", str(opt.batch_size), "--device", "0", "--workers", str(opt.workers),
               "--weights", "", "--noplots", "--project", str(opt.project / "train"), "--name", stem, "--exist-ok"]
    row, text = command_step(f"train {stem} (AMP)", command, opt.project / f"train-{stem}.log", "Training done")
    summary = last_line_with(text, "all ")
    if summary:
        row["figures"] += f"; final val (P R mAP50 mAP50-95): {' '.join(summary.split()[-4:])}"
    return row, opt.project / "train" / stem / "weights" / "best.pt"


def half_steps(weights: Path, opt: argparse.Namespace) -> list[dict]:
    """val.py and detect.py with --half on the GPU; their per-image speed lines as figures."""
    from utils.datasets_check import check_dataset

    val_images = check_dataset(opt.data)["val"]
    source = str(val_images[0] if isinstance(val_images, list) else val_images)
    common = ["--weights", str(weights), "--img", str(opt.img), "--device", "0", "--half"]
    commands = {
        "val.py --half": [sys.executable, "val.py", "--data", str(opt.data), *common, "--project",
                          str(opt.project), "--name", "val", "--exist-ok"],
        "detect.py --half": [sys.executable, "detect.py", "--source", source, *common, "--project",
                             str(opt.project), "--name", "detect", "--exist-ok", "--nosave"],
    }
    rows = []
    for name, command in commands.items():
        row, text = command_step(name, command, opt.project / f"{name.split('.')[0]}-half.log")
        found = SPEED.search(text)
        summary = last_line_with(text, "all ")
        extras = [f"mAP50 mAP50-95 {' '.join(summary.split()[-2:])}" if summary else "",
                  found.group(0) + " per image" if found else ""]
        row["figures"] = "; ".join(x for x in [row["figures"], *extras] if x)
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------- runtimes and export


def cuda_provider_missing() -> str | None:
    """Why ONNX Runtime cannot run on CUDA here, or None when its CUDAExecutionProvider is available."""
    try:
        import onnxruntime
    except ImportError:
        return "onnxruntime is not installed"
    providers = onnxruntime.get_available_providers()
    if "CUDAExecutionProvider" not in providers:
        return f"onnxruntime {onnxruntime.__version__} has no CUDAExecutionProvider (it has {', '.join(providers)})"
    return None


def cuda_ms(fn: Callable[[], object], runs: int, warmup: int = 3) -> float:
    """Median milliseconds of ``fn`` on the GPU (synchronized around every run)."""
    from benchmarks.common import interleaved_medians

    def clock() -> float:
        torch.cuda.synchronize()
        return time.perf_counter()

    return 1e3 * interleaved_medians({"fn": fn}, runs, warmup, clock=clock)["fn"]


def ort_cuda_step(weights: Path, opt: argparse.Namespace) -> dict:
    name = "ONNX Runtime CUDAExecutionProvider"
    why = cuda_provider_missing()
    if why:
        return step(name, "skipped", detail=why)
    command = [sys.executable, "export.py", "--weights", str(weights), "--include", "onnx", "--img", str(opt.img)]
    row, _ = command_step(name, command, opt.project / "export-onnx.log")
    if row["status"] != "ok":
        return row
    from models.backend import InferenceBackend

    backend = InferenceBackend(weights.with_suffix(".onnx"), "cuda:0")
    provider = backend.session.get_providers()[0]
    x = torch.rand(1, 3, opt.img, opt.img, device="cuda:0")
    ms = cuda_ms(lambda: backend(x), opt.runs)
    return step(name, "ok" if provider == "CUDAExecutionProvider" else "failed",
                f"batch 1 @{opt.img}: {ms:.2f} ms (host input and output: the copies are included)",
                f"session provider: {provider}")


def tensorrt_step(weights: Path, opt: argparse.Namespace, missing: Callable[[str], str | None] | None = None) -> dict:
    """export.py --include engine when tensorrt imports; its refusal is recorded as "not available"."""
    from models.backend import missing_package

    name = "TensorRT (export.py --include engine)"
    why = (missing or missing_package)("tensorrt")
    if why:
        return step(name, "skipped", detail=why)
    command = [sys.executable, "export.py", "--weights", str(weights), "--include", "engine", "--img", str(opt.img),
               "--device", "0"]
    row, _ = command_step(name, command, opt.project / "export-engine.log")
    if row["status"] != "ok":
        return step(name, "not available", detail=row["detail"])
    engine = weights.with_suffix(".engine")
    try:
        from models.backend import InferenceBackend

        backend = InferenceBackend(engine, "cuda:0")
        x = torch.rand(1, 3, opt.img, opt.img, device="cuda:0")
        row["figures"] += f"; batch 1 @{opt.img}: {cuda_ms(lambda: backend(x), opt.runs):.2f} ms"
    except Exception as e:
        row["detail"] = f"{engine.name} written; the inference backend does not run it: {first_line(e)}"
    return row


# ------------------------------------------------------------------------------------------------- large kernel


def large_kernel_lines(runs: int) -> list[str]:
    """cuDNN depthwise convolution (float32, float16) against the FFT formulation, per layer case; ms medians."""
    from benchmarks.large_kernel import LAYER_CASES, forward_backward
    from models.modules.large_kernel import _FFTDepthwiseConv2d

    torch.backends.cudnn.benchmark = True
    rows = []
    for channels, size, k in LAYER_CASES:
        conv = nn.Conv2d(channels, channels, k, padding=k // 2, groups=channels, bias=False).cuda()
        x = torch.randn(1, channels, size, size, device="cuda")
        conv16, x16 = nn.Conv2d(channels, channels, k, padding=k // 2, groups=channels, bias=False), x.half()
        conv16 = conv16.cuda().half()
        weight = conv.weight.detach().flatten(0, 1)
        with torch.no_grad():
            error = ((_FFTDepthwiseConv2d.apply(x, weight) - conv(x)).abs().max() / conv(x).abs().max()).item()
            fwd = [cuda_ms(lambda: conv(x), runs), cuda_ms(lambda: conv16(x16), runs),
                   cuda_ms(lambda: _FFTDepthwiseConv2d.apply(x, weight), runs)]
        train = cuda_ms(forward_backward(conv, x), runs)
        flops = 2 * channels * size * size * k * k
        rows.append([f"1x{channels}x{size}x{size}, {k}x{k}", *(f"{t:.3f}" for t in fwd), f"{train:.3f}",
                     f"{flops / fwd[0] / 1e6:.0f}", f"{fwd[0] / fwd[2]:.2f}x", f"{error:.1e}"])
    header = ["depthwise conv (stride 1, 'same')", "cuDNN fp32 fwd", "cuDNN fp16 fwd", "FFT fp32 fwd",
              "cuDNN fp32 fwd+bwd", "cuDNN fp32 GFLOP/s", "FFT speed-up over cuDNN fp32", "FFT rel. err"]
    return markdown_table(header, rows, "l" + "r" * (len(header) - 1))


# ------------------------------------------------------------------------------------------------------- report


def report_lines(header: list[str], rows: list[dict], kernel_lines: list[str], opt: argparse.Namespace) -> list[str]:
    """report.md: command and machine, the steps table, what was skipped and why, the large-kernel table."""
    skipped = [f"- {r['step']}: {r['status']}: {r['detail']}" for r in rows if r["status"] in ("skipped",
                                                                                              "not available")]
    body = [[r["step"], r["status"], r["figures"] or "-", r["detail"] or "-"] for r in rows]
    setup = (f"data {opt.data}, --img {opt.img}, {opt.epochs} epoch(s) at batch {opt.batch_size}; latencies are "
             f"medians of {opt.runs} runs (ms)")
    return [*header, "", setup, "", *markdown_table(STEP_HEADER, body), "",
            "Skipped or not available:", *(skipped or ["- nothing"]), "",
            "Large-kernel depthwise convolution on the GPU (ms, medians):", "",
            *(kernel_lines or ["not run (--no-large-kernel)"])]


def device_line() -> str:
    props = torch.cuda.get_device_properties(0)
    return (f"GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}, "
            f"cuDNN {torch.backends.cudnn.version()}")


def run(opt: argparse.Namespace) -> list[dict]:
    opt.project.mkdir(parents=True, exist_ok=True)
    header = [*header_lines(torch.get_num_threads()), device_line()]
    print("\n".join(header), flush=True)
    rows, weights = [], []
    for cfg in opt.models:
        row, best = train_step(cfg, opt)
        rows.append(row)
        weights.append(best)
    first = weights[0]
    if first.is_file():
        try:
            rows += half_steps(first, opt)
        except Exception as e:  # e.g. the dataset's val split cannot be found
            rows.append(step("val.py/detect.py --half", "failed", detail=f"{type(e).__name__}: {first_line(e)}"))
        rows.append(guarded("ONNX Runtime CUDAExecutionProvider", lambda: ort_cuda_step(first, opt)))
        rows.append(guarded("TensorRT (export.py --include engine)", lambda: tensorrt_step(first, opt)))
    else:
        rows.append(step("val/detect/ONNX/TensorRT", "skipped", detail=f"{first} was not trained"))
    kernel_lines = [] if opt.no_large_kernel else large_kernel_lines(opt.runs)
    lines = report_lines(header, rows, kernel_lines, opt)
    write_text(opt.project / "report.md", lines)
    print("\n".join(lines) + f"\n\nReport saved to {opt.project / 'report.md'}", flush=True)
    return rows


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, help="model YAMLs to train (first: val, "
                        "detect and exports)")
    parser.add_argument("--data", default="data/shapes.yaml", help="data YAML (default: generated, no download)")
    parser.add_argument("--img", type=int, default=320, help="image size of every step")
    parser.add_argument("--epochs", type=int, default=1, help="training epochs per model")
    parser.add_argument("--batch-size", type=int, default=16, help="training batch size")
    parser.add_argument("--workers", type=int, default=4, help="data loader workers")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per latency (median reported)")
    parser.add_argument("--no-large-kernel", action="store_true", help="skip the cuDNN large-kernel table")
    parser.add_argument("--project", type=Path, default=OUTPUT_FOLDER / "gpu", help="logs, runs and report.md")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    opt = parse_opt(argv)
    if not torch.cuda.is_available():
        raise UserInputError(NO_CUDA)
    rows = run(opt)
    return 1 if any(r["status"] == "failed" for r in rows) else 0
