"""Official RepGhostNet checkpoints load into our backbone row and compute the official function.

Fixtures (tests.helpers.SHARED / fixtures/official, see its README): a RepGhostNet 0.5x training checkpoint with
random weights in the official training script's wrapper (``state_dict`` and ``state_dict_ema``), the official
model's outputs for it, and the full-size official key lists with shapes.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
import yaml

from models.modules.repghost import RepGhostModule, RepGhostNet, official_to_ours
from models.pretrained import CheckpointError, identify_format, load_backbone_weights, load_state_into_rows
from models.yolo import DetectionModel, find_model_yaml
from tests.helpers import SHARED

OFFICIAL = SHARED / "fixtures" / "official"
CHECKPOINT = OFFICIAL / "repghostnet_0_5x_nc10.pth.tar"
TRAIN_TOL, FOLDED_TOL = 2e-5, 1e-4  # the fixture README's tolerances, relative to max|reference|


@pytest.fixture(scope="module")
def ref() -> dict:
    return torch.load(OFFICIAL / "repghostnet_0_5x_nc10_ref.pt", weights_only=True)


def model_dict(variant: str, **backbone_kwargs) -> dict:
    """models/yolov5s_RepGhostNet.yaml with the backbone row set to ``repghostnet_<variant>(**backbone_kwargs)``."""
    d = yaml.safe_load(find_model_yaml("yolov5s_RepGhostNet.yaml").read_text())
    d["backbone"][0] = [-1, 1, f"repghostnet_{variant}", [backbone_kwargs] if backbone_kwargs else []]
    return d


def max_rel_errors(outputs: list[torch.Tensor], references: list[torch.Tensor]) -> list[float]:
    assert [o.shape for o in outputs] == [r.shape for r in references]
    return [float((o - r).abs().max() / r.abs().max()) for o, r in zip(outputs, references)]


def backbone_features(model: DetectionModel, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return model.model[0](x)


def test_fixture_checkpoint_reproduces_official_features_trained_and_fused(ref):
    model = DetectionModel(model_dict("0_5x"), verbose=False).eval()
    result = load_backbone_weights(model, CHECKPOINT)
    assert (result.loaded, result.total, result.rows) == (668, 668, [0, 1, 2, 3, 4])  # conv_head/classifier excluded
    assert all(m.eps == 1e-5 for m in model.model[0].modules() if isinstance(m, nn.BatchNorm2d))
    assert all(m.eps == 1e-3 for m in model.model[5:].modules() if isinstance(m, nn.BatchNorm2d))  # head untouched

    outputs = backbone_features(model, ref["input"])
    assert max(max_rel_errors(outputs, ref["features"])) <= TRAIN_TOL
    assert min(max_rel_errors(outputs, ref["non_ema"]["features"])) > 0.1  # the EMA weights were the ones loaded

    model.fuse()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.model[0].modules())
    assert max(max_rel_errors(backbone_features(model, ref["input"]), ref["features"])) <= FOLDED_TOL


def test_deploy_form_checkpoint_reproduces_official_features(ref, tmp_path):
    """A plain state_dict under the official deploy key list's names (our folded cheap operations as values) loads
    into a ``deploy=True`` backbone and computes the fixture's features."""
    trained = DetectionModel(model_dict("0_5x"), verbose=False).eval()
    load_backbone_weights(trained, CHECKPOINT, log=False)
    for m in trained.model[0].modules():
        if isinstance(m, RepGhostModule):
            m.fold_cheap()
    ours = trained.model[0].state_dict()
    keys = json.loads((OFFICIAL / "official_state_dict_keys.json").read_text())["repghostnet_0_5x-deploy"]
    deploy_state = {k: ours[official_to_ours(k)] for k, _ in keys["state_dict"] if official_to_ours(k) in ours}
    torch.save(deploy_state, tmp_path / "repghostnet_0_5x_deploy.pth")

    model = DetectionModel(model_dict("0_5x", deploy=True), verbose=False).eval()
    result = load_backbone_weights(model, tmp_path / "repghostnet_0_5x_deploy.pth")
    assert result.loaded == result.total == len(deploy_state) == 380
    assert max(max_rel_errors(backbone_features(model, ref["input"]), ref["features"])) <= FOLDED_TOL
    model.fuse()
    assert max(max_rel_errors(backbone_features(model, ref["input"]), ref["features"])) <= FOLDED_TOL


@pytest.mark.parametrize("config", ["repghostnet_0_5x-train", "repghostnet_0_5x-deploy",
                                    "repghostnet_1_0x-train", "repghostnet_1_0x-deploy"])
def test_full_size_key_lists_map_completely(config):
    """Every non-head key of the official full-size state_dicts has a place of the same shape in the YAML model."""
    entry = json.loads((OFFICIAL / "official_state_dict_keys.json").read_text())[config]
    variant, form = config.removeprefix("repghostnet_").split("-")
    state = {k: torch.empty(shape, device="meta") for k, shape in entry["state_dict"]}
    with torch.device("meta"):
        model = DetectionModel(model_dict(variant, **({"deploy": True} if form == "deploy" else {})), verbose=False)
    fmt = identify_format(state, config)
    assert fmt.name == ("RepGhostNet (deploy)" if form == "deploy" else "RepGhostNet")
    result = load_state_into_rows(model.model, state, fmt, "keys.json")
    heads = {k for k in state if k.startswith(("conv_head.", "classifier."))}
    assert len(heads) == 4 and result.total == len(state) - 4 == entry["state_dict_entries"] - 4
    assert result.loaded == result.total


def test_refusals(ref, tmp_path):
    """Training-form weights into a deploy-form row, or into a model without a RepGhostNet row, load nothing."""
    deploy_model = DetectionModel(model_dict("0_5x", deploy=True), verbose=False)
    before = copy.deepcopy(deploy_model.state_dict())
    with pytest.raises(CheckpointError, match=r"fusion_bn|cheap_operation\.0"):
        load_backbone_weights(deploy_model, CHECKPOINT)
    assert all(torch.equal(v, deploy_model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(CheckpointError, match="no rows it fits; build the model with a repghostnet_"):
        load_backbone_weights(DetectionModel("yolov5n_RepGhost.yaml", verbose=False), CHECKPOINT)


def test_backbone_options():
    """ReLU by default (the official network), SiLU on request (SE keeps its ReLU), the published widths."""
    def count(net: nn.Module, kind: type) -> int:
        return sum(isinstance(m, kind) for m in net.modules())

    official, silu = RepGhostNet(width=0.5), RepGhostNet(width=0.5, act="silu")
    n_se = sum(type(m).__name__ == "SEModule" for m in official.modules())
    assert n_se == 7 and count(official, nn.SiLU) == 0 and count(official, nn.ReLU) > n_se
    assert count(silu, nn.ReLU) == n_se and count(silu, nn.SiLU) == count(official, nn.ReLU) - n_se
    assert [f.shape[1] for f in RepGhostNet(width=1.0)(torch.zeros(1, 3, 64, 64))] == [16, 24, 40, 112, 960]
    with pytest.raises(ValueError, match="act must be one of relu, silu"):
        RepGhostNet(act="gelu")
    with pytest.raises(ValueError, match="width must be a positive"):
        RepGhostNet(width=0)
