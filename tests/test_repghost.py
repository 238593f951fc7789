"""RepGhost blocks: reference parameter counts, SE design, folding equivalence, YAML models."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from timm.models.repghost import RepGhostBottleneck as TimmRepGhostBottleneck
from torch.utils.flop_counter import FlopCounterMode

from models.modules.repghost import (
    YAML_MODULES,
    C3RepGhost,
    RepGhostBottleneck,
    RepGhostModule,
    repghost_bottleneck_row,
)
from tests.helpers import reparameterize_all, fold_error, n_params, randomize_bn, rel_error

REPGHOST_YAMLS = ["yolov5n_RepGhost.yaml", "yolov5s_RepGhost.yaml", "yolov5m_RepGhost.yaml"]


def assert_fully_folded(model: nn.Module) -> None:
    """No BatchNorm and no re-parameterization branch left anywhere in ``model``."""
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    for m in model.modules():
        if isinstance(m, RepGhostModule):
            assert isinstance(m.cheap, nn.Conv2d) and m.cheap.bias is not None
            assert m.fusion_bn is None and not m.fusion_identity


@pytest.mark.parametrize(
    "args, kwargs, trained, modules_folded, fully_folded",
    [
        ((64, 64, 64), {}, 10_112, 9_600, 9_600),  # modules folded (primary Convs included): nothing else left
        ((128, 256, 128), {"stride": 2}, 92_160, 90_624, 90_112),  # the strided dw conv and shortcut keep their BN
    ],
)
def test_bottleneck_parameter_counts(args, kwargs, trained, modules_folded, fully_folded):
    block = RepGhostBottleneck(*args, **kwargs)
    assert n_params(block) == trained
    block.ghost1.reparameterize()
    block.ghost2.reparameterize()
    assert block.ghost1.folded and block.ghost2.folded
    assert n_params(block) == modules_folded
    assert n_params(reparameterize_all(block)) == fully_folded


@pytest.mark.parametrize("args", [(32, 48, 32, 3, 1, 0.25), (40, 120, 80, 5, 2, 0.25), (24, 72, 40, 3, 2, 0.0)])
def test_bottleneck_matches_timm_repghostnet_block(args):
    """Same parameter count as timm's RepGhostNet block (independent implementation), SE included."""
    c1, cmid, c2, k, s, se = args
    ours = RepGhostBottleneck(c1, cmid, c2, k, s, se_ratio=se)
    assert n_params(ours) == n_params(TimmRepGhostBottleneck(c1, cmid, c2, k, s, se_ratio=se))


@pytest.mark.parametrize("cmid, ratio, reduced", [(48, 0.25, 12), (120, 0.25, 32), (336, 0.25, 84)])
def test_squeeze_excite_design(cmid, ratio, reduced):
    se = RepGhostBottleneck(16, cmid, 16, se_ratio=ratio).se
    assert (se.fc1.in_channels, se.fc1.out_channels, se.fc2.out_channels) == (cmid, reduced, cmid)
    assert se.fc1.bias is not None and isinstance(se.act, nn.ReLU)
    x = torch.linspace(-4, 4, 9)
    assert torch.allclose(se.gate(x), torch.clamp(x + 3, 0, 6) / 6)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"k": 3, "stride": 2, "act": False},
        {"reparam_bn": True, "reparam_identity": True},
        {"reparam_bn": False, "reparam_identity": True, "dw_size": 5},
    ],
)
def test_module_folds_into_one_depthwise_conv(kwargs):
    torch.manual_seed(0)
    module = randomize_bn(RepGhostModule(8, 16, **kwargs)).eval()
    x = torch.randn(2, 8, 12, 12)
    assert fold_error(module, x) < 1e-5
    with torch.no_grad():
        before = module(x)
        module.reparameterize()
        module.reparameterize()  # idempotent
        after = module(x)
    assert (after - before).abs().max() / before.abs().max() < 1e-5
    assert isinstance(module.cheap, nn.Conv2d) and module.cheap.groups == 16 and module.cheap.bias is not None
    assert module.fusion_bn is None and not module.fusion_identity


def test_module_output_is_sum_not_concat():
    module = RepGhostModule(8, 16).eval()
    assert module(torch.randn(1, 8, 6, 6)).shape == (1, 16, 6, 6)


@pytest.mark.parametrize(
    "args, kwargs",
    [
        ((16, 16, 16), {}),
        ((16, 16, 16), {"shortcut": False}),
        ((16, 32, 24), {"stride": 2, "se_ratio": 0.25}),
        ((16, 24, 16), {"dw_kernel_size": 5, "se_ratio": 0.25}),
    ],
)
def test_bottleneck_fold_equivalence(args, kwargs):
    torch.manual_seed(0)
    block = randomize_bn(RepGhostBottleneck(*args, **kwargs)).eval()
    x = torch.randn(2, args[0], 16, 16)
    assert fold_error(block, x) < 1e-5
    assert_fully_folded(reparameterize_all(copy.deepcopy(block)))


def test_bottleneck_shortcut_flag():
    assert RepGhostBottleneck(16, 16, 16).add and not RepGhostBottleneck(16, 16, 16, shortcut=False).add
    assert RepGhostBottleneck(16, 16, 32, shortcut=False).add  # projection residual is kept: shapes differ


def test_c3repghost_structure_and_folding():
    torch.manual_seed(0)
    block = randomize_bn(C3RepGhost(16, 32, n=2, shortcut=False)).eval()
    assert [type(m) for m in block.m] == [RepGhostBottleneck] * 2
    assert all(not m.add and m.ghost1.primary.conv.in_channels == 16 for m in block.m)
    x = torch.randn(2, 16, 16, 16)
    assert block(x).shape == (2, 32, 16, 16)
    assert fold_error(block, x) < 1e-5


def test_yaml_rows():
    assert {name: kind for name, (_, kind) in YAML_MODULES.items()} == {
        "RepGhostModule": "conv",
        "RepGhostBottleneck": "conv",
        "C3RepGhost": "csp",
        **{f"repghostnet_{w}": "backbone" for w in ("0_5x", "0_58x", "0_8x", "1_0x", "1_11x", "1_3x", "1_5x", "2_0x")},
    }
    down = repghost_bottleneck_row(64, 128, 3, 2, 0.5)
    assert down.ghost1.primary.conv.out_channels == 64 and down.ghost2.primary.conv.out_channels == 128
    assert down(torch.randn(1, 64, 16, 16)).shape == (1, 128, 8, 8)


# --- whole models (need models/yolo.py) ---------------------------------------------------------


@pytest.fixture(scope="module")
def detection_model():
    from models.yolo import DetectionModel

    return DetectionModel


def conv_gflops_at_640(model: nn.Module, size: int = 64) -> float:
    """2 x conv MACs (upstream's GFLOPs convention) at 640, counted at ``size`` (multiple of 32), scaled by area."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() / 1e9 * (640 / size) ** 2


def test_yolov5s_repghost_is_much_lighter_than_yolov5s(detection_model):
    light, base = detection_model("yolov5s_RepGhost.yaml"), detection_model("yolov5s.yaml")
    assert n_params(light) == 2_808_317 and n_params(base) == 7_235_389
    assert n_params(light) < 0.4 * n_params(base)
    assert conv_gflops_at_640(light) < 0.5 * conv_gflops_at_640(base)


@pytest.mark.parametrize("cfg", REPGHOST_YAMLS)
def test_repghost_yaml_fuses_exactly(detection_model, cfg):
    torch.manual_seed(0)
    model = randomize_bn(detection_model(cfg)).eval()
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        decoded, raw = model(x)
        fused = copy.deepcopy(model).fuse()
        decoded_fused, raw_fused = fused(x)
    assert rel_error(decoded_fused, decoded) < 1e-5
    assert max(rel_error(a, b) for a, b in zip(raw_fused, raw)) < 1e-5
    assert_fully_folded(fused)
    assert n_params(fused) < n_params(model)
