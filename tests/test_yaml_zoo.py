"""Every shipped model YAML builds and takes a training step (new YAMLs are picked up automatically).

Folding and ONNX parity of every YAML are checked in test_export.py; the families' own tests check folding at 1e-5.
Models above 100M parameters run on the meta device here (wiring and shapes of the forward pass in train and eval
mode, without compute); their blocks train for real in the smaller YAMLs of the same family.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.yolo import DetectionModel
from tests.helpers import ROOT, n_params
from utils.loss import ComputeLoss

YAMLS = sorted(p.name for p in (ROOT / "models").glob("*.yaml"))
HYP = {"box": 0.05, "cls": 0.5, "cls_pw": 1.0, "obj": 1.0, "obj_pw": 1.0, "anchor_t": 4.0, "fl_gamma": 0.0}


def test_zoo_is_complete():
    expected = {"yolov5n.yaml", "yolov5s.yaml", "yolov5m.yaml", "yolov5l.yaml", "yolov5x.yaml", "yolov5_RepLKNet.yaml",
                "yolov5_RevCol.yaml", "yolov5_GFPN.yaml", "yolov5s_GFPN.yaml", "yolov5s_RepGhost.yaml",
                "yolov5s_RepVGG.yaml", "yolov5_RepVGG-A0.yaml"}
    assert expected <= set(YAMLS)


HUGE = 100e6


def meta_forward(name: str) -> None:
    with torch.device("meta"), torch.no_grad():
        model = DetectionModel(name, nc=3, verbose=False)
        raw = model.train()(torch.rand(2, 3, 256, 256))
        pred, _ = model.eval()(torch.rand(1, 3, 256, 256))
    assert [256 // r.shape[-2] for r in raw] == [8, 16, 32][: len(raw)] + [64] * (len(raw) - 3)
    assert all(r.shape[1:2] == (3,) and r.shape[-1] == 8 for r in raw)
    assert pred.shape == (1, sum(3 * r.shape[-2] * r.shape[-3] for r in raw), 8)


@pytest.mark.parametrize("name", YAMLS)
def test_yaml_trains(name):
    with torch.device("meta"):
        size = n_params(DetectionModel(name, nc=3, verbose=False))
    if size > HUGE:
        return meta_forward(name)
    torch.manual_seed(0)
    model = DetectionModel(name, nc=3, verbose=False)
    stride = int(model.stride.max())
    x = torch.rand(2, 3, 2 * stride, 2 * stride)
    targets = torch.tensor([[0, 1, 0.5, 0.5, 0.4, 0.3], [1, 2, 0.3, 0.6, 0.2, 0.5]])
    model.hyp = HYP
    model.train()
    loss, items = ComputeLoss(model)(model(x), targets)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    trainable = [p for p in model.parameters() if p.requires_grad]
    with_grad = sum(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in trainable)
    assert with_grad >= 0.9 * len(trainable), f"{with_grad}/{len(trainable)} parameters received gradients"


NEW_FAMILIES_SMALL = ["yolov5_RepLKNet-tiny.yaml", "yolov5_RevCol.yaml", "yolov5s_timm-repvgg_a0.yaml",
                      "yolov5_RepVGG-A0.yaml", "yolov5s_RepVGG.yaml", "yolov5n_RepGhost.yaml", "yolov5s_GFPN.yaml"]


def test_new_families_train_detect_export_through_the_scripts(tmp_path):
    """train.py (one epoch and its final validation), detect.py and export.py --include onnx (with its parity check)
    on a tiny set, through `python -m benchmarks zoo-epoch`, for the small YAML of each new family; the large YAMLs are
    run the same way in docs/BENCHMARKS.md."""
    out = subprocess.run([sys.executable, "-m", "benchmarks", "zoo-epoch", "--models", *NEW_FAMILIES_SMALL, "--project",
                          str(tmp_path / "runs"), "--csv", str(tmp_path / "zoo.csv"), "--md", str(tmp_path / "zoo.md")],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    rows = list(csv.DictReader(open(tmp_path / "zoo.csv")))
    assert [r["model"] for r in rows] == NEW_FAMILIES_SMALL, out.stdout[-2000:] + out.stderr[-2000:]
    for row in rows:
        assert row["status"] == "ok", row
        assert all(float(row[f"{step}_s"]) > 0 for step in ("train", "detect", "export"))
        assert float(row["peak_rss_gib"]) > 0.1 and " parameters" in row["summary"]
        run = tmp_path / "runs" / Path(row["model"]).stem
        assert (run / "weights" / "best.pt").is_file() and (run / "weights" / "best.onnx").is_file()
        assert len(list((run / "detect").glob("*.jpg"))) == 2  # the two val images, annotated
    assert out.returncode == 0 and "| yolov5_RevCol.yaml | ok |" in (tmp_path / "zoo.md").read_text()
