"""Every shipped model YAML builds and takes a training step (new YAMLs are picked up automatically).

Folding and ONNX parity of every YAML are checked in test_export.py; the families' own tests check folding at 1e-5.
Models above 100M parameters run on the meta device here (wiring and shapes of the forward pass in train and eval
mode, without compute); their blocks train for real in the smaller YAMLs of the same family.
"""

from __future__ import annotations

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
