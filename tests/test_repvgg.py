"""RepVGG blocks, stages and backbones: folding equivalence, structure, parameter counts, custom L2."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn as nn
from timm.layers import SEModule

from models.modules.repvgg import (
    VARIANTS,
    YAML_MODULES,
    RepVGGBlock,
    RepVGGStage,
    repvgg_backbone,
    repvgg_custom_l2,
    repvgg_custom_l2_parameters,
)
from tests.helpers import fold_error, n_params, randomize_bn, rel_error

# Training form, without classifier. The g2 variants are not registered in timm; their figures were measured on
# timm's ByobNet built with timm's own RepVGG block config at groups=2 (same builder as its g4 models).
BACKBONE_PARAMS = {
    "a0": 7_827_968, "a1": 12_811_264, "a2": 26_801_600, "b0": 14_536_960,
    "b1": 55_366_016, "b1g2": 43_733_376, "b1g4": 37_917_056,
    "b2": 86_461_376, "b2g2": 68_285_376, "b2g4": 59_197_376,
    "b3": 120_524_288, "b3g2": 94_350_848, "b3g4": 81_264_128,
    "d2se": 130_773_836,
}
TIMM_VARIANTS = ["a0", "a1", "a2", "b0", "b1", "b1g4", "b2", "b2g4", "b3", "b3g4", "d2se"]


def folded_copy(model: nn.Module) -> nn.Module:
    folded = copy.deepcopy(model)
    for m in list(folded.modules()):
        if hasattr(m, "reparameterize"):
            m.reparameterize()
    return folded.eval()


def assert_plain(model: nn.Module) -> None:
    """No BatchNorm and no RepVGG block that still has branches."""
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert not any(isinstance(m, RepVGGBlock) and not m.folded for m in model.modules())


@pytest.mark.parametrize(
    "cin, cout, stride, groups, use_se",
    [
        (8, 8, 1, 1, False),  # identity branch
        (8, 16, 1, 1, False),  # no identity: channels change
        (16, 16, 2, 1, False),  # no identity: stride 2
        (8, 8, 1, 4, False),  # grouped, with identity
        (8, 16, 2, 2, False),  # grouped, stride 2
        (32, 32, 1, 2, True),  # squeeze-excite, grouped, identity
    ],
)
def test_block_folds_to_one_conv(cin, cout, stride, groups, use_se):
    torch.manual_seed(0)
    block = randomize_bn(RepVGGBlock(cin, cout, 3, stride, 1, groups, use_se)).eval()
    assert (block.identity is not None) == (cin == cout and stride == 1)
    x = torch.randn(2, cin, 9, 9)
    folded = folded_copy(block)
    assert rel_error(folded(x), block(x)) < 1e-5
    assert_plain(folded)
    assert folded.fused.kernel_size == (3, 3) and folded.fused.groups == groups and folded.fused.bias is not None
    assert folded(x).shape == (2, cout, 5 if stride == 2 else 9, 5 if stride == 2 else 9)
    weights = copy.deepcopy(folded.state_dict())
    folded.reparameterize()  # idempotent
    assert all(torch.equal(weights[k], v) for k, v in folded.state_dict().items())


def test_block_se_shape_and_padding_check():
    block = RepVGGBlock(64, 64, use_se=True)
    assert block.se.fc1.out_channels == 4 and block.se.fc1.bias is not None
    with pytest.raises(ValueError):
        RepVGGBlock(8, 8, 3, 1, 0)


def test_stage_folds_and_downsamples():
    torch.manual_seed(0)
    stage = randomize_bn(RepVGGStage(8, 16, 3, stride=2, groups=[1, 2, 1])).eval()
    assert [b.dense.conv.stride[0] for b in stage] == [2, 1, 1]
    assert [b.dense.conv.groups for b in stage] == [1, 2, 1]
    assert [b.identity is not None for b in stage] == [False, True, True]
    x = torch.randn(1, 8, 16, 16)
    assert stage(x).shape == (1, 16, 8, 8)
    assert fold_error(stage, x) < 1e-5
    with pytest.raises(ValueError):
        RepVGGStage(8, 16, 3, groups=[1, 2])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_backbone_parameter_counts(variant):
    with torch.device("meta"):
        backbone = repvgg_backbone(3, variant)
    assert n_params(backbone) == BACKBONE_PARAMS[variant]


@pytest.mark.parametrize("variant", TIMM_VARIANTS)
def test_backbone_matches_timm(variant):
    with torch.device("meta"):
        ours = repvgg_backbone(3, variant)
        reference = timm.create_model(f"repvgg_{variant}", features_only=True, pretrained=False)
    assert n_params(ours) == n_params(reference)
    assert ours.channels == reference.feature_info.channels()
    n_se = sum(isinstance(m, SEModule) for m in ours.modules())
    assert n_se == (1 + sum(VARIANTS[variant]["depths"]) if variant == "d2se" else 0)


def test_grouped_layers_are_2_to_26():
    backbone = repvgg_backbone(3, "b1g4")
    groups = [b.dense.conv.groups for stage in backbone.stages[1:] for b in stage]
    assert groups == [4 if i % 2 == 0 else 1 for i in range(1, 28)]
    assert backbone.stages[0].dense.conv.groups == 1


def test_a0_outputs_and_folding():
    torch.manual_seed(0)
    backbone = randomize_bn(repvgg_backbone(3, "a0")).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        outputs = backbone(x)
        folded = folded_copy(backbone)
        folded_outputs = folded(x)
    assert [o.shape[1] for o in outputs] == [48, 48, 96, 192, 1280]
    assert [64 // o.shape[-1] for o in outputs] == [2, 4, 8, 16, 32]
    assert max(rel_error(a, b) for a, b in zip(folded_outputs, outputs)) < 1e-5
    assert_plain(folded)


def test_yaml_modules():
    assert YAML_MODULES["RepVGGBlock"][1] == "conv" and YAML_MODULES["RepVGGStage"][1] == "csp"
    assert {f"repvgg_{v}" for v in VARIANTS} <= set(YAML_MODULES)
    ctor, kind = YAML_MODULES["repvgg_a0"]
    assert kind == "backbone" and ctor.__name__ == "repvgg_a0"
    assert ctor(1).stages[0].dense.conv.in_channels == 1


def bn_scale_of(bn: nn.BatchNorm2d) -> torch.Tensor:
    return (bn.weight / (bn.running_var + bn.eps).sqrt()).detach()


def direct_custom_l2(block: RepVGGBlock) -> torch.Tensor:
    """The custom L2 penalty written element by element."""
    k3, k1 = block.dense.conv.weight, block.pointwise.conv.weight
    bn3, bn1 = block.dense.bn, block.pointwise.bn
    total = torch.zeros((), dtype=torch.float64)
    for o in range(k3.shape[0]):
        t3 = (bn3.weight[o] / (bn3.running_var[o] + bn3.eps).sqrt()).double()
        t1 = (bn1.weight[o] / (bn1.running_var[o] + bn1.eps).sqrt()).double()
        for i in range(k3.shape[1]):
            w = k3[o, i].double()
            total += (w**2).sum() - w[1, 1] ** 2
            total += (t3 * w[1, 1] + t1 * k1[o, i, 0, 0].double()) ** 2 / (t3**2 + t1**2)
    return total


def test_custom_l2_value_and_gradient():
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(RepVGGBlock(2, 3, groups=1), RepVGGBlock(3, 3, stride=2)))
    expected = sum(direct_custom_l2(b) for b in model)
    penalty = repvgg_custom_l2(model)
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-6)

    penalty.backward()
    block = model[0]
    k3, k1 = block.dense.conv.weight, block.pointwise.conv.weight
    ring = torch.ones(3, 3, dtype=torch.bool)
    ring[1, 1] = False
    assert torch.allclose(k3.grad[:, :, ring], 2 * k3.detach()[:, :, ring])  # plain L2 on the ring
    t3, t1 = (bn_scale_of(branch.bn).view(-1, 1) for branch in (block.dense, block.pointwise))
    centre = t3 * k3.detach()[:, :, 1, 1] + t1 * k1.detach()[:, :, 0, 0]
    assert torch.allclose(k1.grad[:, :, 0, 0], 2 * centre * t1 / (t3**2 + t1**2))
    assert torch.allclose(k3.grad[:, :, 1, 1], 2 * centre * t3 / (t3**2 + t1**2))
    assert block.dense.bn.weight.grad is None  # the BN scales are constants of the penalty


def test_custom_l2_parameters_and_folded_model():
    model = nn.Sequential(RepVGGBlock(4, 4), nn.Conv2d(4, 4, 1), RepVGGBlock(4, 8, stride=2))
    covered = repvgg_custom_l2_parameters(model)
    expected = [model[0].dense.conv.weight, model[0].pointwise.conv.weight,
                model[2].dense.conv.weight, model[2].pointwise.conv.weight]
    assert len(covered) == 4 and all(a is b for a, b in zip(covered, expected))
    folded = folded_copy(model)
    assert repvgg_custom_l2_parameters(folded) == [] and repvgg_custom_l2(folded).item() == 0.0


@pytest.mark.parametrize("cfg, params", [("yolov5s_RepVGG.yaml", 7_512_125), ("yolov5_RepVGG-A0.yaml", 13_003_645)])
def test_yaml_model_fuses(cfg, params):
    from models.yolo import DetectionModel

    torch.manual_seed(0)
    model = randomize_bn(DetectionModel(cfg)).eval()
    assert n_params(model) == params  # the figures quoted in the YAML comments
    assert model.stride.tolist() == [8, 16, 32]
    x = torch.rand(1, 3, 64, 64)
    assert fold_error(model, x) < 1e-5
    folded = copy.deepcopy(model).fuse()
    assert_plain(folded)
    assert any(isinstance(m, RepVGGBlock) for m in folded.modules())


def test_a0_yaml_layout():
    from models.yolo import DetectionModel

    with torch.device("meta"):  # shapes only
        model = DetectionModel("yolov5_RepVGG-A0.yaml")
    assert model.model[0].channels == [48, 48, 96, 192, 1280]
    assert model.save == [2, 3, 6, 10, 13, 16, 19]
    assert model.model[-1].i == 20
