"""Export a trained YOLOv5 model to TorchScript and ONNX, checked against PyTorch.

The model is folded first (``model.fuse()``: Conv+BN and every re-parameterizable block, so large-kernel and
multi-branch models export as plain convolutions), its Detect head returns only the decoded tensor
(batch, anchors, 5 + nc), and stride and class names are embedded as JSON metadata (ONNX: metadata_props
key ``metadata``; TorchScript: extra file ``config.txt``). Each exported file is then run (ONNX Runtime,
TorchScript) on a random input and compared with PyTorch; a difference above tolerance fails the export.

ONNX uses PyTorch's TorchScript-based exporter (``dynamo=False``): the torch.export-based default needs
onnxscript and emits opset >= 18 graphs; this one writes the standard opset-17 operators that ONNX Runtime
and OpenCV DNN read.

Usage:
    python export.py --weights runs/train/exp/weights/best.pt --include torchscript onnx --imgsz 320

Use the exported files:
    python detect.py --weights best.onnx --imgsz 320
    python val.py --weights best.torchscript --data data/shapes.yaml --img 320
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
import warnings
from datetime import datetime
from pathlib import Path

import torch
import torch.nn as nn

if str(Path(__file__).resolve().parent) not in sys.path:  # run as a script: make the repository importable
    sys.path.append(str(Path(__file__).resolve().parent))

from models.yolo import Detect  # noqa: E402
from models.backend import (  # noqa: E402
    ONNX_METADATA_KEY, TORCHSCRIPT_METADATA_FILE, InferenceBackend, names_from_data,
)
from models.loading import load_model  # noqa: E402
from utils.checkpoint import CheckpointError, fill_weights, newest_best  # noqa: E402
from utils.datasets_check import data_yaml_file  # noqa: E402
from utils.general import ROOT, LOGGER, UserInputError, check_img_size, colorstr, run_cli  # noqa: E402
from utils.options import (  # noqa: E402
    Combination, OptionParser, between, check_options, device_spec, each, found, on_cpu, suffix, whole,
)
from utils.torch_utils import select_device  # noqa: E402

FORMATS = {"torchscript": ".torchscript", "onnx": ".onnx"}
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
    """File size in MB, with an ONNX model's external data file."""
    return sum(f.stat().st_size for f in (Path(path), external_data_file(Path(path))) if f.is_file()) / 1e6


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
    """What writes format ``fmt``, for the log: the torch version, or the onnx package's and the opset."""
    if fmt == "torchscript":
        return f"torch {torch.__version__}"
    import onnx

    return f"onnx {onnx.__version__}, opset {opset}"


def write_and_verify(fmt: str, model: nn.Module, im: torch.Tensor, file: Path, opset: int, dynamic: bool,
                     simplify: bool) -> None:
    """Write ``file`` in format ``fmt``, then compare it with ``model`` where this machine can run it."""
    metadata = export_metadata(model, im, dynamic)
    if fmt == "torchscript":
        export_torchscript(model, im, file, metadata)
    else:
        export_onnx(model, im, file, metadata, opset, dynamic, simplify)
    if parity_checkable(fmt, im):
        verify_export(file, model, im, dynamic)
    else:
        LOGGER.warning(f"WARNING {file.name}: not compared with PyTorch (float16 ONNX needs ONNX Runtime's CUDA "
                       "provider, which is not installed)")


def export_one(fmt: str, model: nn.Module, im: torch.Tensor, file: Path, opset: int = DEFAULT_OPSET,
               dynamic: bool = False, simplify: bool = False) -> Path:
    """Export ``model`` to ``file`` in format ``fmt`` and verify it; raises ExportError (the file removed)."""
    label = colorstr(f"{'TorchScript' if fmt == 'torchscript' else 'ONNX'}:")
    LOGGER.info(f"\n{label} writing {file.name} with {exporter_version(fmt, opset)}")
    start = time.time()
    try:
        write_and_verify(fmt, model, im, file, opset, dynamic, simplify)
    except Exception as e:
        for leftover in (file, external_data_file(file)):
            leftover.unlink(missing_ok=True)
        LOGGER.info(f"{label} failed after {time.time() - start:.1f}s: {e}")
        if isinstance(e, ExportError):
            raise
        raise ExportError(f"{label} {file}: {e}") from e
    LOGGER.info(f"{label} done in {time.time() - start:.1f}s: {file} ({file_size(file):.1f} MB)")
    return file


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
    return None if str(fmt).lower() in FORMATS else f"not supported here; choose from {', '.join(FORMATS)}"


EXPORT_RULES = {  # flag -> rule; checked in this order, before the checkpoint is loaded
    "--weights": suffix(".pt", what="a .pt checkpoint (export.py starts from one)"),
    "--data": found(data_yaml_file, "data YAML not found (a path, or a file name in data/)"),
    "--imgsz": each(whole(1), counts=(1, 2)),
    "--batch-size": whole(1),
    "--device": device_spec,
    "--opset": between(*OPSETS),
    "--include": each(known_format),
}
EXPORT_COMBINATIONS = (
    Combination(("--half", "--device"), lambda o: o.half and on_cpu(o.device),
                "float16 exports need a CUDA device (e.g. --device 0)"),
    Combination(("--half", "--dynamic"), lambda o: o.half and o.dynamic, "cannot be combined: pick one of them"),
    Combination(("--simplify", "--include"), lambda o: o.simplify and "onnx" not in map(str.lower, map(str, o.include)),
                "--simplify works on ONNX graphs: add onnx to --include"),
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
) -> list[Path]:
    """Export ``weights`` to each format in ``include``; returns the written files."""
    weights = weights or newest_best()
    check_export_options(argparse.Namespace(**locals()))  # the arguments, checked as the command line's are
    t = time.time()
    include = [x.lower() for x in include]
    device = select_device(device)
    weights = Path(weights)
    model = load_folded(weights, device, data)
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
    files, failures = [], []
    for fmt in include:
        try:
            files.append(export_one(fmt, model, im, weights.with_suffix(FORMATS[fmt]), opset, dynamic, simplify))
        except ExportError as e:
            failures.append(str(e))
    if failures:
        raise ExportError("export failed: " + "; ".join(failures))
    LOGGER.info(f"\n{len(files)} file(s) exported in {time.time() - t:.1f}s to "
                f"{colorstr('bold', weights.parent.resolve())}\n"
                f"{usage_lines(files, imgsz, str(data) if data else None, half)}")
    return files


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OptionParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=str, default=None,
                        help="data YAML supplying class names when the checkpoint has only placeholders")
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
    parser.add_argument("--include", nargs="+", default=["torchscript"], help="formats to write: torchscript, onnx")
    return parser.parse_checked(argv, check_export_options, fill=fill_weights)


def main(opt: argparse.Namespace) -> list[Path]:
    return run(**vars(opt))


if __name__ == "__main__":
    run_cli(main, parse_opt, "export")
