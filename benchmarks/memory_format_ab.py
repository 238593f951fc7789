"""Does channels-last CPU training learn as well as NCHW? Matched train.py runs of both memory formats.

For every data YAML and seed, train.py runs twice with nothing changed but ``--memory-format`` (yolov5n from
scratch by default, 30 epochs at 416, batch 16, 2 workers), and val.py evaluates each best.pt. The report gives per
run mAP@0.5, mAP@0.5:0.95 and the final training losses, the mean and spread per format, and a plot of the training
class loss per epoch of every run. Finished runs are reused, so an interrupted comparison continues where it stopped.

Usage:
    python -m benchmarks memory-format-ab                               # 2 data sets x 3 seeds x 2 formats
    python -m benchmarks memory-format-ab --data data/BCCD.yaml --seeds 0 --epochs 3   # a quick look
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import ROOT

FORMATS = ("channels-last", "nchw")
COLUMNS = ["data", "seed", "format", "mAP50", "mAP50-95", "train_cls_loss", "train_box_loss", "train_obj_loss",
           "best_epoch", "train_s"]


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks memory-format-ab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", default=["data/BCCD.yaml", "data/BCCD-small.yaml"], help="data YAMLs")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds")
    parser.add_argument("--cfg", default="yolov5n.yaml", help="model YAML (trained from scratch)")
    parser.add_argument("--img", type=int, default=416, help="train and val image size")
    parser.add_argument("--epochs", type=int, default=30, help="epochs per run")
    parser.add_argument("--batch-size", type=int, default=16, help="batch size")
    parser.add_argument("--workers", type=int, default=2, help="dataloader workers")
    parser.add_argument("--project", type=Path, default=ROOT / "runs/benchmarks/memory_format_ab",
                        help="folder of the runs and the report")
    return parser.parse_args(argv)


def read_results(file: Path) -> list[dict[str, float]]:
    """results.csv rows as dicts of floats (column names stripped of their padding)."""
    with open(file) as f:
        return [{k.strip(): float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def train_run(opt: argparse.Namespace, data: str, seed: int, fmt: str, run_dir: Path) -> float:
    """One train.py run into ``run_dir`` (skipped when it already finished); its wall seconds (0 if reused)."""
    rows = read_results(run_dir / "results.csv") if (run_dir / "results.csv").is_file() else []
    if len(rows) == opt.epochs and (run_dir / "weights/best.pt").is_file():
        return 0.0
    command = [sys.executable, "train.py", "--cfg", opt.cfg, "--data", data, "--img", str(opt.img), "--epochs",
               str(opt.epochs), "--batch-size", str(opt.batch_size), "--workers", str(opt.workers), "--seed",
               str(seed), "--memory-format", fmt, "--project", str(run_dir.parent), "--name", run_dir.name,
               "--exist-ok"]
    print(" ".join(command[1:]), flush=True)
    start = time.perf_counter()
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
        subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - start


def validate(opt: argparse.Namespace, data: str, weights: Path) -> tuple[float, float]:
    """(mAP@0.5, mAP@0.5:0.95) of ``weights`` from val.py, run as its own process like a user would."""
    out = weights.parents[1] / "val.json"
    if not out.is_file():
        code = ("import json, sys, val; r = val.run(data=sys.argv[1], weights=sys.argv[2], imgsz=int(sys.argv[3]), "
                "batch_size=32, plots=False, project=sys.argv[4], name='val', exist_ok=True)[0]; "
                "json.dump({'mAP50': r[2], 'mAP50-95': r[3]}, open(sys.argv[5], 'w'))")
        subprocess.run([sys.executable, "-c", code, data, str(weights), str(opt.img), str(weights.parents[1]),
                        str(out)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    result = json.loads(out.read_text())
    return result["mAP50"], result["mAP50-95"]


def one_pair_member(opt: argparse.Namespace, data: str, seed: int, fmt: str) -> dict:
    run_dir = opt.project / f"{Path(data).stem}_s{seed}_{fmt}"
    seconds = train_run(opt, data, seed, fmt, run_dir)
    rows = read_results(run_dir / "results.csv")
    map50, map5095 = validate(opt, data, run_dir / "weights/best.pt")
    fits = [0.1 * r["metrics/mAP_0.5"] + 0.9 * r["metrics/mAP_0.5:0.95"] for r in rows]
    return {"data": Path(data).stem, "seed": seed, "format": fmt, "mAP50": map50, "mAP50-95": map5095,
            "train_cls_loss": rows[-1]["train/cls_loss"], "train_box_loss": rows[-1]["train/box_loss"],
            "train_obj_loss": rows[-1]["train/obj_loss"], "best_epoch": fits.index(max(fits)),
            "train_s": round(seconds), "cls_curve": [r["train/cls_loss"] for r in rows]}


def summary_lines(rows: list[dict]) -> list[str]:
    """Mean and spread of mAP@0.5:0.95 per data set and format, and the mean paired difference."""
    lines = ["| data | format | runs | mAP@0.5:0.95 mean | min-max | sd | final cls_loss mean |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for data in dict.fromkeys(r["data"] for r in rows):
        for fmt in FORMATS:
            sel = [r for r in rows if r["data"] == data and r["format"] == fmt]
            if not sel:
                continue
            m = [r["mAP50-95"] for r in sel]
            sd = statistics.stdev(m) if len(m) > 1 else 0.0
            lines.append(f"| {data} | {fmt} | {len(m)} | {statistics.mean(m):.3f} | {min(m):.3f}-{max(m):.3f} | "
                         f"{sd:.3f} | {statistics.mean(r['train_cls_loss'] for r in sel):.4f} |")
    return lines


def report(opt: argparse.Namespace, rows: list[dict]) -> list[str]:
    lines = [f"Memory-format A/B: {opt.cfg} from scratch, {opt.epochs} epochs, --img {opt.img}, batch "
             f"{opt.batch_size}, {opt.workers} workers; best.pt evaluated with val.py", "",
             "| data | seed | format | mAP@0.5 | mAP@0.5:0.95 | final cls_loss | final box_loss | best epoch | "
             "train s |", "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['data']} | {r['seed']} | {r['format']} | {r['mAP50']:.3f} | {r['mAP50-95']:.3f} | "
                     f"{r['train_cls_loss']:.4f} | {r['train_box_loss']:.4f} | {r['best_epoch']} | {r['train_s']} |")
    return [*lines, "", *summary_lines(rows)]


def plot_class_loss(rows: list[dict], file: Path) -> None:
    """Training class loss per epoch, one panel per data set, one line per run (colour = format)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(dict.fromkeys(r["data"] for r in rows))
    fig, axes = plt.subplots(1, len(sets), figsize=(6 * len(sets), 4), squeeze=False)
    for ax, data in zip(axes[0], sets):
        for r in (r for r in rows if r["data"] == data):
            ax.plot(r["cls_curve"], color="tab:red" if r["format"] == "channels-last" else "tab:blue",
                    linestyle=("-", "--", ":")[r["seed"] % 3], label=f"{r['format']} seed {r['seed']}")
        ax.set(title=data, xlabel="epoch", ylabel="train/cls_loss", yscale="log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)


def run(opt: argparse.Namespace) -> list[dict]:
    opt.project.mkdir(parents=True, exist_ok=True)
    rows = []
    for data in opt.data:
        for seed in opt.seeds:
            for fmt in FORMATS:
                rows.append(one_pair_member(opt, data, seed, fmt))
                lines = report(opt, rows)
                (opt.project / "report.md").write_text("\n".join(lines) + "\n")
                (opt.project / "runs.json").write_text(json.dumps(rows, indent=1))
                print(lines[len(lines) - len(summary_lines(rows)) - 2], flush=True)
    plot_class_loss(rows, opt.project / "cls_loss.png")
    print("\n".join(report(opt, rows)) + f"\n\nReport, runs and plot saved in {opt.project}")
    return rows


def main(argv: list[str] | None = None) -> int:
    run(parse_opt(argv))
    return 0
