"""Head-to-head against upstream YOLOv5 on this machine: the same val.py, detect.py and train.py commands, the
same weights and the same data, run alternately by our scripts and upstream's, so every ratio comes from one run.

Upstream is not part of this project. Give the Python of an environment that has it, either the ``yolov5`` PyPI
package (upstream v7.0 packaged; found through ``import yolov5``) or a git checkout (``--upstream-root``).
docs/BENCHMARKS.md lists the pins upstream v7.0 needs to run with torch 2.14.

What is compared (upstream's defaults everywhere; both sides get identical arguments):
    val     val.py --img 640 --batch-size 32 on the data's val split, with our checkpoint converted into an upstream
            pickle of the same weights; wall time of the whole command, per-image times, and the metrics row
    detect  detect.py --img 640 on the val images, same weights; wall time and per-image times
    train   train.py --cfg yolov5s.yaml --weights '' --img 320 --batch-size 16 --workers 2 --epochs 1; wall time
            of the whole command and the mean seconds per iteration (epoch bars' elapsed times, first epoch left
            out when there are more);
            --ours-train-args adds arguments on our side only (e.g. '--compile'), --train-epochs more epochs

Upstream gets its own copy of the labels (its label cache has the same name as ours and another format), a
font in a private config folder (v7.0 would download Arial.ttf) and TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1
(v7.0's checkpoints are pickles, which torch >= 2.6 refuses by default).

Usage:
    python -m benchmarks upstream --upstream-python ~/yolov5-env/bin/python \\
        --weights runs/train/exp/weights/best.pt --data data/BCCD.yaml --repeats 3
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from benchmarks.common import OUTPUT_FOLDER, ROOT, command_line, write_csv, write_text
from models.backend import SPEED_PATTERN
from utils.checkpoint import load_checkpoint
from utils.datasets_check import check_dataset

TASKS = ("val", "detect", "train")
SPEED = SPEED_PATTERN  # the per-image timing line of val.py and detect.py, ours or upstream's
METRICS = re.compile(r"^\s*all\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$", re.M)
BAR = re.compile(r"(\d+)/(\d+) \[(?:(\d+):)?(\d+):(\d+)<[\d:]+,\s+([\d.]+)(s/it|it/s)\]")
COLUMNS = ["task", "who", "repeat", "status", "wall_s", "pre_ms", "inf_ms", "nms_ms", "s_per_iter", "metrics",
           "nms_time_limit_warnings"]

CONVERT = """
import sys, torch
root, prefix, src, dst = sys.argv[1:5]
sys.path.insert(0, root)
DetectionModel = __import__(prefix + 'models.yolo', fromlist=['DetectionModel']).DetectionModel
d = torch.load(src, weights_only=True)
model = DetectionModel(d['yaml'], nc=d['nc'])
model.load_state_dict(d['state'], strict=True)
model.names, model.nc = d['names'], d['nc']
torch.save({'model': model.half(), 'ema': None, 'epoch': -1, 'optimizer': None, 'best_fitness': None}, dst)
"""


# --------------------------------------------------------------------------------------------------- upstream


def upstream_location(python: str, root: str | None) -> tuple[Path, str, str]:
    """(script folder, module prefix, version text) of the upstream code that ``python`` runs."""
    if root:
        described = subprocess.run(["git", "-C", root, "describe", "--tags", "--always"], capture_output=True,
                                   text=True).stdout.strip()
        return Path(root).resolve(), "", f"git checkout {root} ({described or 'no git description'})"
    probe = ("import importlib.metadata as m, os, yolov5; "
             "print(os.path.dirname(yolov5.__file__)); print(m.version('yolov5'))")
    out = subprocess.run([python, "-W", "ignore", "-c", probe], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{python} cannot import the 'yolov5' package; give --upstream-root for a git checkout\n"
                         f"{out.stderr[-1500:]}")
    folder, version = out.stdout.strip().splitlines()[-2:]
    return Path(folder), "yolov5.", f"PyPI yolov5 {version} (upstream v7.0 packaged)"


def upstream_env(work: Path) -> dict:
    """Environment for upstream: pickled checkpoints allowed, and a local font so that nothing is downloaded."""
    import matplotlib

    config = work / "upstream_config"
    config.mkdir(parents=True, exist_ok=True)
    font = Path(matplotlib.get_data_path()) / "fonts/ttf/DejaVuSans.ttf"
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        if not (config / name).is_file():
            shutil.copyfile(font, config / name)
    return {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1", "YOLOV5_CONFIG_DIR": str(config)}


def upstream_weights(weights: Path, python: str, root: Path, prefix: str, work: Path, env: dict) -> Path:
    """Our checkpoint's weights as an upstream pickle (upstream's DetectionModel, strict state_dict load)."""
    ckpt = load_checkpoint(weights)
    state = ckpt["ema"] if ckpt.get("ema") is not None else ckpt["model"]
    src, dst = work / "weights_state.pt", work / f"upstream_{weights.stem}.pt"
    torch.save({"yaml": ckpt["yaml"], "nc": ckpt["nc"], "names": {int(k): v for k, v in ckpt["names"].items()},
                "state": {k: v.float() if v.is_floating_point() else v for k, v in state.items()}}, src)
    out = subprocess.run([python, "-W", "ignore", "-c", CONVERT, str(root), prefix, str(src), str(dst)],
                         capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"converting {weights} for upstream failed:\n{out.stderr[-2000:]}")
    return dst


def upstream_data(data: dict, work: Path) -> Path:
    """A data YAML for upstream: symlinked image folders, copied label folders (without our caches)."""
    folder = work / "upstream_data"
    splits = {}
    for split in ("train", "val"):
        images = Path(data[split])
        if not images.is_dir():
            raise SystemExit(f"{data['yaml_file']}: '{split}' must be an image folder for this comparison")
        labels = images.parent.parent / "labels" / images.name
        (folder / "images").mkdir(parents=True, exist_ok=True)
        link = folder / "images" / split
        if not link.exists():
            link.symlink_to(images, target_is_directory=True)
        if not (folder / "labels" / split).is_dir():
            shutil.copytree(labels, folder / "labels" / split, ignore=shutil.ignore_patterns("*.cache"))
        splits[split] = f"images/{split}"
    file = work / "upstream_data.yaml"
    file.write_text(yaml.safe_dump({"path": str(folder), **splits, "names": data["names"]}, sort_keys=False))
    return file


# ------------------------------------------------------------------------------------------------------- runs


def task_args(task: str, side: dict, source: str, opt: argparse.Namespace, project: Path, name: str) -> list[str]:
    """The arguments of one task's command (identical for both sides but for paths)."""
    common = ["--device", "cpu", "--project", str(project), "--name", name, "--exist-ok"]
    if task == "val":
        return ["val.py", "--weights", str(side["weights"]), "--data", str(side["data"]), "--img", str(opt.img),
                "--batch-size", "32", *common]
    if task == "detect":
        return ["detect.py", "--weights", str(side["weights"]), "--source", source, "--img", str(opt.img), *common]
    return ["train.py", "--cfg", side["cfg"], "--weights", "", "--data", str(side["data"]), "--img",
            str(opt.train_img), "--batch-size", "16", "--workers", "2", "--epochs", str(opt.train_epochs), *common,
            *side.get("train_extra", [])]


def parse_output(text: str, train_img: int = 320) -> dict:
    """Per-image times, metrics row, mean seconds per training iteration and upstream's NMS time-limit warnings.

    Seconds per iteration: the elapsed times of the finished epoch bars over their iterations, without the first
    epoch when there are more (warm-up, compiling). tqdm's own closing rate is a moving average that the last
    iterations (an epoch's smaller last batch) dominate; it is used only when the epochs took under a second in all
    (the elapsed time has a resolution of 1 s).
    """
    text = text.replace("\r", "\n")
    row: dict = {"nms_time_limit_warnings": text.count("NMS time limit")}
    if speeds := SPEED.findall(text):
        row.update(zip(("pre_ms", "inf_ms", "nms_ms"), map(float, speeds[-1]), strict=True))
    if metrics := METRICS.findall(text):
        row["metrics"] = " ".join(metrics[0][2:])  # P R mAP50 mAP50-95 of the first 'all' row
    finished = {}  # epoch -> its bar's last update (tqdm redraws a finished bar when its description changes)
    for line in text.splitlines():
        if f" {train_img}: 100%|" in line and (m := BAR.search(line)):
            finished[line.split()[0]] = m
    bars = list(finished.values())
    timed = bars[1:] or bars
    iterations = sum(int(m.group(2)) for m in timed)
    elapsed = sum(int(m.group(3) or 0) * 3600 + int(m.group(4)) * 60 + int(m.group(5)) for m in timed)
    if elapsed:
        row["s_per_iter"] = elapsed / iterations
    elif bars:
        value = float(bars[-1].group(6))
        row["s_per_iter"] = value if bars[-1].group(7) == "s/it" else 1 / value
    return row


def run_one(command: list[str], cwd: Path, env: dict, log: Path) -> tuple[int, float, str]:
    """(exit code, wall seconds, output) of one command; the output is also written to ``log``."""
    start = time.perf_counter()
    out = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    log.write_text(out.stdout + out.stderr)
    return out.returncode, wall, out.stdout + out.stderr


def median_of(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None and r["status"] == "ok"]
    return statistics.median(values) if values else None


def report(rows: list[dict], header: list[str]) -> list[str]:
    """Markdown: per task the medians of both sides and upstream / ours (above 1: we are faster)."""
    lines = ["# Ours against upstream YOLOv5, same machine, same run", "", *(f"- {h}" for h in header), "",
             "| task | who | runs ok | wall s (median) | pre / inference / NMS ms per image | s/iteration | "
             "metrics P R mAP50 mAP50-95 | NMS time-limit warnings |", "|---|---|---:|---:|---|---:|---|---:|"]
    for task in dict.fromkeys(r["task"] for r in rows):
        for who in ("ours", "upstream"):
            sel = [r for r in rows if r["task"] == task and r["who"] == who]
            stages = [median_of(sel, k) for k in ("pre_ms", "inf_ms", "nms_ms")]
            spi = median_of(sel, "s_per_iter")
            lines.append(f"| {task} | {who} | {sum(r['status'] == 'ok' for r in sel)}/{len(sel)} | "
                         f"{median_of(sel, 'wall_s') or float('nan'):.2f} | "
                         f"{' / '.join(f'{s:.1f}' for s in stages) if None not in stages else '-'} | "
                         f"{f'{spi:.2f}' if spi else '-'} | {sel[-1].get('metrics', '-')} | "
                         f"{sum(r.get('nms_time_limit_warnings', 0) for r in sel)} |")
    lines += ["", "| task | upstream / ours, whole command | upstream / ours, per image or per iteration |",
              "|---|---:|---:|"]
    for task in dict.fromkeys(r["task"] for r in rows):
        side = {who: [r for r in rows if r["task"] == task and r["who"] == who] for who in ("ours", "upstream")}
        wall = [median_of(side[w], "wall_s") for w in side]
        key = "s_per_iter" if task == "train" else None
        if key:
            unit = [median_of(side[w], key) for w in side]
        else:
            unit = [sum(median_of(side[w], k) or 0 for k in ("pre_ms", "inf_ms", "nms_ms")) for w in side]
        ratio = [f"{b / a:.2f}x" if a and b else "-" for a, b in (wall, unit)]
        lines.append(f"| {task} | {ratio[0]} | {ratio[1]} |")
    return lines


def sides(opt: argparse.Namespace, data: dict, work: Path) -> tuple[dict, str]:
    """What each side runs with (Python, folder, environment, data YAML, model YAML, weights) and upstream's version.

    Upstream gets its own data copy and, with --weights, our weights converted into its checkpoint format."""
    root, prefix, version = upstream_location(opt.upstream_python, opt.upstream_root)
    up_env = upstream_env(work)
    both = {"ours": {"python": sys.executable, "cwd": ROOT, "env": dict(os.environ), "data": Path(opt.data),
                     "cfg": opt.cfg, "weights": Path(opt.weights) if opt.weights else None,
                     "train_extra": shlex.split(opt.ours_train_args)},
            "upstream": {"python": opt.upstream_python, "cwd": root, "env": up_env,
                         "data": upstream_data(data, work), "cfg": str(root / "models" / opt.cfg)}}
    if opt.weights:
        both["upstream"]["weights"] = upstream_weights(Path(opt.weights), opt.upstream_python, root, prefix, work,
                                                       up_env)
    return both, version


def run_rounds(opt: argparse.Namespace, both: dict, source: str, work: Path) -> list[dict]:
    """Every repeat of every task on both sides, alternating which side goes first; one row per command."""
    tasks = [t for t in opt.tasks if t == "train" or opt.weights]
    rows = []
    for repeat in range(opt.repeats):
        for task in tasks:
            for who in ("ours", "upstream") if repeat % 2 == 0 else ("upstream", "ours"):
                side = both[who]
                args = task_args(task, side, source, opt, work / "runs", f"{task}_{who}")
                code, wall, text = run_one([side["python"], "-W", "ignore", *args], side["cwd"], side["env"],
                                           work / f"{task}_{who}_{repeat}.log")
                row = {"task": task, "who": who, "repeat": repeat, "status": "ok" if code == 0 else f"exit {code}",
                       "wall_s": wall, **parse_output(text, opt.train_img)}
                rows.append(row)
                print(f"{task:6s} {who:8s} repeat {repeat}: {row['status']}, {wall:.1f} s", flush=True)
    return rows


def run(opt: argparse.Namespace) -> list[dict]:
    """The whole comparison; writes upstream_compare.csv / .md and the logs into --project, returns the rows."""
    work = opt.project.resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = check_dataset(opt.data)
    both, version = sides(opt, data, work)
    header = [f"upstream: {version}; ours: {ROOT}", f"weights: {opt.weights or '-'}; data: {opt.data}",
              f"train: {opt.train_epochs} epoch(s); our extra train.py arguments: {opt.ours_train_args or 'none'}",
              f"repeats: {opt.repeats}, the two sides alternating (ours first in even repeats)",
              f"command: {command_line()}"]
    rows = run_rounds(opt, both, str(Path(data["val"])), work)
    write_csv(work / "upstream_compare.csv", rows, COLUMNS)
    lines = report(rows, header)
    write_text(work / "upstream_compare.md", lines)
    print("\n" + "\n".join(lines) + f"\n\nResults and logs saved to {work}")
    return rows


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks upstream", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream-python", required=True, help="Python of an environment with upstream YOLOv5")
    parser.add_argument("--upstream-root", help="upstream git checkout (default: the 'yolov5' package's folder)")
    parser.add_argument("--weights", help="our .pt for val and detect (without it only train runs)")
    parser.add_argument("--data", default="data/BCCD.yaml", help="data YAML (image folders for train and val)")
    parser.add_argument("--cfg", default="yolov5s.yaml", help="model YAML for train (a name in both models/)")
    parser.add_argument("--img", type=int, default=640, help="val and detect image size")
    parser.add_argument("--train-img", type=int, default=320, help="train image size")
    parser.add_argument("--train-epochs", type=int, default=1, help="train epochs (s/iteration: the last epoch's)")
    parser.add_argument("--ours-train-args", default="", help="extra train.py arguments for our side, e.g. '--compile'")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS), help="what to compare")
    parser.add_argument("--repeats", type=int, default=3, help="runs per task and side")
    parser.add_argument("--project", type=Path, default=OUTPUT_FOLDER / "upstream", help="output folder")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    rows = run(parse_opt(argv))
    return 0 if all(r["status"] == "ok" for r in rows) else 1
