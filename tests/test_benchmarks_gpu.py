"""The gpu task on a CPU machine: the one-line refusal without CUDA, the TensorRT and ONNX Runtime CUDA skip logic,
and the report writer."""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys

import pytest
import torch

from benchmarks import gpu
from tests.helpers import ROOT

NO_TENSORRT = importlib.util.find_spec("tensorrt") is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_one_line_error_and_exit_2():
    out = subprocess.run([sys.executable, "-m", "benchmarks", "gpu"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2
    lines = (out.stdout + out.stderr).strip().splitlines()
    assert lines == [f"ERROR: {gpu.NO_CUDA}"]


@pytest.mark.skipif(not NO_TENSORRT, reason="tensorrt is installed")
def test_tensorrt_absent_is_skipped_and_refused_export_is_not_available(tmp_path):
    opt = argparse.Namespace(project=tmp_path, img=64, runs=2)
    row = gpu.tensorrt_step(tmp_path / "best.pt", opt)
    assert row["status"] == "skipped" and "tensorrt" in row["detail"] and "\n" not in row["detail"]
    # as if tensorrt imported: export.py itself refuses engines today, and that one line is what gets recorded
    row = gpu.tensorrt_step(tmp_path / "best.pt", opt, missing=lambda module: None)
    assert row["status"] == "not available"
    assert row["detail"].startswith("ERROR: --include engine: TensorRT engines are not written")
    assert (tmp_path / "export-engine.log").is_file()


def test_onnxruntime_cuda_provider_skip(tmp_path, monkeypatch):
    opt = argparse.Namespace(project=tmp_path, img=64, runs=2)
    monkeypatch.setattr(gpu, "cuda_provider_missing", lambda: "onnxruntime 0 has no CUDAExecutionProvider")
    row = gpu.ort_cuda_step(tmp_path / "best.pt", opt)
    assert row == gpu.step("ONNX Runtime CUDAExecutionProvider", "skipped",
                           detail="onnxruntime 0 has no CUDAExecutionProvider")
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        monkeypatch.undo()
        assert "CUDAExecutionProvider" in gpu.cuda_provider_missing()


def test_report_lists_figures_and_skips():
    opt = argparse.Namespace(data="data/shapes.yaml", img=320, epochs=1, batch_size=16, runs=20)
    rows = [gpu.step("train yolov5s (AMP)", "ok", "12.0 s wall"),
            gpu.step("TensorRT (export.py --include engine)", "skipped", detail="tensorrt is not installed"),
            gpu.step("val.py --half", "failed", detail="ERROR: something")]
    lines = gpu.report_lines(["command: python -m benchmarks gpu"], rows, [], opt)
    text = "\n".join(lines)
    assert "| train yolov5s (AMP) | ok | 12.0 s wall | - |" in text
    assert "| val.py --half | failed | - | ERROR: something |" in text
    assert "- TensorRT (export.py --include engine): skipped: tensorrt is not installed" in text
    assert "not run (--no-large-kernel)" in text
    assert gpu.guarded("x", lambda: 1 / 0) == gpu.step("x", "failed", detail="ZeroDivisionError: division by zero")


def test_run_writes_report_when_steps_are_stubbed(tmp_path, monkeypatch):
    """The run's flow without a GPU: trained weights missing for the second model, every later step stubbed."""
    first = tmp_path / "train" / "yolov5s" / "weights" / "best.pt"
    first.parent.mkdir(parents=True)
    first.touch()

    def fake_train(cfg, opt):
        stem = cfg.removesuffix(".yaml")
        row = gpu.step(f"train {stem} (AMP)", "ok" if stem == "yolov5s" else "failed")
        return row, opt.project / "train" / stem / "weights" / "best.pt"

    monkeypatch.setattr(gpu, "train_step", fake_train)
    monkeypatch.setattr(gpu, "half_steps", lambda w, opt: [gpu.step("val.py --half", "ok", "1.0 ms")])
    monkeypatch.setattr(gpu, "ort_cuda_step", lambda w, opt: 1 / 0)
    monkeypatch.setattr(gpu, "tensorrt_step", lambda w, opt: gpu.step("TensorRT", "skipped", detail="absent"))
    monkeypatch.setattr(gpu, "device_line", lambda: "GPU: stand-in")
    opt = gpu.parse_opt(["--models", "yolov5s.yaml", "yolov5n_RepGhost.yaml", "--no-large-kernel", "--project",
                         str(tmp_path)])
    rows = gpu.run(opt)
    assert [r["status"] for r in rows] == ["ok", "failed", "ok", "failed", "skipped"]
    report = (tmp_path / "report.md").read_text()
    assert "GPU: stand-in" in report and "ZeroDivisionError" in report and "- TensorRT: skipped: absent" in report
