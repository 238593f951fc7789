"""Peak training memory (forward + backward) of a RevCol backbone, plain versus reversible columns.

Each mode runs in its own subprocess, so one mode's peak cannot hide the other's. On CPU (Linux) the
figures are the process's peak resident memory during the step (VmHWM, reset just before it) and its
increase over the resident memory just before the forward pass, with glibc told to return freed
tensors to the system at once (see WORKER_ENV); on CUDA, the allocator's peak and its increase.

Usage:
    python -m benchmarks revcol-memory                       # revcol_small, batch 4, 320x320, CPU
    python -m benchmarks revcol-memory --variant tiny --batch 2 --img 128 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.common import MIB, ROOT
from models.modules import revcol

MODES = {"plain": False, "reversible": True}  # mode -> save_memory
# glibc raises its mmap threshold as large blocks are freed and then keeps freed memory in its heap, so
# resident memory would track the allocator's history instead of the live tensors; a fixed threshold
# returns every tensor-sized block to the system when it is freed (other C libraries ignore the variable).
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


def _rss_bytes(field: str) -> int:
    """A resident-memory figure of this process from /proc/self/status (Linux): VmRSS now, VmHWM peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> None:
    """Restart VmHWM from the current resident memory. (Not ru_maxrss: a child inherits its parent's peak.)"""
    Path("/proc/self/clear_refs").write_text("5")


def variant_config(variant: str) -> dict:
    """FullNet arguments of a named RevCol variant."""
    return dict(revcol.VARIANTS[variant])


def train_step_memory(config: dict, batch: int, img: int, device: str = "cpu") -> dict[str, float]:
    """One forward + backward of ``FullNet(**config)`` in this process: peak and increase, in MiB."""
    torch.manual_seed(0)
    model = revcol.FullNet(**config).to(device).train()
    x = torch.randn(batch, 3, img, img, device=device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        _reset_peak_rss()
        before = _rss_bytes("VmRSS")
    loss = sum(feature.float().square().mean() for feature in model(x))
    loss.backward()
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _rss_bytes("VmHWM")
    return {"peak_mib": peak / MIB, "train_mib": (peak - before) / MIB}


def measure(config: dict, batch: int = 4, img: int = 320, device: str = "cpu") -> dict[str, dict[str, float]]:
    """Both modes of ``FullNet(**config)``, each in a fresh subprocess (run side by side).

    Returns {mode: {'peak_mib', 'train_mib'}} for the modes 'plain' and 'reversible'.
    """
    workers = {}
    for mode, save_memory in MODES.items():
        worker_config = json.dumps({**config, "save_memory": save_memory})
        cmd = [sys.executable, "-m", "benchmarks", "revcol-memory", "--worker", worker_config,
               "--batch", str(batch), "--img", str(img), "--device", device]
        workers[mode] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                          env={**os.environ, **WORKER_ENV})
    results = {}
    for mode, worker in workers.items():
        out, err = worker.communicate()
        if worker.returncode:
            raise RuntimeError(f"{mode} worker failed:\n{err}")
        results[mode] = json.loads(out.strip().splitlines()[-1])
    return results


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks revcol-memory", description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="small", choices=list(revcol.VARIANTS), help="RevCol size")
    parser.add_argument("--batch", type=int, default=4, help="batch size")
    parser.add_argument("--img", type=int, default=320, help="square input size, a multiple of 32")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the step runs")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: FullNet arguments (JSON) of one mode
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Both modes side by side, or with --worker one mode's measurement (a JSON line on stdout)."""
    opt = parse_opt(argv)
    if opt.worker:
        print(json.dumps(train_step_memory(json.loads(opt.worker), opt.batch, opt.img, opt.device)))
        return 0
    results = measure(variant_config(opt.variant), opt.batch, opt.img, opt.device)
    print(f"revcol_{opt.variant}, batch {opt.batch}, {opt.img}x{opt.img}, {opt.device}, forward + backward:")
    for mode, r in results.items():
        print(f"  {mode:<10}  peak {r['peak_mib']:9.1f} MiB   increase during the step {r['train_mib']:9.1f} MiB")
    plain, rev = results["plain"], results["reversible"]
    print(f"  reversible / plain: peak {rev['peak_mib'] / plain['peak_mib']:.3f}, "
          f"increase {rev['train_mib'] / plain['train_mib']:.3f}")
    return 0
