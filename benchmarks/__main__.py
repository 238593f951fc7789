"""Command line of the benchmarks package: picks the task named by the first argument (``models`` when the first
argument is not a task name) and hands it the remaining arguments."""

from __future__ import annotations

import importlib
import sys

from utils.general import LOGGER, UserInputError, set_logging

# task name -> (module in this package, what it measures)
TASKS = {
    "models": ("models", "per model: GFLOPs, batch-1 latency in four forms, training throughput, peak memory"),
    "e2e": ("e2e", "val.py as a whole command and detect.py's per-image loop, timed like upstream YOLOv5's figures"),
    "large-kernel": ("large_kernel", "nn.Conv2d against the large-kernel depthwise convolution, per layer and model"),
    "revcol-memory": ("revcol_memory", "peak training memory of a RevCol backbone, plain against reversible columns"),
    "zoo-epoch": ("zoo_epoch", "one train.py epoch, detect.py and ONNX export per model YAML on a tiny data set"),
    "upstream": ("upstream_compare", "val.py, detect.py and train.py against an upstream YOLOv5 install"),
    "memory-format": ("memory_format", "channels-last against NCHW: inference and training-step times of one model"),
    "memory-format-ab": ("memory_format_ab", "matched train.py runs, channels-last against NCHW: accuracy"),
    "deploy": ("deploy", "per checkpoint: mAP and batch-1 latency in PyTorch, ONNX Runtime and OpenVINO, FP32 and INT8"),
    "gpu": ("gpu", "on a CUDA machine: AMP training, --half val/detect, ORT CUDA, TensorRT, cuDNN large kernels"),
}
DEFAULT_TASK = "models"


def usage() -> str:
    width = max(map(len, TASKS))
    return "\n".join(["usage: python -m benchmarks [task] [options]      (from the repository root)",
                      "       python -m benchmarks <task> --help       (the task's own options)", "",
                      f"tasks ({DEFAULT_TASK} when the first argument is none of them); results go to "
                      "runs/benchmarks/:", *(f"  {name:<{width}}  {summary}" for name, (_, summary) in TASKS.items())])


def main(argv: list[str] | None = None) -> int:
    """Dispatch to the task's ``main(argv)``; its return value is the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(usage())
        return 0
    task = argv.pop(0) if argv and argv[0] in TASKS else DEFAULT_TASK
    module = importlib.import_module(f"benchmarks.{TASKS[task][0]}")  # only the chosen task's imports are paid for
    try:
        return module.main(argv)
    except UserInputError as e:
        set_logging(verbose=False)  # a handler on stdout even for tasks that print instead of logging
        LOGGER.error(f"ERROR: {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
