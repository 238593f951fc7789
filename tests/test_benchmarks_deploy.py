"""The deploy task: a one-epoch yolov5n trained by the task itself, exported at two small sizes in FP32 and INT8,
scored and timed in all five forms; and the delta / speed-up / flag arithmetic on hand-made rows."""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys

import pytest
import yaml

from benchmarks import deploy
from benchmarks.__main__ import TASKS
from tests.helpers import ROOT
from utils.general import UserInputError
from utils.synthetic import CLASS_NAMES, generate_shapes

SIZES = (64, 96)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """4 train / 2 val synthetic images at 64 px and their data YAML."""
    root = tmp_path_factory.mktemp("deploy_data")
    generate_shapes(root / "shapes", n_train=4, n_val=2, imgsz=SIZES[0], seed=0)
    data = root / "tiny.yaml"
    data.write_text(yaml.safe_dump({"path": str(root / "shapes"), "train": "images/train", "val": "images/val",
                                    "names": dict(enumerate(CLASS_NAMES))}))
    return data


def test_deploy_task_trains_exports_and_reports_five_forms(tiny_data, tmp_path):
    argv = ["--train", "--models", "yolov5n.yaml", "--epochs", "1", "--batch-size", "2", "--img", str(SIZES[0]),
            "--sizes", *map(str, SIZES), "--data", str(tiny_data), "--calib-images", "2", "--runs", "2",
            "--warmup", "1", "--threads", "1", "--val-batch", "2", "--workers", "1", "--project", str(tmp_path)]
    # --workers 1: val.py's loader processes start and end in the process that has run the OpenVINO models
    out = subprocess.run([sys.executable, "-m", "benchmarks", "deploy", *argv], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    with open(tmp_path / "results.csv", newline="") as f:
        rows = {r["form"]: r for r in csv.DictReader(f)}
    assert list(rows) == [label for label, _, _ in deploy.FORMS.values()]
    for label, row in rows.items():
        assert row["model"] == "yolov5n" and not row["error"], row
        assert 0 <= float(row["map50_95"]) <= float(row["map50"]) <= 1, label
        assert all(float(row[f"ms_{s}"]) > 0 for s in SIZES), label
    for label in ("ONNX Runtime INT8", "OpenVINO INT8"):
        assert all(float(rows[label][f"speedup_vs_ort_fp32_{s}"]) > 0 for s in SIZES)
        assert rows[label]["delta_map_points"] != ""
    assert rows["PyTorch folded"]["delta_map_points"] == ""
    for size in SIZES:  # one fixed-shape export set per size
        assert (tmp_path / "yolov5n" / str(size) / "best_int8_openvino_model").is_dir()
        assert (tmp_path / "yolov5n" / str(size) / "best_int8.onnx").is_file()

    report = (tmp_path / "report.md").read_text()
    for text in ("command: python -m benchmarks", "| model | form | mAP@0.5:0.95 @64 | ms@64 | ms@96 |",
                 "delta mAP vs its FP32", "| yolov5n | OpenVINO INT8 |", "INT8 forms losing more than 1 point",
                 "INT8 check: found @IoU 0.9 / 0.5"):
        assert text in report, text


def test_compare_flags_int8_losses_and_speedups():
    opt = argparse.Namespace(sizes=[320], flag_points=1.0)
    maps = {"pytorch": 0.50, "ort-fp32": 0.50, "ov-fp32": 0.49, "ort-int8": 0.485, "ov-int8": 0.488}
    ms = {"pytorch": 40.0, "ort-fp32": 20.0, "ov-fp32": 15.0, "ort-int8": 10.0, "ov-int8": 8.0}
    rows = {f: {"model": "m", "form": f, "map50_95": maps[f], "ms_320": ms[f]} for f in deploy.FORMS}
    deploy.compare(rows, opt)
    assert rows["ort-int8"]["delta_map_points"] == pytest.approx(-1.5)
    assert rows["ort-int8"]["flag"] == "INT8 loses 1.5 points"
    assert rows["ov-int8"]["delta_map_points"] == pytest.approx(-0.2) and "flag" not in rows["ov-int8"]
    assert rows["ov-fp32"]["delta_map_points"] == pytest.approx(-1.0) and "flag" not in rows["ov-fp32"]
    assert rows["ort-int8"]["speedup_vs_ort_fp32_320"] == pytest.approx(2.0)
    assert rows["ov-int8"]["speedup_vs_ort_fp32_320"] == pytest.approx(2.5)
    assert "delta_map_points" not in rows["pytorch"] and "speedup_vs_ort_fp32_320" not in rows["ort-fp32"]
    report = "\n".join(deploy.report_lines(list(rows.values()), argparse.Namespace(
        sizes=[320], img=320, flag_points=1.0, data="d.yaml", threads=2, runs=3, warmup=1), []))
    assert "- **m, ort-int8**: INT8 loses 1.5 points of mAP@0.5:0.95 (0.485)" in report


def test_agreement_column_shows_both_shares_of_int8_rows_only():
    assert deploy.agreement_text({"agreement_iou_0.9": 0.8612, "agreement_iou_0.5": 0.99}) == "86.1% / 99.0%"
    assert deploy.agreement_text({"form": "pytorch"}) == ""


def test_deploy_options_need_checkpoints_and_are_registered():
    with pytest.raises(UserInputError, match="--weights"):
        deploy.parse_opt([])
    with pytest.raises(UserInputError, match="cannot be combined"):
        deploy.parse_opt(["--train", "--weights", "a.pt"])
    assert TASKS["deploy"][0] == "deploy" and TASKS["gpu"][0] == "gpu"
