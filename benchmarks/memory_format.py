"""Channels-last against contiguous (NCHW) memory format on the CPU, measured side by side in one run.

Three workloads of one model: the folded model at batch 1 on a 640x480 image (detect.py's letterboxed BCCD
image), the folded model at batch 8 at 640 (val.py), and a training step (forward, YOLOv5 loss, backward) of the
training-form model at 320, batch 16, channels-last as train.py makes it (``channels_last_training``). The two
formats are timed round-robin (median of --runs after --warmup), and their outputs compared; the training step's
gradients are also compared with a float64 reference.

Usage:
    python -m benchmarks memory-format --cfg yolov5s.yaml --runs 10
"""

from __future__ import annotations

import argparse
import copy

import torch

from benchmarks.common import interleaved_medians
from models.memory_format import channels_last_training
from models.yolo import DetectionModel
from utils.loss import ComputeLoss
from utils.torch_utils import convs_channels_last

HYP = {"box": 0.05, "cls": 0.5, "cls_pw": 1.0, "obj": 1.0, "obj_pw": 1.0, "anchor_t": 4.0, "fl_gamma": 0.0,
       "label_smoothing": 0.0}
FORMATS = {"NCHW": torch.contiguous_format, "channels_last": torch.channels_last}


def to_format(model: torch.nn.Module, memory_format: torch.memory_format) -> torch.nn.Module:
    """A copy of ``model`` with its convolution weights in ``memory_format``."""
    model = copy.deepcopy(model)
    return convs_channels_last(model) if memory_format == torch.channels_last else model


def inference_case(model: torch.nn.Module, shape: tuple) -> tuple[dict, float]:
    """Callables per format and the largest output difference between the formats."""
    x = torch.rand(shape)
    models = {k: to_format(model, f) for k, f in FORMATS.items()}
    inputs = {k: x.contiguous(memory_format=f) for k, f in FORMATS.items()}
    with torch.inference_mode():
        a, b = (models[k](inputs[k])[0] for k in FORMATS)
    fns = {k: torch.inference_mode()(lambda k=k: models[k](inputs[k])) for k in FORMATS}
    return fns, float((a - b).abs().max() / b.abs().max())


def gradient_errors(models: dict, reference: torch.nn.Module, x: torch.Tensor,
                    targets: torch.Tensor) -> dict[str, float]:
    """||g - g64|| / ||g64|| per format, against float64 NCHW gradients of the same weights and batch."""
    reference = copy.deepcopy(reference).double().train()
    ComputeLoss(reference)(reference(x.double()), targets.double())[0].backward()
    g64 = torch.cat([p.grad.flatten() for p in reference.parameters()])
    grads = {k: torch.cat([p.grad.double().flatten() for p in m.parameters()]) for k, m in models.items()}
    return {k: float((g - g64).norm() / g64.norm()) for k, g in grads.items()}


def training_case(model: torch.nn.Module, batch: int, size: int) -> tuple[dict, float, dict]:
    """Training-step callables per format (forward, loss, backward), the largest relative gradient difference
    between the formats, and each format's gradient error against a float64 reference."""
    torch.manual_seed(0)
    x = torch.rand(batch, 3, size, size)
    targets = torch.tensor([[i, i % 3, 0.5, 0.5, 0.3, 0.4] for i in range(batch)], dtype=torch.float32)
    models = {k: copy.deepcopy(model).train() for k in FORMATS}
    channels_last_training(models["channels_last"], torch.device("cpu"), memory_format="channels-last")

    def step(k: str) -> None:
        m = models[k]
        m.zero_grad(set_to_none=True)
        loss, _ = ComputeLoss(m)(m(x), targets)  # NCHW images, as train.py feeds them
        loss.backward()

    for k in FORMATS:
        step(k)
    grads = [torch.cat([p.grad.flatten() for p in models[k].parameters()]) for k in FORMATS]
    errors = gradient_errors(models, model, x, targets)
    diff = float((grads[0] - grads[1]).abs().max() / grads[1].abs().max())
    return {k: (lambda k=k: step(k)) for k in FORMATS}, diff, errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks memory-format", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", default="yolov5s.yaml", help="model YAML")
    parser.add_argument("--runs", type=int, default=10, help="timed runs per workload and format (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs first")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    opt = parser.parse_args(argv)
    torch.set_num_threads(opt.threads)
    model = DetectionModel(opt.cfg, nc=3, verbose=False)
    model.hyp = HYP
    folded = copy.deepcopy(model).fuse().eval()
    *train_fns, errors = training_case(model, 16, 320)
    cases = {
        "folded, batch 1, 480x640 (detect)": inference_case(folded, (1, 3, 480, 640)),
        "folded, batch 8, 640x640 (val)": inference_case(folded, (8, 3, 640, 640)),
        "training step, batch 16, 320x320": tuple(train_fns),
    }
    print(f"{opt.cfg}, torch {torch.__version__}, {opt.threads} threads, median of {opt.runs} runs (ms)\n")
    print("| workload | NCHW | channels_last | speed-up | max rel. difference |\n|---|---:|---:|---:|---:|")
    for name, (fns, diff) in cases.items():
        t = interleaved_medians(fns, opt.runs, opt.warmup)
        print(f"| {name} | {t['NCHW'] * 1e3:.1f} | {t['channels_last'] * 1e3:.1f} | "
              f"{t['NCHW'] / t['channels_last']:.2f}x | {diff:.1e} |", flush=True)
    print("\ntraining-step gradients against a float64 NCHW reference (||g - g64|| / ||g64||): "
          + ", ".join(f"{k} {e:.1e}" for k, e in errors.items()))
    return 0
