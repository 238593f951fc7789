"""One epoch of `train.py` (with its final validation) for each model YAML on a tiny generated dataset.

Proves that every shipped YAML trains through the real script, and records what that costs on this machine:
wall time and peak resident memory of each run, measured on its own process (``os.wait4``). Each YAML runs in
its own subprocess, so a failure is one row with its last error line, not the end of the run.

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

COLUMNS = ["model", "status", "wall_s", "peak_rss_gib", "summary"]


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


def train_one(cfg: str, data: Path, opt: argparse.Namespace) -> dict:
    """Run train.py for ``cfg`` in a subprocess; status, wall time, peak RSS and the model summary line."""
    command = [sys.executable, str(ROOT / "train.py"), "--cfg", cfg, "--data", str(data), "--img", str(opt.img),
               "--epochs", str(opt.epochs), "--batch-size", str(opt.batch), "--workers", "0", "--noplots",
               "--weights", "", "--project", str(opt.project), "--name", Path(cfg).stem, "--exist-ok"]
    log = opt.project / f"{Path(cfg).stem}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True)
        try:
            _, code, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(code)
        except KeyboardInterrupt:
            proc.kill()
            raise
    wall = time.perf_counter() - start
    text = log.read_text(errors="replace")
    ok = proc.returncode == 0 and f"{opt.epochs} epochs completed" in text
    error = line_with(text, "Error") or line_with(text, "ERROR") or f"exit code {proc.returncode}"
    return {"model": Path(cfg).name, "status": "ok" if ok else f"failed: {error}", "wall_s": round(wall, 1),
            "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2),  # ru_maxrss is in KiB on Linux
            "summary": line_with(text, " summary: ", last=False)}  # the training-form model's


def markdown(rows: list[dict], opt: argparse.Namespace) -> list[str]:
    lines = [f"`python benchmarks.py zoo-epoch --img {opt.img} --epochs {opt.epochs} --batch {opt.batch}`: "
             f"train.py on 4 + 2 synthetic images, final validation included", "",
             "| model | status | wall (s) | peak RSS (GiB) | model summary (training form, nc 5) |",
             "|---|---|---:|---:|---|"]
    lines += [f"| {r['model']} | {r['status']} | {r['wall_s']} | {r['peak_rss_gib']} | {r['summary']} |" for r in rows]
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
        rows.append(train_one(cfg, data, opt))
        print(f"{rows[-1]['model']}: {rows[-1]['status']}, {rows[-1]['wall_s']} s, {rows[-1]['peak_rss_gib']} GiB",
              flush=True)
    opt.csv.parent.mkdir(parents=True, exist_ok=True)
    with open(opt.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    opt.md.write_text("\n".join(markdown(rows, opt)) + "\n")
    print("\n".join(markdown(rows, opt)) + f"\n\nResults saved to {opt.csv} and {opt.md}")
    return rows


if __name__ == "__main__":
    result = main(parse_opt())
    sys.exit(0 if all(r["status"] == "ok" for r in result) else 1)
