"""RevCol backbone (models/modules/revcol.py), its YOLOv5 YAMLs and its memory benchmark."""

from __future__ import annotations

import copy

import pytest
import torch

from models.modules.revcol import BACKBONES, VARIANTS, YAML_MODULES, FullNet, SubNet
from tests.helpers import n_params, rel_error

SMALL = {"channels": [8, 16, 24, 32], "layers": [1, 2, 2, 1], "num_subnet": 3}


def randomized(model: FullNet, seed: int = 0) -> FullNet:
    """Non-trivial layer scales (the init 1e-6 hides the blocks) and shortcut scales of both signs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.8 + 0.2)
            elif ".alpha" in name:
                sign = torch.randint(0, 2, p.shape, generator=g) * 2 - 1
                p.copy_(sign * (torch.rand(p.shape, generator=g) * 0.7 + 0.3))
    return model


def with_save_memory(model: FullNet, save_memory: bool) -> FullNet:
    for m in model.modules():
        if isinstance(m, SubNet):
            m.save_memory = save_memory
    return model


def plain_and_reversible(make) -> tuple[FullNet, FullNet]:
    """The same randomized weights in the plain and in the reversible mode."""
    torch.manual_seed(0)
    plain = randomized(make(save_memory=False)).train()
    return plain, with_save_memory(copy.deepcopy(plain), True)


def train_step(model: FullNet, x: torch.Tensor, seed: int):
    """Forward + backward with a fixed seed; outputs, input grad, parameter grads and the RNG draw after."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    outs = model(x)
    weights = [torch.linspace(-1, 1, o.numel()).view_as(o) for o in outs]  # every output element matters
    sum((o * w).sum() + o.square().mean() for o, w in zip(outs, weights)).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return [o.detach() for o in outs], x.grad, grads, torch.rand(4)


def assert_same_training(plain: FullNet, reversible: FullNet, x: torch.Tensor, tol: float = 1e-4) -> None:
    outs_p, gx_p, grads_p, rng_p = train_step(plain, x, seed=1)
    outs_r, gx_r, grads_r, rng_r = train_step(reversible, x, seed=1)
    assert all(rel_error(r, p) < 1e-5 for r, p in zip(outs_r, outs_p))
    assert rel_error(gx_r, gx_p) < tol
    for name, g in grads_p.items():
        assert grads_r[name] is not None, name
        if g.abs().max() == 0:  # first-column shortcut scales see an all-zero previous state
            assert grads_r[name].abs().max() == 0, name
        else:
            assert rel_error(grads_r[name], g) < tol, name
    assert torch.equal(rng_r, rng_p)  # backward replays DropPath's RNG without disturbing the global state


def test_param_counts_exact():
    expected = {"tiny": 29_942_144, "small": 60_054_400, "base": 138_038_256, "large": 272_068_352,
                "xlarge": 832_010_816}
    for variant, count in expected.items():
        with torch.device("meta"):
            model = YAML_MODULES[f"revcol_{variant}"][0]()
        assert n_params(model) == count, variant
    assert set(expected) == set(VARIANTS)
    assert all(kind == "backbone" for _, kind in YAML_MODULES.values())


def test_outputs_and_init():
    torch.manual_seed(0)
    model = FullNet(**SMALL, in_channels=4).eval()
    outs = model(torch.randn(2, 4, 64, 64))
    expected = [(2, c, 64 // s, 64 // s) for c, s in zip(SMALL["channels"], (4, 8, 16, 32))]
    assert [tuple(o.shape) for o in outs] == expected
    linear = model.subnet1.level0.blocks[0].pwconv1
    assert linear.bias.abs().max() == 0 and 0.015 < linear.weight.std() < 0.025
    assert torch.all(model.subnet0.alpha2 == 0.5) and torch.all(model.subnet0.level2.blocks[0].gamma == 1e-6)
    assert model.subnet0.level0.fusion.up is None and model.subnet1.level3.fusion.up is None
    assert model.subnet1.level2.fusion.up is not None


def test_alpha_clamp_keeps_sign():
    torch.manual_seed(0)
    model = FullNet(**SMALL)
    alpha = model.subnet1.alpha0
    with torch.no_grad():
        alpha[0, :5, 0, 0] = torch.tensor([0.0, 1e-5, -1e-5, -0.5, 2.0])
    model(torch.randn(1, 3, 32, 32))
    assert torch.allclose(alpha[0, :5, 0, 0], torch.tensor([1e-3, 1e-3, -1e-3, -0.5, 2.0]))


def test_reversible_gradients_match_plain_with_droppath():
    plain, reversible = plain_and_reversible(lambda **kw: FullNet(**SMALL, drop_path=0.5, **kw))
    x = torch.randn(2, 3, 64, 64)
    torch.manual_seed(1)
    first = plain(x)
    torch.manual_seed(2)
    assert not torch.equal(first[3], plain(x)[3])  # DropPath is active: the seed changes the output
    assert_same_training(plain, reversible, x)


def test_reversible_gradients_match_plain_revcol_tiny():
    plain, reversible = plain_and_reversible(BACKBONES["revcol_tiny"])
    assert_same_training(plain, reversible, torch.randn(1, 3, 64, 64))


def test_reversible_saves_only_column_boundaries():
    """Per column, backward keeps x, the four outputs and the four alphas; nothing from inside the levels."""
    torch.manual_seed(0)
    model = FullNet(**SMALL, drop_path=0.2).train()
    x = model.stem(torch.randn(2, 3, 64, 64))
    saved: list[tuple] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(tuple(t.shape))
        return t

    states = [0.0] * 4
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for i in range(model.num_subnet):
            states = getattr(model, f"subnet{i}")(x, *states)
    boundary = [tuple(x.shape)] + [tuple(s.shape) for s in states] + [(1, c, 1, 1) for c in SMALL["channels"]]
    assert saved == boundary * model.num_subnet
    reference = with_save_memory(copy.deepcopy(model), False)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        reference(torch.randn(2, 3, 64, 64))
    assert len(saved) > 10 * len(boundary) * model.num_subnet  # the plain forward keeps every activation


def test_reversible_returns_parameter_grads():
    """Gradients come back through autograd: torch.autograd.grad works and frozen parameters are skipped."""
    plain, reversible = plain_and_reversible(lambda **kw: FullNet(**SMALL, **kw))
    for model in (plain, reversible):
        model.subnet1.level2.blocks[0].pwconv1.weight.requires_grad_(False)
    x = torch.randn(1, 3, 64, 64)
    wanted = [lambda m: m.subnet0.level1.blocks[0].dwconv.weight, lambda m: m.subnet2.alpha1,
              lambda m: m.subnet1.level0.fusion.up.channel_reschedule[0].weight]
    grads = []
    for model in (plain, reversible):
        loss = sum(o.square().mean() for o in model(x))
        grads.append(torch.autograd.grad(loss, [w(model) for w in wanted]))
        assert all(p.grad is None for p in model.parameters())
    assert all(rel_error(r, p) < 1e-4 for p, r in zip(*grads))


def test_reversible_under_autocast_bf16():
    plain, reversible = plain_and_reversible(lambda **kw: FullNet(**SMALL, drop_path=0.2, **kw))
    x = torch.randn(2, 3, 64, 64)
    results = []
    for model in (plain, reversible):
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs = model(x)
        sum(o.float().square().mean() for o in outs).backward()
        results.append(model.subnet0.level0.blocks[0].pwconv1.weight.grad)
    assert results[1].dtype == torch.float32 and torch.isfinite(results[1]).all()
    assert rel_error(results[1], results[0]) < 0.1  # bf16 recomputation is lossy, yet close


def test_memory_reversible_clearly_below_plain(monkeypatch):
    """python -m benchmarks revcol-memory's measurement (one subprocess per mode) on a small, activation-heavy
    network."""
    from benchmarks import revcol_memory as benchmark

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # inherited by the workers
    config = {"channels": [32, 64, 128, 256], "layers": [2, 1, 1, 1], "num_subnet": 4, "drop_path": 0.1}
    result = benchmark.measure(config, batch=2, img=256)
    plain, reversible = result["plain"], result["reversible"]
    assert plain["train_mib"] > 100  # the plain step keeps ~165 MiB of activations
    assert reversible["train_mib"] < 0.6 * plain["train_mib"]
    assert reversible["peak_mib"] < plain["peak_mib"] - 50


# ---- the YOLOv5 model YAMLs -----------------------------------------------------------------------------------------
def test_published_yaml_builds_and_runs():
    from models.yolo import Detect, DetectionModel

    model = DetectionModel("yolov5_RevCol.yaml")
    assert n_params(model) == 31_223_613
    assert model.save == [2, 3, 5, 9, 13, 16, 19]
    assert len(model.model) == 21 and isinstance(model.model[20], Detect)
    assert model.stride.tolist() == [8, 16, 32]
    model.train()
    maps = model(torch.randn(2, 3, 64, 64))
    assert [tuple(m.shape) for m in maps] == [(2, 3, 64 // s, 64 // s, 85) for s in (8, 16, 32)]
    sum(m.mean() for m in maps).backward()  # reversible columns inside the full model
    assert model.model[0].subnet0.level0.blocks[0].pwconv1.weight.grad.abs().sum() > 0
    model.eval()
    x = torch.randn(1, 3, 128, 96)
    with torch.no_grad():
        pred, _ = model(x)
        assert pred.shape == (1, 3 * (16 * 12 + 8 * 6 + 4 * 3), 85)
        model.fuse()
        assert rel_error(model(x)[0], pred) < 1e-6  # nothing to fold, and nothing breaks


@pytest.mark.parametrize("variant", ["small", "base", "large", "xlarge"])
def test_larger_yamls_build(variant):
    from models.yolo import DetectionModel

    with torch.device("meta"):
        model = DetectionModel(f"yolov5_RevCol-{variant}.yaml")
    backbone = model.model[0]
    assert model.save == [2, 3, 5, 9, 13, 16, 19]
    assert n_params(backbone) == {"small": 60_054_400, "base": 138_038_256, "large": 272_068_352,
                                  "xlarge": 832_010_816}[variant]
    channels = backbone.channels
    sppf = model.model[5]
    assert sppf.cv1.conv.in_channels == channels[3] and sppf.cv2.conv.out_channels == channels[3] // 2
    for index, level in ((13, 1), (16, 2), (19, 3)):  # head widths: half the backbone's at each level
        assert model.model[index].cv3.conv.out_channels == channels[level] // 2
