"""Box conversions, clipping/rescaling and IoU variants on hand-computed cases."""

import math

import numpy as np
import pytest
import torch

from utils.boxes import bbox_iou, box_iou, clip_boxes, scale_boxes, xywh2xyxy, xywhn2xyxy, xyxy2xywh, xyxy2xywhn


def random_xyxy(n=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 500
    wh = torch.rand(n, 2, generator=g) * 100 + 1
    return torch.cat((xy, xy + wh), 1)


def test_xyxy_xywh_hand_case():
    xyxy = torch.tensor([[10.0, 20.0, 50.0, 80.0]])
    assert torch.equal(xyxy2xywh(xyxy), torch.tensor([[30.0, 50.0, 40.0, 60.0]]))
    assert torch.equal(xywh2xyxy(torch.tensor([[30.0, 50.0, 40.0, 60.0]])), xyxy)


@pytest.mark.parametrize("as_numpy", [False, True])
def test_round_trips_and_no_mutation(as_numpy):
    boxes = random_xyxy()
    boxes = boxes.numpy() if as_numpy else boxes
    original = boxes.copy() if as_numpy else boxes.clone()
    np.testing.assert_allclose(xywh2xyxy(xyxy2xywh(boxes)), original, atol=1e-4)
    normalised = xyxy2xywhn(boxes, w=640, h=600)
    assert 0 <= float(normalised[:, :2].min()) and float(normalised[:, 2:].max()) <= 1
    np.testing.assert_allclose(xywhn2xyxy(normalised, w=640, h=600), original, atol=1e-3)
    np.testing.assert_array_equal(boxes, original)  # inputs untouched without clip


def test_xywhn2xyxy_padding_and_batched_shapes():
    x = torch.tensor([[[0.5, 0.5, 0.5, 0.25]]])  # (1, 1, 4): any leading dims
    y = xywhn2xyxy(x, w=100, h=200, padw=10, padh=5)
    assert torch.allclose(y, torch.tensor([[[35.0, 80.0, 85.0, 130.0]]]))


def test_xyxy2xywhn_clip():
    boxes = np.array([[-10.0, -10.0, 50.0, 250.0]])
    y = xyxy2xywhn(boxes, w=100, h=200, clip=True)
    np.testing.assert_allclose(y, [[0.25, 0.5, 0.5, 1.0]])
    np.testing.assert_array_equal(boxes, [[0.0, 0.0, 50.0, 200.0]])  # clipped in place, as upstream does


@pytest.mark.parametrize("as_numpy", [False, True])
def test_clip_boxes(as_numpy):
    boxes = torch.tensor([[-5.0, 3.0, 120.0, 90.0], [10.0, -1.0, 20.0, 300.0]])
    boxes = boxes.numpy() if as_numpy else boxes
    clip_boxes(boxes, (80, 100))  # (height, width)
    np.testing.assert_array_equal(np.asarray(boxes), [[0, 3, 100, 80], [10, 0, 20, 80]])


def test_scale_boxes_undoes_letterbox():
    # a 240x320 (h, w) image letterboxed to 640x640: gain 2, vertical padding 80
    boxes = torch.tensor([[20.0, 100.0, 220.0, 300.0], [600.0, 500.0, 700.0, 700.0]])
    out = scale_boxes((640, 640), boxes, (240, 320))
    assert torch.allclose(out, torch.tensor([[10.0, 10.0, 110.0, 110.0], [300.0, 210.0, 320.0, 240.0]]))
    given = scale_boxes((640, 640), torch.tensor([[20.0, 100.0, 220.0, 300.0]]), (240, 320), ((2, 2), (0, 80)))
    assert torch.allclose(given, out[:1])


def test_bbox_iou_variants_hand_computed():
    a = torch.tensor([0.0, 0.0, 2.0, 2.0])
    b = torch.tensor([1.0, 1.0, 3.0, 3.0])
    iou = 1 / 7  # intersection 1, union 7
    assert bbox_iou(a, b, xywh=False).item() == pytest.approx(iou, abs=1e-6)
    assert bbox_iou(a, b, xywh=False, GIoU=True).item() == pytest.approx(iou - 2 / 9, abs=1e-6)  # hull 9
    assert bbox_iou(a, b, xywh=False, DIoU=True).item() == pytest.approx(iou - 2 / 18, abs=1e-6)  # rho2 2, c2 18
    assert bbox_iou(a, b, xywh=False, CIoU=True).item() == pytest.approx(iou - 2 / 18, abs=1e-6)  # same aspect


def test_ciou_aspect_term():
    a = torch.tensor([1.0, 1.0, 2.0, 2.0])  # xywh: square
    b = torch.tensor([2.0, 1.0, 4.0, 2.0])  # xywh: 2:1, shares the square's lower-left corner
    v = 4 / math.pi**2 * (math.atan(2) - math.atan(1)) ** 2
    expected = 0.5 - (1 / 20 + v * v / (v + 0.5))  # IoU 4/8, rho2 1, hull diagonal^2 20
    assert bbox_iou(a, b, CIoU=True).item() == pytest.approx(expected, abs=1e-6)
    assert bbox_iou(a, b).item() == pytest.approx(0.5, abs=1e-6)


def test_bbox_iou_disjoint_and_broadcast():
    a = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[2.0, 0.0, 3.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    iou = bbox_iou(a, b, xywh=False)
    assert iou.shape == (2, 1)
    assert iou[0].item() == 0 and iou[1].item() == pytest.approx(1.0, abs=1e-6)
    assert bbox_iou(a, b[:1], xywh=False, GIoU=True).item() == pytest.approx(-1 / 3, abs=1e-6)


def test_box_iou_matrix_matches_pairwise():
    a, b = random_xyxy(7, seed=1), random_xyxy(5, seed=2)
    b[0] = a[3]
    matrix = box_iou(a, b)
    assert matrix.shape == (7, 5)
    pairwise = bbox_iou(a[:, None], b[None], xywh=False).squeeze(-1)
    assert torch.allclose(matrix, pairwise, atol=1e-5)
    assert matrix[3, 0].item() == pytest.approx(1.0)
