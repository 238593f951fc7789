"""Official RevCol checkpoints (megvii-research/RevCol) loaded with ``load_backbone_weights``: the same function as the
official FullNet (fixtures in shared/fixtures/official, see its README), and every published key list fits our YAMLs."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from models.modules.revcol import CHECKPOINT_FORMATS, FullNet, SubNet
from models.pretrained import SUMMARY, CheckpointError, load_backbone_weights, load_state_into_rows
from models.yolo import DetectionModel
from tests.helpers import ROOT, SHARED
from utils.general import yaml_load

FIXTURES = SHARED / "fixtures" / "official"
CHECKPOINT = FIXTURES / "revcol_small.pth"
FORMAT = CHECKPOINT_FORMATS[0]
YAMLS = {"tiny": "yolov5_RevCol.yaml", "small": "yolov5_RevCol-small.yaml", "base": "yolov5_RevCol-base.yaml",
         "large": "yolov5_RevCol-large.yaml", "xlarge": "yolov5_RevCol-xlarge.yaml"}
TRAINING_TOL, FOLDED_TOL = 2e-5, 1e-4  # README: training form, folded model
PLAIN_GRAD_TOL, REVERSIBLE_GRAD_TOL = 1e-4, 1e-3  # README: exact autograd, reconstruction through 1/alpha


@pytest.fixture(scope="module")
def ref() -> dict:
    return torch.load(FIXTURES / "revcol_small_ref.pt", weights_only=True)


@pytest.fixture(scope="module")
def key_lists() -> dict:
    return json.loads((FIXTURES / "official_state_dict_keys.json").read_text())


def fixture_model(ref: dict) -> DetectionModel:
    """yolov5_RevCol.yaml with the fixture's backbone configuration in row 0 (keyword arguments of revcol_tiny)."""
    cfg = yaml_load(ROOT / "models" / "yolov5_RevCol.yaml")
    config = {k: ref["config"][k] for k in ("channels", "layers", "num_subnet", "kernel_size", "drop_path")}
    cfg["backbone"][0] = [-1, 1, "revcol_tiny", [config]]
    torch.manual_seed(0)
    return DetectionModel(cfg, verbose=False)


def assert_close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    """README's criterion, max|got - want| <= tol * max|want|; an all-zero reference must be met exactly."""
    err = (got - want).abs().max().item()
    assert err <= tol * want.abs().max().item(), f"{what}: max error {err:.3g}, max |ref| {want.abs().max():.3g}"


def assert_features(outs: list[torch.Tensor], ref: dict, tol: float) -> None:
    assert [tuple(o.shape) for o in outs] == [tuple(f.shape) for f in ref["features"]]
    for name, got, want in zip(ref["feature_names"], outs, ref["features"]):
        assert_close(got, want, tol, name)


def test_fixture_loads_and_matches_official_features(ref):
    model = fixture_model(ref)
    result = load_backbone_weights(model, CHECKPOINT)
    assert (result.loaded, result.total, result.rows) == (284, 284, [0, 1, 2, 3, 4])  # 139 head tensors not counted
    assert SUMMARY.fullmatch(result.summary())
    backbone = model.model[0]
    for key, clamped in ref["alpha_clamped_in_forward"].items():  # the official in-place clamp, done at load
        assert torch.equal(backbone.state_dict()[key], clamped), key
    model.eval()
    with torch.no_grad():
        assert_close(backbone.stem(ref["input"]), ref["stem"], TRAINING_TOL, "stem")
        assert_features(backbone(ref["input"]), ref, TRAINING_TOL)
        alphas = copy.deepcopy(backbone.state_dict())
        model.fuse()
        assert_features(model.model[0](ref["input"]), ref, FOLDED_TOL)
    assert all(torch.equal(v, alphas[k]) for k, v in model.model[0].state_dict().items())  # eval changes nothing


def test_without_the_clamp_the_features_miss(ref):
    """The fixture tells the clamp apart: loading the same tensors without it misses the tolerance."""
    model = fixture_model(ref)
    state = torch.load(CHECKPOINT, weights_only=True)["model"]
    load_state_into_rows(model.model, state, dataclasses.replace(FORMAT, after_load=None), CHECKPOINT)
    with torch.no_grad():
        outs = model.model[0].eval()(ref["input"])
    with pytest.raises(AssertionError, match="max error"):
        assert_features(outs, ref, TRAINING_TOL)


def test_every_column_matches_official(ref):
    """Each column's c0..c3, so an error is pinned to the first column that shows it."""
    model = fixture_model(ref)
    load_backbone_weights(model, CHECKPOINT, log=False)
    net = model.model[0].eval()
    with torch.no_grad():
        x, states = net.stem(ref["input"]), [0.0] * 4
        for i, column in enumerate(ref["columns"]):
            states = getattr(net, f"subnet{i}")(x, *states)
            for level, (got, want) in enumerate(zip(states, column)):
                assert_close(got, want, TRAINING_TOL, f"column {i} c{level}")


@pytest.mark.parametrize("save_memory, tol", [(False, PLAIN_GRAD_TOL), (True, REVERSIBLE_GRAD_TOL)])
def test_gradients_match_official(ref, save_memory, tol):
    """Gradients of sum_i (c_i * grad_weights[i]).sum() in eval mode, by exact autograd and by the reversible
    backward, against the official exact ones."""
    model = fixture_model(ref)
    load_backbone_weights(model, CHECKPOINT, log=False)
    net = model.model[0].eval()
    for m in net.modules():
        if isinstance(m, SubNet):
            m.save_memory = save_memory
    x = ref["input"].clone().requires_grad_(True)
    sum((c * w).sum() for c, w in zip(net(x), ref["grad_weights"])).backward()
    assert_close(x.grad, ref["grad_input"], tol, "input")
    grads = {name: p.grad for name, p in net.named_parameters()}
    assert set(grads) == set(ref["grad_params"])
    for name, want in ref["grad_params"].items():
        assert_close(grads[name], want, tol, name)


def test_official_alpha_rule_keeps_exact_zero(ref, tmp_path):
    """After loading: |alpha| >= 1e-3 with its sign, an exact zero stays zero (the official rule); training still
    lifts a zero to +1e-3, which the reversible backward needs."""
    state = torch.load(CHECKPOINT, weights_only=True)["model"]
    values = torch.tensor([0.0, 1e-6, -1e-6, -2e-4, -0.5, 2.0])
    state["subnet2.alpha1"][0, :6, 0, 0] = values
    torch.save({"model": state}, tmp_path / "edited.pth")
    model = fixture_model(ref)
    load_backbone_weights(model, tmp_path / "edited.pth", log=False)
    alpha = model.model[0].subnet2.alpha1
    assert torch.equal(alpha[0, :6, 0, 0], torch.tensor([0.0, 1e-3, -1e-3, -1e-3, -0.5, 2.0]))
    model.model[0].train()(ref["input"][..., :64, :64])
    assert alpha[0, 0, 0, 0] == 1e-3


def backbone_keys(entry: dict) -> dict[str, list[int]]:
    return {k: shape for k, shape in entry["state_dict"] if not FORMAT.is_head(k)}


def meta_model(size: str) -> DetectionModel:
    with torch.device("meta"):
        return DetectionModel(YAMLS[size], verbose=False)


@pytest.mark.parametrize("name", ["revcol_tiny_1k", "revcol_small_1k", "revcol_base_1k", "revcol_base_22k",
                                  "revcol_base_22k_1kft", "revcol_large_22k", "revcol_large_22k_1kft",
                                  "revcol_xlarge_22k", "revcol_xlarge_22k_1kft"])
def test_official_key_list_maps_fully(key_lists, name):
    """Every non-head key of the full-size official state_dict lands, shape for shape, in the YAML of that size."""
    entry = key_lists[name]
    size = name.split("_")[1]
    assert yaml_load(ROOT / "models" / YAMLS[size])["backbone"][0][2] == f"revcol_{size}"
    keys = backbone_keys(entry)
    heads = {k.split(".")[0] for k, _ in entry["state_dict"] if k not in keys}
    assert heads == ({"cls"} if name.endswith("1kft") else {"cls_blocks", "decoder_blocks"})
    assert sum(torch.Size(s).numel() for s in keys.values()) == entry["backbone_params"]
    state = {k: torch.empty(shape, device="meta") for k, shape in entry["state_dict"]}
    assert FORMAT.recognise(state)
    model = meta_model(size)
    result = load_state_into_rows(model.model, state, FORMAT, f"{name}.pth")
    assert result.loaded == result.total == len(keys) and result.rows == [0, 1, 2, 3, 4]
    assert set(model.model[0].state_dict()) == set(keys)  # nothing of the backbone is left unloaded


def test_wrong_size_is_refused(key_lists):
    """A tiny file into revcol_small (same shapes, half the columns) and a large file into small (8 columns each,
    other widths): one-line errors, nothing loaded."""
    tiny = {k: torch.empty(s, device="meta") for k, s in key_lists["revcol_tiny_1k"]["state_dict"]}
    with pytest.raises(CheckpointError, match=r"4 columns .*'subnet3\.\*'.* has 8") as e:
        load_state_into_rows(meta_model("small").model, tiny, FORMAT, "tiny.pth")
    assert "\n" not in str(e.value)
    large = {k: torch.empty(s, device="meta") for k, s in key_lists["revcol_large_22k"]["state_dict"]}
    with pytest.raises(CheckpointError, match=r"tensor 'stem\.0\.weight' has shape \(128, 3, 4, 4\)"):
        load_state_into_rows(meta_model("small").model, large, FORMAT, "large.pth")


def test_not_claimed_for_other_families(key_lists):
    for name, entry in key_lists.items():
        state = {k: None for k, _ in entry["state_dict"]}
        assert FORMAT.recognise(state) == (entry["family"] == "RevCol"), name


def test_model_without_revcol_row():
    with torch.device("meta"):
        model = DetectionModel("yolov5n.yaml", verbose=False)
    with pytest.raises(CheckpointError, match="no rows it fits; build the model from a RevCol YAML"):
        load_backbone_weights(model, CHECKPOINT)
    assert not any(isinstance(m, FullNet) for m in model.modules())
