"""Behaviour fixtures iou.pt, ap.pt and boxes.pt (upstream v7.0 reference values; see the fixtures' README)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from utils.boxes import bbox_iou, box_iou, clip_boxes, scale_boxes, xywh2xyxy, xywhn2xyxy, xyxy2xywh, xyxy2xywhn
from utils.metrics import ap_per_class, best_f1_index, class_curves, compute_ap

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "behaviour"
MODES = ("iou", "giou", "diou", "ciou")


def load(name: str) -> dict:
    """A fixture file; a missing file fails the test (it must not be skipped)."""
    path = FIXTURES / f"{name}.pt"
    assert path.is_file(), f"behaviour fixture missing: {path}"
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def iou_fixture():
    return load("iou")


@pytest.fixture(scope="module")
def ap_fixture():
    return load("ap")


@pytest.fixture(scope="module")
def boxes_fixture():
    return load("boxes")


def variant(mode: str) -> dict:
    return {"GIoU": mode == "giou", "DIoU": mode == "diou", "CIoU": mode == "ciou"}


def assert_close(actual, expected, atol):
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64),
                               rtol=0, atol=atol, equal_nan=True)


# ---------------------------------------------------------------- iou.pt


@pytest.mark.parametrize("fmt", ["xywh", "xyxy"])
@pytest.mark.parametrize("mode", MODES)
def test_bbox_iou_row_by_row(iou_fixture, fmt, mode):
    boxes = iou_fixture["inputs"][fmt]
    out = bbox_iou(boxes["box1"], boxes["box2"], xywh=fmt == "xywh", **variant(mode))
    expected = iou_fixture["outputs"][f"{fmt}_{mode}"]
    assert out.shape == expected.shape == (200, 1)
    assert torch.equal(out.isnan(), expected.isnan())  # NaN rows (xywh CIoU of empty boxes) in the same places
    assert_close(out, expected, 1e-6)


def test_bbox_iou_degenerate_rows(iou_fixture):
    boxes = iou_fixture["inputs"]["xyxy"]
    giou = bbox_iou(boxes["box1"], boxes["box2"], xywh=False, GIoU=True)
    assert giou[6].item() == pytest.approx(40.0, rel=1e-5)  # identical flat boxes: hull area is only eps
    ciou = bbox_iou(iou_fixture["inputs"]["xywh"]["box1"], iou_fixture["inputs"]["xywh"]["box2"], CIoU=True)
    assert ciou[3:5].isnan().all() and not ciou[5:].isnan().any()


@pytest.mark.parametrize("mode", MODES)
def test_bbox_iou_broadcast(iou_fixture, mode):
    boxes = iou_fixture["inputs"]["broadcast"]
    out = bbox_iou(boxes["box1"], boxes["box2"], **variant(mode))
    assert out.shape == (20, 1)
    assert_close(out, iou_fixture["outputs"][f"broadcast_xywh_{mode}"], 1e-6)


def gradient(fn, box):
    box = box.clone().requires_grad_(True)
    fn(box).sum().backward()
    return box.grad


def test_ciou_alpha_is_constant_in_backprop():
    """d CIoU = d DIoU - alpha * d v with alpha = v / (v - IoU + 1 + eps) held fixed."""
    box1, box2 = torch.tensor([[2.0, 2.0, 2.0, 1.0]]), torch.tensor([[2.5, 2.0, 1.0, 3.0]])  # xywh

    def aspect(b):
        return 4 / torch.pi**2 * (torch.atan(box2[:, 2] / box2[:, 3]) - torch.atan(b[:, 2] / b[:, 3])) ** 2

    iou, v = bbox_iou(box1, box2).item(), aspect(box1).item()
    alpha = v / (v - iou + 1 + 1e-7)
    expected = gradient(lambda b: bbox_iou(b, box2, DIoU=True), box1) - alpha * gradient(aspect, box1)
    actual = gradient(lambda b: bbox_iou(b, box2, CIoU=True), box1)
    assert torch.allclose(actual, expected, atol=1e-6)


def test_box_iou_matrix(iou_fixture):
    boxes = iou_fixture["inputs"]["box_iou"]
    out = box_iou(boxes["box1"], boxes["box2"])
    expected = iou_fixture["outputs"]["box_iou"]
    assert out.shape == (30, 20)
    assert not out.isnan().any()  # zero-area pairs give 0, not 0/0
    assert_close(out, expected, 1e-6)


# ---------------------------------------------------------------- ap.pt

AP_CASES = ("typical", "missing_classes", "large", "perfect", "all_false", "single")


def ap_inputs(fixture, name):
    case = fixture["inputs"]["cases"][name]
    return case["tp"].numpy(), case["conf"].numpy(), case["pred_cls"].numpy(), case["target_cls"].numpy()


@pytest.mark.parametrize("name", AP_CASES)
def test_ap_per_class(ap_fixture, name):
    expected = ap_fixture["outputs"]["cases"][name]
    tp, fp, p, r, f1, ap, classes = ap_per_class(*ap_inputs(ap_fixture, name))
    np.testing.assert_array_equal(classes, expected["unique_classes"].numpy())
    assert classes.dtype == np.int64
    for key, value in {"ap": ap, "p": p, "r": r, "f1": f1}.items():
        assert value.shape == expected[key].shape, key
        assert_close(value, expected[key], 1e-9)
    np.testing.assert_array_equal(tp, expected["tp"].numpy())
    np.testing.assert_array_equal(fp, expected["fp"].numpy())


@pytest.mark.parametrize("name", AP_CASES)
def test_confidence_curves(ap_fixture, name):
    expected = ap_fixture["outputs"]["cases"][name]
    curves = class_curves(*ap_inputs(ap_fixture, name))
    eps = 1e-16
    f1 = 2 * curves.precision * curves.recall / (curves.precision + curves.recall + eps)
    assert_close(curves.precision, expected["p_curve"], 1e-6)
    assert_close(curves.recall, expected["r_curve"], 1e-6)
    assert_close(f1, expected["f1_curve"], 1e-6)
    assert best_f1_index(f1) == expected["max_f1_index"]


@pytest.mark.parametrize("name", ["decreasing", "non_monotonic", "reaches_one", "single_point", "empty", "random_walk"])
def test_compute_ap(ap_fixture, name):
    curve, expected = ap_fixture["inputs"]["compute_ap"][name], ap_fixture["outputs"]["compute_ap"][name]
    ap, mpre, mrec = compute_ap(curve["recall"].numpy(), curve["precision"].numpy())
    assert ap == pytest.approx(expected["ap"], abs=1e-9)
    assert_close(mpre, expected["mpre"], 1e-12)
    assert_close(mrec, expected["mrec"], 1e-12)


# ---------------------------------------------------------------- boxes.pt


def test_xywh_xyxy(boxes_fixture):
    inputs, outputs = boxes_fixture["inputs"], boxes_fixture["outputs"]
    assert_close(xywh2xyxy(inputs["xywh"]), outputs["xywh2xyxy"], 1e-4)
    assert_close(xyxy2xywh(inputs["xyxy"]), outputs["xyxy2xywh"], 1e-4)
    assert_close(xywh2xyxy(inputs["xywh"].numpy()), outputs["xywh2xyxy"], 1e-4)  # numpy arrays alike


def test_xywhn2xyxy(boxes_fixture):
    inputs, outputs = boxes_fixture["inputs"], boxes_fixture["outputs"]
    for (w, h, padw, padh), expected in zip(inputs["xywhn2xyxy_args"], outputs["xywhn2xyxy"]):
        assert_close(xywhn2xyxy(inputs["xywhn"], w, h, padw, padh), expected, 1e-4)


def test_xyxy2xywhn_clips_its_input_in_place(boxes_fixture):
    inputs, outputs = boxes_fixture["inputs"], boxes_fixture["outputs"]
    for (w, h, clip, eps), expected in zip(inputs["xyxy2xywhn_args"], outputs["xyxy2xywhn"]):
        boxes = inputs["xyxy_out"].clone()
        assert_close(xyxy2xywhn(boxes, w, h, clip, eps), expected["out"], 1e-6)
        assert_close(boxes, expected["input_after_call"], 1e-4)


def test_scale_boxes(boxes_fixture):
    cases, outputs = boxes_fixture["inputs"]["scale_cases"], boxes_fixture["outputs"]["scale_boxes"]
    for case, expected in zip(cases, outputs):
        out = scale_boxes(case["img1_shape"], case["boxes"].clone(), case["img0_shape"], case["ratio_pad"])
        assert_close(out, expected, 1e-4)


def test_clip_boxes(boxes_fixture):
    boxes = boxes_fixture["inputs"]["xyxy_out"].clone()
    assert clip_boxes(boxes, boxes_fixture["inputs"]["clip_shape"]) is boxes  # in place
    assert_close(boxes, boxes_fixture["outputs"]["clip_boxes"], 1e-4)
