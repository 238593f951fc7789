"""AutoBatch (--batch-size -1): the line fitted to measured trial batches, the CPU fallback, and train.py's use."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
import yaml

import train
from models.yolo import DetectionModel
from utils import autobatch as ab
from utils.general import LOGGER

GIB = 2**30


@pytest.fixture
def log(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER.name)  # conftest lets the yolov5 logger propagate to caplog
    return caplog


def test_choose_batch_fits_a_line_through_the_trials():
    batches = [1, 2, 4, 8, 16]
    peaks = [0.5 * GIB + 0.25 * GIB * b for b in batches]  # 0.5G base, 0.25G per image
    batch, how = ab.choose_batch(batches, peaks, budget=10.5 * GIB, default=16)
    assert batch == 40 and "batch size 40" in how  # (10.5 - 0.5) / 0.25
    assert ab.choose_batch(batches, peaks, budget=0.6 * GIB, default=16)[0] == 1  # never below 1
    assert ab.choose_batch(batches, peaks, budget=1e6 * GIB, default=16)[0] == ab.MAX_BATCH
    assert ab.choose_batch(batches[:3], peaks[:3], budget=10.5 * GIB, default=16, failed_at=8)[0] == 4
    assert ab.choose_batch([1], peaks[:1], budget=GIB, default=16, failed_at=2)[0] == 1
    assert ab.choose_batch(batches, [GIB] * 5, budget=GIB, default=16)[0] == 16  # flat: no fit, the default


def test_autobatch_on_cpu_says_so_and_uses_16(log):
    model = DetectionModel("yolov5n.yaml", nc=2, verbose=False)
    log.clear()
    assert ab.autobatch(model, 64, torch.device("cpu")) == 16
    assert [r.getMessage() for r in log.records] == [
        "AutoBatch: needs a CUDA device to measure memory; training with batch size 16"]


def test_autobatch_on_cuda_measures_trials_until_out_of_memory(monkeypatch, log):
    """The CUDA path with the device calls replaced: 8 GiB free, trials use 1 GiB + 0.5 GiB per image, batch 16
    runs out of memory."""
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (8 * GIB, 16 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 2 * GIB)
    trials = []

    def measure(model, imgsz, batch, device):
        trials.append(batch)
        assert model.training and imgsz == 64
        return None if batch == 16 else GIB + 0.5 * GIB * batch

    model = DetectionModel("yolov5n.yaml", nc=2, verbose=False).eval()
    batch = ab.autobatch(model, 64, torch.device("cuda", 0), fraction=0.8, measure=measure)
    assert trials == [1, 2, 4, 8, 16] and batch == 8  # the fit says 14 ((0.8 * 10 - 1) / 0.5), 16 failed: at most 8
    assert not model.training  # measured on a copy
    assert "batch size 8" in log.text and "80% of 10.00G" in log.text


def test_trainer_resolves_batch_minus_one_and_records_it(tmp_path, monkeypatch):
    (tmp_path / "opt.yaml").write_text(yaml.safe_dump({"batch_size": -1, "epochs": 3}))
    monkeypatch.setattr(train, "autobatch", lambda model, imgsz, device: 24)
    trainer = SimpleNamespace(opt=SimpleNamespace(batch_size=-1), model=None, imgsz=64, device=torch.device("cpu"),
                              main=True, save_dir=tmp_path)
    train.Trainer.resolve_batch_size(trainer)
    assert trainer.opt.batch_size == 24
    assert yaml.safe_load((tmp_path / "opt.yaml").read_text()) == {"batch_size": 24, "epochs": 3}
