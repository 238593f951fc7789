"""non_max_suppression against a brute-force greedy NMS written with plain Python loops."""

import pytest
import torch

from utils.boxes import xywh2xyxy
from utils.nms import non_max_suppression


def random_prediction(bs=2, n=150, nc=3, nm=0, seed=0):
    """Raw output (bs, n, 5 + nc + nm): crowded boxes (pixels), random objectness and class scores."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(bs, n, 2, generator=g) * 80
    wh = torch.rand(bs, n, 2, generator=g) * 40 + 5
    scores = torch.rand(bs, n, 1 + nc + nm, generator=g)
    return torch.cat((xy, wh, scores), 2)


def iou(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def reference_nms(pred, conf_thres, iou_thres, classes=None, agnostic=False, multi_label=False, max_det=300):
    """Greedy NMS, one box and one class at a time; rows [xyxy, conf, cls]."""
    out = []
    for image in pred.tolist():
        candidates = []
        for row in image:
            box, obj, cls_scores = xywh2xyxy(torch.tensor(row[:4])).tolist(), row[4], row[5:]
            if obj <= conf_thres:
                continue
            confs = [obj * s for s in cls_scores]
            best = max(range(len(confs)), key=lambda c: confs[c])
            chosen = [c for c in range(len(confs)) if confs[c] > conf_thres] if multi_label else [best]
            candidates += [box + [confs[c], c] for c in chosen if confs[c] > conf_thres]
        if classes is not None:
            candidates = [c for c in candidates if c[5] in classes]
        kept = []
        for cand in sorted(candidates, key=lambda c: -c[4]):
            same_group = [k for k in kept if agnostic or k[5] == cand[5]]
            if all(iou(cand[:4], k[:4]) <= iou_thres for k in same_group):
                kept.append(cand)
        out.append(torch.tensor(kept[:max_det]).reshape(-1, 6))
    return out


def assert_same(output, expected):
    assert len(output) == len(expected)
    for got, want in zip(output, expected):
        assert got.shape == want.shape
        assert torch.allclose(got, want.to(got.dtype), atol=1e-4)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(conf_thres=0.25, iou_thres=0.45),
        dict(conf_thres=0.1, iou_thres=0.6, multi_label=True),
        dict(conf_thres=0.1, iou_thres=0.3, agnostic=True),
        dict(conf_thres=0.05, iou_thres=0.5, agnostic=True, multi_label=True),
        dict(conf_thres=0.1, iou_thres=0.5, classes=[0, 2]),
        dict(conf_thres=0.01, iou_thres=0.7, multi_label=True, max_det=7),
    ],
)
def test_matches_brute_force(kwargs):
    pred = random_prediction()
    assert_same(non_max_suppression(pred, **kwargs), reference_nms(pred, **kwargs))


@pytest.mark.parametrize("max_det", [1, 20, 5000])
@pytest.mark.parametrize("agnostic", [False, True])
def test_prefix_nms_is_exact_with_many_candidates_and_tied_scores(max_det, agnostic):
    """Thousands of candidates and few kept boxes: NMS runs on growing prefixes of the sorted candidates (first
    8 * max_det of them, then 4x more each time); scores quantized to 1/8 make many exact ties at every cut. The
    400 most confident rows are near-copies of one box, so the first prefixes keep too few boxes and must grow."""
    pred = random_prediction(bs=1, n=1000, seed=3)
    pred[..., 4:] = (pred[..., 4:] * 8).ceil() / 8
    jitter = torch.rand(400, 4, generator=torch.Generator().manual_seed(0)) * 0.5
    pred[0, :400, :4] = torch.tensor([40.0, 40.0, 30.0, 30.0]) + jitter
    pred[0, :400, 4:] = 1.0
    kwargs = dict(conf_thres=0.001, iou_thres=0.5, multi_label=True, agnostic=agnostic, max_det=max_det)
    want = reference_nms(pred, **kwargs)
    assert len(want[0]) == max_det or max_det > 100  # enough distinct boxes to fill max_det where it is small
    assert_same(non_max_suppression(pred, **kwargs), want)


def test_output_sorted_by_confidence_and_max_det():
    out = non_max_suppression(random_prediction(bs=1, n=300), conf_thres=0.001, iou_thres=0.9, max_det=20)[0]
    assert len(out) == 20
    assert torch.all(out[1:, 4] <= out[:-1, 4])


def test_single_class_ignores_multi_label():
    pred = random_prediction(nc=1)
    assert_same(non_max_suppression(pred, 0.1, 0.5, multi_label=True), reference_nms(pred, 0.1, 0.5))


def test_empty_and_tuple_input():
    pred = random_prediction()
    pred[..., 4] = 0.0  # no objectness anywhere
    out = non_max_suppression((pred, ["raw maps"]))
    assert [o.shape for o in out] == [(0, 6), (0, 6)]


def test_masks_are_carried():
    pred = random_prediction(nm=4)
    out = non_max_suppression(pred, 0.25, 0.45, nm=4)
    plain = non_max_suppression(pred[..., :-4], 0.25, 0.45)
    for with_masks, without in zip(out, plain):
        assert with_masks.shape[1] == 10
        assert torch.equal(with_masks[:, :6], without)


def test_apriori_labels_are_kept():
    pred = random_prediction(bs=1)
    label = torch.tensor([[1.0, 300.0, 300.0, 20.0, 20.0]])  # cls, xywh far from every predicted box
    out = non_max_suppression(pred, 0.25, 0.45, labels=[label])[0]
    assert torch.allclose(out[0], torch.tensor([290.0, 290.0, 310.0, 310.0, 1.0, 1.0]))


def test_rejects_bad_thresholds():
    with pytest.raises(ValueError):
        non_max_suppression(random_prediction(), conf_thres=1.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    pred = random_prediction()
    on_gpu = non_max_suppression(pred.cuda(), 0.1, 0.5, multi_label=True)
    for got, want in zip(on_gpu, non_max_suppression(pred, 0.1, 0.5, multi_label=True)):
        assert got.is_cuda and torch.allclose(got.cpu(), want, atol=1e-4)
