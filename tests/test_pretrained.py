"""The published-checkpoint loader as users run it: train.py --backbone-weights, --freeze backbone, the hub,
and the files it must refuse (another family's, truncated, pickles with code), loading nothing.

The families' own equivalence tests (official outputs reproduced) are in tests/test_pretrained_<family>.py.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from models.loading import build_model
from models.pretrained import SUMMARY, BackboneLoad, CheckpointError, load_backbone_weights
from models.yolo import DetectionModel
from tests.helpers import ROOT, SHARED
from utils.checkpoint import make_checkpoint
from utils.synthetic import generate_shapes

OFFICIAL = SHARED / "fixtures" / "official"
REVCOL_SMALL = {"channels": [8, 16, 32, 64], "layers": [1, 1, 2, 1], "num_subnet": 4, "drop_path": 0.1}


def revcol_model_dict(config: dict | None = None) -> dict:
    """yolov5_RevCol.yaml with the fixture's small RevCol configuration at row 0 and a narrow head."""
    d = yaml.safe_load((ROOT / "models" / "yolov5_RevCol.yaml").read_text())
    d["backbone"][0] = [-1, 1, "revcol_tiny", [dict(config or REVCOL_SMALL)]]
    d["width_multiple"], d["nc"] = 0.0625, 3
    return d


def state_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_summary_line_has_the_documented_form():
    line = BackboneLoad(7, 9, [0, 1, 2, 3, 4], {"head.* (no row for them)": 2}, "a b/c.pth").summary()
    assert line == "loaded 7/9 tensors from a b/c.pth into layers 0-4 (skipped 2: 2 head.* (no row for them))"
    assert SUMMARY.fullmatch(line).groups()[:6] == ("7", "9", "a b/c.pth", "0", "4", "2")
    assert SUMMARY.fullmatch(BackboneLoad(3, 3, [2, 3], {}, "f.pth").summary())


def test_yaml_row_keyword_arguments_reach_the_constructor():
    model = DetectionModel(revcol_model_dict(), verbose=False)
    assert model.model[0].num_subnet == 4 and model.model[0].channels == [8, 16, 32, 64]


def test_loads_everything_and_records_the_rows(caplog):
    model = DetectionModel(revcol_model_dict(), verbose=False)
    with caplog.at_level("INFO", logger="yolov5"):
        model.load_backbone(OFFICIAL / "revcol_small.pth")
    found = [SUMMARY.fullmatch(r.getMessage()) for r in caplog.records if SUMMARY.fullmatch(r.getMessage())]
    assert len(found) == 1
    loaded, total, _, first, last, skipped = found[0].groups()[:6]
    assert loaded == total == "284" and skipped == "0" and (first, last) == ("0", "4")  # 423 minus 139 head tensors
    assert model.backbone_rows == [0, 1, 2, 3, 4] and model.yaml["backbone_rows"] == [0, 1, 2, 3, 4]
    state = torch.load(OFFICIAL / "revcol_small.pth", weights_only=True)["model"]
    own = model.model.state_dict()
    assert torch.equal(own["0.subnet2.level1.blocks.0.pwconv1.weight"], state["subnet2.level1.blocks.0.pwconv1.weight"])
    # the checkpoint's rows survive a save/rebuild through the model's YAML (as in last.pt)
    assert DetectionModel(model.yaml, verbose=False).backbone_rows == [0, 1, 2, 3, 4]


def test_another_familys_checkpoint_loads_nothing():
    model = DetectionModel(revcol_model_dict(), verbose=False)
    before = state_copy(model)
    with pytest.raises(CheckpointError, match=r"replknet_small\.pth: a RepLKNet checkpoint, but the model has no rows"):
        load_backbone_weights(model, OFFICIAL / "replknet_small.pth")
    assert_unchanged(model, before)


def test_a_shape_mismatch_names_the_first_bad_key_and_loads_nothing():
    model = DetectionModel(revcol_model_dict({**REVCOL_SMALL, "channels": [16, 32, 64, 128]}), verbose=False)
    before = state_copy(model)
    with pytest.raises(CheckpointError, match=r"'stem\.0\.weight' has shape \(8, 3, 4, 4\).*no tensor was loaded"):
        load_backbone_weights(model, OFFICIAL / "revcol_small.pth")
    assert_unchanged(model, before)


def test_truncated_file_is_refused(tmp_path):
    data = (OFFICIAL / "revcol_small.pth").read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) // 2])
    model = DetectionModel(revcol_model_dict(), verbose=False)
    before = state_copy(model)
    with pytest.raises(CheckpointError, match=r"cut\.pth: not a readable PyTorch checkpoint, truncated or corrupt"):
        load_backbone_weights(model, cut)
    assert_unchanged(model, before)


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_with_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pth"
    state = torch.load(OFFICIAL / "revcol_small.pth", weights_only=True)
    with open(evil, "wb") as f:
        pickle.dump({"model": state["model"], "payload": _RunsCode(str(marker))}, f)
    model = DetectionModel(revcol_model_dict(), verbose=False)
    before = state_copy(model)
    with pytest.raises(CheckpointError, match=r"evil\.pth: refused, it holds Python objects beyond tensors"):
        load_backbone_weights(model, evil)
    assert not marker.exists()
    assert_unchanged(model, before)


def test_missing_file_and_non_checkpoint(tmp_path):
    model = DetectionModel(revcol_model_dict(), verbose=False)
    with pytest.raises(CheckpointError, match="checkpoint file not found"):
        load_backbone_weights(model, tmp_path / "nope.pth")
    not_weights = tmp_path / "numbers.pth"
    torch.save({"epoch": 3, "lr": 0.1}, not_weights)
    with pytest.raises(CheckpointError, match=r"numbers\.pth: no state_dict found"):
        load_backbone_weights(model, not_weights)
    unknown = tmp_path / "unknown.pth"
    torch.save({"model": {"features.0.weight": torch.zeros(3)}}, unknown)
    with pytest.raises(CheckpointError, match=r"unknown\.pth: not a checkpoint of a known family .*features\.0"):
        load_backbone_weights(model, unknown)


def test_hub_custom_builds_a_yaml_model_with_backbone_weights(tmp_path):
    cfg = tmp_path / "revcol_small.yaml"
    cfg.write_text(yaml.safe_dump(revcol_model_dict()))
    model = torch.hub.load(str(ROOT), "custom", path=str(cfg), backbone_weights=str(OFFICIAL / "revcol_small.pth"),
                           autoshape=False, source="local", _verbose=False)
    assert model.backbone_rows == [0, 1, 2, 3, 4]
    state = torch.load(OFFICIAL / "revcol_small.pth", weights_only=True)["model"]
    assert torch.equal(model.model[0].stem[0].weight, state["stem.0.weight"])


def run_train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """4 train / 2 val synthetic 64-px images and their data YAML."""
    root = tmp_path_factory.mktemp("tiny")
    generate_shapes(root / "shapes", n_train=4, n_val=2, imgsz=64, seed=3)
    data = root / "data.yaml"
    data.write_text(yaml.safe_dump({"path": str(root / "shapes"), "train": "images/train", "val": "images/val",
                                    "names": {0: "circle", 1: "square", 2: "triangle", 3: "star", 4: "ellipse"}}))
    return data


def test_train_cli_loads_and_freezes_the_backbone(tiny_data, tmp_path):
    """train.py --backbone-weights --freeze backbone: the summary line, and a backbone that did not move in an epoch."""
    data = tiny_data
    cfg = tmp_path / "revcol_small.yaml"
    cfg.write_text(yaml.safe_dump(revcol_model_dict()))
    weights = OFFICIAL / "revcol_small.pth"
    out = run_train("--cfg", str(cfg), "--data", str(data), "--backbone-weights", str(weights), "--freeze",
                    "backbone", "--img", "64", "--epochs", "1", "--batch-size", "2", "--workers", "0", "--project",
                    str(tmp_path), "--name", "bb", "--noplots", "--hyp", "hyp.scratch-low.yaml")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    log = out.stdout + out.stderr
    found = re.search(SUMMARY.pattern, log)
    assert found and found[1] == found[2] and (found[4], found[5]) == ("0", "4")
    assert "frozen: model.0.stem.0.weight" in log and "frozen: model.0.subnet3.alpha3" in log
    assert "frozen: model.5." not in log  # SPPF and the head train
    ckpt = torch.load(tmp_path / "bb" / "weights" / "last.pt", weights_only=True)
    assert ckpt["yaml"]["backbone_rows"] == [0, 1, 2, 3, 4]
    official = torch.load(weights, weights_only=True)["model"]
    for key in ("stem.0.weight", "subnet3.level3.blocks.0.pwconv2.weight", "subnet1.alpha2"):
        torch.testing.assert_close(ckpt["model"][f"model.0.{key}"].float(), official[key].half().float())


@pytest.mark.parametrize("args, message", [
    (["--freeze", "backbone"], "--freeze backbone: 'backbone' freezes the layers --backbone-weights loads"),
    (["--backbone-weights", "missing.pth"], "--backbone-weights missing.pth: no such file"),
    (["--freeze", "head"], "--freeze head: must be an integer >= 0 or 'backbone'"),
])
def test_train_cli_rejects_bad_backbone_options(args, message):
    out = run_train("--cfg", "yolov5n.yaml", *args)
    assert out.returncode != 0 and message in out.stdout + out.stderr
    assert "Traceback" not in out.stderr


def test_wrong_family_through_the_cli_is_one_line(tiny_data, tmp_path):
    shutil.copy(OFFICIAL / "replknet_small.pth", tmp_path / "lk.pth")
    out = run_train("--cfg", "yolov5n.yaml", "--data", str(tiny_data), "--backbone-weights", str(tmp_path / "lk.pth"),
                    "--epochs", "1", "--img", "64", "--project", str(tmp_path), "--name", "x")
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "lk.pth: a RepLKNet checkpoint, but the model has no rows it fits" in out.stdout + out.stderr


def test_published_bn_eps_survive_a_checkpoint_rebuild():
    """eps is not in a state_dict: a model rebuilt from its checkpoint (val.py, detect.py, --resume) must get the
    official eps back on the loaded rows, or it computes another function than the one trained."""
    d = yaml.safe_load((ROOT / "models" / "yolov5_RepVGG-A0.yaml").read_text())
    d["backbone"][0] = [-1, 1, "repvgg_a0", [{"depths": [2, 4, 14, 1], "widths": [0.125, 0.125, 0.0625, 0.125]}]]
    d["width_multiple"], d["nc"] = 0.125, 3
    model = DetectionModel(d, verbose=False)
    model.load_backbone(OFFICIAL / "repvgg_small_train.pth")
    assert model.yaml["backbone_bn_eps"] == {0: 1e-5}
    rebuilt = build_model(make_checkpoint(model)).eval()
    eps = {name: m.eps for name, m in rebuilt.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert {e for n, e in eps.items() if n.startswith("model.0.")} == {1e-5}
    assert {e for n, e in eps.items() if not n.startswith("model.0.")} == {1e-3}
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(rebuilt(x)[0], model.eval()(x)[0])
