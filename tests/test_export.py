"""export.py: every model YAML exports to ONNX and matches PyTorch; TorchScript; metadata; OpenCV DNN; failures.

Whole models run at 64x96 (64x128 for stride-64 models) with nc 3 and one thread (OpenMP threads spin on
the shared 2-core machine and multiply CPU time). The per-YAML test builds each YAML at a quarter of its
width: same rows, blocks, depths, kernels and RevCol columns, so the same operators are exported, at a
fraction of the weights and time (the largest YAML, RevCol-xlarge, would need several GB and an ONNX file
with external data at full width).
"""

from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch

import export
from export import (
    ExportError, export_metadata, export_onnx, export_torchscript, prepare_for_export, run_exported, simplify_onnx,
)
from models.modules import revcol
from models.yolo import DetectionModel
from tests.helpers import ROOT, randomize_bn, rel_error
from models.backend import InferenceBackend
from utils.checkpoint import make_checkpoint, save_checkpoint
from utils.general import LOGGER, UserInputError, yaml_load

MODEL_YAMLS = sorted((ROOT / "models").glob("*.yaml"))
WIDTH_DIVISOR = 4
TOLERANCE = 1e-4  # relative error (max |a - b| / max |b|) between exported and PyTorch outputs


def narrow_revcol(variant: str, divisor: int, c1: int = 3) -> revcol.FullNet:
    """A RevCol variant with its channels divided by ``divisor`` (same blocks per level and columns)."""
    config = revcol.VARIANTS[variant]
    return revcol.FullNet([c // divisor for c in config["channels"]], config["layers"], config["num_subnet"],
                          in_channels=c1)


def narrowed_model_dict(cfg: Path, divisor: int) -> tuple[dict, dict]:
    """(model dict, YAML module overrides) for ``cfg`` at 1/``divisor`` of its width.

    YOLOv5 rows follow width_multiple. RepLKNet rows and RevCol backbones fix their widths themselves:
    RepLKNet rows get their output channels (args[0]) and per-stage channel list (the first list argument)
    divided; RevCol backbone names are mapped to narrowed variants. Other rows keep their YAML width.
    """
    d = yaml_load(cfg)
    d["width_multiple"] = d.get("width_multiple", 1.0) / divisor
    for row in d["backbone"] + d["head"]:
        if str(row[2]).startswith("RepLKNet_"):
            args = row[3]
            args[0] //= divisor
            k = next(i for i, a in enumerate(args) if isinstance(a, list))
            args[k] = [c // divisor for c in args[k]]
    overrides = {f"revcol_{v}": (partial(narrow_revcol, v, divisor), "backbone") for v in revcol.VARIANTS}
    return d, overrides


def sample_input(model: DetectionModel, seed: int = 0) -> torch.Tensor:
    """A random 64 x (2 or 3 strides) image batch of one."""
    stride = int(model.stride.max())
    width = 96 if stride == 32 else 2 * stride
    return torch.rand(1, 3, 64, width, generator=torch.Generator().manual_seed(seed))


def onnx_ops(file: Path) -> list[onnx.NodeProto]:
    return list(onnx.load(str(file)).graph.node)


def export_and_compare(model: DetectionModel, file: Path) -> tuple[float, float, list[onnx.NodeProto]]:
    """Fold and export ``model`` (random BN statistics, eval); errors of ONNX Runtime vs the folded and the
    unfolded (training-form, eval mode) PyTorch model, and the graph's nodes."""
    x = sample_input(randomize_bn(model).eval())
    with torch.no_grad():
        unfolded = model(x)[0]
    folded = prepare_for_export(model.fuse(), x)
    with torch.no_grad():
        reference = folded(x)
    y = run_exported(export_onnx(folded, x, file, export_metadata(folded, x, dynamic=False)), x)
    return rel_error(y, reference), rel_error(y, unfolded), onnx_ops(file)


@pytest.mark.parametrize("cfg", MODEL_YAMLS, ids=lambda p: p.stem)
def test_every_model_yaml_exports_to_onnx(cfg: Path, tmp_path: Path):
    d, overrides = narrowed_model_dict(cfg, WIDTH_DIVISOR)
    model = DetectionModel(d, nc=3, verbose=False, extra_modules=overrides)
    err_folded, err_unfolded, nodes = export_and_compare(model, tmp_path / f"{cfg.stem}.onnx")
    assert err_folded < TOLERANCE, f"ONNX Runtime vs folded PyTorch: {err_folded:.2e}"
    assert err_unfolded < TOLERANCE, f"ONNX Runtime vs training-form PyTorch: {err_unfolded:.2e}"
    assert all(n.domain in ("", "ai.onnx") for n in nodes), "custom-domain operators in the graph"
    op_types = {n.op_type for n in nodes}
    assert not op_types & {"DFT", "STFT", "BatchNormalization"}, op_types


def test_large_kernels_export_as_plain_convolutions(tmp_path: Path):
    """RepLKNet-tiny at full width: the FFT fast path of the large-kernel conv is never traced; the folded
    31x31 ... 13x13 depthwise kernels are plain convolutions in ONNX and TorchScript."""
    model = DetectionModel("yolov5_RepLKNet-tiny.yaml", nc=3, verbose=False)
    err_folded, err_unfolded, nodes = export_and_compare(model, tmp_path / "replknet_tiny.onnx")
    assert max(err_folded, err_unfolded) < TOLERANCE
    kernels = {tuple(a.ints) for n in nodes if n.op_type == "Conv" for a in n.attribute if a.name == "kernel_shape"}
    assert {(31, 31), (29, 29), (27, 27), (13, 13)} <= kernels
    assert not {n.op_type for n in nodes} & {"DFT", "STFT", "BatchNormalization"}
    x = sample_input(model)
    folded = prepare_for_export(model, x)
    traced = torch.jit.load(str(export_torchscript(folded, x, tmp_path / "replknet_tiny.torchscript", {})))
    graph = str(traced.inlined_graph)
    assert "aten::_convolution" in graph and "fft" not in graph
    with torch.no_grad():
        assert rel_error(traced(x), folded(x)) < TOLERANCE


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, DetectionModel]:
    """A saved yolov5n (nc 3, random BN statistics) and the folded model for reference outputs."""
    torch.manual_seed(0)
    model = randomize_bn(DetectionModel("yolov5n.yaml", nc=3, verbose=False))
    model.names = {0: "circle", 1: "square", 2: "star"}
    path = tmp_path_factory.mktemp("weights") / "best.pt"
    save_checkpoint(make_checkpoint(model), path)
    return path, prepare_for_export(model.eval().fuse(), sample_input(model))


def test_cli_export_parity_and_metadata(checkpoint):
    """export.run writes both formats; the metadata round-trips; TorchScript and ONNX match PyTorch."""
    path, reference = checkpoint
    files = export.run(weights=path, include=["torchscript", "onnx"], imgsz=[64, 96])
    assert [f.name for f in files] == ["best.torchscript", "best.onnx"]
    x = sample_input(reference, seed=1)
    with torch.no_grad():
        expected = reference(x)
    for f in files:
        backend = InferenceBackend(f)
        assert backend.stride == 32 and backend.names == {0: "circle", 1: "square", 2: "star"}
        assert backend.static_shape == (1, 3, 64, 96)
        assert rel_error(backend(x), expected) < TOLERANCE
    extra = {"config.txt": ""}
    torch.jit.load(str(files[0]), _extra_files=extra)
    props = {p.key: p.value for p in onnx.load(str(files[1])).metadata_props}
    for meta in json.loads(extra["config.txt"]), json.loads(props["metadata"]):
        assert meta["stride"] == 32 and meta["shape"] == [1, 3, 64, 96] and meta["dynamic"] is False
        assert meta["names"] == {"0": "circle", "1": "square", "2": "star"}


def test_static_export_runs_any_batch_size(checkpoint):
    """A batch-1 export serves batches of 3 (val.py's batches) in chunks, identical to PyTorch."""
    path, reference = checkpoint
    backend = InferenceBackend(export.run(weights=path, include=["onnx"], imgsz=[64, 96])[0])
    x = torch.cat([sample_input(reference, seed=s) for s in range(3)])
    with torch.no_grad():
        assert rel_error(backend(x), reference(x)) < TOLERANCE
    with pytest.raises(ValueError, match="takes 64x96 images"):
        backend(torch.zeros(1, 3, 96, 64))


def test_dynamic_export_runs_other_shapes(checkpoint):
    path, reference = checkpoint
    for f in export.run(weights=path, include=["torchscript", "onnx"], imgsz=[64, 96], dynamic=True):
        backend = InferenceBackend(f)
        assert backend.static_shape is None
        x = torch.rand(2, 3, 96, 64)
        with torch.no_grad():
            assert rel_error(backend(x), reference(x)) < TOLERANCE, f.name


def test_opencv_dnn_reads_the_onnx_file(checkpoint):
    """cv2.dnn.readNetFromONNX loads standard yolov5n and gives ONNX Runtime's raw output."""
    path, reference = checkpoint
    file = export.run(weights=path, include=["onnx"], imgsz=[64, 96])[0]
    x = sample_input(reference, seed=2)
    net = cv2.dnn.readNetFromONNX(str(file))
    net.setInput(x.numpy())
    opencv = torch.from_numpy(np.asarray(net.forward()))
    assert rel_error(opencv, InferenceBackend(file)(x)) < TOLERANCE
    assert rel_error(InferenceBackend(file, dnn=True)(x), opencv) == 0


def test_export_fails_when_outputs_differ(checkpoint, monkeypatch):
    """A perturbed exported output fails the export with a message naming the file; the file is removed."""
    path, _ = checkpoint
    monkeypatch.setattr(export, "run_exported", lambda file, im: InferenceBackend(file)(im) + 0.5)
    with pytest.raises(ExportError, match=r"best\.onnx: output differs from PyTorch's: max abs diff 0\.5 px"):
        export.run(weights=path, include=["onnx"], imgsz=[64, 96])
    assert not path.with_suffix(".onnx").exists()


def test_export_rejects_bad_requests(tmp_path: Path, checkpoint):
    path, _ = checkpoint
    with pytest.raises(UserInputError, match="--include tflite: TensorFlow Lite models .* are not written"):
        export.run(weights=path, include=["tflite"])
    with pytest.raises(UserInputError, match="--include mxnet: not supported here; choose from torchscript, onnx"):
        export.run(weights=path, include=["mxnet"])
    with pytest.raises(UserInputError, match="--half with --device cpu: float16 exports need a CUDA device"):
        export.run(weights=path, include=["onnx"], half=True, device="cpu")
    with pytest.raises(UserInputError, match="file not found"):
        export.run(weights=tmp_path / "missing.pt", include=["onnx"])


def test_simplify_without_simplifier_warns_and_continues(monkeypatch, caplog):
    monkeypatch.setattr(export.importlib.util, "find_spec", lambda name: None)
    proto = onnx.ModelProto()
    LOGGER.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger=LOGGER.name):
            assert simplify_onnx(proto) is proto
    finally:
        LOGGER.removeHandler(caplog.handler)
    assert "--simplify needs onnxslim or onnxsim" in caplog.text
