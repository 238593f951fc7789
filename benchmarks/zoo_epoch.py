"""The whole workflow for each model YAML on a tiny generated dataset: one epoch of `train.py` (with its final
validation), `detect.py` with the trained best.pt, and `export.py --include onnx` (which checks ONNX Runtime against
PyTorch and fails on a mismatch).

Proves that every shipped YAML goes through the real scripts, and records what that costs on this machine: wall
time and peak resident memory of each step, measured on its own process (``os.wait4``). Each step runs in its own
subprocess, so a failure is one row with its last error line, not the end of the run.

Usage:
    python benchmarks/zoo_epoch.py                                 # every models/*.yaml, 64 px, 1 epoch
    python benchmarks/zoo_epoch.py --models yolov5n.yaml yolov5_RevCol-xlarge.yaml --img 128
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from utils.synthetic import CLASS_NAMES, generate_shapes  # noqa: E402

COLUMNS = ["model", "status", "train_s", "detect_s", "export_s", "peak_rss_gib", "summary"]


def tiny_dataset(folder: Path, img: int) -> Path:
    """4 train and 2 val synthetic images at ``img`` px and their data YAML (made once per folder and size)."""
    data = folder / f"tiny{img}.yaml"
    if not data.is_file():
        generate_shapes(folder / f"shapes{img}", n_train=4, n_val=2, imgsz=img, seed=0)
        data.write_text(yaml.safe_dump({"path": str(folder / f"shapes{img}"), "train": "images/train",
                                        "val": "images/val", "names": list(CLASS_NAMES)}))
    return data


def line_with(text: str, marker: str, last: bool = True) -> str:
    """The last (or first) line of ``text`` containing ``marker``, stripped; '' if none."""
    lines = [line.strip() for line in text.splitlines() if marker in line]
    return lines[-1 if last else 0] if lines else ""


def run_step(command: list[str], log: Path) -> tuple[int, float, float, str]:
    """Run ``command`` from the repository root; (exit code, wall seconds, peak RSS GiB, output)."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except KeyboardInterrupt:
            proc.kill()
            raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - start, usage.ru_maxrss / 2**20, log.read_text(errors="replace")


def workflow(cfg: str, data: Path, opt: argparse.Namespace) -> dict:
    """train.py, then detect.py and export.py on its best.pt; the row of ``cfg``."""
    stem, py = Path(cfg).stem, sys.executable
    run_dir = opt.project / stem
    best = run_dir / "weights" / "best.pt"
    images = data.parent / f"shapes{opt.img}" / "images" / "val"
    steps = {
        "train": [py, "train.py", "--cfg", cfg, "--data", str(data), "--img", str(opt.img), "--epochs", str(opt.epochs),
                  "--batch-size", str(opt.batch), "--workers", "0", "--noplots", "--weights", "", "--project",
                  str(opt.project), "--name", stem, "--exist-ok"],
        "detect": [py, "detect.py", "--weights", str(best), "--source", str(images), "--img", str(opt.img),
                   "--project", str(run_dir), "--name", "detect", "--exist-ok"],
        "export": [py, "export.py", "--weights", str(best), "--include", "onnx", "--img", str(opt.img)],
    }
    row = {"model": Path(cfg).name, "status": "ok", "peak_rss_gib": 0.0, "summary": ""}
    run_dir.mkdir(parents=True, exist_ok=True)
    for step, command in steps.items():
        code, seconds, peak, text = run_step(command, opt.project / f"{stem}.{step}.log")
        row[f"{step}_s"], row["peak_rss_gib"] = round(seconds, 1), round(max(row["peak_rss_gib"], peak), 2)
        if step == "train":
            row["summary"] = line_with(text, " summary: ", last=False)  # the training-form model's
        if code != 0 or (step == "train" and f"{opt.epochs} epochs completed" not in text):
            error = line_with(text, "Error") or line_with(text, "ERROR") or f"exit code {code}"
            row["status"] = f"{step} failed: {error}"
            break
    return row


def markdown(rows: list[dict], opt: argparse.Namespace) -> list[str]:
    lines = [f"`python benchmarks.py zoo-epoch --img {opt.img} --epochs {opt.epochs} --batch {opt.batch}`: "
             f"train.py (final validation included) on 4 + 2 synthetic images, detect.py, export.py --include onnx",
             "", "| model | status | train.py (s) | detect.py (s) | export.py (s) | peak RSS (GiB) | model summary "
             "(training form, nc 5) |", "|---|---|---:|---:|---:|---:|---|"]
    lines += [f"| {r['model']} | {r['status']} | {r.get('train_s', '-')} | {r.get('detect_s', '-')} | "
              f"{r.get('export_s', '-')} | {r['peak_rss_gib']} | {r['summary']} |" for r in rows]
    return lines


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", help="model YAMLs (default: every models/*.yaml)")
    parser.add_argument("--img", type=int, default=64, help="image size (train.py raises it to 2x the max stride)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--project", type=Path, default=ROOT / "runs/benchmarks/zoo-epoch", help="run folders")
    parser.add_argument("--csv", type=Path, default=ROOT / "runs/benchmarks/zoo-epoch.csv")
    parser.add_argument("--md", type=Path, default=ROOT / "runs/benchmarks/zoo-epoch.md")
    return parser.parse_args(argv)


def main(opt: argparse.Namespace) -> list[dict]:
    models = opt.models or sorted(p.name for p in (ROOT / "models").glob("*.yaml"))
    data = tiny_dataset(opt.project, opt.img)
    rows = []
    for cfg in models:
        rows.append(workflow(cfg, data, opt))
        print(f"{rows[-1]['model']}: {rows[-1]['status']}, train {rows[-1].get('train_s')} s, "
              f"peak {rows[-1]['peak_rss_gib']} GiB", flush=True)
    opt.csv.parent.mkdir(parents=True, exist_ok=True)
    with open(opt.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS, restval="")
        writer.writeheader()
        writer.writerows(rows)
    opt.md.write_text("\n".join(markdown(rows, opt)) + "\n")
    print("\n".join(markdown(rows, opt)) + f"\n\nResults saved to {opt.csv} and {opt.md}")
    return rows


if __name__ == "__main__":
    result = main(parse_opt())
    sys.exit(0 if all(r["status"] == "ok" for r in result) else 1)
