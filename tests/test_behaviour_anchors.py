"""AutoAnchor metrics and the anchor-order check against upstream v7.0's numbers
(../shared/fixtures/behaviour/anchors.pt, README section 7): label sizes with and without the per-image scale,
best possible recall and anchors above threshold for nine cases, the full check's decision, and the order cases.
"""

import logging
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

from models.yolo import Detect, check_anchor_order
from tests.helpers import ROOT
from utils.autoanchor import best_possible_recall, check_anchors, label_sizes

FIXTURE = ROOT.parent / "shared/fixtures/behaviour/anchors.pt"


@pytest.fixture(scope="module")
def fixture() -> dict:
    assert FIXTURE.is_file(), f"behaviour fixture missing: {FIXTURE}"  # a missing fixture fails, never skips
    return torch.load(FIXTURE, weights_only=True)


@pytest.fixture(scope="module")
def dataset(fixture) -> SimpleNamespace:
    """The BCCD labels as a dataset object: ``shapes`` (w, h) per image and ``labels`` (class, x, y, w, h) rows."""
    inp = fixture["inputs"]
    return SimpleNamespace(shapes=inp["shapes_wh"].numpy(), labels=[lb.numpy() for lb in inp["labels"]])


def scale_of(fixture: dict, name: str) -> np.ndarray | None:
    return fixture["inputs"]["random_scale"].numpy() if name == "random" else None


@pytest.mark.parametrize("scale", ["none", "random"])
def test_label_sizes(fixture, dataset, scale):
    wh = label_sizes(dataset, fixture["inputs"]["img_size"], scale_of(fixture, scale))
    want = fixture["outputs"]["wh"][scale].numpy()
    assert wh.shape == want.shape == (2804, 2)
    np.testing.assert_allclose(wh, want, rtol=0, atol=1e-4)


def test_best_possible_recall_and_anchors_above_threshold(fixture, dataset):
    inp = fixture["inputs"]
    anchors = inp["anchors_px"].view(-1, 2).numpy()
    assert len(inp["metric_cases"]) == len(fixture["outputs"]["metric"]) == 9
    for case, want in zip(inp["metric_cases"], fixture["outputs"]["metric"]):
        wh = label_sizes(dataset, inp["img_size"], scale_of(fixture, case["scale"]))
        bpr, aat = best_possible_recall(wh, anchors * case["anchor_multiplier"], case["thr"])
        assert bpr == pytest.approx(want["bpr"], abs=1e-6), case
        assert aat == pytest.approx(want["aat"], abs=1e-6), case


class HeadOnly(nn.Module):
    """``model.model[-1]`` is a Detect head at strides 8/16/32 with the fixture's default anchors."""

    def __init__(self, anchors_px: torch.Tensor):
        super().__init__()
        head = Detect(nc=3, anchors=anchors_px.view(3, 6).tolist(), ch=(4, 4, 4))
        head.stride.copy_(torch.tensor([8.0, 16.0, 32.0]))
        head.set_anchors_px(anchors_px)
        self.model = nn.Sequential(head)


@pytest.mark.parametrize("case", [0, 1])
def test_check_keeps_default_anchors(fixture, dataset, caplog, case):
    """The full check on BCCD at 416 px, per-image scales all 1 or the fixture's draw: the numbers of upstream's
    log line (6.13 anchors per label, BPR 1.000) and the anchors left unchanged."""
    inp, want = fixture["inputs"], fixture["outputs"]["check_anchors_log"][case]
    model = HeadOnly(inp["anchors_px"])
    before = model.model[-1].anchors.clone()
    scale = scale_of(fixture, want["scale"])
    with caplog.at_level(logging.INFO, logger="yolov5"):
        check_anchors(dataset, model, thr=4.0, imgsz=inp["img_size"],
                      scale=np.ones((len(dataset.shapes), 1)) if scale is None else scale)
    aat, bpr = re.search(r"([\d.]+) anchors/target, ([\d.]+) Best Possible Recall", want["log"]).groups()
    line = next(m for m in caplog.messages if "best possible recall" in m)
    assert f"best possible recall {bpr} with {aat} anchors per label" in line
    assert "stay as they are" in line
    assert want["anchors_unchanged"] and torch.equal(model.model[-1].anchors, before)


def test_order_cases(fixture):
    for name, case in fixture["inputs"]["order_cases"].items():
        want = fixture["outputs"]["order"][name]
        m = SimpleNamespace(anchors=case["anchors"].clone(), stride=case["stride"].clone())
        assert check_anchor_order(m) is want["reversed"], name
        assert torch.equal(m.anchors, want["anchors_after"]), name
