"""Bare commands do the main job: train.py takes what the data YAML recommends for the options not given (the
README's demo for the embedded dataset), and val.py / detect.py / export.py without --weights use the newest best.pt
and say which one."""

from __future__ import annotations

import logging
import os
import time

import pytest
import yaml

import detect
import export
import train
import val
from tests.helpers import ROOT
from utils import checkpoint
from utils.general import UserInputError


def recommended() -> dict:
    return yaml.safe_load((ROOT / "data/shapes.yaml").read_text())["train_defaults"]


def test_bare_train_takes_the_embedded_datasets_recommendation():
    opt = train.parse_opt([])
    rec = recommended()
    assert rec["cfg"] and opt.cfg == rec["cfg"]
    assert (opt.hyp, opt.imgsz, opt.epochs, opt.batch_size) == (rec["hyp"], rec["imgsz"], rec["epochs"],
                                                                 rec["batch_size"])
    assert (ROOT / "data/hyps" / rec["hyp"]).is_file()


def test_given_options_win_over_the_recommendation():
    opt = train.parse_opt(["--img", "256", "--epochs", "3", "--cfg", "yolov5s.yaml"])
    assert (opt.imgsz, opt.epochs, opt.cfg) == (256, 3, "yolov5s.yaml")
    assert opt.hyp == recommended()["hyp"]  # not given: recommended
    opt = train.parse_opt(["--weights", "some.pt"])
    assert opt.cfg == ""  # a checkpoint brings its own model


def test_data_without_recommendation_still_needs_a_model(tmp_path):
    data = tmp_path / "plain.yaml"
    data.write_text("path: x\ntrain: images\nval: images\nnames: [a]\n")
    opt = train.parse_opt(["--data", str(data)], check=False)
    assert opt.cfg == "" and opt.epochs == 100 and opt.imgsz == 640  # upstream's defaults untouched
    with pytest.raises(UserInputError, match="--cfg"):
        train.check_train_options(opt)


def test_unknown_recommendation_key_is_named(tmp_path):
    data = tmp_path / "odd.yaml"
    data.write_text("path: x\ntrain: images\nval: images\nnames: [a]\ntrain_defaults: {lr0: 0.1}\n")
    with pytest.raises(UserInputError, match="odd.yaml: train_defaults: unknown key 'lr0'"):
        train.parse_opt(["--data", str(data)])


def make_best(root, name: str, age: float) -> str:
    f = root / name / "weights/best.pt"
    f.parent.mkdir(parents=True)
    f.write_bytes(b"")
    t = time.time() - age
    os.utime(f, (t, t))
    return str(f)


@pytest.mark.parametrize("script", [val, detect, export], ids=["val", "detect", "export"])
def test_scripts_without_weights_use_the_newest_best_and_say_so(script, tmp_path, monkeypatch, caplog):
    make_best(tmp_path, "exp", age=100)
    newest = make_best(tmp_path, "exp3", age=10)
    make_best(tmp_path, "exp2", age=50)
    monkeypatch.setattr(checkpoint, "TRAIN_RUNS", tmp_path)
    with caplog.at_level(logging.INFO, logger="yolov5"):
        opt = script.parse_opt([])
    assert opt.weights == newest
    assert f"weights: {newest}" in caplog.text


def test_no_trained_model_yet_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "TRAIN_RUNS", tmp_path)
    with pytest.raises(UserInputError, match=r"--weights: none given .*\(python train.py\)"):
        val.parse_opt([])


def test_programmatic_run_takes_the_recommendation_of_its_own_data(tmp_path):
    """train.run(data=...) must not inherit the default dataset's recommendation (shapes' model, hyp, size)."""
    data = tmp_path / "plain.yaml"
    data.write_text("path: x\ntrain: images\nval: images\nnames: [a]\n")
    opt = train.run_options(data=str(data), weights="some.pt")
    assert (opt.cfg, opt.imgsz, opt.epochs, opt.hyp.name) == ("", 640, 100, "hyp.scratch-low.yaml")
    opt = train.run_options(epochs=2)  # the default data: its recommendation fills the rest
    assert (opt.cfg, opt.imgsz, opt.epochs) == (recommended()["cfg"], recommended()["imgsz"], 2)


@pytest.mark.parametrize("nbs", [0, -16, 2.5, "64", True])
def test_invalid_nominal_batch_is_named(nbs):
    hyp = yaml.safe_load((ROOT / "data/hyps/hyp.scratch-low.yaml").read_text()) | {"nbs": nbs}
    with pytest.raises(UserInputError, match="'nbs' must be a positive whole number"):
        train.load_hyp(hyp)


@pytest.mark.parametrize("script, argv, flag", [(val, ["--conf-thres", "2"], "--conf-thres"),
                                                (detect, ["--max-det", "0"], "--max-det"),
                                                (export, ["--batch-size", "0"], "--batch-size")])
def test_bad_values_are_named_before_looking_for_weights(script, argv, flag, tmp_path, monkeypatch):
    """On a fresh clone (no best.pt yet) a bad value is still the error reported, not the missing weights."""
    monkeypatch.setattr(checkpoint, "TRAIN_RUNS", tmp_path)
    with pytest.raises(UserInputError, match=f"^{flag} "):
        script.parse_opt(argv)
