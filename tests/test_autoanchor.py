"""AutoAnchor: best possible recall on a hand case, check_anchors on a bare Detect head, k-means + GA evolution."""

import logging
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

from models.yolo import Detect, check_anchor_order
from utils.autoanchor import anchor_fitness, best_possible_recall, check_anchors, kmean_anchors

COCO_ANCHORS = torch.tensor([[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]])


def detect_head(anchors_px=COCO_ANCHORS) -> Detect:
    """A Detect head at strides 8/16/32 holding ``anchors_px`` (3 rows of 6 pixel numbers), in grid units."""
    head = Detect(nc=1, anchors=anchors_px.tolist(), ch=(4, 4, 4))
    head.stride.copy_(torch.tensor([8.0, 16.0, 32.0]))
    head.set_anchors_px(head.anchors.clone())
    return head


class HeadOnly(nn.Module):
    """What check_anchors needs of a model: ``model.model[-1]`` is the Detect head."""

    def __init__(self, anchors_px=COCO_ANCHORS):
        super().__init__()
        self.model = nn.Sequential(detect_head(anchors_px))


def synthetic_dataset(n_images=60, seed=0):
    """Square 640 px images with boxes from three size clusters (~24, ~90x50 and ~260 px)."""
    rng = np.random.default_rng(seed)
    centres = np.array([[24, 24], [90, 50], [260, 260]]) / 640
    labels = []
    for _ in range(n_images):
        k = rng.integers(0, 3, size=5)
        wh = centres[k] * rng.uniform(0.8, 1.25, size=(5, 2))
        labels.append(np.concatenate((k[:, None], np.full((5, 2), 0.5), wh), 1).astype(np.float32))
    return SimpleNamespace(shapes=np.full((n_images, 2), 640.0), labels=labels)


@pytest.fixture
def log_messages(caplog):
    """Messages of the "yolov5" logger (captured even if it does not propagate)."""
    logger = logging.getLogger("yolov5")
    level = logger.level
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.INFO)
    yield lambda: caplog.messages
    logger.removeHandler(caplog.handler)
    logger.setLevel(level)


def test_best_possible_recall_hand_case():
    wh = np.array([[10.0, 10.0], [100.0, 100.0], [40.0, 10.0]])
    # 40x10 against 10x10: width ratio exactly 4 is not strictly within thr
    assert best_possible_recall(wh, np.array([[10.0, 10.0]])) == pytest.approx((1 / 3, 1 / 3))
    two = np.array([[10.0, 10.0], [100.0, 100.0]])
    assert best_possible_recall(wh, two) == pytest.approx((2 / 3, 2 / 3))
    assert best_possible_recall(wh, two, thr=4.1)[0] == pytest.approx(1.0)


def test_check_anchor_order_flips_reversed_anchors():
    m = SimpleNamespace(anchors=COCO_ANCHORS.float().view(3, 3, 2), stride=torch.tensor([8.0, 16.0, 32.0]))
    original = m.anchors.clone()
    m.anchors = m.anchors.flip(0).contiguous()
    assert check_anchor_order(m) is True
    assert torch.equal(m.anchors, original)
    assert check_anchor_order(m) is False


def test_set_anchors_px_orders_converts_and_keeps_the_buffer():
    head = detect_head()
    buffer = head.anchors
    head.set_anchors_px(COCO_ANCHORS.float().flip(0) * 2)
    assert head.anchors is buffer  # the loss holds this tensor
    torch.testing.assert_close(head.anchors_px(), COCO_ANCHORS.float().view(3, 3, 2) * 2)
    torch.testing.assert_close(head.anchors[0, 0], torch.tensor([20 / 8, 26 / 8]))


def test_good_anchors_are_kept(log_messages):
    dataset = synthetic_dataset()
    wh = np.concatenate([lb[:, 3:5] * 640 for lb in dataset.labels])
    anchors_px = torch.tensor(np.repeat(np.array([[24, 24], [90, 50], [260, 260]]), 3, 0).reshape(3, 6))
    model = HeadOnly(anchors_px)
    before = model.model[-1].anchors.clone()
    check_anchors(dataset, model, thr=4.0, imgsz=640)
    assert torch.equal(model.model[-1].anchors, before)
    message = next(m for m in log_messages() if "best possible recall" in m)
    pattern = r"AutoAnchor: best possible recall 1\.000 with \d\.\d\d anchors per label .*stay as they are"
    assert re.fullmatch(pattern, message)
    aat = best_possible_recall(wh, (before * model.model[-1].stride.view(-1, 1, 1)).view(-1, 2).numpy())[1]
    assert 3 < aat < 9


def test_poor_anchors_are_replaced(log_messages):
    dataset = synthetic_dataset()
    model = HeadOnly(COCO_ANCHORS * 8)  # far too large for this dataset
    m = model.model[-1]
    wh = np.concatenate([lb[:, 3:5] * 640 for lb in dataset.labels])
    bpr_before = best_possible_recall(wh, (m.anchors * m.stride.view(-1, 1, 1)).view(-1, 2).numpy())[0]
    check_anchors(dataset, model, thr=4.0, imgsz=640)
    anchors_px = (m.anchors * m.stride.view(-1, 1, 1)).view(-1, 2)
    assert bpr_before < 0.9 and best_possible_recall(wh, anchors_px.numpy())[0] > 0.98
    areas = anchors_px.prod(1)
    assert torch.all(areas[1:] >= areas[:-1])  # smallest anchors on the finest stride
    assert any("too low, searching" in m for m in log_messages())
    assert any("new anchors in use" in m for m in log_messages())


def test_kmean_anchors_improves_fitness_and_is_deterministic():
    dataset = synthetic_dataset()
    wh = np.concatenate([lb[:, 3:5] * 640 for lb in dataset.labels])
    start = kmean_anchors(dataset, n=9, img_size=640, gen=0, verbose=False, seed=3)  # k-means only
    evolved = kmean_anchors(dataset, n=9, img_size=640, gen=300, verbose=False, seed=3)
    assert evolved.shape == (9, 2) and evolved.dtype == np.float32
    assert np.all(np.diff(evolved.prod(1)) >= 0)
    assert anchor_fitness(wh, evolved) > anchor_fitness(wh, start)
    coco = COCO_ANCHORS.view(-1, 2).float().numpy()
    assert anchor_fitness(wh, evolved) > anchor_fitness(wh, coco)
    assert best_possible_recall(wh, evolved)[0] == 1.0
    np.testing.assert_array_equal(evolved, kmean_anchors(dataset, n=9, img_size=640, gen=300, verbose=False, seed=3))


def test_kmean_anchors_falls_back_to_random_init_with_too_few_boxes():
    dataset = SimpleNamespace(shapes=np.array([[640.0, 480.0]]), labels=[np.array([[0, 0.5, 0.5, 0.1, 0.2]])])
    anchors = kmean_anchors(dataset, n=3, img_size=640, gen=20, verbose=False)
    assert anchors.shape == (3, 2) and np.all(anchors >= 2.0)


def test_mutation_factors_always_change_something_and_stay_in_range():
    from utils.autoanchor import _mutation_factors

    factors = _mutation_factors((9, 2), 2000, np.random.default_rng(0))
    assert factors.shape == (2000, 9, 2)
    assert not (factors == 1.0).reshape(2000, -1).all(1).any()
    assert factors.min() >= 0.3 and factors.max() <= 3.0
    assert 0.85 < (factors != 1.0).mean() < 0.95  # each entry mutates with probability 0.9


def test_anchor_fitness_counts_only_boxes_that_fit():
    wh = np.array([[10.0, 10.0], [50.0, 10.0]])
    # box 1 fits the anchor exactly (1.0); box 2's width is 5x the anchor's, beyond thr 4, so it counts 0
    assert anchor_fitness(wh, np.array([[10.0, 10.0]])) == pytest.approx(0.5)
    assert anchor_fitness(wh, np.array([[10.0, 10.0]]), thr=6.0) == pytest.approx((1.0 + 0.2) / 2)
