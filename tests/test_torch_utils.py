"""utils/torch_utils.py helpers: TTA scaling, early stopping, the DDP rank-0-first barrier, the model summary."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn

from utils.general import LOGGER
from utils.torch_utils import TTA_PAD_VALUE, EarlyStopping, model_info, scale_img, torch_distributed_zero_first


def test_scale_img_resizes_then_pads_to_the_stride():
    x = torch.rand(2, 3, 67, 93, generator=torch.Generator().manual_seed(0))
    assert scale_img(x, 1.0) is x
    for ratio, gs, canvas in ((0.5, 32, (64, 64)), (0.83, 64, (64, 128)), (1.3, 32, (96, 128))):
        size = (int(67 * ratio), int(93 * ratio))
        resized = nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
        y = scale_img(x, ratio, gs=gs)
        assert y.shape == (2, 3, *canvas)
        torch.testing.assert_close(y[..., :size[0], :size[1]], resized, rtol=0, atol=0)
        pad = torch.ones_like(y, dtype=torch.bool)
        pad[..., :size[0], :size[1]] = False
        assert (y[pad] == TTA_PAD_VALUE).all() and TTA_PAD_VALUE == pytest.approx(0.447)


def test_scale_img_same_shape_keeps_the_input_size():
    x = torch.rand(1, 3, 40, 56, generator=torch.Generator().manual_seed(1))
    smaller = scale_img(x, 0.5, same_shape=True)
    assert smaller.shape == x.shape and (smaller[..., 20:, :] == TTA_PAD_VALUE).all()
    larger = scale_img(x, 1.5, same_shape=True)  # cropped to the top-left 40 x 56
    full = nn.functional.interpolate(x, size=(60, 84), mode="bilinear", align_corners=False)
    torch.testing.assert_close(larger, full[..., :40, :56], rtol=0, atol=0)


def test_early_stopping_counts_epochs_since_the_best(caplog):
    stopper = EarlyStopping(patience=3)
    fitness = [0.1, 0.2, 0.2, 0.1, 0.15, 0.19]  # a tie counts as a new best: epoch 2
    stops = [stopper(epoch, f) for epoch, f in enumerate(fitness[:5])]
    assert stops == [False] * 5 and stopper.best_epoch == 2 and stopper.possible_stop  # epoch 4: 2 stale
    LOGGER.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger=LOGGER.name):
            assert stopper(5, fitness[5])  # 5 - 2 >= 3
    finally:
        LOGGER.removeHandler(caplog.handler)
    assert "EarlyStopping" in caplog.text and "since epoch 2" in caplog.text and "--patience 0" in caplog.text
    never = EarlyStopping(patience=0)
    assert not any(never(epoch, 0.0 if epoch else 1.0) for epoch in range(1000)) and not never.possible_stop


@pytest.mark.parametrize("rank, expected", [(-1, ["block"]), (0, ["block", "barrier"]), (1, ["barrier", "block"])])
def test_zero_first_barrier_order(monkeypatch, rank: int, expected: list[str]):
    calls = []
    monkeypatch.setattr(torch.distributed, "barrier", lambda *a, **k: calls.append("barrier"))
    with torch_distributed_zero_first(rank):
        calls.append("block")
    assert calls == expected


def test_model_info_summary_line(caplog):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    model[1].weight.requires_grad_(False)
    LOGGER.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger=LOGGER.name):
            figures = model_info(model, verbose=True, imgsz=64)
    finally:
        LOGGER.removeHandler(caplog.handler)
    assert figures[:3] == (3, 3 * 4 * 9 + 4 + 4 + 4, 3 * 4 * 9 + 4 + 4)
    assert "Model summary: 120 parameters (116 trainable), 3 modules" in caplog.text
