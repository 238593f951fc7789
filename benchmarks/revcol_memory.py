"""Peak training memory (forward + backward) of a RevCol backbone, plain versus reversible columns.

Each mode runs in its own subprocess, so one mode's peak cannot hide the other's. On CPU the figure
is the process's peak resident memory (``ru_maxrss``) and its increase over the resident memory
just before the forward pass; on CUDA, the allocator's peak and its increase.

Usage:
    python benchmarks/revcol_memory.py                       # revcol_small, batch 4, 320x320, CPU
    python benchmarks/revcol_memory.py --variant tiny --batch 2 --img 128 --device cuda
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from models.modules import revcol  # noqa: E402

MODES = {"plain": False, "reversible": True}  # mode -> save_memory
MIB = 2**20


def _peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def train_step_memory(variant: str, batch: int, img: int, save_memory: bool, device: str = "cpu") -> dict[str, float]:
    """One forward + backward of ``revcol_<variant>`` in this process: peak and increase, in MiB."""
    torch.manual_seed(0)
    model = getattr(revcol, f"revcol_{variant}")(save_memory=save_memory).to(device).train()
    x = torch.randn(batch, 3, img, img, device=device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = psutil.Process().memory_info().rss
    loss = sum(feature.float().square().mean() for feature in model(x))
    loss.backward()
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _peak_rss_bytes()
    return {"peak_mib": peak / MIB, "train_mib": (peak - before) / MIB}


def measure(variant: str = "small", batch: int = 4, img: int = 320, device: str = "cpu") -> dict[str, dict[str, float]]:
    """Both modes, each in a fresh subprocess; returns {mode: {'peak_mib', 'train_mib'}}."""
    results = {}
    for mode in MODES:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", mode, "--variant", variant,
               "--batch", str(batch), "--img", str(img), "--device", device]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="small", choices=list(revcol.VARIANTS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--img", type=int, default=320, help="square input size, a multiple of 32")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--worker", choices=list(MODES), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(opt: argparse.Namespace) -> None:
    if opt.worker:
        print(json.dumps(train_step_memory(opt.variant, opt.batch, opt.img, MODES[opt.worker], opt.device)))
        return
    results = measure(opt.variant, opt.batch, opt.img, opt.device)
    print(f"revcol_{opt.variant}, batch {opt.batch}, {opt.img}x{opt.img}, {opt.device}, forward + backward:")
    for mode, r in results.items():
        print(f"  {mode:<10}  peak {r['peak_mib']:9.1f} MiB   increase during the step {r['train_mib']:9.1f} MiB")
    plain, rev = results["plain"], results["reversible"]
    print(f"  reversible / plain: peak {rev['peak_mib'] / plain['peak_mib']:.3f}, "
          f"increase {rev['train_mib'] / plain['train_mib']:.3f}")


if __name__ == "__main__":
    main(parse_opt())
