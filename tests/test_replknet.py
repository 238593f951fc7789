"""RepLKNet: folding equivalence, checkpointing, stage geometry, parameter counts, the LARGE_KERNEL_CONV_IMPL hook."""

from __future__ import annotations

import copy
import logging
import sys

import pytest
import torch
import torch.nn as nn

from models.modules import large_kernel, replknet
from models.modules.large_kernel import LargeKernelDepthwiseConv2d
from models.modules.replknet import (
    ConvFFN, RepLKBlock, RepLKNet_stage1, RepLKNet_stage3, RepLKNet_stage4, RepLKNet_Stem, RepLKNetStage,
    ReparamLargeKernelConv,
)
from tests.helpers import fold_error, n_params, randomize_bn

FOLD_TOL = 1e-5
SMALL = dict(channels=[8, 16, 24, 32], large_kernel_sizes=[31, 29, 27, 13], layers=[1, 2, 3, 1])


def batchnorms(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]


@pytest.mark.parametrize("small_kernel", [5, 3, None])
@pytest.mark.parametrize("groups", [8, 2])
def test_reparam_large_kernel_conv_folds(small_kernel, groups):
    module = randomize_bn(ReparamLargeKernelConv(8, 8, 31, 1, groups, small_kernel))
    assert fold_error(module, torch.randn(2, 8, 20, 28)) < FOLD_TOL
    module.eval().reparameterize()
    module.reparameterize()  # idempotent
    assert module.folded and not batchnorms(module) and module.lkb_origin is None and module.small_conv is None
    assert isinstance(module.lkb_reparam, LargeKernelDepthwiseConv2d) and module.lkb_reparam.bias is not None


def test_folded_conv_keeps_the_fast_path(monkeypatch):
    module = randomize_bn(ReparamLargeKernelConv(8, 8, 31, 1, 8, 5)).eval()
    module.reparameterize()
    calls = []
    original = large_kernel._FFTDepthwiseConv2d.apply
    monkeypatch.setattr(large_kernel._FFTDepthwiseConv2d, "apply", lambda *a: calls.append(1) or original(*a))
    with torch.no_grad():
        module(torch.randn(1, 8, 40, 40))
    assert calls == [1]


def test_small_kernel_merged_loads_folded_weights():
    trained = randomize_bn(ReparamLargeKernelConv(8, 8, 13, 1, 8, 5)).eval()
    x = torch.randn(1, 8, 16, 16)
    with torch.no_grad():
        expected = trained(x)
    trained.reparameterize()
    merged = ReparamLargeKernelConv(8, 8, 13, 1, 8, 5, small_kernel_merged=True).eval()
    merged.load_state_dict(trained.state_dict())  # strict: same keys
    with torch.no_grad():
        assert (merged(x) - expected).abs().max() / expected.abs().max() < FOLD_TOL


@pytest.mark.parametrize("make", [lambda: RepLKBlock(8, 16, 13, 5, 0.1), lambda: ConvFFN(8, 32, 8, 0.1)],
                         ids=["RepLKBlock", "ConvFFN"])
def test_blocks_fold_without_any_batchnorm_left(make):
    module = randomize_bn(make())
    assert fold_error(module, torch.randn(2, 8, 18, 14)) < FOLD_TOL
    module.eval().reparameterize()
    module.reparameterize()
    assert not batchnorms(module)


def test_stage_folds():
    stage = randomize_bn(RepLKNetStage(8, 2, 27, [0.0, 0.2], 5, dw_ratio=1.5, ffn_ratio=2))
    assert fold_error(stage, torch.randn(2, 8, 20, 20)) < FOLD_TOL


def test_block_residual_and_drop_path():
    block = RepLKBlock(8, 8, 13, 5, drop_path=0.5)
    assert block.drop_path.drop_prob == 0.5
    assert isinstance(RepLKBlock(8, 8, 13, 5, drop_path=0.0).drop_path, nn.Identity)
    x = torch.randn(1, 8, 12, 12)
    nn.init.zeros_(block.pw2.bn.weight)  # branch output zero: the block is the identity
    nn.init.zeros_(block.pw2.bn.bias)
    assert torch.equal(block.train()(x), x)


def test_checkpointing_gives_identical_gradients(monkeypatch):
    torch.manual_seed(0)
    plain = randomize_bn(RepLKNetStage(8, 2, 13, [0.1, 0.3], 5, use_checkpoint=False)).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.use_checkpoint = True
    calls = []
    original = replknet.checkpoint
    monkeypatch.setattr(replknet, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    x = torch.randn(2, 8, 16, 16)
    grads = []
    for model in (plain, checkpointed):
        torch.manual_seed(1)  # same drop-path masks
        leaf = x.clone().requires_grad_()
        model(leaf).square().sum().backward()
        grads.append([leaf.grad] + [p.grad for p in model.parameters()])
    assert len(calls) == 4  # one per RepLKBlock and ConvFFN
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    with torch.no_grad():  # no recomputation without gradients
        checkpointed(x)
    assert len(calls) == 4


def test_stage_constructor_takes_trailing_use_checkpoint():
    stage = RepLKNet_stage1(*SMALL.values(), 0.3, 5, 1, 4, True)
    assert stage.stage.use_checkpoint
    assert not RepLKNet_stage1(*SMALL.values(), 0.3, 5, 1, 4).stage.use_checkpoint


def test_stem_and_stages_geometry():
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        p2 = RepLKNet_Stem(3, SMALL["channels"]).eval()(x)
        assert p2.shape == (1, 8, 16, 16)
        widths, sizes = [], []
        for stage_cls in (replknet.RepLKNet_stage1, replknet.RepLKNet_stage2, RepLKNet_stage3, RepLKNet_stage4):
            p2 = stage_cls(*SMALL.values()).eval()(p2)
            widths.append(p2.shape[1])
            sizes.append(p2.shape[-1])
    assert widths == [16, 24, 32, 32] and sizes == [8, 4, 2, 2]  # strides 8, 16, 32, 32
    assert isinstance(RepLKNet_stage4(*SMALL.values()).transition, nn.Identity)


def test_drop_path_rates_follow_the_global_linspace():
    stage = RepLKNet_stage3(*SMALL.values(), drop_path_rate=0.35)
    rates = [b.drop_path.drop_prob if hasattr(b.drop_path, "drop_prob") else 0.0 for b in stage.stage.blocks]
    expected = torch.linspace(0, 0.35, 7)[3:6].tolist()
    assert rates == pytest.approx([r for r in expected for _ in range(2)])
    kernel_sizes = {b.large_kernel.kernel_size for b in stage.stage.blocks if isinstance(b, RepLKBlock)}
    assert kernel_sizes == {27}


# --- the LARGE_KERNEL_CONV_IMPL hook -------------------------------------------------------------------------
FAKE_IMPL = '''
import torch.nn as nn


class DepthWiseConv2dImplicitGEMM(nn.Conv2d):
    """Stand-in for MegEngine's CUDA implicit-GEMM depthwise conv: same constructor."""

    def __init__(self, channels, kernel, bias=False):
        super().__init__(channels, channels, kernel, padding=kernel // 2, groups=channels, bias=bias)
'''


@pytest.fixture
def isolated_impl_import(monkeypatch):
    """Keep sys.path and sys.modules as they were around a test of the hook."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    sys.modules.pop(replknet.IMPL_MODULE, None)
    yield
    sys.modules.pop(replknet.IMPL_MODULE, None)


def test_env_hook_uses_the_external_implementation(tmp_path, monkeypatch, isolated_impl_import):
    (tmp_path / f"{replknet.IMPL_MODULE}.py").write_text(FAKE_IMPL)
    monkeypatch.setenv(replknet.IMPL_ENV, str(tmp_path))
    module = randomize_bn(ReparamLargeKernelConv(8, 8, 13, 1, 8, 5))
    assert type(module.lkb_origin.conv).__name__ == replknet.IMPL_CLASS
    assert str(tmp_path) in sys.path
    assert type(module.small_conv.conv) is nn.Conv2d  # 5x5: kernels > 5 only, as in the original
    assert isinstance(ReparamLargeKernelConv(8, 8, 13, 1, 2, 5).lkb_origin.conv, LargeKernelDepthwiseConv2d)
    assert fold_error(module, torch.randn(1, 8, 16, 16)) < FOLD_TOL
    module.eval().reparameterize()
    assert type(module.lkb_reparam).__name__ == replknet.IMPL_CLASS and module.lkb_reparam.bias is not None


def test_env_hook_falls_back_with_a_warning(tmp_path, monkeypatch, caplog, isolated_impl_import):
    monkeypatch.setenv(replknet.IMPL_ENV, str(tmp_path / "missing"))
    with caplog.at_level(logging.WARNING, logger=replknet.__name__):
        module = ReparamLargeKernelConv(8, 8, 13, 1, 8, 5)
    assert isinstance(module.lkb_origin.conv, LargeKernelDepthwiseConv2d)
    assert replknet.IMPL_ENV in caplog.text and "built-in" in caplog.text


# --- whole models (need models/yolo.py) ----------------------------------------------------------------------
@pytest.mark.parametrize(("nc", "expected"), [(80, 90_616_701), (14, 90_261_291)])
def test_full_yaml_parameter_count(nc, expected):
    import models.yolo as yolo
    with torch.device("meta"):
        model = yolo.DetectionModel("yolov5_RepLKNet.yaml", nc=nc)
    assert n_params(model) == expected


def test_tiny_yaml_fuses_to_the_same_outputs():
    import models.yolo as yolo
    model = randomize_bn(yolo.DetectionModel("yolov5_RepLKNet-tiny.yaml", nc=3)).eval()
    assert n_params(model) < 3_000_000
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        before = model(x)[0]
        fused = copy.deepcopy(model).fuse()
        after = fused(x)[0]
    assert (after - before).abs().max() / before.abs().max() < FOLD_TOL
    assert not batchnorms(fused)
    assert all(m.lkb_reparam is not None for m in fused.modules() if isinstance(m, ReparamLargeKernelConv))
