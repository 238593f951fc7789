"""Speed benchmarks on the CPU: per-model latency, training throughput and memory, and end-to-end val/detect times.

Tasks (the first argument; ``models`` when omitted):
    models         per model: parameters, GFLOPs, batch-1 latency in four forms (unfolded, folded, TorchScript,
                   ONNX Runtime), training throughput with train.py's step, peak memory; one subprocess per model
    e2e            val.py on BCCD and a detect loop, timed like upstream YOLOv5's figures
    large-kernel   benchmarks/large_kernel.py (its own options follow)
    revcol-memory  benchmarks/revcol_memory.py (its own options follow)
    zoo-epoch      benchmarks/zoo_epoch.py: train.py epoch, detect.py, ONNX export per model YAML (own options follow)
    upstream       benchmarks/upstream_compare.py: val.py, detect.py, train.py against an upstream YOLOv5 install
    memory-format-ab  benchmarks/memory_format_ab.py: matched train.py runs, channels-last against NCHW (own options)

Usage:
    python benchmarks.py                                          # every models/*.yaml up to --max-gflops
    python benchmarks.py --models yolov5s.yaml yolov5s_RepVGG.yaml --img 320 640 --runs 20 --train-iters 10
    python benchmarks.py --models runs/train/exp/weights/best.pt --no-train
    python benchmarks.py e2e                                      # yolov5s (random weights) on data/BCCD.yaml at 640
    python benchmarks.py large-kernel --runs 3

The models task exits with status 1 when a model failed or timed out (its row says why), 0 otherwise.

Efficiency divides an achieved FLOP rate by the float32 matmul rate measured at the start of the run, so figures
from different machines (or from one machine under different load) can be compared:
    latency:  GFLOPs of the form at that size / seconds per image / matmul GFLOP/s
    training: images/s x 3 x forward GFLOPs at the training size / matmul GFLOP/s   (backward ~ 2 x forward)
"""

from __future__ import annotations

import argparse
import copy
import csv
import importlib.util
import json
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from export import export_one, prepare_for_export  # noqa: E402
from models.yolo import MODELS_DIR, DetectionModel, find_model_yaml  # noqa: E402
from train import channels_last_training  # noqa: E402
from models.loading import build_model  # noqa: E402
from utils.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint  # noqa: E402
from utils.dataloaders import LoadImages, create_dataloader  # noqa: E402
from utils.datasets_check import check_dataset  # noqa: E402
from utils.general import LOGGER, UserInputError, machine_summary, set_logging, yaml_load  # noqa: E402
from utils.loss import ComputeLoss  # noqa: E402
from utils.nms import non_max_suppression  # noqa: E402
from utils.torch_utils import ModelEMA, count_flops, model_gflops, retain_freed_memory, smart_optimizer  # noqa: E402

FORMS = ("unfolded", "folded", "torchscript", "onnxruntime")
MIB = 2**20
NBS = 64  # train.py's nominal batch size
DEFAULT_MAX_GFLOPS = 80.0  # default model set: YAMLs up to this many GFLOPs at 640 (one small size per family)
VAL_THRESHOLDS = {"conf": 0.001, "iou": 0.6}  # val.py's defaults, as in upstream's val commands
DETECT_THRESHOLDS = {"conf": 0.25, "iou": 0.45, "max_det": 1000}  # upstream detect.py's defaults
SPEED_LINE = re.compile(r"Speed: ([\d.]+)ms pre-process, ([\d.]+)ms inference, ([\d.]+)ms NMS")


# ------------------------------------------------------------------------------------------------------ machine


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (the processor name elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def available_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def header_lines(threads: int) -> list[str]:
    """The exact command line and a machine summary, printed and written above every table."""
    return [f"command: python {shlex.join(sys.argv)}",
            f"machine: {machine_summary()}, {cpu_model()}, {available_cores()} cores, "
            f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
            f"torch {torch.__version__}, threads: {threads}, {time.strftime('%Y-%m-%d %H:%M:%S')}"]


def median_seconds(fn: Callable[[], object], runs: int, warmup: int) -> float:
    """Median wall time of ``fn`` over ``runs`` calls after ``warmup`` untimed calls."""
    return interleaved_medians({"fn": fn}, runs, warmup)["fn"]


def interleaved_medians(fns: dict[str, Callable[[], object]], runs: int, warmup: int) -> dict[str, float]:
    """Median wall time of each function; the timed runs go round-robin so a change of load hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def matmul_gflops(size: int = 2048, runs: int = 10) -> float:
    """float32 GFLOP/s of a size x size x size matrix product (median of ``runs``, current torch threads)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    out = torch.empty(size, size)
    seconds = median_seconds(lambda: torch.mm(a, b, out=out), runs, warmup=1)
    return 2 * size**3 / seconds / 1e9


def efficiency(gflop: float | None, seconds: float, matmul: float) -> float | None:
    """Achieved FLOP rate of ``gflop`` done in ``seconds``, as a fraction of the matmul rate."""
    return None if gflop is None else gflop / seconds / matmul


def train_efficiency(images_per_s: float, forward_gflops: float, matmul: float) -> float:
    """Training efficiency as in upstream_speed.md: images/s x 3 x forward GFLOPs / matmul GFLOP/s."""
    return images_per_s * 3 * forward_gflops / matmul


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MIB if sys.platform == "darwin" else peak / 1024


# ------------------------------------------------------------------------------------------------------- models


def model_definition(spec: str) -> dict | Path:
    """A model YAML path, or the model dict inside a .pt checkpoint."""
    return load_checkpoint(spec)["yaml"] if str(spec).endswith(".pt") else find_model_yaml(spec)


def load_for_inference(spec: str) -> nn.Module:
    """The model of a YAML (seeded random weights) or of a .pt checkpoint (its EMA weights), in eval mode."""
    torch.manual_seed(0)
    model = build_model(load_checkpoint(spec)) if str(spec).endswith(".pt") else DetectionModel(spec, verbose=False)
    return model.float().eval()


def meta_gflops(spec: str | Path) -> float:
    """GFLOPs at 640 counted on the meta device (no memory, no compute): to choose the default models cheaply."""
    size = 64  # a multiple of every stride (P6 models have 64); stride is unknown on meta
    with torch.device("meta"):
        model = DetectionModel(spec, verbose=False).eval()
        flops = count_flops(model, torch.zeros(1, model.yaml["ch"], size, size))
    return flops / 1e9 * (640 / size) ** 2


def default_models(max_gflops: float) -> list[str]:
    """Every shipped models/*.yaml with at most ``max_gflops`` at 640 (a YAML that fails here is kept)."""
    chosen = []
    for path in sorted(MODELS_DIR.glob("*.yaml")):
        try:
            keep = meta_gflops(path) <= max_gflops
        except (RuntimeError, ValueError, TypeError, NotImplementedError, UserInputError):
            keep = True  # let its worker report the error
        if keep:
            chosen.append(path.name)
    return chosen


# ------------------------------------------------------------------------------------------------------ latency


def deployed_forms(folded: nn.Module, x: torch.Tensor, folder: Path, threads: int) -> dict[str, Callable]:
    """TorchScript and ONNX Runtime callables of the folded model, exported (and checked) by export.py at x's shape."""
    import onnxruntime

    with warnings.catch_warnings():  # the tracer's notes on Detect's grid-shape check and jit's deprecation
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)
        wrapped = prepare_for_export(copy.deepcopy(folded), x)
        ts_file = export_one("torchscript", wrapped, x, folder / f"model_{x.shape[-1]}.torchscript")
        onnx_file = export_one("onnx", wrapped, x, folder / f"model_{x.shape[-1]}.onnx")
        traced = torch.jit.load(str(ts_file)).eval()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = onnxruntime.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    return {"torchscript": lambda: traced(x), "onnxruntime": lambda: session.run(None, feed)}


def latency_at(model: nn.Module, folded: nn.Module, size: int, job: dict, folder: Path) -> dict:
    """ms and efficiency of each requested form at batch 1, ``size`` x ``size``; an error text per failed form."""
    x = torch.rand(1, 3, size, size)
    fns: dict[str, Callable] = {"unfolded": lambda: model(x), "folded": lambda: folded(x)}
    gflops = {"unfolded": model_gflops(model, size), **dict.fromkeys(FORMS[1:], model_gflops(folded, size))}
    out: dict = {}
    if {"torchscript", "onnxruntime"} & set(job["forms"]):
        try:
            fns.update(deployed_forms(folded, x, folder, job["threads"]))
        except Exception as e:  # an export failure must not lose the other forms' figures
            out["error"] = f"export at {size}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    with torch.inference_mode():
        medians = interleaved_medians({f: fns[f] for f in job["forms"] if f in fns}, job["runs"], job["warmup"])
    for form, seconds in medians.items():
        out[f"lat_{form}_{size}_ms"] = seconds * 1e3
        out[f"eff_{form}_{size}"] = efficiency(gflops[form], seconds, job["matmul_gflops"])
    return out


def measure_latency(spec: str, job: dict, result: dict, save: Callable[[], None]) -> None:
    """Parameters, GFLOPs and the latency of every form at every size, into ``result``."""
    model = load_for_inference(spec)
    folded = copy.deepcopy(model).fuse().eval()
    result.update(params_m=sum(p.numel() for p in model.parameters()) / 1e6, gflops_640=model_gflops(model, 640),
                  gflops_fused_640=model_gflops(folded, 640))
    save()
    with tempfile.TemporaryDirectory(prefix="bench_export_") as folder:
        for size in job["sizes"]:
            figures = latency_at(model, folded, size, job, Path(folder))
            if "error" in figures:
                add_error(result, figures.pop("error"))
            result.update(figures)
            save()
    result["peak_infer_mib"] = peak_rss_mib()


# ----------------------------------------------------------------------------------------------------- training


def load_hyp(path: str | Path) -> dict:
    return yaml_load(path if Path(path).is_file() else ROOT / "data/hyps" / Path(path).name)


class TrainStep:
    """One training iteration as train.py does it on the CPU: forward, ComputeLoss, backward, and on train.py's
    warm-up accumulation schedule gradient clipping, an SGD step and the EMA update. Same hyp scaling and memory
    format (channels-last where train.py uses it) as train.py."""

    def __init__(self, definition: dict | Path, nc: int, imgsz: int, batch: int, hyp: dict, batches_per_epoch: int):
        torch.manual_seed(0)
        self.model = DetectionModel(definition, nc=nc, anchors=hyp.get("anchors"), verbose=False).train()
        channels_last_training(self.model, torch.device("cpu"), compile_model=False)
        hyp = dict(hyp)
        hyp["weight_decay"] *= batch * max(round(NBS / batch), 1) / NBS
        nl = self.model.model[-1].nl
        hyp["box"] *= 3 / nl
        hyp["cls"] *= nc / 80 * 3 / nl
        hyp["obj"] *= (imgsz / 640) ** 2 * 3 / nl
        hyp["label_smoothing"] = 0.0
        self.model.nc, self.model.hyp = nc, hyp
        self.optimizer = smart_optimizer(self.model, "SGD", hyp["lr0"], hyp["momentum"], hyp["weight_decay"])
        self.ema = ModelEMA(self.model)
        self.compute_loss = ComputeLoss(self.model)
        self.warmup_iters = max(round(hyp["warmup_epochs"] * batches_per_epoch), 100)
        self.max_accumulate = NBS / batch
        self.iteration, self.last_step = 0, -1

    def __call__(self, imgs: torch.Tensor, targets: torch.Tensor) -> None:
        ni = self.iteration
        accumulate = max(1, int(np.interp(ni, [0, self.warmup_iters], [1, self.max_accumulate]).round()))
        loss, _ = self.compute_loss(self.model(imgs.float() / 255), targets)
        loss.backward()
        if ni - self.last_step >= accumulate:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=10.0)
            self.optimizer.step()
            self.optimizer.zero_grad()
            self.ema.update(self.model)
            self.last_step = ni
        self.iteration += 1


def endless(loader) -> Iterator:
    """Batches of ``loader`` epoch after epoch."""
    while True:
        yield from loader


def measure_training(spec: str, job: dict, result: dict) -> None:
    """images/s of train.py's step with the real augmenting DataLoader (workers), after warm-up iterations."""
    t = job["train"]
    data = check_dataset(t["data"])
    hyp = load_hyp(t["hyp"])
    loader, _ = create_dataloader(data["train"], t["img"], t["batch"], 32, hyp=hyp, augment=True, shuffle=True,
                                  workers=t["workers"], nc=data["nc"])  # stride 32: used by rect batches only
    step = TrainStep(model_definition(spec), data["nc"], t["img"], t["batch"], hyp, len(loader))
    batches = endless(loader)
    iter_times, wait = [], 0.0
    for i in range(t["warmup"] + t["iters"]):
        start = time.perf_counter()
        imgs, targets, _, _ = next(batches)
        fetched = time.perf_counter()
        step(imgs, targets)
        if i >= t["warmup"]:
            iter_times.append(time.perf_counter() - start)
            wait += fetched - start
    images_per_s = len(iter_times) * t["batch"] / sum(iter_times)
    gflops = model_gflops(step.model, t["img"])
    result.update(train_img=t["img"], train_batch=t["batch"], train_workers=loader.num_workers,
                  train_iters=t["iters"], train_images_s=images_per_s, train_s_per_iter=statistics.median(iter_times),
                  train_data_wait=wait / sum(iter_times), train_gflops=gflops,
                  train_eff=train_efficiency(images_per_s, gflops, job["matmul_gflops"]))
    if job.get("data_images_s"):
        result["data_ratio"] = job["data_images_s"] / images_per_s


def data_pipeline_throughput(data: str, img: int, batch: int, hyp_file: str, batches: int) -> float:
    """images/s of the augmenting data pipeline (mosaic on) in this process (workers=0): one worker's rate."""
    data_dict = check_dataset(data)
    loader, _ = create_dataloader(data_dict["train"], img, batch, 32, hyp=load_hyp(hyp_file), augment=True,
                                  shuffle=True, workers=0, nc=data_dict["nc"])
    stream = endless(loader)
    next(stream)  # warm-up: file cache, first allocations
    start = time.perf_counter()
    images = sum(len(next(stream)[0]) for _ in range(batches))
    return images / (time.perf_counter() - start)


# ------------------------------------------------------------------------------------------------------- worker


def add_error(result: dict, text: str) -> None:
    """Append ``text`` to the row's error column."""
    result["error"] = "; ".join(filter(None, (result.get("error"), text)))


def run_worker(job: dict) -> int:
    """Measure one model (``job`` from the parent) and keep ``job['out']`` (JSON) up to date after every stage."""
    torch.set_num_threads(job["threads"])
    result: dict = {"model": job["model"], "status": "running", "base_mib": peak_rss_mib()}

    def save() -> None:
        tmp = Path(job["out"] + ".tmp")
        tmp.write_text(json.dumps(result))
        os.replace(tmp, job["out"])

    try:
        measure_latency(job["model"], job, result, save)
        save()
        if job.get("train"):
            retain_freed_memory()  # as train.py's process does
            measure_training(job["model"], job, result)
        result.update(status="ok", peak_mib=peak_rss_mib())
        return 0
    except Exception as e:  # reported in the table; the parent goes on with the next model
        add_error(result, f"{type(e).__name__}: {e}".splitlines()[0])
        result.update(status="failed", peak_mib=peak_rss_mib())
        return 1
    finally:
        save()


def spawn_worker(job: dict, timeout: float) -> dict:
    """Run ``python benchmarks.py --worker JSON`` for one model; its (possibly partial) result and status."""
    with tempfile.TemporaryDirectory(prefix="bench_worker_") as folder:
        job = {**job, "out": str(Path(folder) / "result.json")}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
        try:
            rc = subprocess.run(cmd, cwd=ROOT, timeout=timeout).returncode
            status = None if rc in (0, 1) else f"crashed (exit {rc})"
        except subprocess.TimeoutExpired:
            status = f"timeout ({timeout:g} s)"
        out = Path(job["out"])
        result = json.loads(out.read_text()) if out.is_file() else {"model": job["model"]}
    if status:
        result["status"] = status
    return result


# ------------------------------------------------------------------------------------------------------ reports


def model_columns(sizes: list[int], forms: list[str]) -> list[str]:
    """CSV columns of the models task."""
    latency = [f"{kind}_{form}_{size}{unit}" for size in sizes for form in forms
               for kind, unit in (("lat", "_ms"), ("eff", ""))]
    return ["model", "status", "params_m", "gflops_640", "gflops_fused_640", *latency, "train_img", "train_batch",
            "train_workers", "train_iters", "train_images_s", "train_s_per_iter", "train_data_wait", "train_gflops",
            "train_eff", "data_images_s", "data_ratio", "base_mib", "peak_infer_mib", "peak_mib", "matmul_gflops",
            "threads", "error"]


def write_csv(file: Path, rows: list[dict], columns: list[str]) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    with open(file, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def fmt(value, digits: int = 3) -> str:
    """A table cell: numbers to ``digits`` significant figures, missing values as '-'."""
    if value is None or value == "":
        return "-"
    if not isinstance(value, float):
        return str(value)
    return f"{value:.0f}" if abs(value) >= 10**digits else f"{value:.{digits}g}"


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows)]


def latency_table(rows: list[dict], sizes: list[int], forms: list[str]) -> list[str]:
    header = ["model", "params (M)", "GFLOPs @640", "folded GFLOPs @640",
              *(f"{form} @{size} ms (eff.)" for size in sizes for form in forms)]
    body = [[r["model"], fmt(r.get("params_m")), fmt(r.get("gflops_640")), fmt(r.get("gflops_fused_640")),
             *(f"{fmt(r.get(f'lat_{form}_{size}_ms'))} ({fmt(r.get(f'eff_{form}_{size}'), 2)})"
               for size in sizes for form in forms)] for r in rows]
    return markdown_table(header, body)


def training_table(rows: list[dict]) -> list[str]:
    header = ["model", "GFLOPs @train size", "images/s", "s/iteration", "efficiency", "data wait", "data ratio",
              "RSS after imports (MiB)", "peak RSS inference (MiB)", "peak RSS all (MiB)", "status"]
    body = [[r["model"], fmt(r.get("train_gflops")), fmt(r.get("train_images_s")), fmt(r.get("train_s_per_iter")),
             fmt(r.get("train_eff"), 2), fmt(r.get("train_data_wait"), 2), fmt(r.get("data_ratio"), 2),
             *(fmt(r.get(key), 0) for key in ("base_mib", "peak_infer_mib", "peak_mib")),
             r.get("status", "?") + (f": {r['error']}" if r.get("error") else "")] for r in rows]
    return markdown_table(header, body)


def write_text(file: Path, lines: list[str]) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------------------- models task


def make_job(opt: argparse.Namespace, model: str, matmul: float, data_ips: float | None) -> dict:
    train = None if opt.no_train else {"data": str(opt.data), "hyp": str(opt.hyp), "img": opt.train_img,
                                       "batch": opt.train_batch, "iters": opt.train_iters,
                                       "warmup": opt.train_warmup, "workers": opt.workers}
    return {"model": model, "sizes": opt.img, "forms": opt.forms, "runs": opt.runs, "warmup": opt.warmup,
            "threads": opt.threads, "matmul_gflops": matmul, "data_images_s": data_ips, "train": train}


def models_report(opt: argparse.Namespace, header: list[str], rows: list[dict]) -> list[str]:
    t = f"{opt.train_img} px, batch {opt.train_batch}, {opt.train_iters} iterations after {opt.train_warmup} warm-up"
    return ["# Model benchmarks", "", *(f"- {line}" for line in header), "",
            f"Latency: batch 1, median of {opt.runs} runs after {opt.warmup} warm-up, inference_mode. "
            "eff. = GFLOPs of the form / time / matmul rate (folded forms use the folded model's GFLOPs).", "",
            *latency_table(rows, opt.img, opt.forms), "",
            f"Training: train.py's step ({Path(opt.hyp).name}, mosaic on, SGD, EMA) on {opt.data}, {t}, "
            f"DataLoader with up to {opt.workers} workers. efficiency = images/s x 3 x GFLOPs / matmul rate; "
            "data wait = share of the iteration spent waiting for the batch; data ratio = the in-process "
            "pipeline's images/s (one worker) / training images/s.", "",
            *training_table(rows)]


def run_models(opt: argparse.Namespace) -> int:
    """The models task: machine figures once, then one worker subprocess per model; writes CSV and Markdown."""
    torch.set_num_threads(opt.threads)
    header = header_lines(opt.threads)
    models = opt.models or default_models(opt.max_gflops)
    matmul = matmul_gflops(opt.matmul_size, opt.matmul_runs)
    header.append(f"float32 matmul {opt.matmul_size}^3: {matmul:.1f} GFLOP/s (median of {opt.matmul_runs})")
    data_ips = None
    if not opt.no_train:
        data_ips = data_pipeline_throughput(str(opt.data), opt.train_img, opt.train_batch, str(opt.hyp),
                                            opt.data_batches)
        header.append(f"data pipeline (mosaic, {opt.train_img} px, in-process = one worker): {data_ips:.1f} images/s")
    header.append(f"models ({len(models)}): {' '.join(models)}")
    LOGGER.info("\n".join(header))
    rows = []
    for model in models:
        LOGGER.info(f"\n--- {model}")
        row = {**spawn_worker(make_job(opt, model, matmul, data_ips), opt.timeout), "matmul_gflops": matmul,
               "data_images_s": data_ips, "threads": opt.threads}
        rows.append(row)
        LOGGER.info(", ".join(f"{k}={fmt(v)}" for k, v in row.items()))
        write_csv(opt.csv, rows, model_columns(opt.img, opt.forms))
        write_text(opt.md, models_report(opt, header, rows))
    header.append(f"float32 matmul again at the end: {matmul_gflops(opt.matmul_size, opt.matmul_runs):.1f} GFLOP/s "
                  "(a large change means the machine's load changed during the run)")
    write_text(opt.md, models_report(opt, header, rows))
    LOGGER.info("\n" + "\n".join(models_report(opt, header, rows)) + f"\n\nResults saved to {opt.csv} and {opt.md}")
    return int(any(r.get("status") != "ok" for r in rows))


# ---------------------------------------------------------------------------------------------------- e2e task


def random_checkpoint(cfg: str, data: dict, file: Path) -> Path:
    """A checkpoint of ``cfg`` with seeded random weights and the dataset's classes (speed only: its mAP is 0)."""
    torch.manual_seed(0)
    model = DetectionModel(cfg, nc=data["nc"], verbose=False)
    model.names = data["names"]
    save_checkpoint(make_checkpoint(model, ema=None, epoch=-1), file)
    return file


def parse_speed(text: str) -> tuple[float, float, float]:
    """(pre-process, inference, NMS) ms per image from val.py's 'Speed:' line."""
    match = SPEED_LINE.search(text)
    if not match:
        raise RuntimeError("val.py printed no 'Speed:' line")
    return tuple(float(x) for x in match.groups())


def time_val(weights: Path, opt: argparse.Namespace, folder: Path) -> dict:
    """Wall time of the whole val.py command and its per-image times."""
    cmd = [sys.executable, "val.py", "--weights", str(weights), "--data", str(opt.data), "--img", str(opt.img),
           "--batch-size", str(opt.batch), "--device", "cpu", "--project", str(folder), "--name", "val",
           "--exist-ok"]
    env = {**os.environ, "OMP_NUM_THREADS": str(opt.threads)}
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if out.returncode:
        raise RuntimeError(f"val.py failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    pre, inf, nms = parse_speed(out.stdout + out.stderr)
    return {"command": "python " + shlex.join(cmd[1:]), "wall_s": wall, "pre_ms": pre, "inf_ms": inf, "nms_ms": nms}


def detect_one(model: nn.Module, im: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """(raw predictions, detections, [pre, inference, NMS] seconds) of detect.py's steps on one letterboxed image."""
    marks = [time.perf_counter()]
    x = (torch.from_numpy(im).float() / 255)[None]
    marks.append(time.perf_counter())
    with torch.inference_mode():
        pred = model(x)
        marks.append(time.perf_counter())
        det = non_max_suppression(pred, DETECT_THRESHOLDS["conf"], DETECT_THRESHOLDS["iou"],
                                  max_det=DETECT_THRESHOLDS["max_det"])[0]
    marks.append(time.perf_counter())
    return pred, det, [b - a for a, b in zip(marks, marks[1:], strict=False)]


def time_detect(weights: Path, source: str, img: int) -> dict:
    """detect.py's loop over the images of ``source``: letterbox (auto), folded .pt model, NMS at detect's defaults.

    Timed like upstream's detect.py: pre-process = array -> normalized tensor, no warm-up (the first image is
    included); reading + letterboxing is timed separately ('load'). Also counts the boxes NMS had to consider:
    those whose objectness passes val's and detect's confidence thresholds.
    """
    from models.backend import InferenceBackend

    model = InferenceBackend(weights, "cpu")
    images = iter(LoadImages(source, img_size=img, stride=model.stride, auto=True))
    times = dict.fromkeys(("load", "pre", "inf", "nms"), 0.0)
    counts = dict.fromkeys(("val_candidates", "detect_candidates", "detections"), 0)
    n, start = 0, time.perf_counter()
    while True:
        before = time.perf_counter()
        item = next(images, None)
        if item is None:
            break
        times["load"] += time.perf_counter() - before
        pred, det, seconds = detect_one(model, item[1])
        for key, s in zip(("pre", "inf", "nms"), seconds, strict=True):
            times[key] += s
        counts["val_candidates"] += int((pred[..., 4] > VAL_THRESHOLDS["conf"]).sum())
        counts["detect_candidates"] += int((pred[..., 4] > DETECT_THRESHOLDS["conf"]).sum())
        counts["detections"] += len(det)
        n += 1
    wall, per = time.perf_counter() - start, 1 / max(n, 1)
    return {"images": n, "wall_s": wall, **{f"{k}_ms": v * per * 1e3 for k, v in times.items()},
            **{f"{k}_per_image": v * per for k, v in counts.items()}}


E2E_COLUMNS = ["what", "command", "images", "wall_s", "load_ms", "pre_ms", "inf_ms", "nms_ms",
               "val_candidates_per_image", "detect_candidates_per_image", "detections_per_image"]


def e2e_report(opt: argparse.Namespace, header: list[str], val: dict, detect: dict, weights: Path) -> list[str]:
    rows = [["val.py", fmt(val["wall_s"]), "-", fmt(val["pre_ms"]), fmt(val["inf_ms"]), fmt(val["nms_ms"])],
            ["detect loop", fmt(detect["wall_s"]), fmt(detect["load_ms"]), fmt(detect["pre_ms"]),
             fmt(detect["inf_ms"]), fmt(detect["nms_ms"])]]
    return ["# End-to-end benchmarks", "", *(f"- {line}" for line in header), f"- weights: {weights}",
            f"- val.py: `{val['command']}` (conf {VAL_THRESHOLDS['conf']}, IoU {VAL_THRESHOLDS['iou']}: val.py's "
            "defaults, as in upstream's val commands); wall = the whole command, Python start-up included",
            f"- detect loop: {detect['images']} images of {opt.data}'s val split at {opt.img}, batch 1, folded model "
            f"through InferenceBackend, NMS conf {DETECT_THRESHOLDS['conf']}, IoU {DETECT_THRESHOLDS['iou']}, "
            f"max_det {DETECT_THRESHOLDS['max_det']} (upstream detect.py's defaults); wall = the loop only",
            f"- NMS time depends on how many boxes pass the confidence threshold. Per image, objectness passed "
            f"{detect['val_candidates_per_image']:.0f} boxes at conf {VAL_THRESHOLDS['conf']} and "
            f"{detect['detect_candidates_per_image']:.1f} at conf {DETECT_THRESHOLDS['conf']}; "
            f"{detect['detections_per_image']:.1f} detections kept. A trained model gives other counts.", "",
            *markdown_table(["what", "wall (s)", "load ms/image", "pre-process ms/image", "inference ms/image",
                             "NMS ms/image"], rows)]


def run_e2e(opt: argparse.Namespace) -> int:
    """The e2e task: val.py's wall and per-image times, and detect.py's per-image times, on --data's val split."""
    torch.set_num_threads(opt.threads)
    header = header_lines(opt.threads)
    data = check_dataset(opt.data)
    opt.csv.parent.mkdir(parents=True, exist_ok=True)
    weights = Path(opt.weights) if opt.weights else random_checkpoint(
        opt.cfg, data, opt.csv.parent / f"{Path(opt.cfg).stem}_random_{data['nc']}cls.pt")
    LOGGER.info("\n".join(header))
    val = time_val(weights, opt, opt.csv.parent)
    detect = time_detect(weights, data["val"], opt.img)
    write_csv(opt.csv, [{"what": "val.py", **val}, {"what": "detect loop", **detect}], E2E_COLUMNS)
    report = e2e_report(opt, header, val, detect, weights)
    write_text(opt.md, report)
    LOGGER.info("\n" + "\n".join(report) + f"\n\nResults saved to {opt.csv} and {opt.md}")
    return 0


# ---------------------------------------------------------------------------------------------------------- CLI


def load_script(name: str):
    """benchmarks/<name>.py as a module (this file's name shadows the benchmarks/ folder as a package)."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_large_kernel(argv: list[str]) -> int:
    load_script("large_kernel").main(argv)
    return 0


def run_revcol_memory(argv: list[str]) -> int:
    script = load_script("revcol_memory")
    script.main(script.parse_opt(argv))
    return 0


def run_zoo_epoch(argv: list[str]) -> int:
    script = load_script("zoo_epoch")
    rows = script.main(script.parse_opt(argv))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


def run_upstream(argv: list[str]) -> int:
    script = load_script("upstream_compare")
    rows = script.main(script.parse_opt(argv))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


def run_memory_format_ab(argv: list[str]) -> int:
    script = load_script("memory_format_ab")
    script.main(script.parse_opt(argv))
    return 0


DELEGATES = {"large-kernel": run_large_kernel, "revcol-memory": run_revcol_memory, "zoo-epoch": run_zoo_epoch,
             "upstream": run_upstream, "memory-format-ab": run_memory_format_ab}


def common_options(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--threads", type=int, default=available_cores(), help="torch threads (default: all cores)")
    parser.add_argument("--csv", type=Path, default=ROOT / f"runs/benchmarks/{name}.csv", help="CSV output path")
    parser.add_argument("--md", type=Path, default=ROOT / f"runs/benchmarks/{name}.md", help="Markdown output path")


def models_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="benchmarks.py [models]", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", help="model YAMLs (path or name in models/) or .pt weights "
                        "(default: every models/*.yaml with at most --max-gflops at 640)")
    parser.add_argument("--max-gflops", type=float, default=DEFAULT_MAX_GFLOPS,
                        help="GFLOPs @640 cap of the default model set ('inf': all)")
    parser.add_argument("--img", "--imgsz", nargs="+", type=int, default=[320, 640], help="latency image sizes")
    parser.add_argument("--forms", nargs="+", choices=FORMS, default=list(FORMS), help="latency forms")
    parser.add_argument("--runs", type=int, default=20, help="timed latency runs (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed latency runs before timing")
    parser.add_argument("--no-train", action="store_true", help="skip training and data pipeline throughput")
    parser.add_argument("--data", default=ROOT / "data/shapes.yaml", help="training data YAML")
    parser.add_argument("--hyp", default=ROOT / "data/hyps/hyp.scratch-low.yaml", help="training hyperparameters")
    parser.add_argument("--train-img", type=int, default=320, help="training image size")
    parser.add_argument("--train-batch", type=int, default=16, help="training batch size")
    parser.add_argument("--train-iters", type=int, default=10, help="timed training iterations")
    parser.add_argument("--train-warmup", type=int, default=2, help="untimed training iterations first")
    parser.add_argument("--workers", type=int, default=8, help="max DataLoader workers (train.py's default)")
    parser.add_argument("--data-batches", type=int, default=8, help="batches timed for the data pipeline rate")
    parser.add_argument("--matmul-size", type=int, default=2048, help="matrix size of the matmul rate")
    parser.add_argument("--matmul-runs", type=int, default=10, help="matmul runs (median reported)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds allowed per model")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one model's job (JSON), see run_worker
    common_options(parser, "models")
    return parser


def e2e_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="benchmarks.py e2e", description="val.py and detect timings vs upstream")
    parser.add_argument("--weights", help=".pt weights (default: --cfg with seeded random weights)")
    parser.add_argument("--cfg", default="yolov5s.yaml", help="model YAML for the random-weights checkpoint")
    parser.add_argument("--data", default="data/BCCD.yaml", help="data YAML (its val split is used)")
    parser.add_argument("--img", "--imgsz", type=int, default=640, help="image size")
    parser.add_argument("--batch", type=int, default=32, help="val.py batch size")
    common_options(parser, "e2e")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    task = argv.pop(0) if argv and argv[0] in (*DELEGATES, "models", "e2e") else "models"
    if task in DELEGATES:
        return DELEGATES[task](argv)
    opt = (e2e_parser() if task == "e2e" else models_parser()).parse_args(argv)
    if getattr(opt, "worker", None):
        set_logging(verbose=False)
        return run_worker(json.loads(opt.worker))
    set_logging()
    return run_e2e(opt) if task == "e2e" else run_models(opt)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserInputError as e:
        LOGGER.error(f"ERROR: {e}")
        sys.exit(2)
