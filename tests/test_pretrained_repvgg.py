"""Official RepVGG checkpoints (github.com/DingXiaoH/RepVGG) loaded with ``load_backbone_weights``.

The fixtures (tests.helpers.SHARED/fixtures/official, README there) hold small official models in training and
deploy form with their outputs; loading them into this project's RepVGGBackbone must reproduce those outputs, in
training form and after folding. The full-size key lists must map completely onto the shipped variants.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml

from models.modules.repvgg import RepVGGBackbone
from models.pretrained import CheckpointError, checkpoint_formats, load_backbone_weights, load_state_into_rows
from models.yolo import DetectionModel
from tests.helpers import ROOT, SHARED, rel_error

FIXTURES = SHARED / "fixtures" / "official"
TRAIN_TOL, FOLDED_TOL = 2e-5, 1e-4  # the fixture README's tolerances (max|ours - ref| / max|ref|)
EXTRA = {"RepVGGBackbone": (RepVGGBackbone, "backbone")}  # the backbone with explicit depths/widths as a YAML row

# fixture name -> RepVGGBackbone(depths, widths, groups, use_se), from the README's official configs
CONFIGS = {
    "repvgg_small": [[2, 4, 14, 1], [0.125, 0.125, 0.0625, 0.125], 1, False],
    "repvgg_small_g4se": [[2, 2, 2, 1], [0.25] * 4, 4, True],
}
TRAIN_FILES = [("repvgg_small", "repvgg_small_train.pth"), ("repvgg_small", "repvgg_small_train_ddp.pth"),
               ("repvgg_small_g4se", "repvgg_small_g4se_train.pth")]
KEY_LISTS = json.loads((FIXTURES / "official_state_dict_keys.json").read_text())
REPVGG_LISTS = sorted(k for k, v in KEY_LISTS.items() if v["family"] == "RepVGG")


def model_dict(row: list) -> dict:
    """yolov5_RepVGG-A0.yaml with ``row`` as its backbone row (layer 0), 3 classes."""
    d = yaml.safe_load((ROOT / "models" / "yolov5_RepVGG-A0.yaml").read_text())
    d["backbone"][0], d["nc"] = row, 3
    return d


def fixture_model(name: str) -> DetectionModel:
    d = model_dict([-1, 1, "RepVGGBackbone", copy.deepcopy(CONFIGS[name])])
    d["width_multiple"] = 0.125  # a small head: only the backbone row is compared
    return DetectionModel(d, verbose=False, extra_modules=EXTRA)


def reference(name: str) -> dict:
    return torch.load(FIXTURES / f"{name}_ref.pt", weights_only=True)


def backbone_errors(model: DetectionModel, ref: dict) -> list[float]:
    """Relative error of each of the five backbone maps against the official ``features``."""
    with torch.no_grad():
        outs = model.eval().model[0](ref["input"])
    assert [o.shape for o in outs] == [f.shape for f in ref["features"]]
    return [rel_error(o, f) for o, f in zip(outs, ref["features"])]


def official_backbone_keys(file: str) -> list[str]:
    state = torch.load(FIXTURES / file, weights_only=True)
    return [k for k in state if not k.startswith(("linear.", "module.linear."))]


@pytest.mark.parametrize(("name", "file"), TRAIN_FILES)
def test_training_checkpoint_reproduces_official_outputs(name, file):
    model = fixture_model(name)
    result = load_backbone_weights(model, FIXTURES / file)
    assert result.loaded == result.total == len(official_backbone_keys(file))
    assert result.rows == [0, 1, 2, 3, 4]
    assert {m.eps for m in model.model[0].modules() if isinstance(m, torch.nn.BatchNorm2d)} == {1e-5}
    ref = reference(name)
    assert max(backbone_errors(model, ref)) <= TRAIN_TOL
    model.fuse()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.model[0].modules())
    assert max(backbone_errors(model, ref)) <= FOLDED_TOL


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_deploy_checkpoint_into_folded_model_reproduces_official_outputs(name):
    model = fixture_model(name).fuse()
    file = f"{name}_deploy.pth"
    result = load_backbone_weights(model, FIXTURES / file)
    assert result.loaded == result.total == len(official_backbone_keys(file))
    assert max(backbone_errors(model, reference(name))) <= FOLDED_TOL


def test_deploy_checkpoint_into_unfolded_model_is_refused():
    model = fixture_model("repvgg_small")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(CheckpointError, match=r"rbr_reparam.*folded model") as e:
        load_backbone_weights(model, FIXTURES / "repvgg_small_deploy.pth")
    assert "\n" not in str(e.value)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_wrong_configuration_is_refused_before_loading_anything():
    model = fixture_model("repvgg_small_g4se")  # 16 stem channels where the A0-like file has 8
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(CheckpointError, match=r"'stage0.rbr_dense.conv.weight' has shape \(8, 3, 3, 3\)"):
        load_backbone_weights(model, FIXTURES / "repvgg_small_train.pth")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_block_rows_without_a_whole_backbone_get_a_clear_error():
    with torch.device("meta"):
        model = DetectionModel("yolov5s_RepVGG.yaml", nc=3, verbose=False)
    with pytest.raises(CheckpointError, match=r"RepVGG checkpoint.*whole-backbone row.*no published checkpoint") as e:
        load_backbone_weights(model, FIXTURES / "repvgg_small_train.pth")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("entry", REPVGG_LISTS)
def test_full_size_key_list_maps_completely(entry):
    """Every non-classifier key of the official variant lands, with its shape, in the repvgg_<variant> row."""
    variant, form = entry.removeprefix("RepVGG-").lower().rsplit("-", 1)
    fmt = next(f for f in checkpoint_formats() if f.name == "RepVGG")
    with torch.device("meta"):
        model = DetectionModel(model_dict([-1, 1, f"repvgg_{variant}", []]), verbose=False)
        if form == "deploy":
            model.fuse()
        state = {k: torch.empty(shape) for k, shape in KEY_LISTS[entry]["state_dict"]}
    assert fmt.recognise(state)
    result = load_state_into_rows(model.model, state, fmt, "keys.json")
    assert result.loaded == result.total == len(state) - 2  # all but linear.weight and linear.bias
