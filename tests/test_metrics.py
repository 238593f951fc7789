"""compute_ap, ap_per_class, process_batch, ConfusionMatrix and fitness on hand-computed cases."""

import numpy as np
import pytest
import torch

from utils.boxes import box_iou
from utils.metrics import ConfusionMatrix, ap_per_class, compute_ap, fitness, process_batch, smooth

IOUV = torch.linspace(0.5, 0.95, 10)


def test_compute_ap_piecewise_linear_envelope():
    # envelope: 1 on [0, .2], 1 -> .75 on [.2, .4], .75 on [.4, .6], .75 -> 0 on [.6, 1]
    ap, mpre, mrec = compute_ap(np.array([0.2, 0.4, 0.6]), np.array([1.0, 0.5, 0.75]))
    assert ap == pytest.approx(0.2 + 0.2 * 0.875 + 0.2 * 0.75 + 0.4 * 0.375)
    np.testing.assert_allclose(mpre, [1, 1, 0.75, 0.75, 0])
    np.testing.assert_allclose(mrec, [0, 0.2, 0.4, 0.6, 1])


def test_compute_ap_perfect_detector_is_0995():
    """The sentinel (recall 1, precision 0) makes the last 101-point trapezoid half height."""
    assert compute_ap(np.array([0.5, 1.0]), np.array([1.0, 1.0]))[0] == pytest.approx(0.995)


def test_compute_ap_repeated_recall():
    # recall .25 .5 .75 .75, precision 1 1 1 .75: precision 1 up to recall .74, .75 at .75 (np.interp
    # takes the last of repeated x), then linear to 0 at recall 1
    ap = compute_ap(np.array([0.25, 0.5, 0.75, 0.75]), np.array([1, 1, 1, 0.75]))[0]
    assert ap == pytest.approx(0.74 + 0.01 * 0.875 + 0.25 * 0.375)


def test_ap_per_class_synthetic():
    # class 0: 2 labels, 2 correct predictions; class 1: 4 labels, predictions TP TP TP FP;
    # class 2: 1 label, no prediction; class 5: predicted only (not reported)
    tp = np.array([1, 1, 1, 1, 1, 0, 0], dtype=bool)[:, None].repeat(2, 1)
    tp[0, 1] = False  # second IoU threshold: class 0's best prediction is not good enough
    conf = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.95])
    pred_cls = np.array([0, 0, 1, 1, 1, 1, 5])
    target_cls = np.array([0, 0, 1, 1, 1, 1, 2])
    tp_, fp, p, r, f1, ap, classes = ap_per_class(tp, conf, pred_cls, target_cls, names={0: "a", 1: "b", 2: "c"})
    assert classes.tolist() == [0, 1, 2]
    np.testing.assert_allclose(ap[:, 0], [0.995, 0.74 + 0.01 * 0.875 + 0.25 * 0.375, 0.0])
    # class 0 at the second threshold: FP then TP -> envelope .5 up to recall .5, then linear to 0 at 1
    assert ap[0, 1] == pytest.approx(0.5 * 0.5 + 0.5 * 0.5 / 2)
    # operating point: the mean-F1 peak lies between the last TP and the FP of class 1
    assert p[0] == 1 and r[0] == pytest.approx(1) and r[1] == pytest.approx(0.75)
    assert 0.75 < p[1] <= 1 and p[2] == 0 and r[2] == 0
    np.testing.assert_array_equal(tp_, [2, 3, 0])
    np.testing.assert_array_equal(fp, [0, 0, 0])
    np.testing.assert_allclose(f1, 2 * p * r / (p + r + 1e-16))


def test_smooth_keeps_constants_and_length():
    y = np.full(100, 0.3)
    np.testing.assert_allclose(smooth(y, 0.1), y)
    assert smooth(np.arange(1000.0), 0.1).shape == (1000,)


def test_process_batch_hand_case():
    labels = torch.tensor([[0, 0, 0, 10, 10], [0, 20, 20, 30, 30]], dtype=torch.float32)
    detections = torch.tensor(
        [
            [0, 0, 10, 10, 0.9, 0],  # label 0, IoU 1
            [0, 0, 10, 7.7, 0.8, 0],  # label 0 again (IoU .77): duplicate
            [20, 20, 30, 27, 0.7, 1],  # label 1's box but the wrong class
            [21.8, 20, 30, 30, 0.6, 0],  # label 1, IoU .82
        ]
    )
    correct = process_batch(detections, labels, IOUV)
    assert correct.dtype == torch.bool and correct.shape == (4, 10)
    assert correct[0].all() and not correct[1].any() and not correct[2].any()
    assert correct[3].tolist() == [True] * 7 + [False] * 3  # thresholds .5 ... .8


def test_process_batch_label_takes_first_detection_not_best_iou():
    """Upstream val.py: after dropping duplicate detections a label keeps its first (most confident) one."""
    labels = torch.tensor([[0, 0, 0, 10, 10]], dtype=torch.float32)
    detections = torch.tensor([[0, 0, 10, 6.2, 0.9, 0], [0, 0, 10, 9.2, 0.8, 0]])  # IoU .62, .92
    correct = process_batch(detections, labels, IOUV)
    assert correct[0].tolist() == [True] * 3 + [False] * 7
    assert correct[1].tolist() == [False] * 3 + [True] * 6 + [False]


def test_process_batch_empty():
    assert process_batch(torch.zeros(0, 6), torch.tensor([[0.0, 0, 0, 5, 5]]), IOUV).shape == (0, 10)
    assert not process_batch(torch.tensor([[0.0, 0, 5, 5, 0.9, 0]]), torch.zeros(0, 5), IOUV).any()


def test_confusion_matrix_hand_case():
    cm = ConfusionMatrix(nc=2)
    labels = torch.tensor([[0, 0, 0, 10, 10], [1, 20, 20, 30, 30], [1, 50, 50, 60, 60]], dtype=torch.float32)
    detections = torch.tensor(
        [
            [0, 0, 10, 10, 0.9, 0],  # correct
            [20, 20, 30, 30, 0.8, 0],  # true 1 predicted 0
            [80, 80, 90, 90, 0.7, 1],  # nothing there: background false positive
            [50, 50, 60, 60, 0.1, 1],  # below conf 0.25: label 2 is a background false negative
        ]
    )
    cm.process_batch(detections, labels)
    np.testing.assert_array_equal(cm.matrix, [[1, 1, 0], [0, 0, 1], [0, 1, 0]])
    tp, fp = cm.tp_fp()
    np.testing.assert_array_equal(tp, [1, 0])
    np.testing.assert_array_equal(fp, [1, 1])


def test_confusion_matrix_prefers_best_iou_and_counts_unmatched():
    cm = ConfusionMatrix(nc=2)
    labels = torch.tensor([[0, 0, 0, 10, 10]], dtype=torch.float32)
    detections = torch.tensor([[0, 0, 10, 6.2, 0.9, 1], [0, 0, 10, 9.2, 0.8, 0]])
    cm.process_batch(detections, labels)  # the IoU .92 detection (class 0) is the match
    np.testing.assert_array_equal(cm.matrix, [[1, 0, 0], [0, 0, 1], [0, 0, 0]])
    cm.process_batch(None, torch.tensor([1.0, 1.0]))  # nothing predicted: two missed class-1 labels
    cm.process_batch(torch.tensor([[0, 0, 5, 5, 0.9, 1.0]]), torch.zeros(0, 5))  # no labels at all
    np.testing.assert_array_equal(cm.matrix, [[1, 0, 0], [0, 0, 2], [0, 2, 0]])


def test_fitness_weights():
    x = np.array([[0.5, 0.6, 0.7, 0.4], [1.0, 1.0, 0.0, 0.0]])
    np.testing.assert_allclose(fitness(x), [0.07 + 0.36, 0.0])


def reference_matches(iou, allowed, best_label_per_detection):
    """The matching rule written as plain loops: each detection takes its allowed label of highest IoU (the
    last on ties); each label then keeps its first detection (val) or its highest-IoU one, the last on ties (CM)."""
    choice = {}
    for d in range(iou.shape[1]):
        options = [(iou[l, d], l) for l in range(iou.shape[0]) if allowed[l, d]]
        if options:
            choice[d] = max(options)[1]  # max over (iou, label): the last label on ties
    kept = {}
    for d, label in choice.items():
        if label not in kept or (best_label_per_detection and iou[label, d] >= iou[label, kept[label]]):
            kept[label] = d
    return sorted((label, d) for label, d in kept.items())


def random_image(g, n, m, nc):
    xy = torch.randint(0, 40, (n + m, 2), generator=g).float()
    boxes = torch.cat((xy, xy + torch.randint(2, 20, (n + m, 2), generator=g)), 1)
    boxes[n:][torch.rand(m, generator=g) < 0.3] = boxes[n].clone()  # duplicated labels: exact IoU ties
    near = torch.randint(n, n + m, (n,), generator=g)  # most detections: a label box moved by 0-2 px
    jitter = torch.randint(-2, 3, (n, 4), generator=g).float()
    boxes[:n] = torch.where(torch.rand(n, 1, generator=g) < 0.7, boxes[near] + jitter, boxes[:n])
    det_cls, label_cls = torch.randint(0, nc, (n, 1), generator=g), torch.randint(0, nc, (m, 1), generator=g)
    conf = torch.rand(n, 1, generator=g).sort(0, descending=True)[0]
    return torch.cat((boxes[:n], conf, det_cls), 1), torch.cat((label_cls, boxes[n:]), 1)


def test_process_batch_and_confusion_matrix_follow_the_rule_on_random_images():
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        n, m, nc = (int(v) for v in torch.randint(1, 12, (3,), generator=g))
        nc = nc % 3 + 1
        detections, labels = random_image(g, n, m, nc)
        iou = box_iou(labels[:, 1:], detections[:, :4]).numpy()
        same = (labels[:, :1] == detections[:, 5]).numpy()
        correct = process_batch(detections, labels, IOUV)
        for t, threshold in enumerate(IOUV.tolist()):
            expected = np.zeros(n, dtype=bool)
            for _, d in reference_matches(iou, (iou >= np.float32(threshold)) & same, False):
                expected[d] = True
            np.testing.assert_array_equal(correct[:, t].numpy(), expected)
        cm = ConfusionMatrix(nc=nc, conf=0.0)
        cm.process_batch(detections, labels)
        pairs = reference_matches(iou, iou > 0.45, True)
        assert np.trace(cm.matrix[:nc, :nc]) == sum(labels[l, 0] == detections[d, 5] for l, d in pairs)
        assert cm.matrix[nc].sum() == m - len(pairs) and cm.matrix[:, nc].sum() == n - len(pairs)


def test_ap_per_class_without_labels_or_predictions():
    out = ap_per_class(np.zeros((3, 10), bool), np.array([0.9, 0.5, 0.2]), np.array([0.0, 1, 0]), np.zeros(0))
    assert all(len(a) == 0 for a in out)
    tp, fp, p, r, f1, ap, classes = ap_per_class(np.zeros((0, 10), bool), np.zeros(0), np.zeros(0), np.array([1.0, 2]))
    assert classes.tolist() == [1, 2] and not ap.any() and not p.any() and not r.any()
