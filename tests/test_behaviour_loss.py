"""ComputeLoss against upstream v7.0's numbers (../shared/fixtures/behaviour/loss.pt, README section 1).

Covers all 30 loss cases (three target sets, label smoothing, focal loss, 3 and 80 classes), the
target assignment of the mixed set (order, neighbour cells, clamping) and the loss gradients.
"""

import pytest
import torch
from torch import nn

from tests.helpers import ROOT
from utils.loss import ComputeLoss

FIXTURE = ROOT.parent / "shared/fixtures/behaviour/loss.pt"


@pytest.fixture(scope="module")
def fixture() -> dict:
    assert FIXTURE.is_file(), f"behaviour fixture missing: {FIXTURE}"  # a missing fixture fails, never skips
    return torch.load(FIXTURE, weights_only=True)


class Head(nn.Module):
    """The attributes ComputeLoss reads from a Detect layer: anchors in grid units and strides."""

    def __init__(self, nc: int, anchors: torch.Tensor, stride: torch.Tensor):
        super().__init__()
        self.nc, self.nl, self.na = nc, anchors.shape[0], anchors.shape[1]
        self.register_buffer("anchors", anchors.float().clone())
        self.register_buffer("stride", stride.float().clone())
        self.scale = nn.Parameter(torch.ones(1))  # ComputeLoss takes its device from the parameters


class Model(nn.Module):
    def __init__(self, head: Head, hyp: dict):
        super().__init__()
        self.model = nn.Sequential(head)
        self.hyp = dict(hyp)


def make_loss(fixture: dict, nc_key: str, hyp_name: str) -> ComputeLoss:
    out = fixture["outputs"]
    nc = int(nc_key[2:])
    head = Head(nc, out[f"detect_anchors_grid_{nc_key}"], torch.as_tensor(out[f"detect_stride_{nc_key}"]))
    return ComputeLoss(Model(head, fixture["inputs"]["hyps"][nc_key][hyp_name]))


def predictions(fixture: dict, nc_key: str) -> list[torch.Tensor]:
    inputs = fixture["inputs"]
    return [q.float() / inputs["preds_divisor"] for q in inputs["preds_q"][nc_key]]


def test_fixture_layout(fixture):
    inputs = fixture["inputs"]
    assert inputs["batch_size"] == 4 and list(inputs["strides"]) == [8, 16, 32]
    assert len(fixture["outputs"]["cases"]) == 30
    anchors = torch.as_tensor(inputs["anchors_px"]).float().view(3, 3, 2)
    grid = anchors / torch.tensor([8.0, 16.0, 32.0]).view(3, 1, 1)
    assert torch.equal(fixture["outputs"]["detect_anchors_grid_nc3"], grid)


CASE_IDS = [
    f"{nc}-{targets}-{hyp}"
    for nc in ("nc3", "nc80")
    for targets in ("mixed", "sparse", "none")
    for hyp in ("yaml", "train", "train_ls0.1", "train_fl1.5", "train_ls0.1_fl1.5")
]


@pytest.mark.parametrize("index", range(30), ids=CASE_IDS)
def test_loss_case(fixture, index):
    case = fixture["outputs"]["cases"][index]
    assert CASE_IDS[index] == f"{case['nc']}-{case['targets']}-{case['hyp']}"
    loss_fn = make_loss(fixture, case["nc"], case["hyp"])
    targets = fixture["inputs"]["targets"][case["nc"]][case["targets"]]
    total, items = loss_fn(predictions(fixture, case["nc"]), targets)
    assert total.shape == (1,) and items.shape == (3,) and not items.requires_grad
    torch.testing.assert_close(items, case["items"], rtol=1e-5, atol=0)
    assert total.item() == pytest.approx(case["loss"], rel=1e-5, abs=0)


def test_build_targets(fixture):
    nc_key, target_key = fixture["inputs"]["build_targets_case"]
    expected = fixture["outputs"]["build_targets"]
    preds = predictions(fixture, nc_key)
    tcls, tbox, indices, anchors = make_loss(fixture, nc_key, "train").build_targets(
        preds, fixture["inputs"]["targets"][nc_key][target_key]
    )
    assert [len(c) for c in tcls] == [168, 170, 81]
    for level in range(3):
        assert torch.equal(tcls[level], expected["tcls"][level])
        assert len(indices[level]) == 4
        for got, want in zip(indices[level], expected["indices"][level]):
            assert got.dtype == torch.int64 and torch.equal(got, want)
        torch.testing.assert_close(tbox[level], expected["tbox"][level], rtol=0, atol=1e-6)
        torch.testing.assert_close(anchors[level], expected["anchors"][level], rtol=0, atol=1e-6)


def test_gradients(fixture):
    (grad_case,) = fixture["outputs"]["grads"]
    preds = [p.requires_grad_() for p in predictions(fixture, grad_case["nc"])]
    loss_fn = make_loss(fixture, grad_case["nc"], grad_case["hyp"])
    total, _ = loss_fn(preds, fixture["inputs"]["targets"][grad_case["nc"]][grad_case["targets"]])
    total.sum().backward()
    for pred, want in zip(preds, grad_case["grad"]):
        got = pred.grad
        # README tolerance: abs 1e-9 or rel 1e-4, whichever is looser, element by element
        assert ((got - want).abs() <= torch.maximum(torch.full_like(want, 1e-9), 1e-4 * want.abs())).all()
