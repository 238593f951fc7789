"""Local timm checkpoints into timm backbones, as users load them: the YAML row's weights argument and
load_backbone_weights (train.py --backbone-weights), through timm's own pretrained loader, never the network.

The reference is the classification model that wrote the file, run stage by stage (stem, stages 0-3 are
repvgg_a0's five feature maps): the loaded backbone must compute the same maps, unfolded and after model.fuse().
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file

from models.loading import build_model
from models.modules.timm_backbone import TimmBackbone
from models.pretrained import SUMMARY, CheckpointError, load_backbone_weights
from models.yolo import DetectionModel
from tests.helpers import ROOT, randomize_bn, rel_error
from utils.checkpoint import make_checkpoint
from utils.synthetic import generate_shapes

N_EXTRACTOR = 349  # repvgg_a0's extractor tensors: the classification state_dict (351) less head.fc.{weight,bias}


def save_timm_checkpoint(model: torch.nn.Module, path) -> None:
    """What timm publishes (.safetensors) or a user saves (.pth): the classification model's bare state_dict."""
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path)) if str(path).endswith(".safetensors") else torch.save(state, path)


@pytest.fixture(scope="module")
def repvgg(tmp_path_factory):
    """A random repvgg_a0 classification model (BatchNorm statistics non-trivial, so eps and folding matter) and
    its checkpoint saved in both formats."""
    torch.manual_seed(0)
    full = randomize_bn(timm.create_model("repvgg_a0", pretrained=False)).eval()
    folder = tmp_path_factory.mktemp("timm")
    files = {ext: folder / f"repvgg_a0.{ext}" for ext in ("safetensors", "pth")}
    for path in files.values():
        save_timm_checkpoint(full, path)
    return full, files


def model_dict(weights=None, nc: int = 3) -> dict:
    """yolov5s_timm-repvgg_a0.yaml with a narrow head, its backbone row naming ``weights`` when given."""
    d = yaml.safe_load((ROOT / "models" / "yolov5s_timm-repvgg_a0.yaml").read_text())
    d["backbone"][0] = [-1, 1, "TimmBackbone", ["repvgg_a0", None, str(weights)] if weights else ["repvgg_a0"]]
    d["width_multiple"], d["nc"] = 0.125, nc
    return d


def stage_maps(full: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The classification model's stem and stage outputs (what the extractor must return)."""
    with torch.no_grad():
        maps = [full.stem(x)]
        for stage in full.stages:
            maps.append(stage(maps[-1]))
    return maps


def assert_weights_equal_file(backbone: TimmBackbone, full: torch.nn.Module) -> None:
    own, ref = backbone.model.state_dict(), full.state_dict()
    assert len(own) == N_EXTRACTOR
    for k, v in ref.items():
        if not k.startswith("head."):
            assert torch.equal(own[k.replace(".", "_", 1) if k.startswith("stages.") else k], v), k


def state_copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test loudly."""
    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.mark.parametrize("ext", ["safetensors", "pth"])
def test_yaml_weights_argument_loads_the_file(repvgg, no_network, ext):
    full, files = repvgg
    model = DetectionModel(model_dict(files[ext]), verbose=False)
    assert_weights_equal_file(model.model[0], full)
    backbone = TimmBackbone(3, "repvgg_a0", None, files[ext]).eval()  # the row's module, as timm built it
    assert backbone.keeps_bn_eps
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert max(rel_error(a, b) for a, b in zip(backbone(x), stage_maps(full, x))) <= 2e-5


@pytest.mark.parametrize("ext", ["safetensors", "pth"])
def test_load_backbone_weights_reproduces_the_classification_model(repvgg, no_network, caplog, ext):
    full, files = repvgg
    torch.manual_seed(1)
    model = DetectionModel(model_dict(), verbose=False).eval()
    with caplog.at_level("INFO", logger="yolov5"):
        result = load_backbone_weights(model, files[ext])
    assert (result.loaded, result.total, result.rows, result.skipped) == (N_EXTRACTOR, N_EXTRACTOR, [0, 1, 2, 3, 4], {})
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded "))
    assert SUMMARY.fullmatch(line).groups()[:6] == ("349", "349", str(files[ext]), "0", "4", "0")
    backbone = model.model[0]
    assert_weights_equal_file(backbone, full)
    bns = [m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.eps == 1e-5 for m in bns)  # timm's eps, not YOLOv5's 1e-3
    assert model.model[5].cv1.bn.eps == 1e-3  # the head keeps YOLOv5's
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    reference = stage_maps(full, x)
    with torch.no_grad():
        unfolded = backbone(x)
        model.fuse()
        folded = backbone(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.modules())
    assert max(rel_error(a, b) for a, b in zip(unfolded, reference)) <= 2e-5
    assert max(rel_error(a, b) for a, b in zip(folded, reference)) <= 1e-4


def test_training_checkpoint_wrapper_loads_the_ema_weights(repvgg, tmp_path):
    """timm's training scripts save {'state_dict', 'state_dict_ema', 'epoch', 'arch'}: the EMA weights load."""
    full, _ = repvgg
    other = randomize_bn(timm.create_model("repvgg_a0"), seed=5)
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"state_dict": other.state_dict(), "state_dict_ema": full.state_dict(), "epoch": 3,
                "arch": "repvgg_a0"}, path)
    backbone = TimmBackbone(3, "repvgg_a0")
    result = backbone.load_backbone_file(path)
    assert (result.loaded, result.total) == (N_EXTRACTOR, N_EXTRACTOR)
    assert_weights_equal_file(backbone, full)


def test_counts_skip_extractor_less_tensors_and_adapt_input_channels(tmp_path):
    """mobilenetv3's conv_head is neither classifier nor extractor: counted, skipped; a 4-channel input is adapted
    by timm from the 3-channel stem, every other tensor is the file's."""
    torch.manual_seed(0)
    full = timm.create_model("mobilenetv3_small_050")
    path = tmp_path / "mnv3.safetensors"
    save_timm_checkpoint(full, path)
    result = TimmBackbone(3, "mobilenetv3_small_050").load_backbone_file(path)
    assert (result.loaded, result.total) == (len(full.state_dict()) - 4, len(full.state_dict()) - 2)
    assert result.skipped == {"conv_head.* (not in the feature extractor)": 2}
    backbone = TimmBackbone(4, "mobilenetv3_small_050", None, path)
    own, ref = backbone.model.state_dict(), full.state_dict()
    assert own["conv_stem.weight"].shape[1] == 4 and ref["conv_stem.weight"].shape[1] == 3
    assert all(torch.equal(own[k], ref[k]) for k in own if k != "conv_stem.weight")


def test_relative_path_from_working_directory_or_repository_root(repvgg, tmp_path, monkeypatch):
    full, files = repvgg
    monkeypatch.chdir(files["pth"].parent)
    assert_weights_equal_file(TimmBackbone(3, "repvgg_a0", None, "repvgg_a0.pth"), full)
    monkeypatch.chdir(tmp_path)
    from_root = os.path.relpath(files["safetensors"], ROOT)
    assert_weights_equal_file(TimmBackbone(3, "repvgg_a0", None, from_root), full)
    with pytest.raises(CheckpointError, match=r"^nothing\.pth: timm weights file not found \(looked in "):
        TimmBackbone(3, "repvgg_a0", None, "nothing.pth")


@pytest.mark.parametrize("ext", ["safetensors", "pth"])
def test_truncated_file_is_refused_and_nothing_loaded(repvgg, tmp_path, no_network, ext):
    _, files = repvgg
    data = files[ext].read_bytes()
    path = tmp_path / f"truncated.{ext}"
    path.write_bytes(data[: len(data) // 2])
    model = DetectionModel(model_dict(), verbose=False)
    before = state_copy(model)
    with pytest.raises(CheckpointError, match=rf"truncated\.{ext}: not a readable") as e:
        load_backbone_weights(model, path)
    assert "\n" not in str(e.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_file_of_another_model_is_refused_naming_the_first_bad_key(repvgg, tmp_path, no_network):
    model = DetectionModel(model_dict(), verbose=False)
    before = state_copy(model)
    wider = tmp_path / "repvgg_a1.pth"  # same names, other shapes
    save_timm_checkpoint(timm.create_model("repvgg_a1"), wider)
    with pytest.raises(CheckpointError, match=r"repvgg_a1\.pth: tensor 'stem\.conv_kxk\.conv\.weight' has shape "
                                              r"\(64, 3, 3, 3\), the repvgg_a0 extractor's .* \(48, 3, 3, 3\)") as e:
        load_backbone_weights(model, wider)
    assert "\n" not in str(e.value)
    other = tmp_path / "resnet10t.safetensors"  # other names altogether
    save_timm_checkpoint(timm.create_model("resnet10t"), other)
    with pytest.raises(CheckpointError, match=r"resnet10t\.safetensors: lacks 288 tensors of the repvgg_a0 "
                                              r"extractor, the first 'stem\.conv_kxk\.conv\.weight'"):
        load_backbone_weights(model, other)
    with pytest.raises(CheckpointError, match="timm weights file not found"):
        load_backbone_weights(model, tmp_path / "missing.safetensors")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_train_one_epoch_from_a_local_timm_checkpoint(repvgg, tmp_path):
    """The real train.py CLI on a timm-backbone YAML whose row names the checkpoint; the run starts from it."""
    full, files = repvgg
    generate_shapes(tmp_path / "shapes", n_train=4, n_val=2, imgsz=64, seed=1)
    names = {0: "circle", 1: "square", 2: "triangle", 3: "star", 4: "ellipse"}
    data = tmp_path / "tiny.yaml"
    data.write_text(yaml.safe_dump({"path": str(tmp_path / "shapes"), "train": "images/train",
                                    "val": "images/val", "names": names}))
    cfg = tmp_path / "timm_repvgg.yaml"
    cfg.write_text(yaml.safe_dump(model_dict(files["safetensors"], nc=5)))
    out = subprocess.run([sys.executable, "train.py", "--cfg", str(cfg), "--data", str(data), "--img", "64",
                          "--epochs", "1", "--batch-size", "2", "--workers", "0", "--project", str(tmp_path),
                          "--name", "exp", "--noplots"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         check=False)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    assert f"TimmBackbone: repvgg_a0 loaded 349/349 tensors from {files['safetensors']}" in log
    assert "Training done: 1 epoch(s)" in log
    trained = torch.load(tmp_path / "exp" / "weights" / "last.pt", weights_only=True)["model"]
    start = full.state_dict()["stages.2.3.conv_kxk.conv.weight"]
    unrelated = timm.create_model("repvgg_a0").state_dict()["stages.2.3.conv_kxk.conv.weight"]
    after = trained["model.0.model.stages_2.3.conv_kxk.conv.weight"].float()
    assert rel_error(after, start) < 0.1 < rel_error(unrelated, start)  # one epoch moved it little from the file's


def test_yaml_route_computes_timms_function_and_survives_a_checkpoint_without_the_file(repvgg, tmp_path, no_network):
    """Inside a DetectionModel the YAML-loaded backbone keeps timm's BatchNorm eps, and a model rebuilt from a
    checkpoint (as val.py/detect.py do) needs no weights file and computes the same function."""
    full, files = repvgg
    moved = tmp_path / "moved.safetensors"
    moved.write_bytes(files["safetensors"].read_bytes())
    model = DetectionModel(model_dict(moved), verbose=False).eval()
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model.model[0](x)
        assert max(rel_error(a, b) for a, b in zip(got, stage_maps(full, x))) <= 2e-5
        ckpt = make_checkpoint(model)
        moved.unlink()
        rebuilt = build_model(ckpt).eval()
        assert all(torch.equal(a, b) for a, b in zip(rebuilt.model[0](x), got))
        assert torch.equal(rebuilt(x)[0], model(x)[0])
