"""Export a trained YOLOv5 model to TorchScript, ONNX and OpenVINO IR, checked against PyTorch; INT8 on request.

The model is folded first (``model.fuse()``: Conv+BN and every re-parameterizable block, so large-kernel and
multi-branch models export as plain convolutions), its Detect head returns only the decoded tensor
(batch, anchors, 5 + nc), and stride and class names are embedded as metadata (ONNX: JSON in metadata_props
key ``metadata``; TorchScript: extra file ``config.txt``; OpenVINO: ``metadata.yaml`` in the model folder).
Each exported model is then run (ONNX Runtime, TorchScript, OpenVINO) on a random input and compared with
PyTorch; a difference above tolerance fails the export.

ONNX uses PyTorch's TorchScript-based exporter (``dynamo=False``): the torch.export-based default needs
onnxscript and emits opset >= 18 graphs; this one writes the standard opset-17 operators that ONNX Runtime
and OpenCV DNN read. OpenVINO IR (``<name>_openvino_model/<name>.xml/.bin``, float32 weights) is converted
from that ONNX graph by ``openvino.convert_model``.

``--int8 --data DATA.yaml`` also writes post-training INT8 models, calibrated on images of the dataset's train
split (``--calib-images``, letterboxed as detect.py feeds a fixed-shape model): ``<name>_int8.onnx`` (ONNX
Runtime static quantization, QDQ, per-channel int8 weights, uint8 activations, bias correction) and
``<name>_int8_openvino_model/`` (NNCF). The Detect head (output convolutions and box decoding) stays float, and so
do the model layers named by ``--int8-float`` (indices into the model YAML's backbone + head).
The INT8 check runs both models on the calibration images and counts the FP32 detections (after NMS) found
again by the INT8 model at IoU 0.9 (and, to tell box jitter from lost detections, at 0.5); below 95% it warns
(the file is kept: measure it with val.py). The figures go into the INT8 model's metadata as ``int8_check``.

Formats of upstream YOLOv5 not written here (engine, tflite, coreml, saved_model, pb, edgetpu, tfjs, paddle)
are refused with a one-line error.

Usage:
    python export.py --weights runs/train/exp/weights/best.pt --include torchscript onnx openvino --imgsz 320
    python export.py --weights best.pt --include onnx openvino --int8 --data data/shapes.yaml --imgsz 320

Use the exported files:
    python detect.py --weights best.onnx --imgsz 320
    python detect.py --weights best_openvino_model --imgsz 320
    python val.py --weights best_int8.onnx --data data/shapes.yaml --img 320
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import logging
import random
import re
import shutil
import sys
import tempfile
import time
import warnings
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

if str(Path(__file__).resolve().parent) not in sys.path:  # run as a script: make the repository importable
    sys.path.append(str(Path(__file__).resolve().parent))

from models.yolo import Detect  # noqa: E402
from models.backend import (  # noqa: E402
    ONNX_METADATA_KEY, OPENVINO_METADATA_FILE, OPENVINO_SUFFIX, TORCHSCRIPT_METADATA_FILE, InferenceBackend,
    missing_package, names_from_data, openvino_core, openvino_xml, require,
)
from models.loading import load_model  # noqa: E402
from utils.augmentations import letterbox  # noqa: E402
from utils.boxes import box_iou  # noqa: E402
from utils.checkpoint import CheckpointError, fill_weights, newest_best  # noqa: E402
from utils.dataloaders import bgr_to_chw_rgb, find_image_files, imread  # noqa: E402
from utils.datasets_check import check_dataset, data_yaml_file  # noqa: E402
from utils.general import (  # noqa: E402
    ROOT, LOGGER, UserInputError, check_img_size, colorstr, first_line, run_cli, yaml_load, yaml_save,
)
from utils.nms import non_max_suppression  # noqa: E402
from utils.options import (  # noqa: E402
    Combination, OptionParser, between, check_options, device_spec, each, found, on_cpu, suffix, whole,
)
from utils.torch_utils import select_device  # noqa: E402

FORMATS = {"torchscript": ".torchscript", "onnx": ".onnx", "openvino": OPENVINO_SUFFIX}  # name -> file suffix
LABELS = {"torchscript": "TorchScript", "onnx": "ONNX", "openvino": "OpenVINO"}
INT8_FORMATS = ("onnx", "openvino")
NOT_WRITTEN = {  # the other --include formats of upstream YOLOv5, refused with a one-line error
    "engine": "TensorRT engines", "tflite": "TensorFlow Lite models", "coreml": "Core ML models",
    "saved_model": "TensorFlow SavedModels", "pb": "TensorFlow GraphDefs", "edgetpu": "Edge TPU models",
    "tfjs": "TensorFlow.js models", "paddle": "PaddlePaddle models",
}
DEFAULT_CALIB_IMAGES = 300
LAYER_IN_NAME = re.compile(r"(?:^|/)model\.(\d+)(?=/|$)")  # the exporter's node names: /model/model.<layer>/...
# INT8 check: FP32 detections (PyTorch, after NMS at INT8_NMS = (conf, IoU)) that the INT8 model finds again
# (same class, box IoU >= INT8_MATCH_IOU); fewer than INT8_KEPT of them is reported with a warning.
INT8_NMS = (0.25, 0.45)
INT8_MATCH_IOU = 0.9
INT8_KEPT = 0.95
INT8_LOOSE_IOU = 0.5  # also reported: tells box jitter (found at 0.5, not at 0.9) from lost or new detections
DEFAULT_OPSET = 17
OPSETS = (9, 20)  # what the TorchScript-based exporter writes for these models (8 and below lack their resizes)
# Parity check: largest allowed difference between an exported file's output and PyTorch's, for boxes
# relative to the input's longer side and for objectness/class scores (in [0, 1]) absolute.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2}


class ExportError(UserInputError):
    """An export that failed or whose output differs from PyTorch's; the message names the file."""


class DecodedOutput(nn.Module):
    """The graph that is exported: one image tensor in, the decoded predictions (b, n, 5 + nc) out.

    Wrapping hides DetectionModel.forward's keyword arguments (augment, profile, ...) from the tracer.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.stride, self.names = model.stride, model.names

    def forward(self, im: torch.Tensor) -> torch.Tensor:
        return self.model(im)[0]


def external_data_file(file: Path) -> Path:
    """Where the weights of an ONNX model over 2 GB (protobuf's limit) go: ``<name>.onnx.data`` beside it."""
    return file.with_name(f"{file.name}.data")


def file_size(path: str | Path) -> float:
    """Size in MB of a file with an ONNX model's external data file, or of the files in an OpenVINO folder."""
    path = Path(path)
    files = path.iterdir() if path.is_dir() else (path, external_data_file(path))
    return sum(f.stat().st_size for f in files if f.is_file()) / 1e6


def export_path(weights: Path, fmt: str, int8: bool = False) -> Path:
    """Where format ``fmt`` of ``weights`` goes: best.onnx, best_int8.onnx, best_openvino_model/, ..."""
    return weights.with_name(f"{weights.stem}{'_int8' if int8 else ''}{FORMATS[fmt]}")


def remove_export(path: Path) -> None:
    """Delete what an export wrote at ``path``: an OpenVINO folder, or a file with its external data."""
    if path.is_dir():
        shutil.rmtree(path)
    for leftover in (path, external_data_file(path)):
        if leftover.is_file():
            leftover.unlink()


def prepare_for_export(model: nn.Module, im: torch.Tensor, inplace: bool = False, dynamic: bool = False
                       ) -> DecodedOutput:
    """Eval mode, frozen weights, Detect heads returning only the decoded tensor, wrapped; after a dry run.

    The switches are set on the model's Detect instances (the class attribute stays untouched). Without
    ``dynamic`` the dry run caches the grids of ``im``'s shape, which the traced graph then keeps.
    """
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, Detect):
            m.export, m.dynamic, m.inplace = True, dynamic, inplace
    wrapped = DecodedOutput(model).eval()  # exporters restore the wrapper's mode on the whole tree
    with torch.no_grad():
        wrapped(im)
    return wrapped


def export_metadata(model: nn.Module, im: torch.Tensor, dynamic: bool) -> dict:
    """What inference needs besides the graph: stride, class names, the traced input shape."""
    return {
        "stride": int(model.stride.max()),
        "names": {int(k): v for k, v in model.names.items()},
        "shape": list(im.shape),
        "dynamic": dynamic,
        "half": im.dtype == torch.float16,
        "precision": "float16" if im.dtype == torch.float16 else "float32",
        "description": "YOLOv5 model exported by export.py",
        "torch": str(torch.__version__),
        "date": datetime.now().isoformat(timespec="seconds"),
    }


def export_torchscript(model: nn.Module, im: torch.Tensor, file: Path, metadata: dict) -> Path:
    """Trace ``model`` on ``im`` and save it with the metadata as extra file ``config.txt``."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace is deprecated in favour of torch.export
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks become constants, as intended
        traced = torch.jit.trace(model, im, strict=False, check_trace=False)  # verify_export checks it
    traced.save(str(file), _extra_files={TORCHSCRIPT_METADATA_FILE: json.dumps(metadata)})
    return file


def export_onnx(model: nn.Module, im: torch.Tensor, file: Path, metadata: dict, opset: int = DEFAULT_OPSET,
                dynamic: bool = False, simplify: bool = False) -> Path:
    """Export to ONNX (input 'images', output 'output0'), embed the metadata, check it with onnx.checker.

    ``dynamic``: batch, height and width of the input (and batch, anchors of the output) are free. A model
    over 2 GB keeps its weights in one external file (see :func:`external_data_file`), not simplified.
    """
    import onnx

    axes = {"images": {0: "batch", 2: "height", 3: "width"}, "output0": {0: "batch", 1: "anchors"}}
    with tempfile.TemporaryDirectory(dir=file.parent) as tmp:  # the exporter writes one file per external tensor
        raw = Path(tmp) / file.name
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript-based exporter, chosen on purpose
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks become constants, as intended
            torch.onnx.export(model, (im,), str(raw), dynamo=False, opset_version=opset, do_constant_folding=True,
                              input_names=["images"], output_names=["output0"],
                              dynamic_axes=axes if dynamic else None)
        proto = onnx.load(str(raw), load_external_data=False)
        external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
        if external:
            onnx.load_external_data_for_model(proto, tmp)
    if simplify and external:
        LOGGER.warning("WARNING --simplify skipped: the model is over 2 GB (external data)")
    elif simplify:
        proto = simplify_onnx(proto)
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = ONNX_METADATA_KEY, json.dumps(metadata)
    external_data_file(file).unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save_model(proto, str(file), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=external_data_file(file).name)
    onnx.checker.check_model(str(file))  # a path: also works with external data
    return file


def simplify_onnx(proto):
    """Simplify with onnxslim, else onnx-simplifier; a warning and the unchanged graph when neither is installed."""
    if importlib.util.find_spec("onnxslim"):
        import onnxslim

        LOGGER.info(f"{colorstr('ONNX:')} slimming with onnxslim...")
        return onnxslim.slim(proto)
    if importlib.util.find_spec("onnxsim"):
        import onnxsim

        LOGGER.info(f"{colorstr('ONNX:')} simplifying with onnxsim...")
        simplified, ok = onnxsim.simplify(proto)
        if not ok:
            raise ExportError("onnxsim could not validate the simplified graph")
        return simplified
    LOGGER.warning("WARNING --simplify needs onnxslim or onnxsim (pip install onnxslim); exporting without it")
    return proto


def write_openvino(network, folder: Path, metadata: dict) -> Path:
    """Save an OpenVINO model as ``folder/<name>.xml/.bin`` (float32 weights) with ``metadata.yaml`` beside it."""
    ov = require("openvino", purpose="OpenVINO export")
    folder.mkdir(parents=True, exist_ok=True)
    xml = folder / f"{folder.name.removesuffix(OPENVINO_SUFFIX)}.xml"
    for stale in (xml, xml.with_suffix(".bin"), folder / OPENVINO_METADATA_FILE):
        stale.unlink(missing_ok=True)
    ov.save_model(network, str(xml), compress_to_fp16=False)  # the default halves the weights
    yaml_save(folder / OPENVINO_METADATA_FILE, metadata)
    return folder


def export_openvino(model: nn.Module, im: torch.Tensor, folder: Path, metadata: dict, opset: int = DEFAULT_OPSET,
                    dynamic: bool = False) -> Path:
    """Export to ONNX in a scratch folder, convert that graph with ``openvino.convert_model`` and write the IR.

    Going through ONNX reuses the graph that every model YAML is tested to export exactly; OpenVINO's own PyTorch
    frontend would trace the model a second, different way.
    """
    ov = require("openvino", purpose="OpenVINO export")
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        graph = export_onnx(model, im, Path(tmp) / f"{folder.name}.onnx", metadata, opset, dynamic)
        network = ov.convert_model(str(graph))
    return write_openvino(network, folder, metadata)


def run_exported(file: Path, im: torch.Tensor) -> torch.Tensor:
    """Output of an exported file on ``im``, through the same backend detect.py and val.py use."""
    return InferenceBackend(file, im.device, fp16=im.dtype == torch.float16)(im)


def parity_errors(y: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(largest box difference in pixels, largest objectness/class score difference) of two decoded outputs."""
    if y.shape != reference.shape:
        raise ExportError(f"output shape {tuple(y.shape)} differs from PyTorch's {tuple(reference.shape)}")
    diff = (y.float() - reference.float()).abs()
    return diff[..., :4].max().item(), diff[..., 4:].max().item()


def verify_export(file: Path, model: nn.Module, im: torch.Tensor, dynamic: bool) -> tuple[float, float]:
    """Compare ``file`` with ``model`` on a random input (another shape when ``dynamic``).

    Returns the (box px, score) differences; raises ExportError above the tolerance.
    """
    if dynamic:
        im = im.new_empty(im.shape[0] + 1, 3, im.shape[2] + int(model.stride.max()), im.shape[3])
    x = torch.rand(im.shape, generator=torch.Generator().manual_seed(0)).to(im.device, im.dtype)
    with torch.no_grad():
        reference = model(x)
    box_err, score_err = parity_errors(run_exported(file, x), reference)
    box_tol, score_tol = TOLERANCE[x.dtype] * max(x.shape[2:]), TOLERANCE[x.dtype]
    LOGGER.info(f"parity with PyTorch on a random {tuple(x.shape)} input: max abs diff {box_err:.3g} px (boxes), "
                f"{score_err:.3g} (scores); tolerance {box_tol:.3g} px, {score_tol:g}")
    if box_err > box_tol or score_err > score_tol:
        raise ExportError(f"{file}: output differs from PyTorch's: max abs diff {box_err:.3g} px (boxes, tolerance "
                          f"{box_tol:.3g}), {score_err:.3g} (scores, tolerance {score_tol:g}). The file was removed. "
                          "Check that every module traces (no data-dependent Python control flow) and folds "
                          "exactly (model.fuse())")
    return box_err, score_err


def parity_checkable(fmt: str, im: torch.Tensor) -> bool:
    """Float16 ONNX graphs run in ONNX Runtime only with its CUDA provider."""
    if fmt != "onnx" or im.dtype != torch.float16:
        return True
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def exporter_version(fmt: str, opset: int) -> str:
    """What writes format ``fmt``, for the log: torch's version, or the onnx (and openvino) version and the opset."""
    if fmt == "torchscript":
        return f"torch {torch.__version__}"
    import onnx

    via = f"onnx {onnx.__version__}, opset {opset}"
    return via if fmt == "onnx" else f"openvino {require('openvino').__version__} (from ONNX: {via})"


def write_and_verify(fmt: str, model: nn.Module, im: torch.Tensor, file: Path, opset: int, dynamic: bool,
                     simplify: bool) -> None:
    """Write ``file`` in format ``fmt``, then compare it with ``model`` where this machine can run it."""
    metadata = export_metadata(model, im, dynamic)
    if fmt == "torchscript":
        export_torchscript(model, im, file, metadata)
    elif fmt == "openvino":
        export_openvino(model, im, file, metadata, opset, dynamic)
    else:
        export_onnx(model, im, file, metadata, opset, dynamic, simplify)
    if parity_checkable(fmt, im):
        verify_export(file, model, im, dynamic)
    else:
        LOGGER.warning(f"WARNING {file.name}: not compared with PyTorch (float16 ONNX needs ONNX Runtime's CUDA "
                       "provider, which is not installed)")


def guarded(label: str, file: Path, write) -> Path:
    """Call ``write()``, which writes and checks ``file``; log the time and size. Any failure removes what was
    written and raises ExportError naming the file."""
    start = time.time()
    try:
        write()
    except Exception as e:
        remove_export(file)
        LOGGER.info(f"{label} failed after {time.time() - start:.1f}s: {e}")
        if isinstance(e, ExportError):
            raise
        raise ExportError(f"{label} {file}: {first_line(e)}") from e
    LOGGER.info(f"{label} done in {time.time() - start:.1f}s: {file} ({file_size(file):.1f} MB)")
    return file


def export_one(fmt: str, model: nn.Module, im: torch.Tensor, file: Path, opset: int = DEFAULT_OPSET,
               dynamic: bool = False, simplify: bool = False) -> Path:
    """Export ``model`` to ``file`` in format ``fmt`` and verify it; raises ExportError (the file removed)."""
    label = colorstr(f"{LABELS[fmt]}:")
    LOGGER.info(f"\n{label} writing {file.name} with {exporter_version(fmt, opset)}")
    return guarded(label, file, lambda: write_and_verify(fmt, model, im, file, opset, dynamic, simplify))


# ------------------------------------------------------------------------------------------------------------ INT8


class CalibrationImages:
    """Dataset images as float32 input batches of the exported shape (b, 3, h, w), read from disk on each pass.

    Each image is letterboxed to (h, w) as detect.py prepares it for a fixed-shape model (no stride trimming,
    grey padding, RGB, /255). Unreadable files are skipped; an incomplete last batch is dropped (the images are
    repeated when there are fewer than b).
    """

    def __init__(self, files: list[str], shape: tuple[int, ...]):
        self.shape = tuple(shape)
        b = self.shape[0]
        self.files = list(files) * -(-b // len(files)) if len(files) < b else list(files)
        self.batches = len(self.files) // b

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        b, _, h, w = self.shape
        batch = []
        for file in self.files:
            image = imread(file)
            if image is None:
                continue
            batch.append(bgr_to_chw_rgb(letterbox(image, (h, w), auto=False)[0]))
            if len(batch) == b:
                yield np.stack(batch).astype(np.float32) / 255
                batch = []


def calibration_images(data: str | Path, count: int, shape: tuple[int, ...], split: str = "train"
                       ) -> CalibrationImages:
    """Up to ``count`` images of ``split`` of data YAML ``data`` (a fixed random sample when there are more)."""
    dataset = check_dataset(data)
    if not dataset.get(split):
        raise UserInputError(f"--data {data}: no '{split}' split to take INT8 calibration images from")
    files = find_image_files(dataset[split])
    chosen = sorted(random.Random(0).sample(files, count)) if len(files) > count else files
    LOGGER.info(f"\n{colorstr('INT8:')} calibrating on {len(chosen)} of the {len(files)} {split} images of {data}, "
                f"letterboxed to {shape[2]}x{shape[3]}")
    return CalibrationImages(chosen, shape)


def float_head(order: list[str], successors: dict[str, list[str]], convs: set[str]) -> set[str]:
    """The graph's last convolutions (those with no convolution after them) and every node downstream of them.

    In a detector these are the Detect head: its output convolutions, then the reshapes, sigmoids and grid/anchor
    arithmetic whose output holds pixel boxes and [0, 1] scores side by side (one 8-bit scale for both would erase
    the scores). INT8 exports keep them in float: the decoding must, and the output convolutions, a sliver of the
    compute, decide the box coordinates that the INT8 check compares. ``order`` lists the node names
    topologically; ``successors`` maps a name to its consumers.
    """
    feeds_conv = set()
    for name in reversed(order):
        if any(s in convs or s in feeds_conv for s in successors.get(name, ())):
            feeds_conv.add(name)
    stack = [c for c in convs if c not in feeds_conv]
    head = set(stack)
    while stack:
        for s in successors.get(stack.pop(), ()):
            if s not in head:
                head.add(s)
                stack.append(s)
    return head


def onnx_float_nodes(proto, layers=()) -> list[str]:
    """The nodes of an ONNX graph that INT8 exports leave float: float_head, and every node of the model layers
    ``layers`` (see layer_nodes). Every node is named first: quantization excludes nodes by name."""
    for k, node in enumerate(proto.graph.node):
        node.name = node.name or f"{node.op_type}_{k}"
    producer = {out: node.name for node in proto.graph.node for out in node.output}
    successors = {}
    for node in proto.graph.node:
        for tensor in node.input:
            if tensor in producer:
                successors.setdefault(producer[tensor], []).append(node.name)
    convs = {node.name for node in proto.graph.node if node.op_type == "Conv"}
    order = [node.name for node in proto.graph.node]
    return sorted(float_head(order, successors, convs) | layer_nodes(order, layers))


def openvino_float_nodes(network, layers=()) -> list[str]:
    """onnx_float_nodes for an OpenVINO model, as operation names (Result nodes left out)."""
    ops = network.get_ordered_ops()
    successors = {op.get_friendly_name(): [target.get_node().get_friendly_name() for out in op.outputs()
                                           for target in out.get_target_inputs()] for op in ops}
    convs = {op.get_friendly_name() for op in ops if op.get_type_name() in ("Convolution", "GroupConvolution")}
    results = {op.get_friendly_name() for op in ops if op.get_type_name() == "Result"}
    order = [op.get_friendly_name() for op in ops]
    return sorted((float_head(order, successors, convs) | layer_nodes(order, layers)) - results)


def layer_nodes(names, layers) -> set[str]:
    """Those of the graph node ``names`` that belong to the model layers ``layers`` (indices into the model YAML's
    backbone + head list), as the ONNX exporter names them (``/model/model.<layer>/...``; OpenVINO keeps the names)."""
    layers = set(layers)
    return {n for n in names if (m := LAYER_IN_NAME.search(n)) and int(m.group(1)) in layers}


def conv_input_means(proto, convs: list, calib: CalibrationImages) -> dict[str, np.ndarray]:
    """Per-channel mean of each of ``convs``' input tensors over the calibration images, in the float graph."""
    import onnx
    import onnxruntime
    from onnx import helper, numpy_helper

    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    opset = next(o.version for o in probe.opset_import if o.domain in ("", "ai.onnx"))
    if opset >= 18:  # ReduceMean takes its axes as an input from opset 18 on, as an attribute before
        probe.graph.initializer.append(numpy_helper.from_array(np.array([0, 2, 3], np.int64), "bias_fix_axes"))
    tensors = sorted({node.input[0] for node in convs})
    means = [f"bias_fix_mean_{k}" for k in range(len(tensors))]
    for tensor, mean in zip(tensors, means):
        probe.graph.node.append(helper.make_node("ReduceMean", [tensor, "bias_fix_axes"], [mean], keepdims=0)
                                if opset >= 18 else
                                helper.make_node("ReduceMean", [tensor], [mean], axes=[0, 2, 3], keepdims=0))
        probe.graph.output.append(helper.make_tensor_value_info(mean, onnx.TensorProto.FLOAT, None))
    session = onnxruntime.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    sums, count = None, 0
    for batch in calib:
        values = session.run(means, {"images": batch})
        sums = values if sums is None else [a + b for a, b in zip(sums, values)]
        count += 1
    return {tensor: total / count for tensor, total in zip(tensors, sums)}


def quantized_conv_weights(qproto) -> dict[str, np.ndarray]:
    """Conv node name -> its weights as a QDQ graph dequantizes them: (q - zero point) * scale, per channel."""
    from onnx import numpy_helper

    constants = {t.name: numpy_helper.to_array(t) for t in qproto.graph.initializer}
    producer = {out: node for node in qproto.graph.node for out in node.output}
    weights = {}
    for node in qproto.graph.node:
        dq = producer.get(node.input[1]) if node.op_type == "Conv" else None
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in constants:
            continue
        q = constants[dq.input[0]].astype(np.float32)
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        shape = [-1 if k == axis else 1 for k in range(q.ndim)]
        zero = constants[dq.input[2]].astype(np.float32).reshape(shape) if len(dq.input) > 2 else 0.0
        weights[node.name] = (q - zero) * constants[dq.input[1]].reshape(shape)
    return weights


def correct_conv_biases(proto, quantized: dict[str, np.ndarray], means: dict[str, np.ndarray]) -> int:
    """Bias correction (Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias Correction", ICCV
    2019; here with input means measured on the calibration images): subtract from each quantized conv's bias the
    mean output shift that rounding its weights causes, i.e. per output channel the rounding error summed over the
    taps of each input channel times that channel's mean input (exact away from zero padding). Returns the count."""
    from onnx import numpy_helper

    constants = {t.name: t for t in proto.graph.initializer}
    corrected = 0
    for node in proto.graph.node:
        if node.name not in quantized or len(node.input) < 3 or node.input[2] not in constants:
            continue
        weight = numpy_helper.to_array(constants[node.input[1]])
        groups = next((a.i for a in node.attribute if a.name == "group"), 1)
        error = (quantized[node.name] - weight).sum(axis=(2, 3)).reshape(groups, weight.shape[0] // groups, -1)
        shift = (error * means[node.input[0]].reshape(groups, 1, -1)).sum(-1).reshape(-1)
        bias = numpy_helper.to_array(constants[node.input[2]]) - shift.astype(np.float32)
        constants[node.input[2]].CopyFrom(numpy_helper.from_array(bias, node.input[2]))
        corrected += 1
    return corrected


def quantize_onnx(source: Path, target: Path, calib: CalibrationImages, metadata: dict,
                  float_layers: tuple[int, ...] = ()) -> Path:
    """ONNX Runtime static quantization of ``source``: QDQ, per-channel int8 weights, uint8 activations (ONNX
    Runtime's advice for x86 CPUs), min/max calibration, with bias correction of the quantized convolutions (NNCF
    does the same for OpenVINO; folded RepVGG kernels lose most to weight rounding); the Detect head and the model
    layers ``float_layers`` stay float (see onnx_float_nodes)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self, batches: int | None = None):
            self.batches = itertools.islice(calib, batches)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"images": batch}

    settings = dict(quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        prepared = Path(tmp) / source.name
        try:  # shape inference and graph clean-up, which ONNX Runtime recommends before quantizing
            quant_pre_process(str(source), str(prepared))
        except Exception as e:
            LOGGER.warning(f"WARNING ONNX Runtime's pre-quantization pass failed ({first_line(e)}); quantizing the "
                           "graph as exported")
            prepared = source
        proto = onnx.load(str(prepared))
        excluded = onnx_float_nodes(proto, float_layers)
        first = Path(tmp) / "weights.onnx"  # the rounded weights, which do not depend on the calibration images
        quantize_static(onnx.load(str(prepared)), str(first), Reader(1), nodes_to_exclude=excluded, **settings)
        quantized = quantized_conv_weights(onnx.load(str(first)))
    convs = [node for node in proto.graph.node if node.name in quantized]
    count = correct_conv_biases(proto, quantized, conv_input_means(proto, convs, calib))
    LOGGER.info(f"{colorstr('INT8:')} bias correction of {count} quantized convolutions")
    props = [p for p in proto.metadata_props if p.key != ONNX_METADATA_KEY]  # keeps the pre-processing mark
    del proto.metadata_props[:]
    proto.metadata_props.extend(props)
    entry = proto.metadata_props.add()
    entry.key, entry.value = ONNX_METADATA_KEY, json.dumps(metadata)
    quantize_static(proto, str(target), Reader(), nodes_to_exclude=excluded, **settings)
    return target


def quantize_openvino(source: Path, target: Path, calib: CalibrationImages, metadata: dict,
                      float_layers: tuple[int, ...] = ()) -> Path:
    """NNCF post-training quantization of the OpenVINO model in folder ``source`` (symmetric int8 weights,
    asymmetric activations, NNCF's bias correction); the Detect head and the model layers ``float_layers`` stay
    float (see onnx_float_nodes)."""
    require("openvino", purpose="OpenVINO INT8 export")
    nncf = require("nncf", purpose="OpenVINO INT8 export")
    nncf.set_log_level(logging.WARNING)  # otherwise one line per operation left unquantized
    network = openvino_core().read_model(str(openvino_xml(source)))
    ignored = nncf.IgnoredScope(names=openvino_float_nodes(network, float_layers), validate=False)
    quantized = nncf.quantize(network, nncf.Dataset(calib), preset=nncf.QuantizationPreset.MIXED,
                              subset_size=len(calib), ignored_scope=ignored)
    return write_openvino(quantized, target, metadata)


def kept_detections(reference: torch.Tensor, test: torch.Tensor, iou: float = INT8_MATCH_IOU) -> int:
    """How many ``reference`` detections (rows [xyxy, conf, cls], most confident first, as NMS returns them)
    have a ``test`` detection of the same class overlapping them by ``iou`` or more, each test row used once."""
    if not len(reference) or not len(test):
        return 0
    overlaps = box_iou(reference[:, :4], test[:, :4])
    overlaps[reference[:, 5:6] != test[:, 5].unsqueeze(0)] = 0
    taken = torch.zeros(len(test), dtype=torch.bool, device=test.device)
    kept = 0
    for row in overlaps:
        row = row.masked_fill(taken, 0)
        best = int(row.argmax())
        if row[best] >= iou:
            taken[best] = True
            kept += 1
    return kept


def int8_agreement(file: Path, model: nn.Module, calib: CalibrationImages) -> tuple[int, int, int]:
    """(FP32 detections found again by the INT8 model ``file`` at INT8_MATCH_IOU, the same at INT8_LOOSE_IOU,
    FP32 detections) over the calibration images; FP32 is the folded PyTorch model, both outputs go through the
    same NMS."""
    backend = InferenceBackend(file)
    device = next(model.parameters()).device
    kept = loose = total = 0
    for batch in calib:
        x = torch.from_numpy(batch)
        with torch.no_grad():
            reference = non_max_suppression(model(x.to(device)).float().cpu(), *INT8_NMS)
        test = non_max_suppression(backend(x).cpu(), *INT8_NMS)
        for ref, got in zip(reference, test):
            kept += kept_detections(ref, got)
            loose += kept_detections(ref, got, INT8_LOOSE_IOU)
            total += len(ref)
    return kept, loose, total


def check_int8(file: Path, model: nn.Module, calib: CalibrationImages) -> dict | None:
    """Log the share of FP32 detections that ``file`` keeps, warn below INT8_KEPT; returns the figures (None when
    FP32 detects nothing)."""
    kept, loose, total = int8_agreement(file, model, calib)
    images = f"{len(calib) * calib.shape[0]} calibration images"
    if not total:
        LOGGER.warning(f"WARNING {file.name}: the FP32 model detects nothing above conf {INT8_NMS[0]} on the {images};"
                       " INT8 agreement not measured")
        return None
    share = kept / total
    figure = (f"{file.name} finds {kept} of the {total} FP32 detections (conf >= {INT8_NMS[0]} after NMS) on the "
              f"{images} again (same class, IoU >= {INT8_MATCH_IOU}): {share:.1%}; at IoU >= {INT8_LOOSE_IOU} it "
              f"finds {loose / total:.1%}")
    if share >= INT8_KEPT:
        LOGGER.info(f"{colorstr('INT8:')} check passed: {figure}")
    else:
        LOGGER.warning(f"WARNING INT8 check below {INT8_KEPT:.0%}: {figure}. The file is kept; measure its mAP with "
                       "val.py before deploying it")
    return {"fp32_detections": total, "iou": INT8_MATCH_IOU, "found": kept, "share": round(share, 4),
            "loose_iou": INT8_LOOSE_IOU, "loose_share": round(loose / total, 4)}


def record_int8_check(file: Path, figures: dict) -> None:
    """Add the INT8 check's figures to the metadata of the written INT8 model, as ``int8_check``."""
    if file.suffix == ".onnx":
        import onnx

        proto = onnx.load(str(file))
        for prop in proto.metadata_props:
            if prop.key == ONNX_METADATA_KEY:
                prop.value = json.dumps({**json.loads(prop.value), "int8_check": figures})
        onnx.save(proto, str(file))
    else:
        meta_file = file / OPENVINO_METADATA_FILE
        yaml_save(meta_file, {**yaml_load(meta_file), "int8_check": figures})


def int8_check_figures(file: str | Path) -> dict | None:
    """The ``int8_check`` figures recorded in an INT8 export's metadata (None when there are none)."""
    file = Path(file)
    if file.suffix == ".onnx":
        import onnx

        props = {p.key: p.value for p in onnx.load(str(file), load_external_data=False).metadata_props}
        return json.loads(props.get(ONNX_METADATA_KEY, "{}")).get("int8_check")
    meta_file = file / OPENVINO_METADATA_FILE
    return yaml_load(meta_file).get("int8_check") if meta_file.is_file() else None


def export_int8(fmt: str, model: nn.Module, im: torch.Tensor, weights: Path, calib: CalibrationImages,
                data: str | Path, dynamic: bool = False, float_layers: tuple[int, ...] = ()) -> Path:
    """Quantize the float32 ``fmt`` export of ``weights`` into its <name>_int8 sibling (model layers
    ``float_layers`` left float), then check it."""
    source, target = export_path(weights, fmt), export_path(weights, fmt, int8=True)
    label = colorstr(f"{LABELS[fmt]} INT8:")
    method = ("onnxruntime quantize_static: QDQ, per-channel int8 weights, uint8 activations; bias correction"
              if fmt == "onnx"
              else f"nncf {require('nncf', purpose='OpenVINO INT8 export').__version__} quantize: mixed preset, "
                   "symmetric int8 weights, asymmetric 8-bit activations")
    if float_layers:
        method += f"; model layers {' '.join(map(str, float_layers))} left float"
    LOGGER.info(f"\n{label} quantizing {source.name} into {target.name} ({method})")
    meta = {**export_metadata(model, im, dynamic), "precision": "int8",
            "calibration": {"data": str(data), "split": "train", "images": len(calib) * calib.shape[0],
                            "method": method, "float_layers": list(float_layers)}}
    quantize = quantize_onnx if fmt == "onnx" else quantize_openvino

    def write():
        quantize(source, target, calib, meta, float_layers)
        figures = check_int8(target, model, calib)
        if figures:
            record_int8_check(target, figures)

    return guarded(label, target, write)


def usage_lines(files: list[Path], imgsz: list[int], data: str | None, half: bool) -> str:
    """The commands that use the exported files."""
    lines = []
    for f in files:
        size = f" --imgsz {imgsz[0]} {imgsz[1]}" if imgsz != [640, 640] else ""
        val_size = f" --img {imgsz[0]}" if imgsz[0] == imgsz[1] and imgsz[0] != 640 else ""
        extra = (" --half" if half else "") + (f" --data {data}" if data else "")
        lines += [f"Run it:          python detect.py --weights {f}{size}{' --half' if half else ''}",
                  f"Score it:        python val.py --weights {f}{val_size}{extra}",
                  f"From Python:     model = torch.hub.load('{ROOT}', 'custom', path='{f}', source='local')"]
    return "\n".join(lines + ["View the graph:  https://netron.app"])


def load_folded(weights: Path, device: torch.device, data: str | Path | None = None) -> nn.Module:
    """The checkpoint's model, folded; class names from ``data`` when the checkpoint has only placeholders."""
    if weights.suffix != ".pt":
        raise UserInputError(f"--weights {weights}: export.py starts from a .pt checkpoint")
    if not weights.is_file():
        raise CheckpointError(f"--weights {weights}: file not found")
    model = load_model(weights, device, fuse=True)
    if data and set(model.names.values()) == {f"class{i}" for i in range(len(model.names))}:
        names = names_from_data(data)
        if len(names) != len(model.names):
            raise UserInputError(f"--data {data} has {len(names)} class names, the model {len(model.names)} classes")
        model.names = names
    return model


def known_format(fmt) -> str | None:
    """None for a format this script writes (and whose package imports); else why not, in one line."""
    fmt, written = str(fmt).lower(), ", ".join(FORMATS)
    if fmt == "openvino":
        return missing_package("openvino")
    if fmt in FORMATS:
        return None
    if fmt == "engine" and missing_package("tensorrt"):
        return f"TensorRT engines are not written by this export.py, and tensorrt is not installed; it writes {written}"
    if fmt in NOT_WRITTEN:
        return f"{NOT_WRITTEN[fmt]} (upstream YOLOv5's {fmt}) are not written by this export.py; it writes {written}"
    return f"not supported here; choose from {written}"


def includes(opt: argparse.Namespace, formats) -> bool:
    """Whether --include names one of ``formats``."""
    return bool({str(f).lower() for f in opt.include or ()} & set(formats))


EXPORT_RULES = {  # flag -> rule; checked in this order, before the checkpoint is loaded
    "--weights": suffix(".pt", what="a .pt checkpoint (export.py starts from one)"),
    "--data": found(data_yaml_file, "data YAML not found (a path, or a file name in data/)"),
    "--imgsz": each(whole(1), counts=(1, 2)),
    "--batch-size": whole(1),
    "--device": device_spec,
    "--opset": between(*OPSETS),
    "--include": each(known_format),
    "--calib-images": whole(1),
    "--int8-float": each(whole(0)),
}
EXPORT_COMBINATIONS = (
    Combination(("--half", "--device"), lambda o: o.half and on_cpu(o.device),
                "float16 exports need a CUDA device (e.g. --device 0)"),
    Combination(("--half", "--dynamic"), lambda o: o.half and o.dynamic, "cannot be combined: pick one of them"),
    Combination(("--simplify", "--include"), lambda o: o.simplify and not includes(o, ["onnx"]),
                "--simplify works on ONNX graphs: add onnx to --include"),
    Combination(("--half", "--include"), lambda o: o.half and includes(o, ["openvino"]),
                "OpenVINO IR is written in float32 (--int8 makes a smaller, faster one): drop --half"),
    Combination(("--int8", "--include"), lambda o: o.int8 and not includes(o, INT8_FORMATS),
                f"INT8 models are written for {' and '.join(INT8_FORMATS)}: add one of them to --include"),
    Combination(("--int8",), lambda o: o.int8 and not o.data,
                "INT8 calibration takes images from a dataset: add --data DATA.yaml (its train split is used)"),
    Combination(("--int8", "--half"), lambda o: o.int8 and o.half, "INT8 is quantized from float32: drop --half"),
    Combination(("--int8-float", "--int8"), lambda o: o.int8_float and not o.int8,
                "names layers to leave float in INT8 exports: add --int8 (and --data)"),
    Combination(("--int8", "--include"), lambda o: o.int8 and includes(o, ["openvino"]) and missing_package("nncf"),
                lambda o: f"OpenVINO INT8 needs NNCF: {missing_package('nncf')}"),
)


def check_export_options(opt: argparse.Namespace, spelled: dict[str, str] | None = None) -> None:
    """EXPORT_RULES and EXPORT_COMBINATIONS; a failure raises UserInputError naming the flag."""
    check_options(opt, EXPORT_RULES, EXPORT_COMBINATIONS, spelled)


def run(
    weights: str | Path | None = None,
    imgsz: int | list[int] = (640, 640),
    batch_size: int = 1,
    device: str = "cpu",
    include: list[str] | tuple[str, ...] = ("torchscript",),
    half: bool = False,
    inplace: bool = False,
    dynamic: bool = False,
    simplify: bool = False,
    opset: int = DEFAULT_OPSET,
    data: str | Path | None = None,
    int8: bool = False,
    calib_images: int = DEFAULT_CALIB_IMAGES,
    int8_float: list[int] | tuple[int, ...] | None = None,
) -> list[Path]:
    """Export ``weights`` to each format in ``include`` (and, with ``int8``, INT8 ONNX/OpenVINO models calibrated
    on ``calib_images`` train images of ``data``, the model layers ``int8_float`` left float); returns the written
    files and folders."""
    weights = weights or newest_best()
    check_export_options(argparse.Namespace(**locals()))  # the arguments, checked as the command line's are
    t = time.time()
    include = [x.lower() for x in include]
    device = select_device(device)
    weights = Path(weights)
    model = load_folded(weights, device, data)
    float_layers = tuple(sorted(set(int8_float or ())))
    if float_layers and float_layers[-1] >= len(model.model):
        raise UserInputError(f"--int8-float {float_layers[-1]}: {weights.name} has layers 0-{len(model.model) - 1} "
                             "(its YAML's backbone, then head)")
    imgsz = [imgsz] * 2 if isinstance(imgsz, int) else list(imgsz) * (2 if len(imgsz) == 1 else 1)
    imgsz = check_img_size(imgsz, s=int(model.stride.max()))
    im = torch.zeros(batch_size, 3, *imgsz, device=device)
    if half:
        im, model = im.half(), model.half()
    model = prepare_for_export(model, im, inplace, dynamic)
    with torch.no_grad():
        shape = tuple(model(im).shape)
    LOGGER.info(f"\n{colorstr('PyTorch:')} {weights} ({file_size(weights):.1f} MB) loaded and folded; "
                f"output {shape} for input {tuple(im.shape)}")
    calib = calibration_images(data, calib_images, tuple(im.shape)) if int8 else None
    files, failures = [], []
    for fmt in include:
        try:
            files.append(export_one(fmt, model, im, export_path(weights, fmt), opset, dynamic, simplify))
            if int8 and fmt in INT8_FORMATS:
                files.append(export_int8(fmt, model, im, weights, calib, data, dynamic, float_layers))
        except ExportError as e:
            failures.append(str(e))
    if failures:
        raise ExportError("export failed: " + "; ".join(failures))
    LOGGER.info(f"\n{len(files)} model(s) exported in {time.time() - t:.1f}s to "
                f"{colorstr('bold', weights.parent.resolve())}\n"
                f"{usage_lines(files, imgsz, str(data) if data else None, half)}")
    return files


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OptionParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=str, default=None,
                        help="data YAML: class names when the checkpoint has only placeholders, and the images that "
                             "calibrate --int8")
    parser.add_argument("--weights", type=str, default=None,
                        help="the .pt checkpoint to export (default: the newest runs/train/*/weights/best.pt)")
    parser.add_argument("--imgsz", "--img", "--img-size", nargs="+", type=int, default=[640, 640],
                        help="input size the model is traced at: height width, or one number for both")
    parser.add_argument("--batch-size", type=int, default=1, help="batch size the model is traced at")
    parser.add_argument("--device", default="cpu", help="where to trace: cpu, or a CUDA index such as 0")
    parser.add_argument("--half", action="store_true", help="export float16 weights and input (CUDA only)")
    parser.add_argument("--inplace", action="store_true", help="let the Detect head decode boxes in place")
    parser.add_argument("--dynamic", action="store_true", help="accept any batch size and image size")
    parser.add_argument("--simplify", action="store_true", help="ONNX: run onnxslim (or onnxsim) on the graph")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX: operator set version to target")
    parser.add_argument("--include", nargs="+", default=["torchscript"],
                        help=f"formats to write: {', '.join(FORMATS)} (OpenVINO IR: a <name>{OPENVINO_SUFFIX} "
                             f"folder). Upstream YOLOv5's {', '.join(NOT_WRITTEN)} are not written")
    parser.add_argument("--int8", action="store_true",
                        help="also write post-training INT8 models of the onnx/openvino exports (<name>_int8.onnx: "
                             "ONNX Runtime; <name>_int8_openvino_model: NNCF), calibrated on --data images")
    parser.add_argument("--calib-images", type=int, default=DEFAULT_CALIB_IMAGES,
                        help="--int8: how many train images of --data calibrate the quantization")
    parser.add_argument("--int8-float", nargs="+", type=int, default=None, metavar="LAYER",
                        help="--int8: model layers (indices into the model YAML's backbone + head) to leave in float "
                             "in the INT8 models; closer to FP32, less speed-up")
    return parser.parse_checked(argv, check_export_options, fill=fill_weights)


def main(opt: argparse.Namespace) -> list[Path]:
    return run(**vars(opt))


if __name__ == "__main__":
    run_cli(main, parse_opt, "export")
