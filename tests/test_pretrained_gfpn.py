"""DAMO-YOLO detector checkpoints into the GiraffeNeckV2 rows of models/yolov5_GFPN-damo-{t,s,m,l}.yaml.

The fixtures (tests.helpers.SHARED / fixtures/official, README "GFPN") are the official neck in two small
configurations; the shipped YAMLs at width 0.0625 have exactly their widths (P3/P4/P5 16/32/64), so these tests
build the shipped YAMLs, load with the loader users run, and feed the fixture's [x2, x1, x0] into the neck rows.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import yaml

from models.modules.gfpn import CHECKPOINT_FORMATS, CSPStage, RepConv, damo_neck_rows
from models.pretrained import CheckpointError, load_backbone_weights, load_state_into_rows
from models.yolo import DetectionModel
from tests.helpers import ROOT, SHARED, rel_error

OFFICIAL = SHARED / "fixtures" / "official"
NECK_INPUT_ROWS = (4, 6, 9)  # x2, x1, x0 (P3, P4, P5) in every yolov5_GFPN-damo-*.yaml
OUTPUT_NODES = ("merge_5", "merge_7", "merge_6")  # x5, x7, x6: the fixture's features
FIXTURES = [("gfpn_small_relu", "s"), ("gfpn_small_silu", "m")]  # the fixture's config is DAMO-S's / DAMO-M's
TRAIN_TOL, FOLDED_TOL = 2e-5, 1e-4


def damo_model(variant: str, width: float = 0.0625) -> DetectionModel:
    """The shipped yolov5_GFPN-damo-<variant>.yaml at another width, in eval mode."""
    d = yaml.safe_load((ROOT / "models" / f"yolov5_GFPN-damo-{variant}.yaml").read_text())
    d["width_multiple"], d["nc"] = width, 3
    return DetectionModel(d, verbose=False).eval()


def _src(i: int, f: int) -> int:
    return f if f >= 0 else i + f


def run_neck(model: DetectionModel, inputs: list[torch.Tensor]) -> dict[int, torch.Tensor]:
    """Every neck row's output (by layer index), with the fixture's [x2, x1, x0] as the backbone's P3, P4, P5."""
    rows = model.model
    out = dict(zip(NECK_INPUT_ROWS, inputs))
    with torch.no_grad():
        for i in range(NECK_INPUT_ROWS[-1] + 1, len(rows) - 1):  # up to the Detect row
            f = rows[i].f
            out[i] = rows[i]([out[_src(i, j)] for j in f] if isinstance(f, list) else out[_src(i, f)])
    return out


def node_errors(model: DetectionModel, ref: dict) -> dict[str, float]:
    """Relative error of each official module's input and output (``ref['nodes']``) and of the three features."""
    out = run_neck(model, ref["inputs"])
    errors, rows = {}, damo_neck_rows(model.model)
    for name, row in rows.items():
        source = _src(row, model.model[row].f)  # a merge's Concat row, a bu_conv's input row
        errors[f"{name} in"] = rel_error(out[source], ref["nodes"][name]["input"])
        errors[f"{name} out"] = rel_error(out[row], ref["nodes"][name]["output"])
    for name, want in zip(OUTPUT_NODES, ref["features"]):
        errors[f"feature {name}"] = rel_error(out[rows[name]], want)
    return errors


@pytest.mark.parametrize("fixture, variant", FIXTURES)
def test_official_neck_outputs_reproduced_before_and_after_fuse(fixture, variant):
    ref = torch.load(OFFICIAL / f"{fixture}_ref.pt", weights_only=True)
    model = damo_model(variant)
    result = load_backbone_weights(model, OFFICIAL / f"{fixture}.pth")
    assert result.loaded == result.total == len(torch.load(OFFICIAL / f"{fixture}.pth", weights_only=True)["model"])
    assert (min(result.rows), max(result.rows)) == (10, 26)
    assert all(m.eps == 1e-3 for m in model.model[10:27].modules() if isinstance(m, nn.BatchNorm2d))
    blocks = {len(m.convs) for m in model.modules() if isinstance(m, CSPStage)}
    assert blocks == {round(3 * ref["config"]["depth"])}  # 3, and 4 for depth 1.5 (Python rounds half to even)

    errors = node_errors(model, ref)
    assert len(errors) == 2 * len(ref["nodes"]) + 3
    assert max(errors.values()) <= TRAIN_TOL, errors

    model.fuse()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.model[10:27].modules())
    assert all(m.rbr_1x1 is None for m in model.modules() if isinstance(m, RepConv))
    folded = node_errors(model, ref)
    assert max(folded.values()) <= FOLDED_TOL, folded


@pytest.mark.parametrize("variant", ["t", "s", "m", "l"])
def test_full_size_neck_keys_all_map(variant):
    entry = json.loads((OFFICIAL / "official_state_dict_keys.json").read_text())[f"DAMO-YOLO-{variant.upper()}-neck"]
    with torch.device("meta"):
        model = DetectionModel(f"yolov5_GFPN-damo-{variant}.yaml", verbose=False)
    state = {k: torch.empty(shape, device="meta") for k, shape in entry["state_dict"]}
    result = load_state_into_rows(model.model, state, CHECKPOINT_FORMATS[0], "keys.json")
    assert result.loaded == result.total == entry["state_dict_entries"]  # shapes checked by the loader
    assert sum(p.numel() for p in model.model[10:27].parameters()) == entry["params"]  # the official neck's count


def test_detector_checkpoint_loads_only_its_neck(tmp_path):
    """A real DAMO-YOLO file also holds backbone.* and head.* (not counted) and training state."""
    state = torch.load(OFFICIAL / "gfpn_small_relu.pth", weights_only=True)["model"]
    extra = {"backbone.block_list.0.conv1.conv.weight": torch.ones(8, 3, 3, 3), "head.gfl_cls.0.bias": torch.ones(3)}
    path = tmp_path / "damoyolo.pth"
    torch.save({"model": {**extra, **state}, "epoch": 300, "feature_loss": torch.zeros(1)}, path)
    model = damo_model("s")
    backbone = {k: v.clone() for k, v in model.model[:10].state_dict().items()}
    result = load_backbone_weights(model, path)
    assert (result.loaded, result.total) == (len(state), len(state))
    assert all(torch.equal(v, model.model[:10].state_dict()[k]) for k, v in backbone.items())
    assert torch.equal(model.model.state_dict()["12.convs.2.conv2.rbr_1x1.conv.weight"],
                       state["neck.merge_3.convs.2.conv2.rbr_1x1.conv.weight"])


def shipped_gfpn_model() -> DetectionModel:
    """yolov5s_GFPN.yaml (a GFPN neck of another data flow and concat order) at the fixture's widths."""
    d = yaml.safe_load((ROOT / "models" / "yolov5s_GFPN.yaml").read_text())
    d["width_multiple"] = 0.0625
    return DetectionModel(d, verbose=False)


REFUSALS = {
    "other flow": (shipped_gfpn_model, r"layer 13 is not DAMO-YOLO's merge_3 = merge_3\(cat\[x0, bu_conv13\(x1\)\]\)"),
    "other widths": (lambda: damo_model("s", 0.125), r"'neck\.bu_conv13\.conv\.weight' has shape \(32, 32, 3, 3\)"),
    "other hidden_ratio": (lambda: damo_model("m"), r"'neck\.merge_3\.convs\.0\.conv1\.conv\.weight' has shape"),
    "no GFPN": (lambda: DetectionModel("yolov5n.yaml", verbose=False), r"DAMO-YOLO checkpoint, but the model has no"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_a_neck_of_another_structure_or_width_loads_nothing(case):
    """Another concat order, other widths, another hidden_ratio, no GFPN at all: refused, one line, model intact."""
    model_of, match = REFUSALS[case]
    model = model_of()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=match) as error:
        load_backbone_weights(model, OFFICIAL / "gfpn_small_relu.pth")
    assert "\n" not in str(error.value)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_neck_structure_is_read_from_the_rows():
    with torch.device("meta"):
        model = DetectionModel("yolov5_GFPN-damo-s.yaml", verbose=False)
    assert damo_neck_rows(model.model) == {
        "merge_3": 12, "merge_4": 16, "merge_5": 19, "merge_7": 22, "merge_6": 26,
        "bu_conv13": 10, "bu_conv24": 13, "bu_conv57": 20, "bu_conv46": 23, "bu_conv76": 24}
    model.model[17].mode = "bilinear"  # up(x4) must be a nearest 2x upsample, as in DAMO-YOLO
    with pytest.raises(CheckpointError, match=r"layer 19 is not DAMO-YOLO's merge_5"):
        damo_neck_rows(model.model)
