"""The models task: per model, parameters, GFLOPs, batch-1 latency in four forms (unfolded, folded, TorchScript,
ONNX Runtime), training throughput with train.py's step, and peak memory; each model in its own worker subprocess.

Usage:
    python -m benchmarks                                          # every models/*.yaml up to --max-gflops
    python -m benchmarks --models yolov5s.yaml yolov5s_RepVGG.yaml --img 320 640 --runs 20 --train-iters 10
    python -m benchmarks models --models runs/train/exp/weights/best.pt --no-train

Exits with status 1 when a model failed or timed out (its row says why), 0 otherwise.

Efficiency divides an achieved FLOP rate by the float32 matmul rate measured at the start of the run, so figures
from different machines (or from one machine under different load) can be compared:
    latency:  GFLOPs of the form at that size / seconds per image / matmul GFLOP/s
    training: images/s x 3 x forward GFLOPs at the training size / matmul GFLOP/s   (backward ~ 2 x forward)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn as nn

from benchmarks.common import (
    ROOT, efficiency, fmt, header_lines, interleaved_medians, markdown_table, matmul_gflops,
    peak_rss_mib, standard_options, train_efficiency, write_csv, write_text,
)
from export import export_one, prepare_for_export
from models.loading import build_model
from models.memory_format import channels_last_training
from models.yolo import MODELS_DIR, DetectionModel, find_model_yaml
from train import MAX_GRAD_NORM, load_hyp, loss_gains
from utils.checkpoint import load_checkpoint
from utils.dataloaders import create_dataloader
from utils.datasets_check import check_dataset
from utils.general import LOGGER, UserInputError, set_logging
from utils.loss import ComputeLoss
from utils.schedule import Schedule, nominal_batch, scaled_weight_decay
from utils.torch_utils import ModelEMA, count_flops, model_gflops, retain_freed_memory, smart_optimizer

FORMS = ("unfolded", "folded", "torchscript", "onnxruntime")
DEFAULT_MAX_GFLOPS = 80.0  # default model set: YAMLs up to this many GFLOPs at 640 (one small size per family)


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


class TrainStep:
    """One training iteration as train.py does it on the CPU: forward, ComputeLoss, backward, and when the
    accumulation schedule says so gradient clipping, an SGD step and the EMA update. The model, memory format, loss
    gains and weight decay are set up as train.py sets them; the learning rate stays at lr0 (speed does not depend
    on it)."""

    def __init__(self, definition: dict | Path, nc: int, imgsz: int, batch: int, hyp: dict, batches_per_epoch: int):
        torch.manual_seed(0)
        self.model = DetectionModel(definition, nc=nc, anchors=hyp.get("anchors"), verbose=False).train()
        channels_last_training(self.model, torch.device("cpu"))  # train.py's --memory-format auto
        hyp = loss_gains(hyp, self.model.model[-1].nl, nc, imgsz)
        hyp.update(weight_decay=scaled_weight_decay(hyp["weight_decay"], batch, nominal_batch(hyp)),
                   label_smoothing=0.0)
        self.model.nc, self.model.hyp = nc, hyp
        self.optimizer = smart_optimizer(self.model, "SGD", hyp["lr0"], hyp["momentum"], hyp["weight_decay"])
        self.ema = ModelEMA(self.model)
        self.compute_loss = ComputeLoss(self.model)
        self.schedule = Schedule(hyp, epochs=1, batches=batches_per_epoch, batch_size=batch)
        self.iteration, self.last_step = 0, -1

    def __call__(self, imgs: torch.Tensor, targets: torch.Tensor) -> None:
        accumulate = self.schedule.at(self.iteration).accumulate
        loss, _ = self.compute_loss(self.model(imgs.float() / 255), targets)
        loss.backward()
        if self.iteration - self.last_step >= accumulate:
            nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=MAX_GRAD_NORM)
            self.optimizer.step()
            self.optimizer.zero_grad()
            self.ema.update(self.model)
            self.last_step = self.iteration
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
    """Run ``python -m benchmarks models --worker JSON`` for one model; its (possibly partial) result and status."""
    with tempfile.TemporaryDirectory(prefix="bench_worker_") as folder:
        job = {**job, "out": str(Path(folder) / "result.json")}
        cmd = [sys.executable, "-m", "benchmarks", "models", "--worker", json.dumps(job)]
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


def run(opt: argparse.Namespace) -> int:
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


# ---------------------------------------------------------------------------------------------------------- CLI


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks [models]", description=__doc__,
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
    standard_options(parser, "models")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """The models task, or with --worker the measurement of one model inside its subprocess."""
    opt = parse_opt(argv)
    if opt.worker:
        set_logging(verbose=False)
        return run_worker(json.loads(opt.worker))
    set_logging()
    return run(opt)
