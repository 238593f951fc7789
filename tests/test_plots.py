"""Plots: files are written, non-empty and readable by OpenCV; Annotator draws where asked."""

import shutil

import cv2
import numpy as np
import pytest
import torch

from tests.helpers import SHARED
from utils.metrics import ConfusionMatrix, ap_per_class
from utils.plots import (Annotator, colors, feature_visualization, output_to_target, plot_images, plot_labels,
                         plot_results)


def read_image(path):
    assert path.exists() and path.stat().st_size > 0
    im = cv2.imread(str(path))
    assert im is not None and im.ndim == 3
    return im


def test_colors_palette():
    assert colors(0) == (255, 56, 56) and colors(0, bgr=True) == (56, 56, 255)
    assert colors(20) == colors(0) and len({colors(i) for i in range(20)}) == 20


@pytest.mark.parametrize("pil", [False, True])
def test_annotator_draws_box_and_label(pil):
    im = np.zeros((100, 120, 3), dtype=np.uint8)
    annotator = Annotator(im, line_width=2, pil=pil)
    annotator.box_label([30, 40, 90, 80], "cat 0.9", color=(0, 255, 0))
    out = annotator.result()
    assert out.shape == (100, 120, 3)
    assert (out[60, 30] == (0, 255, 0)).all()  # left edge of the box
    assert out[30:40, 30:60].any()  # label tab above the box
    assert not out[90:, :20].any()  # far corner untouched


def test_annotator_cv2_rejects_non_contiguous_image():
    with pytest.raises(ValueError):
        Annotator(np.zeros((10, 20, 3), dtype=np.uint8)[:, ::2])


def test_plot_images_labels_and_predictions(tmp_path):
    images = torch.rand(4, 3, 64, 80)
    labels = torch.tensor([[0, 0, 0.5, 0.5, 0.4, 0.3], [3, 1, 0.3, 0.6, 0.2, 0.2]])  # normalised xywh
    plot_images(images, labels, paths=["a.jpg"] * 4, fname=tmp_path / "val_batch0_labels.jpg", names={0: "x", 1: "y"})
    im = read_image(tmp_path / "val_batch0_labels.jpg")
    assert im.shape == (128, 160, 3)
    preds = [torch.tensor([[10.0, 10, 40, 30, 0.9, 1], [5, 5, 15, 15, 0.1, 0]]), torch.zeros(0, 6)]
    targets = output_to_target(preds)
    assert targets.shape == (2, 7)
    np.testing.assert_allclose(targets[0], [0, 1, 25, 20, 30, 20, 0.9], rtol=1e-6)
    plot_images(images[:2], targets, fname=tmp_path / "val_batch0_pred.jpg", names=["x", "y"])
    assert read_image(tmp_path / "val_batch0_pred.jpg").shape == (128, 160, 3)  # 2x2 grid, one column used


def test_plot_images_downscales_large_batches(tmp_path):
    images = (torch.rand(16, 3, 640, 640) * 255).to(torch.uint8)
    plot_images(images, np.zeros((0, 6)), fname=tmp_path / "train_batch0.jpg")
    assert read_image(tmp_path / "train_batch0.jpg").shape == (1920, 1920, 3)


def test_plot_results_reads_upstream_csv(tmp_path):
    shutil.copy(SHARED / "fixtures" / "upstream_bccd_train" / "results.csv", tmp_path / "results.csv")
    plot_results(file=tmp_path / "results.csv")
    assert read_image(tmp_path / "results.png").shape[:2] == (1200, 2400)


def test_plot_labels(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.concatenate((rng.integers(0, 3, (200, 1)), rng.uniform(0.05, 0.95, (200, 4))), 1)
    plot_labels(labels, names={0: "RBC", 1: "WBC", 2: "Platelets"}, save_dir=tmp_path)
    read_image(tmp_path / "labels.jpg")
    read_image(tmp_path / "labels_correlogram.jpg")


def test_metric_curves_and_confusion_matrix(tmp_path):
    rng = np.random.default_rng(0)
    tp = rng.random((60, 10)) < 0.6
    conf, pred_cls, target_cls = rng.random(60), rng.integers(0, 2, 60), rng.integers(0, 2, 40)
    ap_per_class(tp, conf, pred_cls, target_cls, plot=True, save_dir=tmp_path, names={0: "a", 1: "b"})
    for name in ("PR_curve.png", "F1_curve.png", "P_curve.png", "R_curve.png"):
        read_image(tmp_path / name)
    cm = ConfusionMatrix(nc=2)
    cm.process_batch(torch.tensor([[0, 0, 10, 10, 0.9, 0.0]]), torch.tensor([[1.0, 0, 0, 10, 10]]))
    cm.plot(save_dir=tmp_path, names=["a", "b"])
    read_image(tmp_path / "confusion_matrix.png")


def test_feature_visualization(tmp_path):
    feature_visualization(torch.randn(1, 12, 8, 8), "models.common.C3", stage=2, n=10, save_dir=tmp_path)
    read_image(tmp_path / "stage2_C3_features.png")
    assert np.load(tmp_path / "stage2_C3_features.npy").shape == (12, 8, 8)
    feature_visualization(torch.randn(1, 12, 8, 8), "models.yolo.Detect", stage=3, save_dir=tmp_path)
    assert not list(tmp_path.glob("stage3*"))
