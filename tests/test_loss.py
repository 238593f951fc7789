"""ComputeLoss: target assignment on a hand case, loss assembly, and that optimising a tiny head lowers it."""

import ast
import inspect
import math
import textwrap

import pytest
import torch
from torch import nn

from utils.boxes import bbox_iou
from utils.loss import ComputeLoss, FocalLoss, smooth_BCE

HYP = dict(box=0.05, obj=1.0, cls=0.5, cls_pw=1.0, obj_pw=1.0, anchor_t=4.0, fl_gamma=0.0)
ANCHORS_PX = ((10, 13, 16, 30, 33, 23), (30, 61, 62, 45, 59, 119), (116, 90, 156, 198, 373, 326))
STRIDES = (8.0, 16.0, 32.0)


class FakeDetect(nn.Module):
    """Detect-like head: 1x1 convs on per-level features, training-mode output (bs, na, ny, nx, no)."""

    def __init__(self, nc=3, channels=8):
        super().__init__()
        self.nc, self.no, self.nl, self.na = nc, nc + 5, len(STRIDES), 3
        self.register_buffer("stride", torch.tensor(STRIDES))
        anchors = torch.tensor(ANCHORS_PX, dtype=torch.float32).view(self.nl, self.na, 2)
        self.register_buffer("anchors", anchors / self.stride.view(-1, 1, 1))  # grid units
        self.m = nn.ModuleList(nn.Conv2d(channels, self.na * self.no, 1) for _ in STRIDES)

    def forward(self, features):
        out = []
        for conv, x in zip(self.m, features):
            bs, _, ny, nx = x.shape
            out.append(conv(x).view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous())
        return out


class FakeModel(nn.Module):
    def __init__(self, nc=3, hyp=None):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), FakeDetect(nc))
        self.hyp, self.nc = dict(hyp or HYP), nc


def zero_preds(bs=2, img=64, nc=3):
    return [torch.zeros(bs, 3, img // int(s), img // int(s), nc + 5) for s in STRIDES]


# image 0, class 1, a 16x16 px box centred at (19.2, 38.4) in a 64x64 image
ONE_TARGET = torch.tensor([[0.0, 1.0, 0.3, 0.6, 0.25, 0.25]])


def test_build_targets_hand_case():
    loss = ComputeLoss(FakeModel())
    tcls, tbox, indices, anch = loss.build_targets(zero_preds(), ONE_TARGET)
    # P3 (8x8 grid): centre (2.4, 4.8), size (2, 2): all 3 anchors within ratio 4; x is near its
    # left cell edge -> left neighbour (gi 1); y is near its lower edge -> lower neighbour (gj 5)
    b, a, gj, gi = indices[0]
    assert a.tolist() == [0, 1, 2] * 3
    assert gi.tolist() == [2, 2, 2, 1, 1, 1, 2, 2, 2]
    assert gj.tolist() == [4, 4, 4, 4, 4, 4, 5, 5, 5]
    assert b.tolist() == [0] * 9 and tcls[0].tolist() == [1] * 9
    expected_xy = torch.tensor([[0.4, 0.8]] * 3 + [[1.4, 0.8]] * 3 + [[0.4, -0.2]] * 3)
    assert torch.allclose(tbox[0][:, :2], expected_xy, atol=1e-5)
    assert torch.allclose(tbox[0][:, 2:], torch.full((9, 2), 2.0))
    assert torch.allclose(anch[0], loss.anchors[0].repeat(3, 1))
    # P4 (4x4): centre (1.2, 2.4), size (1, 1): the third anchor (7.4x taller) is rejected; x and y
    # both near their left/upper edges -> left (gi 0) and upper (gj 1) neighbours
    b, a, gj, gi = indices[1]
    assert a.tolist() == [0, 1] * 3
    assert gi.tolist() == [1, 1, 0, 0, 1, 1]
    assert gj.tolist() == [2, 2, 2, 2, 1, 1]
    # P5 (2x2): size (0.5, 0.5) is over 4x smaller than every anchor
    assert len(indices[2][0]) == 0 and tbox[2].shape == (0, 4)


def test_build_targets_border_cells_have_no_outside_neighbour():
    loss = ComputeLoss(FakeModel())
    target = torch.tensor([[1.0, 0.0, 0.05, 0.05, 0.2, 0.2]])  # image 1, top-left corner cell of P3
    b, _, gj, gi = loss.build_targets(zero_preds(), target)[2][0]
    assert gi.tolist() == [0, 0, 0] and gj.tolist() == [0, 0, 0] and b.tolist() == [1, 1, 1]


def test_loss_value_at_zero_logits():
    """With all logits 0 every BCE term is log 2, and the box term is 1 - CIoU of anchor-sized boxes."""
    loss = ComputeLoss(FakeModel())
    preds = zero_preds(bs=2)
    total, items = loss(preds, ONE_TARGET)
    _, tbox, _, anch = loss.build_targets(preds, ONE_TARGET)
    lbox = sum(
        (1 - bbox_iou(torch.cat((torch.full_like(a, 0.5), a), 1), t, CIoU=True)).mean()
        for t, a in zip(tbox[:2], anch[:2])
    )
    expected = torch.tensor([lbox * HYP["box"], math.log(2) * 5.4 * HYP["obj"], math.log(2) * 2 * HYP["cls"]])
    assert torch.allclose(items, expected, atol=1e-5)
    assert total.shape == (1,) and total.item() == pytest.approx(2 * expected.sum().item(), rel=1e-5)
    assert not items.requires_grad


def test_no_targets_and_single_class():
    loss = ComputeLoss(FakeModel(nc=1))
    total, items = loss(zero_preds(nc=1), torch.zeros(0, 6))
    assert items[0] == 0 and items[2] == 0 and items[1] > 0
    total, items = loss(zero_preds(nc=1), torch.tensor([[0.0, 0.0, 0.5, 0.5, 0.3, 0.3]]))
    assert items[0] > 0 and items[2] == 0  # one class: no class loss


def test_smoothing_and_focal_loss():
    assert smooth_BCE(0.1) == pytest.approx((0.95, 0.05))
    focal = FocalLoss(nn.BCEWithLogitsLoss(), gamma=1.5, alpha=0.25)
    value = focal(torch.zeros(4), torch.ones(4))
    assert value.item() == pytest.approx(math.log(2) * 0.25 * 0.5**1.5, rel=1e-5)
    model = FakeModel(hyp=dict(HYP, fl_gamma=1.5, label_smoothing=0.1))
    loss = ComputeLoss(model)
    assert isinstance(loss.bce_obj, FocalLoss) and (loss.cls_pos, loss.cls_neg) == pytest.approx((0.95, 0.05))
    assert torch.isfinite(loss(zero_preds(), ONE_TARGET)[0]).all()


def test_autobalance_keeps_stride16_level_at_one():
    loss = ComputeLoss(FakeModel(), autobalance=True)
    loss(zero_preds(), ONE_TARGET)
    assert loss.reference_level == 1 and loss.balance[1] == pytest.approx(1.0)
    assert loss.balance[0] != pytest.approx(4.0)


def test_optimising_a_tiny_head_lowers_the_loss():
    torch.manual_seed(0)
    model = FakeModel()
    detect = model.model[-1]
    features = [torch.randn(2, 8, 64 // int(s), 64 // int(s)) for s in STRIDES]
    targets = torch.tensor([[0, 0, 0.3, 0.6, 0.25, 0.25], [0, 2, 0.7, 0.3, 0.4, 0.2], [1, 1, 0.5, 0.5, 0.6, 0.7]])
    loss = ComputeLoss(model)
    optimizer = torch.optim.Adam(detect.parameters(), lr=0.05)
    history = []
    for _ in range(40):
        total, items = loss(detect(features), targets)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        history.append(items)
    first, last = history[0], history[-1]
    assert last.sum() < 0.5 * first.sum()
    assert torch.all(last < first)  # box, obj and cls all improve


def test_target_building_has_no_python_loop_over_targets():
    """Assignment and loss have no loop statements; comprehensions may only run over the levels' tensors."""

    def loops(fn):
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
        kinds = (ast.For, ast.While, ast.ListComp, ast.GeneratorExp, ast.SetComp, ast.DictComp)
        return [node for node in ast.walk(tree) if isinstance(node, kinds)]

    for fn in (ComputeLoss.assign, ComputeLoss.build_targets, ComputeLoss.__call__, ComputeLoss._objectness):
        for node in loops(fn):
            assert not isinstance(node, (ast.For, ast.While)), fn.__name__
            iters = {ast.unparse(gen.iter) for gen in node.generators}
            assert iters <= {
                "preds",
                "zip(preds, self._level_indices(found))",
                "(found.cls, found.box, found.anchor_wh)",
            }, iters


def test_focal_loss_leaves_the_wrapped_criterion_alone():
    bce = nn.BCEWithLogitsLoss(reduction="sum")
    focal = FocalLoss(bce, gamma=2.0)
    logits, target = torch.tensor([-1.0, 0.5, 2.0]), torch.tensor([0.0, 1.0, 0.3])
    elementwise = nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p = logits.sigmoid()
    p_t = target * p + (1 - target) * (1 - p)
    expected = (elementwise * (0.25 * target + 0.75 * (1 - target)) * (1 - p_t) ** 2).sum()
    assert focal(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)
    assert bce.reduction == "sum"


def test_collisions_keep_the_last_entry():
    """Two targets in the same cell and anchor: the cell's objectness target is the later entry's CIoU."""
    model = FakeModel(nc=1)
    loss = ComputeLoss(model)
    targets = torch.tensor([[0, 0, 0.3, 0.6, 0.25, 0.25], [0, 0, 0.31, 0.61, 0.2, 0.3]])
    preds = zero_preds(nc=1)
    for p in preds:
        p.requires_grad_()
    loss(preds, targets)[0].backward()
    found = loss.assign(preds, targets)
    cell = (found.level == 0) & (found.anchor == 0) & (found.row == 4) & (found.col == 2)
    entries = cell.nonzero().flatten()
    assert found.image[entries].tolist() == [0, 0] and len(entries) == 2  # one entry per target, same cell
    predicted = torch.tensor([[0.5, 0.5, *loss.anchors[0, 0].tolist()]]).expand(2, 4)  # zero logits, anchor 0
    ious = bbox_iou(predicted, found.box[entries], CIoU=True).flatten().tolist()
    # with zero logits a cell's objectness gradient is (sigmoid(0) - target) * d(total)/d(mean BCE) / cells
    grad = preds[0].grad[..., 4]
    scale = 2 * HYP["obj"] * 4.0 / grad.numel()  # batch size 2, level weight 4
    assert grad[0, 0, 4, 2].item() == pytest.approx((0.5 - ious[1]) * scale, rel=1e-4)
    assert grad[0, 0, 4, 2].item() != pytest.approx((0.5 - ious[0]) * scale, rel=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    torch.manual_seed(0)
    preds = [p + torch.randn_like(p) for p in zero_preds()]
    cpu_total, cpu_items = ComputeLoss(FakeModel())(preds, ONE_TARGET)
    gpu_total, gpu_items = ComputeLoss(FakeModel().cuda())([p.cuda() for p in preds], ONE_TARGET.cuda())
    assert gpu_items.is_cuda and torch.allclose(gpu_items.cpu(), cpu_items, rtol=1e-4)
