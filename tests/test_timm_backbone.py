"""timm feature extractors as multi-output backbones (models/modules/timm_backbone.py)."""

from __future__ import annotations

import copy
import logging

import pytest
import timm
import torch
import torch.nn as nn

from models.modules.timm_backbone import YAML_MODULES, TimmBackbone
from models.pretrained import CheckpointError
from tests.helpers import fold_error, n_params, randomize_bn, rel_error


@pytest.fixture
def yolov5_log(caplog):
    """Records of the 'yolov5' logger, whether or not it propagates to the root logger."""
    logger = logging.getLogger("yolov5")
    level, propagate = logger.level, logger.propagate
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # each record once
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.setLevel(level)
    logger.propagate = propagate


def strides(features: list[torch.Tensor], size: int) -> list[int]:
    return [size // f.shape[-1] for f in features]


def test_four_outputs_resnet18_custom_in_channels():
    backbone = TimmBackbone(4, "resnet18", [1, 2, 3, 4])
    features = backbone(torch.randn(1, 4, 64, 64))
    assert strides(features, 64) == backbone.strides == [4, 8, 16, 32]
    assert [f.shape[1] for f in features] == backbone.channels == [64, 128, 256, 512]
    assert YAML_MODULES["TimmBackbone"] == (TimmBackbone, "backbone")


def test_five_outputs_and_random_init_log(yolov5_log):
    backbone = TimmBackbone(3, "repvgg_a0", drop_path_rate=0.1)
    features = backbone(torch.randn(1, 3, 64, 64))
    assert strides(features, 64) == [2, 4, 8, 16, 32]
    assert [f.shape[1] for f in features] == [48, 48, 96, 192, 1280]
    messages = [r.getMessage() for r in yolov5_log.records]
    assert len(messages) == 1 and "repvgg_a0" in messages[0] and "randomly initialized" in messages[0]


def test_missing_weights_file_is_named(tmp_path):
    path = tmp_path / "no_such_weights.pth"
    with pytest.raises(CheckpointError, match="no_such_weights.pth: timm weights file not found") as e:
        TimmBackbone(3, "resnet18", weights=path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["resnet18", "repvgg_a0"])  # repvgg: 'stages.0' is 'stages_0' in the extractor
def test_weights_from_classification_model_file(tmp_path, yolov5_log, name):
    torch.manual_seed(0)
    full = timm.create_model(name, pretrained=False)
    path = tmp_path / f"{name}.pth"
    torch.save(full.state_dict(), path)
    backbone = TimmBackbone(3, name, weights=str(path))
    loaded = backbone.model.state_dict()
    reference = {k: v for k, v in full.state_dict().items() if not k.startswith(("head", "fc."))}
    assert len(loaded) == len(reference)
    assert all(torch.equal(a, b) for a, b in zip(loaded.values(), reference.values()))
    assert any("loaded" in r.getMessage() for r in yolov5_log.records)
    assert not any("randomly" in r.getMessage() for r in yolov5_log.records)


def test_weights_from_extractor_file_and_incomplete_file(tmp_path):
    torch.manual_seed(0)
    source = TimmBackbone(3, "resnet18", [2, 3, 4])
    path = tmp_path / "extractor.pt"
    torch.save(source.model.state_dict(), path)
    x = torch.randn(1, 3, 64, 64)
    target = TimmBackbone(3, "resnet18", [2, 3, 4], weights=path).eval()
    assert all(torch.equal(a, b) for a, b in zip(target(x), source.eval()(x)))
    partial = {k: v for k, v in source.model.state_dict().items() if not k.startswith("layer4")}
    torch.save(partial, path)
    with pytest.raises(CheckpointError, match=r"extractor.pt: lacks \d+ tensors of the resnet18 extractor"):
        TimmBackbone(3, "resnet18", [2, 3, 4], weights=path)


@pytest.mark.parametrize("name", ["repvgg_a0", "mobileone_s0", "repghostnet_100"])
def test_timm_reparameterize_protocol(name):
    """timm's own re-parameterizable blocks fold through ``reparameterize()`` with unchanged outputs."""
    torch.manual_seed(0)
    backbone = randomize_bn(TimmBackbone(3, name))
    assert any(hasattr(m, "reparameterize") for m in backbone.modules())
    assert fold_error(backbone, torch.randn(2, 3, 64, 64)) < 1e-5


# ---- whole models ---------------------------------------------------------------------------------------------------
def test_repvgg_yaml_fuses_without_batchnorm():
    from models.yolo import DetectionModel

    torch.manual_seed(0)
    model = DetectionModel("yolov5s_timm-repvgg_a0.yaml")
    assert n_params(model) == 13_003_645
    assert model.save == [2, 3, 6, 10, 13, 16, 19] and model.stride.tolist() == [8, 16, 32]
    assert model.model[0].slots == [0, 1, 2, 3, 4]
    maps = model.train()(torch.randn(1, 3, 64, 64))
    assert [tuple(m.shape) for m in maps] == [(1, 3, 64 // s, 64 // s, 85) for s in (8, 16, 32)]
    model = randomize_bn(model).eval()
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        before = model(x)[1]  # the raw head maps (the box decoding amplifies rounding)
        model.fuse()
        after = model(x)[1]
    assert all(rel_error(a, b) < 1e-5 for a, b in zip(after, before))
    backbone = model.model[0]
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in backbone.modules())
    assert all(hasattr(m, "reparam_conv") for m in backbone.modules() if type(m).__name__ == "RepVggBlock")


def test_four_output_backbone_in_yaml():
    """resnet18 without its stride-2 map: layer index 0 stays empty, the head still finds P3-P5 by stride."""
    from models.yolo import DetectionModel, find_model_yaml
    from utils.general import yaml_load

    cfg = copy.deepcopy(yaml_load(find_model_yaml("yolov5s_timm-repvgg_a0.yaml")))
    cfg["backbone"][0] = [-1, 1, "TimmBackbone", ["resnet18", [1, 2, 3, 4]]]
    model = DetectionModel(cfg)
    assert model.model[0].slots == [None, 0, 1, 2, 3]
    assert model.model[5].cv1.conv.in_channels == 512  # SPPF on resnet18's stride-32 map
    assert model.stride.tolist() == [8, 16, 32]
    pred, _ = model.eval()(torch.randn(1, 3, 64, 64))
    assert pred.shape == (1, 3 * (8 * 8 + 4 * 4 + 2 * 2), 85)
