"""Efficient RepGFPN (DAMO-YOLO neck): blocks, folding equivalence, CSPStage's SPP, YAML models."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from models.modules.gfpn import (
    YAML_MODULES,
    BasicBlock_3x3_Reverse,
    ConvBNAct,
    CSPStage,
    PoolPyramid,
    RepConv,
    get_activation,
)
from tests.helpers import reparameterize_all, fold_error, n_params, randomize_bn, rel_error


def assert_fully_folded(model: nn.Module) -> None:
    """No BatchNorm and no parallel RepConv branch left anywhere in ``model``."""
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    for m in model.modules():
        if isinstance(m, RepConv):
            assert m.rbr_1x1 is None and isinstance(m.rbr_dense, nn.Conv2d) and m.rbr_dense.bias is not None


@pytest.mark.parametrize(
    "name, cls", [("relu", nn.ReLU), ("silu", nn.SiLU), ("swish", nn.SiLU), ("lrelu", nn.LeakyReLU),
                  ("hardsigmoid", nn.Hardsigmoid), ("identity", nn.Identity), (None, nn.Identity)]
)
def test_activation_by_name(name, cls):
    assert type(get_activation(name)) is cls
    assert get_activation(name) is not get_activation(name)  # a fresh module each time


def test_activation_details_and_unknown_name():
    assert get_activation("lrelu").negative_slope == 0.1
    with pytest.raises(ValueError, match="unknown activation"):
        get_activation("nn.ReLU()")


@pytest.mark.parametrize("k, stride, padding", [(1, 1, 0), (3, 2, 1), (5, 1, 2), (2, 2, 0)])
def test_convbnact_geometry(k, stride, padding):
    layer = ConvBNAct(8, 16, k, stride, act="relu")
    assert layer.conv.padding == (padding, padding) and layer.conv.bias is None
    assert isinstance(layer.act, nn.ReLU) and n_params(layer) == 8 * 16 * k * k + 2 * 16


@pytest.mark.parametrize("stride, act", [(1, "relu"), (2, "silu"), (1, "identity")])
def test_repconv_folds_to_one_3x3_conv(stride, act):
    torch.manual_seed(0)
    block = randomize_bn(RepConv(8, 16, 3, stride, act=act)).eval()
    assert n_params(block) == 8 * 16 * 9 + 32 + 8 * 16 + 32
    x = torch.randn(2, 8, 12, 12)
    with torch.no_grad():
        before = block(x)
        block.reparameterize()
        block.reparameterize()  # idempotent
        after = block(x)
    assert rel_error(after, before) < 1e-5
    assert block.rbr_1x1 is None and isinstance(block.rbr_dense, nn.Conv2d)
    assert block.rbr_dense.kernel_size == (3, 3) and block.rbr_dense.stride == (stride, stride)
    assert n_params(block) == 8 * 16 * 9 + 16


def test_basic_block_structure_and_folding():
    torch.manual_seed(0)
    block = randomize_bn(BasicBlock_3x3_Reverse(16, 0.5, 16, act="silu")).eval()
    assert block.conv2.rbr_dense.conv.out_channels == 8 and block.conv1.conv.in_channels == 8
    x = torch.randn(2, 16, 10, 10)
    plain = BasicBlock_3x3_Reverse(16, 0.5, 16, act="silu", shortcut=False).eval()
    plain.load_state_dict(block.state_dict())
    with torch.no_grad():
        assert torch.allclose(block(x), plain(x) + x)
    assert fold_error(block, x) < 1e-5
    with pytest.raises(ValueError):
        BasicBlock_3x3_Reverse(16, 1.0, 32)


@pytest.mark.parametrize("c2", [32, 75])
def test_cspstage_channels(c2):
    stage = CSPStage(24, c2, n=3, hidden_ratio=0.75)
    first, mid = c2 // 2, c2 - c2 // 2
    assert (stage.conv1.conv.out_channels, stage.conv2.conv.out_channels) == (first, mid)
    assert stage.conv3.conv.in_channels == mid * 3 + first
    assert all(b.conv2.rbr_dense.conv.out_channels == int(mid * 0.75) for b in stage.convs)
    assert stage(torch.randn(1, 24, 8, 8)).shape == (1, c2, 8, 8)


@pytest.mark.parametrize("n, spp", [(1, False), (2, False), (1, True), (2, True), (3, True)])
def test_cspstage_fold_equivalence(n, spp):
    torch.manual_seed(0)
    stage = randomize_bn(CSPStage(24, 32, n=n, spp=spp)).eval()
    x = torch.randn(2, 24, 16, 16)
    assert fold_error(stage, x) < 1e-5
    assert_fully_folded(reparameterize_all(copy.deepcopy(stage)))


@pytest.mark.parametrize("n, after", [(1, 0), (2, 0), (3, 1), (4, 1)])
def test_cspstage_spp_follows_middle_block(n, after):
    """The pooled map follows block (n-1)//2, feeds the next block and replaces that block's output in the concat."""
    stage = CSPStage(16, 32, n=n, spp=True).eval()
    first = mid = 16
    calls = []
    for name, module in [*((str(i), b) for i, b in enumerate(stage.convs)), ("spp", stage.spp)]:
        module.register_forward_hook(lambda _m, _i, out, name=name: calls.append((name, out)))
    concat = []
    stage.conv3.register_forward_hook(lambda _m, inputs, _o: concat.append(inputs[0]))
    with torch.no_grad():
        stage(torch.randn(1, 16, 16, 16))
    assert [name for name, _ in calls] == [*map(str, range(after + 1)), "spp", *map(str, range(after + 1, n))]
    assert stage.conv3.conv.in_channels == concat[0].shape[1] == first + mid * n
    slot = first + mid * after
    assert torch.equal(concat[0][:, slot:slot + mid], dict(calls)["spp"])


def test_cspstage_spp_adds_one_pool_pyramid():
    with_spp, without = CSPStage(24, 32, n=3, spp=True), CSPStage(24, 32, n=3)
    mid = 16
    assert n_params(with_spp) - n_params(without) == 4 * mid * mid + 2 * mid == n_params(PoolPyramid(mid))


def test_pool_pyramid_pools_on_its_input():
    spp = PoolPyramid(4, act="identity").eval()
    x = torch.randn(1, 4, 16, 16)
    seen = []
    spp.conv.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0]))
    spp(x)
    expected = [x] + [nn.functional.max_pool2d(x, k, 1, k // 2) for k in (5, 9, 13)]
    assert torch.equal(seen[0], torch.cat(expected, 1))


def test_yaml_rows():
    assert {name: kind for name, (_, kind) in YAML_MODULES.items()} == {
        "CSPStage": "csp", "RepConv": "conv", "ConvBNAct": "conv",
    }


# --- whole models (need models/yolo.py) ---------------------------------------------------------


@pytest.fixture(scope="module")
def detection_model():
    from models.yolo import DetectionModel

    return DetectionModel


@pytest.mark.parametrize(
    "cfg, nc, params",
    [
        ("yolov5_GFPN.yaml", None, 66_807_267),
        ("yolov5_GFPN.yaml", 80, 67_205_757),
        ("yolov5s_GFPN.yaml", None, 9_255_203),
        ("yolov5s_GFPN.yaml", 80, 9_454_781),
    ],
)
def test_gfpn_yaml_parameter_counts(detection_model, cfg, nc, params):
    with torch.device("meta"):
        model = detection_model(cfg, nc=nc)
    assert model.yaml["nc"] == (nc or 6)
    assert n_params(model) == params
    assert [type(model.model[i]).__name__ for i in (13, 17, 20, 23, 27)] == ["CSPStage"] * 5
    assert model.model[-1].f == [20, 23, 27]


@pytest.mark.parametrize("cfg", ["yolov5s_GFPN.yaml", "yolov5_GFPN.yaml"])
def test_gfpn_yaml_fuses_exactly(detection_model, cfg):
    torch.manual_seed(0)
    model = randomize_bn(detection_model(cfg)).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        decoded, raw = model(x)
        fused = copy.deepcopy(model).fuse()
        decoded_fused, raw_fused = fused(x)
    assert rel_error(decoded_fused, decoded) < 1e-5
    assert max(rel_error(a, b) for a, b in zip(raw_fused, raw)) < 1e-5
    assert_fully_folded(fused)
    assert list(model.stride) == [8, 16, 32]
