"""Official RepLKNet checkpoints load into the RepLKNet rows and compute the official function.

The fixture (``tests.helpers.SHARED / fixtures/official``, see its README) is the official RepLKNet in a small
training-form configuration with random weights and non-trivial BatchNorms, plus its outputs on a fixed input.
The full-size key lists check that every non-classifier tensor of the published 31B (1K and 22K), 31L and XL
checkpoints has a place of the same shape in our YAML models (built on the meta device: no memory, no compute).
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from models.modules.replknet import CHECKPOINT_FORMATS
from models.pretrained import CheckpointError, load_backbone_weights, load_state_into_rows
from models.yolo import DetectionModel
from tests.helpers import ROOT, SHARED, rel_error
from utils.general import yaml_load

FIXTURES = SHARED / "fixtures" / "official"
TRAIN_TOL, FOLDED_TOL = 2e-5, 1e-4  # the fixture README's tolerances: max|ours - ref| <= tol * max|ref|
FORMAT = CHECKPOINT_FORMATS[0]
BACKBONE_ROWS = range(5)  # RepLKNet_Stem, RepLKNet_stage1..4

SMALL = {"channels": [16, 32, 64, 128], "kernels": [13, 11, 9, 5], "layers": [1, 2, 2, 1], "drop_path": 0.1,
         "small_kernel": 5, "dw_ratio": 1, "ffn_ratio": 4}
# The published variants' backbone arguments (ARCHITECTURES.md, checked against the key lists' shapes);
# None: yolov5_RepLKNet.yaml as shipped (31B).
FULL_SIZE = {
    "RepLKNet-31B_ImageNet-1K": None,
    "RepLKNet-31B_ImageNet-22K": None,
    "RepLKNet-31L_ImageNet-1K": {"channels": [192, 384, 768, 1536], "kernels": [31, 29, 27, 13],
                                 "layers": [2, 2, 18, 2], "drop_path": 0.3, "small_kernel": 5, "dw_ratio": 1,
                                 "ffn_ratio": 4},
    "RepLKNet-XL_ImageNet-1K": {"channels": [256, 512, 1024, 2048], "kernels": [27, 27, 27, 13],
                                "layers": [2, 2, 18, 2], "drop_path": 0.3, "small_kernel": None, "dw_ratio": 1.5,
                                "ffn_ratio": 4},
}


def replknet_model_dict(variant: dict, width_multiple: float | None = None) -> dict:
    """yolov5_RepLKNet.yaml's model dict with its backbone rows built for ``variant`` (and the head's width)."""
    d = yaml_load(ROOT / "models" / "yolov5_RepLKNet.yaml")
    ch = variant["channels"]
    args = [ch, variant["kernels"], variant["layers"], variant["drop_path"], variant["small_kernel"],
            variant["dw_ratio"], variant["ffn_ratio"]]
    d["backbone"] = [[-1, 1, "RepLKNet_Stem", [ch[0], 3, ch]]] + [
        [-1, 1, f"RepLKNet_stage{s + 1}", [ch[min(s + 1, 3)], *args]] for s in range(4)]
    if width_multiple is not None:
        d["width_multiple"] = width_multiple
    return d


def official_keys(name: str) -> dict[str, list[int]]:
    """One full-size key list of official_state_dict_keys.json: key -> shape."""
    entry = json.loads((FIXTURES / "official_state_dict_keys.json").read_text())[name]
    return {key: shape for key, shape in entry["state_dict"]}


def meta_state(keys: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(shape, device="meta") for k, shape in keys.items()}


# ------------------------------------------------------------------------------------------------- small fixture


@pytest.fixture(scope="module")
def reference():
    return torch.load(FIXTURES / "replknet_small_ref.pt", weights_only=True)


def row_outputs(model: DetectionModel, x: torch.Tensor) -> list[torch.Tensor]:
    """Outputs of the backbone rows during one ordinary eval forward of the whole detector (forward hooks)."""
    outputs: dict[int, torch.Tensor] = {}
    hooks = [model.model[i].register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out))
             for i in BACKBONE_ROWS]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in hooks:
            h.remove()
    return [outputs[i] for i in BACKBONE_ROWS]


def test_small_fixture_reproduces_the_official_outputs_trained_and_folded(reference):
    """Loaded with the users' loader, the stem, the three transitions and the last stage equal the official model's
    outputs in the training form (tol 2e-5) and after model.fuse() (tol 1e-4)."""
    assert reference["config"]["large_kernel_sizes"] == SMALL["kernels"]
    assert reference["config"]["channels"] == SMALL["channels"]
    model = DetectionModel(replknet_model_dict(SMALL, width_multiple=0.125), nc=3, verbose=False)
    result = load_backbone_weights(model, FIXTURES / reference["checkpoint"]["file"], log=False)
    assert (result.loaded, result.total, result.rows) == (336, 336, list(BACKBONE_ROWS))
    bns = [m for i in BACKBONE_ROWS for m in model.model[i].modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.eps == 1e-5 for m in bns)  # the official eps; YOLOv5's 1e-3 misses the outputs
    assert all(m.eps == 1e-3 for m in model.model[5:].modules() if isinstance(m, torch.nn.BatchNorm2d))

    wanted = [reference["stem"], *reference["transitions"], reference["features"][3]]
    trained = row_outputs(model, reference["input"])
    for i, (got, want) in enumerate(zip(trained, wanted)):
        assert got.shape == want.shape
        assert rel_error(got, want) <= TRAIN_TOL, f"row {i} (training form)"

    model.fuse()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for i in BACKBONE_ROWS for m in model.model[i].modules())
    for i, (got, want) in enumerate(zip(row_outputs(model, reference["input"]), wanted)):
        assert rel_error(got, want) <= FOLDED_TOL, f"row {i} (folded)"


def test_small_fixture_into_other_channels_is_refused():
    """The 31B-shaped tiny YAML has other widths: the loader names the first mismatching tensor and loads nothing."""
    with torch.device("meta"):
        model = DetectionModel("yolov5_RepLKNet-tiny.yaml", nc=3, verbose=False)
    with pytest.raises(CheckpointError, match=r"'stem\.0\.conv\.weight' has shape \(16, 3, 3, 3\)"):
        load_backbone_weights(model, FIXTURES / "replknet_small.pth", log=False)


# ------------------------------------------------------------------------------------------------- full-size key lists


def build_full_size(name: str, tmp_path) -> DetectionModel:
    """The variant's model on the meta device: the shipped YAML for 31B, a YAML file written from it otherwise
    (so XL's small_kernel goes through the YAML parser as null)."""
    variant = FULL_SIZE[name]
    cfg = "yolov5_RepLKNet.yaml"
    if variant is not None:
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump(replknet_model_dict(variant), sort_keys=False))
        assert (variant["small_kernel"] is None) == ("null" in cfg.read_text())
    with torch.device("meta"):
        return DetectionModel(cfg, nc=80, verbose=False)


@pytest.mark.parametrize("name", list(FULL_SIZE))
def test_full_size_checkpoint_maps_completely(name, tmp_path):
    """Every official non-classifier tensor lands on a backbone tensor of the same shape, and every tensor of our
    backbone rows receives one."""
    keys = official_keys(name)
    model = build_full_size(name, tmp_path)
    result = load_state_into_rows(model.model, meta_state(keys), FORMAT, f"{name}.json")
    heads = [k for k in keys if FORMAT.is_head(k)]
    assert {k.split(".")[0] for k in heads} == {"norm", "head"}
    assert result.loaded == result.total == len(keys) - len(heads)
    assert result.rows == list(BACKBONE_ROWS)
    mapped = set(FORMAT.map_keys([k for k in keys if not FORMAT.is_head(k)], model.model).values())
    ours = {k for k in model.model.state_dict() if int(k.split(".", 1)[0]) in BACKBONE_ROWS}
    assert mapped == ours
    if FULL_SIZE[name] and FULL_SIZE[name]["small_kernel"] is None:
        assert not any("small_conv" in k for k in ours)


def test_intermediate_norms_are_reported_skipped(tmp_path):
    """``stages.{s}.norm.*`` (norm_intermediate_features, used by XL downstream) has no place: skipped, not loaded."""
    keys = official_keys("RepLKNet-31B_ImageNet-1K")
    norms = {f"stages.{s}.norm.{t}": [c] for s, c in enumerate([128, 256, 512, 1024])
             for t in ("weight", "bias", "running_mean", "running_var")}
    model = build_full_size("RepLKNet-31B_ImageNet-1K", tmp_path)
    result = load_state_into_rows(model.model, meta_state({**keys, **norms}), FORMAT, "keys.json")
    assert result.total - result.loaded == len(norms)
    assert result.skipped == {"stages.* (no row for them)": len(norms)}


def test_stage_rows_missing_from_the_model_are_skipped():
    """A model with only the stem and stage 1 loads those and reports the rest of the file as skipped."""
    d = replknet_model_dict(SMALL, width_multiple=0.125)
    d["backbone"] = d["backbone"][:2]
    d["head"] = [[-1, 1, "Conv", [64, 1, 1]], [[-1], 1, "Detect", ["nc", [[10, 13, 16, 30, 33, 23]]]]]
    model = DetectionModel(d, nc=3, verbose=False)
    result = load_backbone_weights(model, FIXTURES / "replknet_small.pth", log=False)
    assert result.rows == [0, 1] and 0 < result.loaded < result.total == 336
    assert set(result.skipped) == {"stages.* (no row for them)", "transitions.* (no row for them)"}
