"""The benchmarks package: the models task end to end on yolov5n at 64 px (subprocesses), the e2e detect timing loop,
the efficiency formulas, the task dispatch, and the upstream comparison against a stand-in."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest
import yaml

from benchmarks import common, e2e, upstream_compare
from benchmarks.__main__ import TASKS
from benchmarks.__main__ import main as benchmarks_main
from tests.helpers import ROOT
from utils.datasets_check import check_dataset
from utils.synthetic import CLASS_NAMES, generate_shapes

SIZE = 64
LATENCY_COLUMNS = [f"{kind}_{form}_{SIZE}{unit}" for form in ("unfolded", "folded", "torchscript", "onnxruntime")
                   for kind, unit in (("lat", "_ms"), ("eff", ""))]
POSITIVE_COLUMNS = ["params_m", "gflops_640", "gflops_fused_640", *LATENCY_COLUMNS, "train_images_s",
                    "train_s_per_iter", "train_gflops", "train_eff", "data_images_s", "data_ratio", "base_mib",
                    "peak_infer_mib", "peak_mib", "matmul_gflops"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """8 train / 4 val synthetic images at 64 px and their data YAML."""
    root = tmp_path_factory.mktemp("bench_data")
    generate_shapes(root / "shapes", n_train=8, n_val=4, imgsz=SIZE, seed=1)
    data = root / "tiny.yaml"
    data.write_text(yaml.safe_dump({"path": str(root / "shapes"), "train": "images/train", "val": "images/val",
                                    "names": dict(enumerate(CLASS_NAMES))}))
    return data


def test_models_task_end_to_end(tiny_data, tmp_path):
    """One real model and one missing YAML: each in its own worker; the failure is a row, not a crash of the run."""
    out_csv, out_md = tmp_path / "bench.csv", tmp_path / "bench.md"
    cmd = [sys.executable, "-m", "benchmarks", "--models", "yolov5n.yaml", "missing_model.yaml", "--img", str(SIZE),
           "--runs", "2", "--warmup", "1", "--train-img", str(SIZE), "--train-batch", "2", "--train-iters", "2",
           "--train-warmup", "1", "--workers", "1", "--data", str(tiny_data), "--data-batches", "1",
           "--matmul-size", "256", "--matmul-runs", "2", "--threads", "1", "--csv", str(out_csv), "--md", str(out_md)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]  # 1: a model failed, the run finished

    with open(out_csv, newline="") as f:
        reader = csv.DictReader(f)
        rows = {r["model"]: r for r in reader}
    assert set(POSITIVE_COLUMNS) <= set(reader.fieldnames)
    good, bad = rows["yolov5n.yaml"], rows["missing_model.yaml"]
    assert good["status"] == "ok", good["error"]
    for column in POSITIVE_COLUMNS:
        assert float(good[column]) > 0, column
    assert float(good["params_m"]) == pytest.approx(1.872157)
    assert float(good["peak_mib"]) >= float(good["peak_infer_mib"]) >= float(good["base_mib"])
    assert (good["train_img"], good["train_batch"], good["train_iters"], good["threads"]) == (str(SIZE), "2", "2", "1")
    assert bad["status"] == "failed" and "missing_model.yaml" in bad["error"]

    report = out_md.read_text()
    for text in ("command: python -m benchmarks --models yolov5n.yaml", "machine: ", "float32 matmul 256^3",
                 f"onnxruntime @{SIZE} ms (eff.)", "| images/s |", "| yolov5n.yaml |"):
        assert text in report, text
    assert "command: python -m benchmarks" in out.stdout and "threads" in out.stdout


def test_detect_loop_times_and_counts(tiny_data, tmp_path):
    """The e2e detect loop runs the folded model on every val image and reports per-image times and box counts."""
    data = check_dataset(tiny_data)
    weights = e2e.random_checkpoint("yolov5n.yaml", data, tmp_path / "random.pt")
    result = e2e.time_detect(weights, data["val"], SIZE)
    assert result["images"] == 4
    assert all(result[f"{k}_ms"] > 0 for k in ("load", "pre", "inf", "nms"))
    assert result["wall_s"] * 1e3 >= result["inf_ms"] * 4
    assert result["val_candidates_per_image"] >= result["detect_candidates_per_image"] >= 0


def test_efficiency_formulas_and_speed_line():
    """Upstream's own figures give upstream's training efficiency; val.py's Speed line is parsed."""
    assert common.train_efficiency(3.1, 4.15, 55.6) == pytest.approx(0.69, abs=0.005)
    assert common.efficiency(16.6, 0.2708, 55.6) == pytest.approx(1.10, abs=0.01)
    assert common.efficiency(None, 1.0, 55.6) is None
    line = "Speed: 3.4ms pre-process, 324.8ms inference, 78.4ms NMS per image at shape (32, 3, 640, 640)"
    assert e2e.parse_speed("...\n" + line) == (3.4, 324.8, 78.4)
    with pytest.raises(RuntimeError, match="timing line"):
        e2e.parse_speed("no timing here")


def test_task_list_and_user_errors(capsys):
    """--help lists every task; a user error in a task is one ERROR line and exit code 2."""
    assert benchmarks_main(["--help"]) == 0
    listing = capsys.readouterr().out
    assert all(f"  {task} " in listing for task in TASKS)
    cmd = [sys.executable, "-m", "benchmarks", "models", "--models", "yolov5n.yaml", "--data", "missing_data.yaml",
           "--matmul-size", "64", "--matmul-runs", "1", "--threads", "1"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert [line for line in out.stdout.splitlines() if "ERROR" in line] == [
        "ERROR: missing_data.yaml: data YAML not found"]


def test_upstream_compare_parses_upstream_style_output():
    """Speed line, first 'all' row, mean s/iteration from the epoch bars' elapsed times (\\r-separated tqdm updates,
    first epoch left out when there are more), NMS warnings."""
    def bar(epoch: int, elapsed: str, rate: str) -> str:
        head = f"      {epoch}/2         0G     0.1054     0.1576    0.03678         77        320:"
        done = f"{head} 100%|██████████| 19/19 [{elapsed}<00:00,"
        return f"{head}  95%|█████████▌| 18/19 [00:20<00:01,  1.13it/s]\r{done}  1.0s/it]\r{done}  {rate}]\n"

    text = (bar(0, "00:38", "1.35s/it") + "WARNING ⚠️ NMS time limit 2.100s exceeded\n"
            "                   all         72        945      0.274      0.516      0.393      0.155\n"
            "                   RBC         72        805      0.358      0.358      0.285     0.0722\n"
            "Speed: 2.2ms pre-process, 131.4ms inference, 78.0ms NMS per image at shape (32, 3, 640, 640)\n")
    row = upstream_compare.parse_output(text, train_img=320)
    assert row == {"nms_time_limit_warnings": 1, "pre_ms": 2.2, "inf_ms": 131.4, "nms_ms": 78.0,
                   "metrics": "0.274 0.516 0.393 0.155", "s_per_iter": 2.0}  # 38 s / 19 iterations, not tqdm's 1.35
    epochs = bar(0, "01:40", "9.0s/it") + bar(1, "00:19", "1.1s/it") + bar(2, "1:00:38", "1.2s/it")
    parse = upstream_compare.parse_output
    assert parse(epochs, 320)["s_per_iter"] == pytest.approx((19 + 3638) / 38)  # epoch 0 left out
    assert parse(bar(0, "00:00", "2.00it/s"), 320)["s_per_iter"] == 0.5  # under 1 s: tqdm's rate
    assert "s_per_iter" not in upstream_compare.parse_output(text, train_img=640)


def test_upstream_compare_end_to_end_against_a_stand_in(tiny_data, tmp_path):
    """The whole comparison with this repository standing in for upstream (a git-checkout layout): weights
    converted into a pickled model and back, a private data copy, three tasks, one report."""
    data = check_dataset(tiny_data)
    weights = e2e.random_checkpoint("yolov5n.yaml", data, tmp_path / "random.pt")
    cmd = [sys.executable, "-m", "benchmarks", "upstream", "--upstream-python", sys.executable, "--upstream-root",
           str(ROOT), "--weights", str(weights), "--data", str(tiny_data), "--cfg", "yolov5n.yaml", "--img",
           str(SIZE), "--train-img", str(SIZE), "--repeats", "1", "--project", str(tmp_path / "cmp")]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "cmp/upstream_compare.csv")))
    assert [(r["task"], r["who"]) for r in rows] == [(t, w) for t in ("val", "detect", "train")
                                                     for w in ("ours", "upstream")]
    assert all(r["status"] == "ok" and float(r["wall_s"]) > 0 for r in rows)
    val = [r for r in rows if r["task"] == "val"]
    assert val[0]["metrics"] and val[0]["metrics"] == val[1]["metrics"]  # same weights through the pickle
    assert all(float(r["inf_ms"]) > 0 for r in rows if r["task"] != "train")
    assert all(float(r["s_per_iter"]) > 0 for r in rows if r["task"] == "train")
    copy = tmp_path / "cmp/upstream_data"
    assert (copy / "images/val").is_symlink() and not (copy / "labels/val").is_symlink()  # labels: own copy
    report = (tmp_path / "cmp/upstream_compare.md").read_text()
    assert "| task | upstream / ours, whole command |" in report and "| train |" in report
