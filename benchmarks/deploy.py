"""Deployment table: accuracy and batch-1 latency of trained checkpoints in five forms, FP32 and INT8.

For each checkpoint (``--weights``, or ``--train``: train.py runs first, one per ``--models`` YAML) export.py writes
ONNX and OpenVINO IR in FP32 and, calibrated on ``--data`` train images, INT8 (ONNX Runtime QDQ and NNCF). Then
every form is scored with val.py's ``run()`` (mAP@0.5:0.95 on the val split at ``--img``) and timed at batch 1 on
random input at each ``--sizes`` with ``--threads`` threads (median of ``--runs``, forms interleaved):

    pytorch   the folded .pt model (as val.py and detect.py run it: channels-last on the CPU)
    ort-fp32  <name>.onnx                     ov-fp32  <name>_openvino_model/
    ort-int8  <name>_int8.onnx                ov-int8  <name>_int8_openvino_model/

Exports are fixed-shape, one set per size (the checkpoint is copied to <project>/<model>/<size>/ and exported
there): a static input is how these files are deployed, and it lets each runtime plan for one shape. mAP uses the
set exported at --img; its letterbox is therefore square, while the .pt model is scored with val.py's rectangular
batches. The delta column compares an INT8 form with the FP32 export of the same runtime, an FP32 export with the
PyTorch row. An INT8 form losing more than --flag-points points of mAP@0.5:0.95 is flagged in the report.

Usage:
    python -m benchmarks deploy --weights runs/train/exp/weights/best.pt --data data/BCCD.yaml
    python -m benchmarks deploy --train                     # train the seven default models on BCCD at 320 first
    python -m benchmarks deploy --train --models yolov5n.yaml --epochs 1 --img 64 --sizes 64 96 --data tiny.yaml

Writes <project>/report.md and <project>/results.csv (default runs/benchmarks/deploy/). Exits with status 1 when a
step failed for some model (its rows say which), 0 otherwise.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.common import (
    OUTPUT_FOLDER, fmt, header_lines, interleaved_medians, markdown_table, run_logged, write_csv, write_text,
)
from utils.general import LOGGER, UserInputError, first_line

DEFAULT_MODELS = ["yolov5n.yaml", "yolov5s.yaml", "yolov5s_RepVGG.yaml", "yolov5s_RepGhost.yaml",
                  "yolov5s_GFPN.yaml", "yolov5_RepLKNet-tiny.yaml", "yolov5_RevCol.yaml"]
# form -> (label, file name pattern beside the copied checkpoint, the form its mAP delta is taken against)
FORMS = {
    "pytorch": ("PyTorch folded", "{}.pt", None),
    "ort-fp32": ("ONNX Runtime FP32", "{}.onnx", "pytorch"),
    "ov-fp32": ("OpenVINO FP32", "{}_openvino_model", "pytorch"),
    "ort-int8": ("ONNX Runtime INT8", "{}_int8.onnx", "ort-fp32"),
    "ov-int8": ("OpenVINO INT8", "{}_int8_openvino_model", "ov-fp32"),
}
INT8_FORMS = ("ort-int8", "ov-int8")


def columns(sizes: list[int]) -> list[str]:
    return ["model", "form", "map50_95", "map50", *(f"ms_{s}" for s in sizes), "delta_map_points",
            *(f"speedup_vs_ort_fp32_{s}" for s in sizes), "agreement_iou_0.9", "agreement_iou_0.5", "flag", "error"]


# ----------------------------------------------------------------------------------------------------- training


def train_models(opt: argparse.Namespace) -> dict[str, Path | str]:
    """train.py per --models YAML; model name -> best.pt, or the one-line reason it has none."""
    out: dict[str, Path | str] = {}
    folder = opt.project / "train"
    folder.mkdir(parents=True, exist_ok=True)
    for cfg in opt.models:
        stem = Path(cfg).stem
        command = [sys.executable, "train.py", "--cfg", cfg, "--data", str(opt.data), "--img", str(opt.img),
                   "--epochs", str(opt.epochs), "--batch-size", str(opt.batch_size), "--workers", str(opt.workers),
                   "--weights", "", "--noplots", "--project", str(folder), "--name", stem, "--exist-ok"]
        if opt.hyp:
            command += ["--hyp", str(opt.hyp)]
        LOGGER.info(f"training {cfg}: {' '.join(command[1:])}")
        code, seconds, _, text = run_logged(command, folder / f"{stem}.log")
        best = folder / stem / "weights" / "best.pt"
        if code == 0 and best.is_file():
            out[stem] = best
            LOGGER.info(f"{cfg}: trained in {seconds:.0f} s -> {best}")
        else:
            errors = [line for line in text.splitlines() if "Error" in line or "ERROR" in line]
            out[stem] = f"train.py failed (exit {code}): {errors[-1].strip() if errors else 'see ' + stem + '.log'}"
    return out


def model_name(weights: Path, taken: set[str]) -> str:
    """runs/train/<name>/weights/best.pt -> <name> (else the file stem), made unique within the run."""
    name = weights.parent.parent.name if weights.parent.name == "weights" else weights.stem
    base, i = name, 2
    while name in taken:
        name, i = f"{base}-{i}", i + 1
    return name


# ------------------------------------------------------------------------------------------------------ exports


def export_size(weights: Path, folder: Path, size: int, opt: argparse.Namespace) -> tuple[dict[str, Path], str]:
    """Copy ``weights`` into ``folder`` and export it there at ``size`` (FP32 and INT8).

    Returns form -> path for the forms that exist afterwards, and the export's error line ('' if none)."""
    import export

    folder.mkdir(parents=True, exist_ok=True)
    copy = folder / "best.pt"
    shutil.copy2(weights, copy)
    error = ""
    try:
        export.run(weights=copy, imgsz=size, include=["onnx", "openvino"], int8=True, data=opt.data,
                   calib_images=opt.calib_images)
    except Exception as e:  # one failed format must not lose the others' figures
        error = f"export at {size}: {type(e).__name__}: {first_line(e)}"
        LOGGER.error(error)
    paths = {form: folder / pattern.format(copy.stem) for form, (_, pattern, _) in FORMS.items()}
    return {form: path for form, path in paths.items() if path.exists()}, error


def export_all(weights: Path, folder: Path, sizes: list[int], opt: argparse.Namespace) -> tuple[dict, list[str]]:
    """size -> {form: path} of what exported at each size; and the error lines of the exports that failed."""
    files, errors = {}, []
    for size in sizes:
        files[size], error = export_size(weights, folder / str(size), size, opt)
        errors += [error] if error else []
    return files, errors


# ---------------------------------------------------------------------------------------------------- measuring


def measure_map(file: Path, opt: argparse.Namespace, out_dir: Path) -> tuple[float, float]:
    """(mAP@0.5:0.95, mAP@0.5) of ``file`` with val.py's run() on the val split at --img."""
    import val

    results, _, _ = val.run(data=opt.data, weights=file, batch_size=opt.val_batch, imgsz=opt.img, device="cpu",
                            workers=opt.workers, half=False, plots=False, project=out_dir, name="val",
                            exist_ok=True)
    return float(results[3]), float(results[2])


def timed_forms(files: dict[str, Path], size: int, opt: argparse.Namespace) -> dict[str, float | str]:
    """Median batch-1 ms of each form at ``size`` on random input (forms interleaved); an error text per failure."""
    from models.backend import InferenceBackend

    x = torch.rand(1, 3, size, size)
    fns: dict[str, Callable] = {}
    out: dict[str, float | str] = {}
    for form, file in files.items():
        try:
            backend = InferenceBackend(file, "cpu")
            fns[form] = lambda b=backend: b(x)
        except Exception as e:
            out[form] = f"load at {size}: {type(e).__name__}: {first_line(e)}"
    with torch.inference_mode():
        medians = interleaved_medians(fns, opt.runs, opt.warmup)
    return out | {form: seconds * 1e3 for form, seconds in medians.items()}


def model_rows(name: str, files: dict[int, dict[str, Path]], errors: list[str], opt: argparse.Namespace
               ) -> list[dict]:
    """The five rows of one model: mAP at --img, ms at every size, then the deltas, speed-ups and flags."""
    rows = {form: {"model": name, "form": label, "error": "; ".join(errors)} for form, (label, _, _) in FORMS.items()}
    for form, row in rows.items():
        if form not in files.get(opt.img, {}) and not row["error"]:
            row["error"] = f"no {row['form']} export at {opt.img}"
    for form, file in files.get(opt.img, {}).items():
        try:
            rows[form]["map50_95"], rows[form]["map50"] = measure_map(file, opt, file.parent / f"val-{form}")
        except Exception as e:
            add_error(rows[form], f"val: {type(e).__name__}: {first_line(e)}")
        if form in INT8_FORMS:
            add_agreement(rows[form], file)
    for size in opt.sizes:
        if size not in files:
            continue
        for form, value in timed_forms(files[size], size, opt).items():
            if isinstance(value, str):
                add_error(rows[form], value)
            else:
                rows[form][f"ms_{size}"] = value
    compare(rows, opt)
    return list(rows.values())


def add_agreement(row: dict, file: Path) -> None:
    """The INT8 check's shares of FP32 detections found again (export.py records them in the model's metadata)."""
    import export

    figures = export.int8_check_figures(file) or {}
    for key, column in (("share", "agreement_iou_0.9"), ("loose_share", "agreement_iou_0.5")):
        if key in figures:
            row[column] = float(figures[key])


def add_error(row: dict, text: str) -> None:
    row["error"] = f"{row['error']}; {text}" if row.get("error") else text


def compare(rows: dict[str, dict], opt: argparse.Namespace) -> None:
    """Fill the mAP delta (points, against the form's reference), INT8 speed-ups over ORT FP32, and flags."""
    for form, (label, _, reference) in FORMS.items():
        row, ref = rows[form], rows[reference] if reference else None
        if ref and isinstance(row.get("map50_95"), float) and isinstance(ref.get("map50_95"), float):
            row["delta_map_points"] = 100 * (row["map50_95"] - ref["map50_95"])
            if form in INT8_FORMS and row["delta_map_points"] < -opt.flag_points:
                row["flag"] = f"INT8 loses {-row['delta_map_points']:.1f} points"
        if form in INT8_FORMS:
            for size in opt.sizes:
                fp32, int8 = rows["ort-fp32"].get(f"ms_{size}"), row.get(f"ms_{size}")
                if isinstance(fp32, float) and isinstance(int8, float):
                    row[f"speedup_vs_ort_fp32_{size}"] = fp32 / int8


# ------------------------------------------------------------------------------------------------------- report


def agreement_text(row: dict) -> str:
    """'86.1% / 99.0%' from an INT8 row's check figures ('' for other rows)."""
    shares = [row.get(k) for k in ("agreement_iou_0.9", "agreement_iou_0.5")]
    return " / ".join(f"{100 * v:.1f}%" for v in shares) if all(isinstance(v, float) for v in shares) else ""


def report_lines(rows: list[dict], opt: argparse.Namespace, header: list[str]) -> list[str]:
    """report.md: the command and machine, the table, the flagged INT8 losses and the errors."""
    sizes = opt.sizes
    table_header = ["model", "form", f"mAP@0.5:0.95 @{opt.img}", *(f"ms@{s}" for s in sizes),
                    "delta mAP vs its FP32 (points)", *(f"INT8 speed-up vs ORT FP32 @{s}" for s in sizes),
                    "INT8 check: found @IoU 0.9 / 0.5"]
    body = [[r["model"], r["form"], fmt(r.get("map50_95")), *(fmt(r.get(f"ms_{s}")) for s in sizes),
             fmt(r.get("delta_map_points"), 2), *(fmt(r.get(f"speedup_vs_ort_fp32_{s}"), 2) for s in sizes),
             agreement_text(r)] for r in rows]
    flagged = [f"- **{r['model']}, {r['form']}**: {r['flag']} of mAP@0.5:0.95 ({fmt(r.get('map50_95'))})"
               for r in rows if r.get("flag")]
    failed = [f"- {r['model']}, {r['form']}: {r['error']}" for r in rows if r.get("error")]
    notes = [f"mAP on the val split of {opt.data} at {opt.img} (val.py run(), conf 0.001, IoU 0.6); latency: batch "
             f"1, random input, {opt.threads} threads, median of {opt.runs} interleaved runs after {opt.warmup} "
             "warm-up. Exports are fixed-shape, one set per size; exported forms are scored with a square "
             "letterbox, the .pt model with val.py's rectangular batches. Delta: INT8 against the same runtime's "
             "FP32 export, FP32 exports against PyTorch folded; speed-up: ORT FP32 ms / INT8 ms at that size. "
             "INT8 check: "
             f"export.py's share of FP32 detections (conf >= 0.25) found again at IoU >= 0.9 and >= 0.5 on the "
             f"calibration images at {opt.img}."]
    title = f"INT8 forms losing more than {opt.flag_points:g} point(s) of mAP@0.5:0.95:"
    return [*header, "", *notes, "", *markdown_table(table_header, body, "ll" + "r" * (len(table_header) - 2)), "",
            title, *(flagged or ["- none"]),
            *(["", "Errors:", *failed] if failed else [])]


# ---------------------------------------------------------------------------------------------------------- run


def checkpoints(opt: argparse.Namespace) -> dict[str, Path | str]:
    """Model name -> checkpoint to deploy (or why there is none): trained now, or given with --weights."""
    if opt.train:
        return train_models(opt)
    out: dict[str, Path | str] = {}
    for w in opt.weights:
        out[model_name(Path(w), set(out))] = Path(w) if Path(w).is_file() else f"--weights {w}: file not found"
    return out


def run(opt: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(opt.threads)  # ONNX Runtime and OpenVINO sessions of InferenceBackend take the same count
    header = header_lines(torch.get_num_threads())
    print("\n".join(header), flush=True)
    rows: list[dict] = []
    for name, weights in checkpoints(opt).items():
        t = time.time()
        if isinstance(weights, str):
            rows += [{"model": name, "form": label, "error": weights} for label, _, _ in FORMS.values()]
            continue
        files, errors = export_all(weights, opt.project / name, sorted({opt.img, *opt.sizes}), opt)
        rows += model_rows(name, files, errors, opt)
        LOGGER.info(f"{name}: measured in {time.time() - t:.0f} s")
    csv_file, md_file = opt.project / "results.csv", opt.project / "report.md"
    write_csv(csv_file, rows, columns(opt.sizes))
    write_text(md_file, report_lines(rows, opt, header))
    print("\n".join(report_lines(rows, opt, [])) + f"\n\nResults saved to {csv_file} and {md_file}", flush=True)
    return rows


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks deploy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", nargs="+", default=[], help="trained .pt checkpoints to deploy")
    parser.add_argument("--train", action="store_true", help="train each of --models with train.py first")
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, help="--train: model YAMLs")
    parser.add_argument("--data", default="data/BCCD.yaml", help="data YAML: training, calibration and mAP")
    parser.add_argument("--hyp", default=None, help="--train: hyperparameter YAML (default: train.py's)")
    parser.add_argument("--epochs", type=int, default=10, help="--train: epochs")
    parser.add_argument("--batch-size", type=int, default=16, help="--train: batch size")
    parser.add_argument("--img", type=int, default=320, help="training and mAP image size")
    parser.add_argument("--sizes", nargs="+", type=int, default=[320, 640], help="latency image sizes")
    parser.add_argument("--calib-images", type=int, default=300, help="INT8 calibration images (train split)")
    parser.add_argument("--threads", type=int, default=2, help="threads of every runtime")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per form and size (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs before timing")
    parser.add_argument("--val-batch", type=int, default=16, help="val.py batch size")
    parser.add_argument("--workers", type=int, default=2,
                        help="data loader workers of val.py (and of train.py with --train)")
    parser.add_argument("--flag-points", type=float, default=1.0, help="INT8 mAP@0.5:0.95 loss (points) to flag")
    parser.add_argument("--project", type=Path, default=OUTPUT_FOLDER / "deploy", help="exports and reports")
    opt = parser.parse_args(argv)
    if not opt.train and not opt.weights:
        raise UserInputError("deploy needs checkpoints: pass --weights a.pt [b.pt ...], or --train to make them")
    if opt.train and opt.weights:
        raise UserInputError("--train and --weights cannot be combined: pick one of them")
    return opt


def main(argv: list[str] | None = None) -> int:
    rows = run(parse_opt(argv))
    return 1 if any(r.get("error") for r in rows) else 0
