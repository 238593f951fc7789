"""export.py --include openvino and --int8: the IR folder, its parity with PyTorch, INT8 ONNX/OpenVINO calibrated on a
synthetic dataset and their detection check, detect.py/val.py on the results, refused formats, and signals still
handled after OpenVINO models are dropped.

Small and quick: yolov5n (nc 5, random weights) at 64x96 or 96x96, a dataset of 8 generated shape images. The
random detector is made confident (objectness and class biases raised) so that FP32 has detections above the
INT8 check's confidence threshold to compare; the figure it reports is not asserted (random weights keep no
accuracy worth holding to 95%), only that it is measured and logged.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

pytest.importorskip("openvino")

import detect  # noqa: E402
import export  # noqa: E402
import val  # noqa: E402
from export import (  # noqa: E402
    ExportError, export_metadata, export_openvino, float_head, kept_detections, prepare_for_export,
)
from models.backend import InferenceBackend  # noqa: E402
from models.yolo import Detect, DetectionModel  # noqa: E402
from tests.helpers import ROOT, randomize_bn, rel_error  # noqa: E402
from tests.test_export import TOLERANCE, narrowed_model_dict, sample_input  # noqa: E402
from utils.checkpoint import make_checkpoint, save_checkpoint  # noqa: E402
from utils.general import LOGGER, UserInputError, yaml_load, yaml_save  # noqa: E402
from utils.synthetic import CLASS_NAMES, generate_shapes  # noqa: E402

NAMES = dict(enumerate(CLASS_NAMES))
FIGURE = re.compile(r"finds (\d+) of the (\d+) FP32 detections .*: ([\d.]+)%")


def confident(model: DetectionModel) -> DetectionModel:
    """Raise the Detect head's objectness and first-class biases so that a random model detects plenty."""
    head = next(m for m in model.modules() if isinstance(m, Detect))
    with torch.no_grad():
        for conv in head.m:
            bias = conv.bias.view(head.na, head.no)
            bias[:, 4] += 4.0
            bias[:, 5] += 4.0
    return model


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    """best.pt (yolov5n, nc 5, random BN statistics, confident head), the folded reference, a shapes data YAML."""
    root = tmp_path_factory.mktemp("openvino")
    torch.manual_seed(0)
    model = confident(randomize_bn(DetectionModel("yolov5n.yaml", nc=5, verbose=False)))
    model.names = NAMES
    weights = root / "best.pt"
    save_checkpoint(make_checkpoint(model), weights)
    generate_shapes(root / "shapes", n_train=8, n_val=4, imgsz=96, seed=2)
    data = root / "shapes.yaml"
    yaml_save(data, {"path": str(root / "shapes"), "train": "images/train", "val": "images/val", "names": NAMES})
    reference = prepare_for_export(model.eval().fuse(), sample_input(model))
    return {"root": root, "weights": weights, "data": data, "reference": reference}


@pytest.fixture(scope="module")
def openvino_folder(workspace) -> Path:
    return export.run(weights=workspace["weights"], include=["openvino"], imgsz=[96, 96])[0]  # square: val.py's


@pytest.fixture(scope="module")
def int8_exports(workspace) -> tuple[list[Path], str]:
    """export.run with --include onnx openvino --int8 on 4 calibration images at 96x96, and what it logged."""
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    level = LOGGER.level
    LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.INFO)
    try:
        files = export.run(weights=workspace["weights"], include=["onnx", "openvino"], imgsz=[96, 96], int8=True,
                           data=workspace["data"], calib_images=4)
    finally:
        LOGGER.removeHandler(handler)
        LOGGER.setLevel(level)
    return files, "\n".join(records)


def test_openvino_layout_metadata_and_parity(workspace, openvino_folder: Path):
    """best_openvino_model/ holds best.xml/.bin and metadata.yaml; the folder and the .xml run like PyTorch."""
    assert openvino_folder == workspace["weights"].with_name("best_openvino_model") and openvino_folder.is_dir()
    assert {f.name for f in openvino_folder.iterdir()} == {"best.xml", "best.bin", "metadata.yaml"}
    meta = yaml_load(openvino_folder / "metadata.yaml")
    assert meta["stride"] == 32 and meta["names"] == NAMES and meta["shape"] == [1, 3, 96, 96]
    assert meta["precision"] == "float32"
    x = torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = workspace["reference"](x)
    for weights in (openvino_folder, openvino_folder / "best.xml"):
        backend = InferenceBackend(weights)
        assert backend.kind == "openvino" and backend.stride == 32 and backend.names == NAMES
        assert backend.static_shape == (1, 3, 96, 96)
        assert rel_error(backend(torch.cat([x, x])), torch.cat([expected, expected])) < TOLERANCE  # batch of 2


def test_openvino_parity_failure_removes_the_folder(workspace, monkeypatch):
    monkeypatch.setattr(export, "run_exported", lambda file, im: InferenceBackend(file)(im) + 0.5)
    target = workspace["root"] / "failing.pt"
    target.write_bytes(workspace["weights"].read_bytes())
    with pytest.raises(ExportError, match=r"failing_openvino_model: output differs from PyTorch's"):
        export.run(weights=target, include=["openvino"], imgsz=[64, 96])
    assert not target.with_name("failing_openvino_model").exists()


def test_dynamic_openvino_export_runs_other_shapes(workspace):
    weights = workspace["root"] / "dyn.pt"
    weights.write_bytes(workspace["weights"].read_bytes())
    folder = export.run(weights=weights, include=["openvino"], imgsz=[64, 96], dynamic=True)[0]
    backend = InferenceBackend(folder)
    assert backend.static_shape is None
    x = torch.rand(2, 3, 96, 64)
    with torch.no_grad():
        assert rel_error(backend(x), workspace["reference"](x)) < TOLERANCE


def test_detect_and_val_run_the_openvino_folder(workspace, openvino_folder: Path):
    root = workspace["root"]
    save_dir = detect.run(weights=str(openvino_folder), source=root / "shapes/images/val", imgsz=[96, 96],
                          project=root / "detect", name="ov", device="cpu")
    assert len(list(Path(save_dir).glob("*.jpg"))) == 4
    results, _, _ = val.run(data=workspace["data"], weights=openvino_folder, imgsz=96, batch_size=4, workers=0,
                            device="cpu", project=root / "val", name="ov", plots=False)
    assert len(results) == 7 and all(0 <= v <= 1 for v in results[:4])


def test_hub_custom_runs_the_openvino_folder(workspace, openvino_folder: Path):
    model = torch.hub.load(str(ROOT), "custom", path=str(openvino_folder), source="local", trust_repo=True,
                           _verbose=False)
    images = sorted((workspace["root"] / "shapes/images/val").glob("*.jpg"))[:2]
    results = model([str(f) for f in images], size=96)
    assert len(results) == 2 and model.names == NAMES


def test_openvino_models_dropped_in_load_order_leave_signals_working(openvino_folder: Path):
    """Two OpenVINO models released in the order they were loaded, then Ctrl-C: a KeyboardInterrupt. With a Core per
    model, the second one's CPU plugin put the first one's freed signal stack back and SIGINT crashed the process
    (see models.backend.openvino_core). Run in a fresh interpreter, which a crash cannot take down with pytest."""
    code = textwrap.dedent(f"""
        import gc, os, signal, time
        signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with SIGINT ignored
        from models.backend import InferenceBackend
        first, second = InferenceBackend({str(openvino_folder)!r}), InferenceBackend({str(openvino_folder)!r})
        del first; gc.collect()
        del second; gc.collect()
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        except KeyboardInterrupt:
            print("KeyboardInterrupt")
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert (out.returncode, out.stdout.strip()) == (0, "KeyboardInterrupt"), out.stderr[-2000:]


@pytest.mark.parametrize("argv", [["--weights", "m_openvino_model"], ["--weights", "m_openvino_model/m.xml"]])
def test_val_and_detect_accept_openvino_paths(argv):
    assert val.parse_opt(argv).weights == argv[1:]
    assert detect.parse_opt([*argv, "--source", str(ROOT / "data/images")]).weights == argv[1:]
    with pytest.raises(UserInputError, match="expected .*OpenVINO folder"):
        val.parse_opt(["--weights", "model.tflite"])


def test_int8_exports_are_written_and_checked(workspace, int8_exports):
    """best.onnx, best_int8.onnx, the FP32 and the INT8 OpenVINO folder; metadata says int8; each INT8 model's
    share of FP32 detections kept is logged with its counts and recorded in its metadata."""
    files, log = int8_exports
    assert [f.name for f in files] == ["best.onnx", "best_int8.onnx", "best_openvino_model", "best_int8_openvino_model"]
    onnx_meta = json.loads({p.key: p.value for p in onnx.load(str(files[1])).metadata_props}["metadata"])
    ov_meta = yaml_load(files[3] / "metadata.yaml")
    for meta in onnx_meta, ov_meta:
        assert meta["precision"] == "int8" and meta["calibration"]["images"] == 4
        assert {int(k): v for k, v in meta["names"].items()} == NAMES
    figures = FIGURE.findall(log)
    assert [f.split()[0] for f in re.findall(r"(best_int8\S*) finds", log)] == ["best_int8.onnx",
                                                                                "best_int8_openvino_model"]
    for kept, total, share in figures:
        assert int(total) > 0 and 0 <= int(kept) <= int(total)
        assert float(share) == pytest.approx(100 * int(kept) / int(total), abs=0.05)
    recorded = [export.int8_check_figures(f) for f in (files[1], files[3])]
    assert [(str(r["found"]), str(r["fp32_detections"])) for r in recorded if r] == [f[:2] for f in figures]
    assert all(r["loose_share"] >= r["share"] and r["iou"] == 0.9 for r in recorded if r)
    assert "calibrating on 4 of the 8 train images" in log
    quantized = {n.op_type for n in onnx.load(str(files[1])).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= quantized
    convs = sum(n.op_type == "Conv" for n in onnx.load(str(files[0])).graph.node) - 3  # all but Detect's three
    assert f"bias correction of {convs} quantized convolutions" in log


@pytest.mark.parametrize("groups", [1, 4])
def test_bias_correction_restores_each_channels_mean_output(groups: int, tmp_path: Path):
    """One conv (no padding, inputs with channel means far from 0) quantized by ONNX Runtime: with the corrected
    bias, the rounded weights give the float conv's per-channel mean output; without it, they do not."""
    from onnx import helper, numpy_helper
    from onnxruntime import InferenceSession
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    rng = np.random.default_rng(0)
    weight = rng.normal(0, 1, (8, 4 // groups, 3, 3)).astype(np.float32)
    weight[:, :, 1, 1] *= 20  # a folded RepVGG kernel's large centre tap: coarse steps for the other taps
    conv = helper.make_node("Conv", ["images", "w", "b"], ["y"], name="conv", group=groups)
    inputs = [helper.make_tensor_value_info("images", onnx.TensorProto.FLOAT, [1, 4, 12, 12])]
    outputs = [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)]
    constants = [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.zeros(8, np.float32), "b")]
    graph = helper.make_graph([conv], "g", inputs, outputs, constants)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    images = [(rng.random((1, 4, 12, 12)) * 4 + np.arange(1, 5).reshape(1, 4, 1, 1) * 3).astype(np.float32)
              for _ in range(6)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(images)

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {"images": x}

    copy = onnx.load_from_string(proto.SerializeToString())  # quantize_static changes the graph it is given
    quantize_static(copy, str(tmp_path / "q.onnx"), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    rounded = export.quantized_conv_weights(onnx.load(str(tmp_path / "q.onnx")))["conv"]
    assert 0 < np.abs(rounded - weight).max() <= np.abs(weight).max() / 127 / 2 + 1e-6

    def mean_output(w: np.ndarray, b: np.ndarray) -> np.ndarray:
        model = onnx.ModelProto()
        model.CopyFrom(proto)
        del model.graph.initializer[:]
        model.graph.initializer.extend([numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
        session = InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return np.mean([session.run(None, {"images": x})[0].mean((0, 2, 3)) for x in images], 0)

    means = export.conv_input_means(proto, list(proto.graph.node), images)
    assert export.correct_conv_biases(proto, {"conv": rounded}, means) == 1
    corrected = numpy_helper.to_array(proto.graph.initializer[1])
    float_mean = mean_output(weight, np.zeros(8, np.float32))
    uncorrected_error = np.abs(mean_output(rounded, np.zeros(8, np.float32)) - float_mean).max()
    assert uncorrected_error > 1e-2
    assert np.abs(mean_output(rounded, corrected) - float_mean).max() < uncorrected_error / 100


def test_int8_onnx_keeps_the_detect_head_float(int8_exports):
    """The last convolutions keep float weights and nothing from them on feeds a quantize node: boxes and scores
    leave the model in float (the convolutions' input, the neck's output, is quantized like any other)."""
    proto = onnx.load(str(int8_exports[0][1]))
    head = [n for n in proto.graph.node if n.name in set(export.onnx_float_nodes(onnx.load(str(int8_exports[0][0]))))]
    producer = {out: node.op_type for node in proto.graph.node for out in node.output}
    consumers = {}
    for node in proto.graph.node:
        for tensor in node.input:
            consumers.setdefault(tensor, set()).add(node.op_type)
    assert sum(n.op_type == "Conv" for n in head) == 3  # Detect's output convolutions
    assert not {producer.get(t) for n in head if n.op_type == "Conv" for t in n.input[1:]} & {"DequantizeLinear"}
    assert not set().union(*(consumers.get(t, set()) for n in head for t in n.output)) & {"QuantizeLinear"}


def test_val_and_detect_run_the_int8_models(workspace, int8_exports):
    root, files = workspace["root"], int8_exports[0]
    results, _, _ = val.run(data=workspace["data"], weights=files[1], imgsz=96, batch_size=4, workers=0,
                            device="cpu", project=root / "val", name="int8", plots=False)
    assert len(results) == 7 and all(0 <= v <= 1 for v in results[:4])
    save_dir = detect.run(weights=str(files[3]), source=root / "shapes/images/val", imgsz=[96, 96],
                          project=root / "detect", name="int8", device="cpu")
    assert len(list(Path(save_dir).glob("*.jpg"))) == 4


def test_kept_detections_matches_class_and_iou_once():
    ref = torch.tensor([[0, 0, 10, 10, 0.9, 0], [20, 20, 30, 30, 0.8, 1], [40, 40, 50, 50, 0.7, 2],
                        [0, 0, 10, 10, 0.6, 0]])
    test = torch.tensor([[0, 0, 10, 10.5, 0.9, 0],  # IoU 0.95 with the first (and fourth) row
                         [20, 20, 30, 32, 0.8, 1],  # IoU 0.83: not kept
                         [40, 40, 50, 50, 0.7, 1]])  # right box, wrong class
    assert kept_detections(ref, test) == 1  # the fourth row finds the test box already taken
    assert kept_detections(ref, test, iou=0.8) == 2
    assert kept_detections(ref, test[:0]) == 0 and kept_detections(ref[:0], test) == 0


def test_float_head_is_what_follows_the_last_convolutions():
    """conv1 -> conv2 -> {conv3 -> sigmoid, conv4 -> mul} -> concat: conv3, conv4 and everything after them."""
    order = ["conv1", "conv2", "conv3", "conv4", "sigmoid", "mul", "concat"]
    successors = {"conv1": ["conv2"], "conv2": ["conv3", "conv4"], "conv3": ["sigmoid"], "conv4": ["mul"],
                  "sigmoid": ["concat"], "mul": ["concat"]}
    head = float_head(order, successors, {"conv1", "conv2", "conv3", "conv4"})
    assert head == {"conv3", "conv4", "sigmoid", "mul", "concat"}


def test_int8_option_errors(workspace):
    weights = workspace["weights"]
    with pytest.raises(UserInputError, match="--int8: INT8 calibration takes images from a dataset: add --data"):
        export.run(weights=weights, include=["onnx"], int8=True)
    with pytest.raises(UserInputError, match="--int8 with --include torchscript: INT8 models are written for onnx"):
        export.run(weights=weights, include=["torchscript"], int8=True, data=workspace["data"])
    with pytest.raises(UserInputError, match="--calib-images 0: must be a positive integer"):
        export.run(weights=weights, include=["onnx"], int8=True, data=workspace["data"], calib_images=0)
    with pytest.raises(UserInputError, match="--int8-float 3 with --int8: names layers to leave float"):
        export.run(weights=weights, include=["onnx"], int8_float=[3])
    with pytest.raises(UserInputError, match="--int8-float -1: must be an integer >= 0"):
        export.run(weights=weights, include=["onnx"], int8=True, data=workspace["data"], int8_float=[-1])
    with pytest.raises(UserInputError, match=r"^--int8-float 25: best.pt has layers 0-24 \(its YAML's backbone"):
        export.run(weights=weights, include=["onnx"], int8=True, data=workspace["data"], int8_float=[2, 25])


def onnx_float_convs(file: Path) -> dict[str, bool]:
    """Conv node name -> whether its weights are plain float (no DequantizeLinear in front of them)."""
    proto = onnx.load(str(file))
    producer = {out: node.op_type for node in proto.graph.node for out in node.output}
    return {n.name: producer.get(n.input[1]) != "DequantizeLinear" for n in proto.graph.node if n.op_type == "Conv"}


def openvino_float_convs(folder: Path) -> dict[str, bool]:
    """Convolution name -> whether its weights are a plain constant (NNCF's compressed weights end in a Multiply)."""
    network = export.openvino_core().read_model(str(export.openvino_xml(folder)))
    return {op.get_friendly_name(): op.input_value(1).get_node().get_type_name() == "Constant"
            for op in network.get_ordered_ops() if op.get_type_name() in ("Convolution", "GroupConvolution")}


def test_int8_float_leaves_the_named_layers_float(workspace, tmp_path: Path):
    """--int8-float 0 3: in both INT8 models every convolution of model layers 0 and 3 (yolov5n: two Conv layers)
    keeps float weights, the other layers' are quantized (the Detect head's excepted); the metadata and the log
    name the layers."""
    weights = tmp_path / "best.pt"
    weights.write_bytes(workspace["weights"].read_bytes())
    files = export.run(weights=weights, include=["onnx", "openvino"], imgsz=[96, 96], int8=True,
                       data=workspace["data"], calib_images=4, int8_float=[3, 0])
    for file, convs in ((files[1], onnx_float_convs(files[1])), (files[3], openvino_float_convs(files[3]))):
        layer = {name: int(m.group(1)) for name in convs if (m := export.LAYER_IN_NAME.search(name))}
        assert set(layer.values()) >= {0, 1, 3, 4} and len(layer) == len(convs)
        float_layers = {layer[name] for name, is_float in convs.items() if is_float}
        assert float_layers == {0, 3, 24}, (file.name, float_layers)  # 24: Detect, float in every INT8 export
        assert all(convs[name] for name in convs if layer[name] in (0, 3))
        meta = (json.loads({p.key: p.value for p in onnx.load(str(file)).metadata_props}["metadata"])
                if file.suffix == ".onnx" else yaml_load(file / "metadata.yaml"))
        assert meta["calibration"]["float_layers"] == [0, 3]
        assert meta["calibration"]["method"].endswith("; model layers 0 3 left float")


MISSING_OPENVINO = """
import sys
sys.modules["openvino"] = None  # makes `import openvino` fail, before anything imports it
import pytest
import export
from models.backend import InferenceBackend
from utils.general import UserInputError
with pytest.raises(UserInputError, match=r"^--include openvino: the openvino package .*pip install openvino$"):
    export.run(weights=sys.argv[1], include=["openvino"])
with pytest.raises(UserInputError, match=r"x_openvino_model is an OpenVINO model: .*pip install openvino$"):
    InferenceBackend(sys.argv[2])
print("both refused")
"""


def test_missing_openvino_is_one_line_with_the_install_command(workspace):
    """In a subprocess, so that hiding the openvino package from sys.modules stays out of the test process."""
    out = subprocess.run([sys.executable, "-c", MISSING_OPENVINO, str(workspace["weights"]),
                          str(workspace["root"] / "x_openvino_model")], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "both refused" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]


REFUSALS = {
    "engine": "TensorRT engines are not written by this export.py, and tensorrt is not installed; it writes "
              "torchscript, onnx, openvino",
    "tflite": "TensorFlow Lite models (upstream YOLOv5's tflite) are not written",
}


@pytest.mark.parametrize("fmt, words", REFUSALS.items(), ids=list(REFUSALS))
def test_unsupported_formats_fail_in_one_line(workspace, fmt: str, words: str):
    if fmt == "engine" and export.missing_package("tensorrt") is None:
        pytest.skip("tensorrt is installed here")
    run = subprocess.run([sys.executable, str(ROOT / "export.py"), "--weights", str(workspace["weights"]),
                          "--include", fmt], capture_output=True, text=True, cwd=ROOT, timeout=120)
    output = (run.stdout + run.stderr).strip().splitlines()
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert output[-1].startswith(f"ERROR: --include {fmt}: ") and words in output[-1]
    assert sum(line.startswith("ERROR") for line in output) == 1


@pytest.mark.parametrize("cfg", ["yolov5s_RepVGG", "yolov5_RepLKNet-tiny"])
def test_reparameterized_families_export_to_openvino(cfg: str, tmp_path: Path):
    """Folded RepVGG blocks and RepLKNet's large depthwise kernels (quarter width) match PyTorch in OpenVINO."""
    d, overrides = narrowed_model_dict(ROOT / "models" / f"{cfg}.yaml", 4)
    model = randomize_bn(DetectionModel(d, nc=3, verbose=False, extra_modules=overrides)).eval()
    x = sample_input(model)
    folded = prepare_for_export(model.fuse(), x)
    folder = export_openvino(folded, x, tmp_path / f"{cfg}_openvino_model", export_metadata(folded, x, False))
    box_err, score_err = export.verify_export(folder, folded, x, dynamic=False)
    assert box_err <= export.TOLERANCE[torch.float32] * 96 and score_err <= export.TOLERANCE[torch.float32]
