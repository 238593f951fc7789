"""Model core: YOLOv5 parity with upstream (counts, keys, outputs), YAML parsing, multi-output rows, folding."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping

import pytest
import torch
import torch.nn as nn

from models import common
from models.common import BatchNorm2d, Conv
from models.yolo import BackboneSlot, DetectionModel, ModelConfigError, find_model_yaml
from tests.helpers import SHARED, fold_error, n_params, randomize_bn, rel_error, reparameterize_all

SIZES = ["yolov5n", "yolov5s", "yolov5m", "yolov5l", "yolov5x"]


@pytest.fixture(scope="module")
def upstream_keys() -> dict:
    return json.loads((SHARED / "fixtures" / "yolov5_state_dict_keys.json").read_text())


@pytest.mark.parametrize("name", SIZES)
def test_counts_keys_and_shapes_match_upstream(name, upstream_keys):
    with torch.device("meta"):
        model = DetectionModel(f"{name}.yaml")
    ours = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    assert n_params(model) == upstream_keys[name]["params"]
    assert ours == upstream_keys[name]["state_dict"]


def test_upstream_reference_outputs_reproduced():
    ref = torch.load(SHARED / "fixtures" / "yolov5n_nc3_reference.pt", weights_only=True)
    for cfg in (ref["cfg"], "yolov5n.yaml"):  # upstream's own dict (with 'None' strings) and our YAML
        model = DetectionModel(cfg, nc=3)
        model.load_state_dict(ref["state_dict"], strict=True)
        model.eval()
        assert torch.equal(model.stride, ref["stride"])
        with torch.no_grad():
            pred, raw = model(ref["input"])
        scale = ref["output_eval"].abs().max()
        assert (pred - ref["output_eval"]).abs().max() <= 1e-4 * scale
        for ours, theirs in zip(raw, ref["outputs_raw"]):
            assert ours.shape == theirs.shape
            assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()


@pytest.mark.parametrize("name", SIZES)
def test_fuse_keeps_outputs(name):
    torch.manual_seed(0)
    model = randomize_bn(DetectionModel(f"{name}.yaml", nc=3))
    err = fold_error(model, torch.rand(1, 3, 64, 96))
    assert err < 1e-5


def test_fuse_removes_batchnorm():
    model = DetectionModel("yolov5n.yaml").fuse()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(m.conv.bias is not None for m in model.modules() if isinstance(m, Conv))


class FourMaps(nn.Module):
    """Test backbone returning four maps at strides 4, 8, 16, 32 (deliberately in shuffled order)."""

    def __init__(self, c1: int, width: int = 8):
        super().__init__()
        chans = [width, 2 * width, 4 * width, 8 * width]
        self.stem = Conv(c1, chans[0], 4, 4, 0)
        self.stages = nn.ModuleList(Conv(a, b, 3, 2) for a, b in zip(chans, chans[1:]))

    def forward(self, x):
        outs = [self.stem(x)]
        for stage in self.stages:
            outs.append(stage(outs[-1]))
        return [outs[2], outs[0], outs[3], outs[1]]


class FiveMaps(nn.Module):
    """Test backbone returning five maps at strides 2..32."""

    def __init__(self, c1: int, width: int = 8):
        super().__init__()
        chans = [width * 2**i for i in range(5)]
        self.layers = nn.ModuleList(Conv(a, b, 3, 2) for a, b in zip([c1] + chans, chans))

    def forward(self, x):
        outs = []
        for layer in self.layers:
            x = layer(x)
            outs.append(x)
        return outs


def spliced_yaml(backbone: str, args: list) -> dict:
    """The RevCol-style layout of ARCHITECTURES.md section 3: backbone at 0-4, SPPF at 5, head from 6."""
    return {
        "nc": 4, "depth_multiple": 0.33, "width_multiple": 0.25,
        "anchors": [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]],
        "backbone": [[-1, 1, backbone, args], [-1, 1, "SPPF", [1024, 5]]],
        "head": [[-1, 1, "Conv", [512, 1, 1]], [-1, 1, "nn.Upsample", [None, 2, "nearest"]],
                 [[-1, 3], 1, "Concat", [1]], [-1, 3, "C3", [512, False]],
                 [-1, 1, "Conv", [256, 1, 1]], [-1, 1, "nn.Upsample", [None, 2, "nearest"]],
                 [[-1, 2], 1, "Concat", [1]], [-1, 3, "C3", [256, False]],
                 [-1, 1, "Conv", [256, 3, 2]], [[-1, 9], 1, "Concat", [1]], [-1, 3, "C3", [512, False]],
                 [-1, 1, "Conv", [512, 3, 2]], [[-1, 5], 1, "Concat", [1]], [-1, 3, "C3", [1024, False]],
                 [[13, 16, 19], 1, "Detect", ["nc", "anchors"]]],
    }


@pytest.mark.parametrize("ctor", [FourMaps, FiveMaps])
def test_multi_output_backbone(ctor):
    model = DetectionModel(spliced_yaml(ctor.__name__, [8]), extra_modules={ctor.__name__: (ctor, "backbone")})
    assert isinstance(model.model[0], ctor)
    assert all(isinstance(model.model[i], BackboneSlot) for i in range(1, 5))
    assert model.model[5].i == 5 and model.model[-1].i == 20
    assert model.save == [2, 3, 5, 9, 13, 16, 19]
    assert model.stride.tolist() == [8, 16, 32]
    expected_slots = [None, 1, 3, 0, 2] if ctor is FourMaps else [0, 1, 2, 3, 4]
    assert model.model[0].slots == expected_slots
    x = torch.rand(2, 3, 64, 96)
    model.train()
    raw = model(x)
    assert [tuple(r.shape) for r in raw] == [(2, 3, 8, 12, 9), (2, 3, 4, 6, 9), (2, 3, 2, 3, 9)]
    model.eval()
    pred, _ = model(x)
    assert pred.shape == (2, 3 * (8 * 12 + 4 * 6 + 2 * 3), 9)
    assert fold_error(randomize_bn(model), x) < 1e-5


def test_multi_output_backbone_with_timm_features():
    import timm

    def timm_resnet(c1: int, name: str, out_indices: list):
        return timm.create_model(name, features_only=True, pretrained=False, in_chans=c1, out_indices=out_indices)

    cfg = spliced_yaml("resnet_features", ["resnet18", [1, 2, 3, 4]])
    model = DetectionModel(cfg, extra_modules={"resnet_features": (timm_resnet, "backbone")})
    assert model.model[0].slots == [None, 0, 1, 2, 3]
    model.eval()
    pred, _ = model(torch.rand(1, 3, 64, 64))
    assert pred.shape[-1] == 9 and torch.isfinite(pred).all()


def test_bare_name_resolution_and_overrides(caplog):
    assert find_model_yaml("yolov5s") == find_model_yaml("yolov5s.yaml")
    with caplog.at_level("INFO", logger="yolov5"):
        model = DetectionModel("yolov5n", nc=7, anchors=[[5, 6, 7, 8, 9, 10]] * 3)
    assert model.model[-1].nc == 7
    assert "Overriding yolov5n.yaml nc=80 with nc=7" in caplog.text
    assert torch.allclose(model.model[-1].anchors[0, 0], torch.tensor([5 / 8, 6 / 8]))


def test_detect_on_one_level():
    """A head on a single level (``from: [2]``, one anchor row) builds and decodes, as upstream allows."""
    cfg = {"nc": 2, "depth_multiple": 1.0, "width_multiple": 1.0, "anchors": [[10, 13, 16, 30, 33, 23]],
           "backbone": [[-1, 1, "Conv", [8, 3, 2]], [-1, 1, "Conv", [16, 3, 2]], [-1, 1, "Conv", [16, 3, 2]]],
           "head": [[[2], 1, "Detect", ["nc", "anchors"]]]}
    model = DetectionModel(cfg).eval()
    assert model.stride.tolist() == [8.0] and model.model[-1].f == [2]
    assert model(torch.zeros(1, 3, 64, 64))[0].shape == (1, 3 * 8 * 8, 7)


def test_activation_from_yaml():
    cfg = DetectionModel("yolov5n.yaml").yaml
    cfg["activation"] = "nn.LeakyReLU(0.1)"
    model = DetectionModel(cfg)
    acts = {type(m.act) for m in model.modules() if isinstance(m, Conv)}
    assert acts == {nn.LeakyReLU}
    cfg["activation"] = "__import__('os').system('true')"
    with pytest.raises(ModelConfigError, match="activation"):
        DetectionModel(cfg)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["backbone"].__setitem__(1, [-1, 1, "NoSuchBlock", [64]]), "backbone row 1 .*unknown module 'NoSuchBlock'"),
    (lambda d: d["head"].__setitem__(2, [[-1, 40], 1, "Concat", [1]]), "head row 2 .*'from' index 40"),
    (lambda d: d["head"].__setitem__(2, [[-1, 3], 1, "Concat", [1]]), "do not fit together"),
    (lambda d: d.pop("head"), "missing or invalid 'head'"),
    (lambda d: d.__setitem__("nc", "eighty"), "'nc' must be a positive integer"),
    (lambda d: d["backbone"].__setitem__(0, [-1, 1, "Conv"]), r"backbone row 0 .*\[from, number, module, args\]"),
])
def test_bad_yaml_gives_one_line_error(mutate, message):
    cfg = DetectionModel("yolov5n.yaml").yaml
    mutate(cfg)
    with pytest.raises(ModelConfigError, match=message) as info:
        DetectionModel(cfg)
    assert "\n" not in str(info.value)


def test_tta_forward():
    model = DetectionModel("yolov5n.yaml", nc=2).eval()
    with torch.no_grad():
        pred, _ = model(torch.rand(1, 3, 64, 64), augment=True)
    assert pred.dim() == 3 and pred.shape[-1] == 7 and pred.shape[1] > 0


def test_cli_prints_summary():
    import subprocess
    import sys

    from tests.helpers import ROOT

    out = subprocess.run([sys.executable, "models/yolo.py", "--cfg", "yolov5n.yaml"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "YOLOv5n summary:" in out.stdout and "1872157 parameters" in out.stdout


def test_channels_last_backend_gives_the_folded_models_outputs(tmp_path):
    """InferenceBackend runs .pt models channels-last on the CPU: same predictions as the plain folded model."""
    from models.backend import InferenceBackend
    from utils.checkpoint import make_checkpoint, save_checkpoint

    torch.manual_seed(0)
    model = DetectionModel("yolov5n.yaml", nc=3, verbose=False)
    randomize_bn(model)
    save_checkpoint(make_checkpoint(model.eval()), tmp_path / "w.pt")
    backend = InferenceBackend(tmp_path / "w.pt")
    assert backend.channels_last
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last)
               for m in backend.model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1))
    x = torch.rand(2, 3, 96, 128)
    with torch.inference_mode():
        want = model.fuse().eval()(x)[0]
        got = backend(x)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def batch_norm_step(bn: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> list[torch.Tensor]:
    """Output, input gradient, weight and bias gradients of one training-mode call."""
    x = x.detach().clone().requires_grad_()
    y = bn(x)
    y.backward(grad)
    return [y.detach(), x.grad, bn.weight.grad, bn.bias.grad]


def test_channels_last_batch_norm_is_accurate_where_pytorch_nhwc_kernel_is_not():
    """models.common.BatchNorm2d on channels-last CPU input of a large mean (as conv outputs after SiLU have): output
    and input gradient as close to float64 as NCHW's, where nn.BatchNorm2d's NHWC kernel is 20x+ off in its output;
    weight and bias gradients from PyTorch's NHWC backward (measured 3e-6, NCHW's 3e-7 to 9e-7); running statistics
    as nn.BatchNorm2d's; NCHW and eval mode are nn.BatchNorm2d's own kernels, bit for bit."""
    torch.manual_seed(0)
    x64, grad64 = torch.randn(8, 32, 48, 48, dtype=torch.float64) + 30, torch.randn(8, 32, 48, 48, dtype=torch.float64)
    cl = torch.channels_last

    def make(cls, dtype=torch.float32):
        torch.manual_seed(1)
        bn = cls(32)
        nn.init.uniform_(bn.weight, 0.5, 1.5)
        nn.init.uniform_(bn.bias, -1, 1)
        return bn.to(dtype)

    reference = batch_norm_step(make(nn.BatchNorm2d, torch.float64), x64, grad64)
    x, grad = x64.float(), grad64.float()
    runs = {"nchw": (make(nn.BatchNorm2d), x, grad),
            "pytorch nhwc": (make(nn.BatchNorm2d), x.contiguous(memory_format=cl), grad.contiguous(memory_format=cl)),
            "ours nhwc": (make(BatchNorm2d), x.contiguous(memory_format=cl), grad.contiguous(memory_format=cl))}
    errors, modules = {}, {}
    for name, (bn, xi, gi) in runs.items():
        out = batch_norm_step(bn, xi, gi)
        errors[name] = [float((o.double() - r).norm() / r.norm()) for o, r in zip(out, reference)]
        modules[name] = bn
    ours, native, nchw = errors["ours nhwc"], errors["pytorch nhwc"], errors["nchw"]
    assert ours[0] < native[0] / 20 and ours[0] < 5 * nchw[0] + 1e-7, errors  # output
    assert ours[1] < 2 * nchw[1] + 1e-7, errors  # input gradient
    assert max(ours[2:]) < 2e-5, errors  # weight and bias gradients
    for key in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(modules["ours nhwc"], key), getattr(modules["nchw"], key), rtol=1e-5,
                                   atol=1e-6)
    assert int(modules["ours nhwc"].num_batches_tracked) == 1
    for train in (True, False):  # everything but channels-last CPU training is nn.BatchNorm2d's path
        ours, theirs = make(BatchNorm2d).train(train), make(nn.BatchNorm2d).train(train)
        assert torch.equal(ours(x), theirs(x))
    ours, theirs = make(BatchNorm2d).eval(), make(nn.BatchNorm2d).eval()
    assert torch.equal(ours(x.contiguous(memory_format=cl)), theirs(x.contiguous(memory_format=cl)))


def test_channels_last_batch_norm_with_frozen_affine_parameters():
    """Frozen weight and bias (--freeze) take no gradients; the input gradient still matches nn.BatchNorm2d's."""
    x = (torch.randn(2, 16, 8, 8) + 5).contiguous(memory_format=torch.channels_last)
    grads = []
    for cls in (BatchNorm2d, nn.BatchNorm2d):
        bn = cls(16).requires_grad_(False)
        xi = x.clone().requires_grad_()
        bn(xi).square().sum().backward()
        assert bn.weight.grad is None and bn.bias.grad is None
        grads.append(xi.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-3, atol=1e-4)


# ---- the standard blocks: upstream's module layout, folding, the generic formulations -------------------------------
# (constructor, input shape, the modules that own state_dict entries, in upstream's order)
CORE_BLOCKS = {
    "Conv": (lambda: common.Conv(8, 16, 3, 2), (2, 8, 12, 12), ["conv", "bn"]),
    "DWConv": (lambda: common.DWConv(8, 16, 3, 2), (2, 8, 12, 12), ["conv", "bn"]),
    "Bottleneck": (lambda: common.Bottleneck(8, 8), (2, 8, 10, 10), ["cv1.conv", "cv1.bn", "cv2.conv", "cv2.bn"]),
    "CrossConv": (lambda: common.CrossConv(8, 8, 3, 1, 1, 1.0, True), (2, 8, 10, 10),
                  ["cv1.conv", "cv1.bn", "cv2.conv", "cv2.bn"]),
    "BottleneckCSP": (lambda: common.BottleneckCSP(8, 16, 1), (2, 8, 10, 10),
                      ["cv1.conv", "cv1.bn", "cv2", "cv3", "cv4.conv", "cv4.bn", "bn",
                       "m.0.cv1.conv", "m.0.cv1.bn", "m.0.cv2.conv", "m.0.cv2.bn"]),
    "C3": (lambda: common.C3(8, 16, 1), (2, 8, 10, 10),
           ["cv1.conv", "cv1.bn", "cv2.conv", "cv2.bn", "cv3.conv", "cv3.bn",
            "m.0.cv1.conv", "m.0.cv1.bn", "m.0.cv2.conv", "m.0.cv2.bn"]),
    "C3x": (lambda: common.C3x(16, 16, 1, False), (2, 16, 10, 10),
            ["cv1.conv", "cv1.bn", "cv2.conv", "cv2.bn", "cv3.conv", "cv3.bn",
             "m.0.cv1.conv", "m.0.cv1.bn", "m.0.cv2.conv", "m.0.cv2.bn"]),
    "C3TR": (lambda: common.C3TR(8, 16, 1), (2, 8, 5, 6),
             ["cv1.conv", "cv1.bn", "cv2.conv", "cv2.bn", "cv3.conv", "cv3.bn", "m.linear", "m.tr.0.q", "m.tr.0.k",
              "m.tr.0.v", "m.tr.0.ma", "m.tr.0.ma.out_proj", "m.tr.0.fc1", "m.tr.0.fc2"]),
    "TransformerBlock": (lambda: common.TransformerBlock(8, 16, 4, 1), (2, 8, 5, 6),
                         ["conv.conv", "conv.bn", "linear", "tr.0.q", "tr.0.k", "tr.0.v", "tr.0.ma", "tr.0.ma.out_proj",
                          "tr.0.fc1", "tr.0.fc2"]),
    "SPP": (lambda: common.SPP(16, 32), (2, 16, 10, 10), ["cv1.conv", "cv1.bn", "cv2.conv", "cv2.bn"]),
    "SPPF": (lambda: common.SPPF(16, 32, 5), (2, 16, 10, 10), ["cv1.conv", "cv1.bn", "cv2.conv", "cv2.bn"]),
    "C3SPP": (lambda: common.C3SPP(16, 32), (2, 16, 10, 10),
              ["cv1.conv", "cv1.bn", "cv2.conv", "cv2.bn", "cv3.conv", "cv3.bn",
               "m.cv1.conv", "m.cv1.bn", "m.cv2.conv", "m.cv2.bn"]),
    "Focus": (lambda: common.Focus(3, 16, 3), (2, 3, 16, 16), ["conv.conv", "conv.bn"]),
    "GhostConv": (lambda: common.GhostConv(8, 16, 3, 2), (2, 8, 12, 12), ["cv1.conv", "cv1.bn", "cv2.conv", "cv2.bn"]),
    "GhostBottleneck": (lambda: common.GhostBottleneck(16, 32, 3, 2), (2, 16, 10, 10),
                        ["conv.0.cv1.conv", "conv.0.cv1.bn", "conv.0.cv2.conv", "conv.0.cv2.bn", "conv.1.conv",
                         "conv.1.bn", "conv.2.cv1.conv", "conv.2.cv1.bn", "conv.2.cv2.conv", "conv.2.cv2.bn",
                         "shortcut.0.conv", "shortcut.0.bn", "shortcut.1.conv", "shortcut.1.bn"]),
    "C3Ghost": (lambda: common.C3Ghost(8, 16, 1), (2, 8, 10, 10),
                ["cv1.conv", "cv1.bn", "cv2.conv", "cv2.bn", "cv3.conv", "cv3.bn", "m.0.conv.0.cv1.conv",
                 "m.0.conv.0.cv1.bn", "m.0.conv.0.cv2.conv", "m.0.conv.0.cv2.bn", "m.0.conv.2.cv1.conv",
                 "m.0.conv.2.cv1.bn", "m.0.conv.2.cv2.conv", "m.0.conv.2.cv2.bn"]),
}


def state_owners(module: nn.Module) -> list[str]:
    """Paths of the modules that hold state_dict entries, in state_dict order."""
    owners = []
    for key in module.state_dict():
        owner = key.rpartition(".")[0]
        if owner not in owners:
            owners.append(owner)
    return owners


@pytest.mark.parametrize("name", list(CORE_BLOCKS))
def test_core_block_layout_and_fold_equivalence(name):
    """Upstream's module nesting (so its checkpoints load), and every block folds with unchanged outputs, leaving
    no BatchNorm."""
    make, shape, owners = CORE_BLOCKS[name]
    torch.manual_seed(0)
    block = randomize_bn(make())
    assert state_owners(block) == owners
    x = torch.randn(shape)
    assert fold_error(block, x) < 1e-5
    folded = reparameterize_all(copy.deepcopy(block))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert all(m.folded for m in folded.modules() if isinstance(m, common.Reparameterizable))


def reference_pools(x: torch.Tensor, sizes) -> list[torch.Tensor]:
    return [nn.MaxPool2d(k, 1, k // 2)(x) for k in sizes]


@pytest.mark.parametrize("sizes", [(5, 9, 13), (3, 7), (9, 5, 13), (5, 5, 3), (1, 15)])
def test_spp_chained_pools_equal_parallel_pools(sizes):
    """SPP computes its pools as one chain; the concatenation is exactly [x, pool_k(x) for k in sizes]."""
    torch.manual_seed(0)
    spp = randomize_bn(common.SPP(8, 16, sizes)).eval()
    x = torch.randn(2, 8, 11, 13)
    seen = []
    spp.cv2.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0]))
    with torch.no_grad():
        spp(x)
        hidden = spp.cv1(x)
    assert torch.equal(seen[0], torch.cat([hidden, *reference_pools(hidden, sizes)], 1))


def test_sppf_is_spp_5_9_13_and_even_pools_are_refused():
    torch.manual_seed(0)
    sppf = randomize_bn(common.SPPF(16, 32, 5)).eval()
    spp = common.SPP(16, 32, (5, 9, 13)).eval()
    spp.load_state_dict(sppf.state_dict())
    x = torch.randn(1, 16, 12, 12)
    with torch.no_grad():
        assert torch.equal(sppf(x), spp(x))
    with pytest.raises(ValueError, match="odd"):
        common.SPP(16, 32, (5, 8))


def test_space_depth_rearrangements():
    """Focus stacks the pixel phases (0,0), (1,0), (0,1), (1,1) (row, column); Contract orders them row-major;
    Expand inverts Contract."""
    x = torch.randn(2, 3, 8, 12)
    focus_order = [x[..., r::2, c::2] for c, r in ((0, 0), (0, 1), (1, 0), (1, 1))]
    assert torch.equal(common._space_to_depth(x, 2, common.Focus.phase_order), torch.cat(focus_order, 1))
    focus = common.Focus(3, 8, act=False).eval()
    with torch.no_grad():
        assert torch.equal(focus(x), focus.conv(torch.cat(focus_order, 1)))
    for gain in (2, 4):
        contracted = common.Contract(gain)(x)
        phases = [x[..., r::gain, c::gain] for r in range(gain) for c in range(gain)]
        assert torch.equal(contracted, torch.cat(phases, 1))
        assert torch.equal(common.Expand(gain)(contracted), x)


# ---- the re-parameterization protocol, across every family --------------------------------------------------------
def family_modules() -> list:
    import importlib
    import pkgutil

    import models.modules

    return [importlib.import_module(f"models.modules.{m.name}") for m in pkgutil.iter_modules(models.modules.__path__)]


def reparameterizable_examples() -> dict[type, tuple]:
    """One small instance (and an input shape) of every Reparameterizable class of the project."""
    from models.modules import gfpn, repghost, replknet, repvgg

    return {
        common.ConvBN: (lambda: common.ConvBN(8, 16, 3, 2, g=2), (2, 8, 9, 9)),
        common.Conv: (lambda: common.Conv(8, 16, 3), (2, 8, 9, 9)),
        common.DWConv: (lambda: common.DWConv(8, 8, 5), (2, 8, 9, 9)),
        common.BottleneckCSP: (lambda: common.BottleneckCSP(8, 16, 2), (2, 8, 9, 9)),
        repvgg.RepVGGBlock: (lambda: repvgg.RepVGGBlock(8, 8, use_se=True), (2, 8, 9, 9)),
        repghost.RepGhostModule: (lambda: repghost.RepGhostModule(8, 16, reparam_identity=True), (2, 8, 9, 9)),
        gfpn.RepConv: (lambda: gfpn.RepConv(8, 16, 3, 2), (2, 8, 9, 9)),
        gfpn.ConvBNAct: (lambda: gfpn.ConvBNAct(8, 16, 3), (2, 8, 9, 9)),
        replknet.ReparamLargeKernelConv: (lambda: replknet.ReparamLargeKernelConv(8, 8, 13, 1, 8, 5), (2, 8, 16, 16)),
        replknet.RepLKBlock: (lambda: replknet.RepLKBlock(8, 16, 13, 5, 0.0), (2, 8, 16, 16)),
        replknet.ConvFFN: (lambda: replknet.ConvFFN(8, 32, 8, 0.0), (2, 8, 16, 16)),
    }


def all_reparameterizable_classes() -> set[type]:
    family_modules()  # import every family so that its classes exist
    found, todo = set(), [common.Reparameterizable]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub.__module__.startswith("models.") and sub not in found:
                found.add(sub)
                todo.append(sub)
    return found


def test_every_reparameterizable_class_has_an_example():
    assert all_reparameterizable_classes() == set(reparameterizable_examples())


@pytest.mark.parametrize("cls", list(reparameterizable_examples()), ids=lambda c: c.__name__)
def test_reparameterization_protocol(cls):
    """``folded`` flips with ``reparameterize()``, which is idempotent and keeps outputs; ``folded_kernel_bias()``
    (where a block has it) is the same kernel and bias before and after."""
    make, shape = reparameterizable_examples()[cls]
    torch.manual_seed(0)
    block = randomize_bn(make()).eval()
    x = torch.randn(shape)
    assert not block.folded
    with torch.no_grad():
        before = block(x)
        kernel_bias = [t.clone() for t in block.folded_kernel_bias()] if hasattr(block, "folded_kernel_bias") else []
        block.reparameterize()
        assert block.folded and not any(isinstance(m, nn.BatchNorm2d) for m in block.modules())
        assert rel_error(block(x), before) < 1e-5
        state = {k: v.clone() for k, v in block.state_dict().items()}
        block.reparameterize()
        assert state.keys() == block.state_dict().keys()
        assert all(torch.equal(v, block.state_dict()[k]) for k, v in state.items())
        if kernel_bias:
            for was, now in zip(kernel_bias, block.folded_kernel_bias()):
                assert rel_error(now, was) < 1e-6


def test_one_protocol_vocabulary():
    """No family keeps a second name for the folded kernel or for 'is it folded'."""
    legacy = ("equivalent_kernel_bias", "folded_cheap_kernel_bias", "has_branches")
    for cls in all_reparameterizable_classes():
        assert not any(hasattr(cls, name) for name in legacy), cls


def test_variants_are_declared_one_way():
    """Every family with named sizes: VARIANTS maps names to constructor keyword arguments, and each variant is the
    YAML backbone '<family>_<name>' built from them (with keyword overrides)."""
    families = [m for m in family_modules() if hasattr(m, "VARIANTS")]
    assert {m.__name__.rsplit(".", 1)[1] for m in families} >= {"repvgg", "revcol"}
    for family in families:
        prefix = getattr(family, "VARIANT_PREFIX", family.__name__.rsplit(".", 1)[1])
        for name, kwargs in family.VARIANTS.items():
            assert isinstance(kwargs, Mapping) and all(isinstance(k, str) for k in kwargs)
            constructor, kind = family.YAML_MODULES[f"{prefix}_{name}"]
            assert kind == "backbone" and constructor.__name__ == f"{prefix}_{name}"
            assert constructor.__module__ == family.__name__
    from models.modules import revcol

    with torch.device("meta"):
        tiny = revcol.YAML_MODULES["revcol_tiny"][0](4, num_subnet=2, save_memory=False)
    assert tiny.num_subnet == 2 and tiny.stem[0].in_channels == 4 and tiny.channels == [64, 128, 256, 512]
