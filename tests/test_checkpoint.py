"""Checkpoints: safe format, atomic writes, one loader, safe import of upstream YOLOv5 pickles."""

from __future__ import annotations

import os

import pytest
import torch

from models.loading import build_model
from models.yolo import DetectionModel
from utils.checkpoint import (
    CheckpointError, load_checkpoint, make_checkpoint, rng_state, save_checkpoint, set_rng_state,
)
from tests.helpers import SHARED


@pytest.fixture(scope="module")
def small_model():
    model = DetectionModel("yolov5n.yaml", nc=3, verbose=False)
    model.names = {0: "a", 1: "b", 2: "c"}
    return model


def test_round_trip_is_weights_only_and_exact(tmp_path, small_model):
    path = tmp_path / "w.pt"
    save_checkpoint(make_checkpoint(small_model, epoch=3, train_args={"data": tmp_path / "d.yaml"}), path)
    raw = torch.load(path, weights_only=True)  # no custom class may be needed
    assert raw["epoch"] == 3 and raw["train_args"]["data"] == str(tmp_path / "d.yaml")
    model = build_model(load_checkpoint(path))
    assert model.names == small_model.names
    for (k, a), b in zip(small_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k


def test_atomic_write_keeps_old_file_on_failure(tmp_path, small_model, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"yaml": small_model.yaml, "model": {}, "epoch": 1}, path)
    before = path.read_bytes()

    def broken_save(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"yaml": small_model.yaml, "model": {}, "epoch": 2}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_rng_state_round_trip(tmp_path):
    import random

    import numpy as np

    torch.save(rng_state(), tmp_path / "rng.pt")
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_missing_and_garbage_files_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_checkpoint(bad)


class _Exploit:
    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_crafted_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    _Exploit.marker = marker
    evil = tmp_path / "evil.pt"
    torch.save({"model": _Exploit()}, evil)
    with pytest.raises(CheckpointError, match="refused to load.*system"):
        load_checkpoint(evil)
    assert not marker.exists()


def test_upstream_checkpoint_converts_to_same_weights_and_outputs():
    ckpt = load_checkpoint(SHARED / "fixtures" / "upstream_yolov5n_bccd.pt")
    ref = torch.load(SHARED / "fixtures" / "upstream_yolov5n_bccd_state.pt", weights_only=True)
    assert list(ckpt["model"]) == list(ref["state_dict"])
    assert ckpt["names"] == {0: "RBC", 1: "WBC", 2: "Platelets"}
    ours = build_model(ckpt).eval()
    theirs = DetectionModel(ref["cfg"], verbose=False)
    theirs.load_state_dict({k: v.float() for k, v in ref["state_dict"].items()})
    x = torch.rand(1, 3, 128, 160)
    with torch.no_grad():
        assert torch.equal(ours(x)[0], theirs.eval()(x)[0])
