"""Detect head decode against upstream v7.0's numbers (../shared/fixtures/behaviour/detect.pt, README section 8).

The fixture gives the head's 1x1-conv outputs; the tests swap the convs for identities so the decode sees them
unchanged, and check both decode paths (in place and concatenating), the export output and the training maps.
"""

import pytest
import torch
import torch.nn as nn

from models.yolo import Detect, DetectionModel
from tests.helpers import ROOT

FIXTURE = ROOT.parent / "shared/fixtures/behaviour/detect.pt"


@pytest.fixture(scope="module")
def fixture() -> dict:
    assert FIXTURE.is_file(), f"behaviour fixture missing: {FIXTURE}"  # a missing fixture fails, never skips
    return torch.load(FIXTURE, weights_only=True)


def fixture_head(fixture: dict, inplace: bool) -> Detect:
    """A Detect with the fixture's classes, anchors and strides whose convs pass their input through."""
    inp = fixture["inputs"]
    head = Detect(nc=inp["nc"], anchors=fixture["common"]["anchors_list"], ch=[r.shape[1] for r in inp["raw"]],
                  inplace=inplace)
    head.m = nn.ModuleList(nn.Identity() for _ in inp["raw"])
    head.stride.copy_(torch.tensor(inp["strides"]))
    head.set_anchors_px(inp["anchors_px"])
    return head


def assert_decoded_matches(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape == (2, 1260, 8)
    torch.testing.assert_close(got[..., :4], want[..., :4], rtol=0, atol=1e-4)  # pixel boxes
    torch.testing.assert_close(got[..., 4:], want[..., 4:], rtol=0, atol=1e-6)  # probabilities


@pytest.mark.parametrize("inplace", [True, False])
def test_decode_matches_upstream(fixture, inplace):
    head = fixture_head(fixture, inplace).eval()
    raw = fixture["inputs"]["raw"]
    with torch.no_grad():
        decoded, maps = head([r.clone() for r in raw])
    assert_decoded_matches(decoded, fixture["outputs"]["decoded"])
    torch.testing.assert_close(head.anchors, fixture["outputs"]["anchors_grid"], rtol=0, atol=0)
    for m, r in zip(maps, raw):  # raw maps: (bs, na, ny, nx, no), channel = anchor * no + field
        b, _, ny, nx = r.shape
        assert torch.equal(m, r.view(b, 3, 8, ny, nx).permute(0, 1, 3, 4, 2))


def test_export_output_and_training_maps(fixture):
    head = fixture_head(fixture, inplace=False).eval()
    raw = fixture["inputs"]["raw"]
    head.export = True
    with torch.no_grad():
        out = head(list(raw))
    assert isinstance(out, tuple) and len(out) == 1
    assert_decoded_matches(out[0], fixture["outputs"]["decoded"])
    head.export = False
    maps = head.train()(list(raw))
    assert [tuple(m.shape) for m in maps] == [(2, 3, 16, 20, 8), (2, 3, 8, 10, 8), (2, 3, 4, 5, 8)]


def test_cached_offsets_follow_the_map_size(fixture):
    """A second input size rebuilds the cell offsets; returning to the first size decodes as before."""
    head = fixture_head(fixture, inplace=True).eval()
    raw = fixture["inputs"]["raw"]
    small = [r[..., : r.shape[-2] // 2, : r.shape[-1] // 2].contiguous() for r in raw]
    with torch.no_grad():
        head([r.clone() for r in raw])
        part, _ = head([r.clone() for r in small])
        full, _ = head([r.clone() for r in raw])
    assert_decoded_matches(full, fixture["outputs"]["decoded"])
    want = fixture["outputs"]["decoded"][:, :960].view(2, 3, 16, 20, 8)[:, :, :8, :10].reshape(2, -1, 8)
    torch.testing.assert_close(part[:, :240], want, rtol=0, atol=1e-4)  # level 0: the grid's top-left quarter


def test_model_bias_priors():
    """Objectness starts near 8 objects per 640x640 image per level; classes near 0.6 / (nc - 0.99999)."""
    torch.manual_seed(0)
    model = DetectionModel("yolov5n.yaml", nc=3, verbose=False)
    head = model.model[-1]
    for conv, stride in zip(head.m, head.stride.tolist()):
        bias = conv.bias.detach().view(head.na, head.no)
        bound = 1 / (conv.in_channels**0.5)  # PyTorch's default uniform init of a 1x1 conv's bias
        obj_prior = torch.tensor(8 / (640 / stride) ** 2).log()
        cls_prior = torch.tensor(0.6 / (3 - 0.99999)).log()
        assert ((bias[:, 4] - obj_prior).abs() <= bound).all()
        assert ((bias[:, 5:] - cls_prior).abs() <= bound).all()
        assert (bias[:, :4].abs() <= bound).all()


def test_model_bias_priors_from_class_counts():
    torch.manual_seed(0)
    model = DetectionModel("yolov5n.yaml", nc=3, verbose=False)
    before = [conv.bias.detach().clone() for conv in model.model[-1].m]
    counts = torch.tensor([10.0, 30.0, 60.0])
    model._initialize_biases(model.stride.tolist(), class_freq=counts)
    head = model.model[-1]
    for conv, old, stride in zip(head.m, before, head.stride.tolist()):
        added = (conv.bias.detach() - old).view(head.na, head.no)
        torch.testing.assert_close(added[:, 5:], (counts / 100).log().expand(head.na, 3))
        torch.testing.assert_close(added[:, 4], torch.full((head.na,), 8 / (640 / stride) ** 2).log())
        assert torch.equal(added[:, :4], torch.zeros(head.na, 4))


def test_tta_keeps_the_expected_levels_and_maps_boxes_back():
    """Full-size view without its coarsest level, the mirrored 0.83 view whole, the 0.67 view without its finest."""
    torch.manual_seed(0)
    model = DetectionModel("yolov5n.yaml", nc=2, verbose=False).eval()
    x = torch.rand(1, 3, 96, 128)
    with torch.no_grad():
        pred, extra = model(x, augment=True)
        plain, _ = model(x)
    assert extra is None

    def rows(h, w):  # decoded rows per level of an input padded to a multiple of 32
        return [3 * (h // s) * (w // s) for s in (8, 16, 32)]

    full, mid, small = rows(96, 128), rows(96, 128), rows(96, 96)  # 80x106 and 64x85 views, padded up to 32
    assert pred.shape == (1, sum(full[:2]) + sum(mid) + sum(small[1:]), 7)
    torch.testing.assert_close(pred[:, : sum(full[:2])], plain[:, : sum(full[:2])])  # the first view is x itself
    mirrored = pred[:, sum(full[:2]): sum(full[:2]) + sum(mid)]
    assert mirrored[..., 0].min() > -64 and mirrored[..., 0].max() < 128 + 64  # centres mapped back to x's pixels
