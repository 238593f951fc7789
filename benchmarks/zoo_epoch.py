"""The whole workflow for each model YAML on a tiny generated dataset: one epoch of `train.py` (with its final
validation), `detect.py` with the trained best.pt, and `export.py --include onnx` (which checks ONNX Runtime against
PyTorch and fails on a mismatch).

Proves that every shipped YAML goes through the real scripts, and records what that costs on this machine: wall
time and peak resident memory of each step, measured on its own process (``os.wait4``). Each step runs in its own
subprocess, so a failure is one row with its last error line, not the end of the run.

Usage:
    python -m benchmarks zoo-epoch                                 # every models/*.yaml, 64 px, 1 epoch
    python -m benchmarks zoo-epoch --models yolov5n.yaml yolov5_RevCol-xlarge.yaml --img 128

Exits with status 1 when a model failed a step, 0 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from benchmarks.common import OUTPUT_FOLDER, ROOT, markdown_table, run_logged, standard_options, write_csv, write_text
from utils.synthetic import CLASS_NAMES, generate_shapes

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
        code, seconds, peak_mib, text = run_logged(command, opt.project / f"{stem}.{step}.log")
        row[f"{step}_s"], row["peak_rss_gib"] = round(seconds, 1), round(max(row["peak_rss_gib"], peak_mib / 1024), 2)
        if step == "train":
            row["summary"] = line_with(text, " summary: ", last=False)  # the training-form model's
        if code != 0 or (step == "train" and f"Training done: {opt.epochs} epoch(s)" not in text):
            error = line_with(text, "Error") or line_with(text, "ERROR") or f"exit code {code}"
            row["status"] = f"{step} failed: {error}"
            break
    return row


def markdown(rows: list[dict], opt: argparse.Namespace) -> list[str]:
    header = ["model", "status", "train.py (s)", "detect.py (s)", "export.py (s)", "peak RSS (GiB)",
              "model summary (training form, nc 5)"]
    body = [[r["model"], r["status"], r.get("train_s", "-"), r.get("detect_s", "-"), r.get("export_s", "-"),
             r["peak_rss_gib"], r["summary"]] for r in rows]
    return [f"`python -m benchmarks zoo-epoch --img {opt.img} --epochs {opt.epochs} --batch {opt.batch}`: "
            "train.py (final validation included) on 4 + 2 synthetic images, detect.py, export.py --include onnx",
            "", *markdown_table(header, body, align="llrrrrl")]


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks zoo-epoch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", help="model YAMLs (default: every models/*.yaml)")
    parser.add_argument("--img", type=int, default=64, help="image size (train.py raises it to 2x the max stride)")
    parser.add_argument("--epochs", type=int, default=1, help="training epochs")
    parser.add_argument("--batch", type=int, default=2, help="training batch size")
    parser.add_argument("--project", type=Path, default=OUTPUT_FOLDER / "zoo-epoch", help="run folders")
    standard_options(parser, "zoo-epoch", threads=False)
    return parser.parse_args(argv)


def run(opt: argparse.Namespace) -> list[dict]:
    """The workflow of every model in turn; writes the CSV and Markdown tables and returns the rows."""
    models = opt.models or sorted(p.name for p in (ROOT / "models").glob("*.yaml"))
    data = tiny_dataset(opt.project, opt.img)
    rows = []
    for cfg in models:
        rows.append(workflow(cfg, data, opt))
        print(f"{rows[-1]['model']}: {rows[-1]['status']}, train {rows[-1].get('train_s')} s, "
              f"peak {rows[-1]['peak_rss_gib']} GiB", flush=True)
    write_csv(opt.csv, rows, COLUMNS)
    write_text(opt.md, markdown(rows, opt))
    print("\n".join(markdown(rows, opt)) + f"\n\nResults saved to {opt.csv} and {opt.md}")
    return rows


def main(argv: list[str] | None = None) -> int:
    rows = run(parse_opt(argv))
    return 0 if all(r["status"] == "ok" for r in rows) else 1
