"""PyTorch Hub entry points of this repository (``source='local'``: nothing is ever downloaded).

Usage:
    import torch
    model = torch.hub.load('path/to/repo', 'custom', path='runs/train/exp/weights/best.pt', source='local')
    model = torch.hub.load('path/to/repo', 'yolov5s', pretrained=False, classes=5, source='local')  # random init
    results = model(['data/images/shapes1.jpg'])  # file paths, PIL images, RGB numpy arrays, or lists of them
    results.print()
    results.save()  # runs/detect/exp
    results.pandas().xyxy[0]  # DataFrame: xmin ymin xmax ymax confidence class name

Every ``models/*.yaml`` has an entry point of the same name (``yolov5n``, ``yolov5s_RepVGG``,
``yolov5_RepLKNet-tiny``, ...): the public callables of this file, which is what ``torch.hub.list`` reports
for a GitHub copy of the repository. With ``pretrained=True`` an
entry point loads ``<name>.pt`` from the working directory or the repository root, and fails when there
is none; ``pretrained=False`` builds the model with random weights.
"""

from pathlib import Path as _Path  # private aliases: torch.hub.list() shows every public callable here

dependencies = ["torch", "torchvision", "numpy", "cv2", "yaml", "PIL", "pandas", "scipy", "matplotlib", "timm"]

_ROOT = _Path(__file__).resolve().parent


def _device(device):
    from utils.torch_utils import select_device

    return select_device("" if device is None else str(device))


def _local_weights(name: str) -> _Path:
    """``name``.pt from the working directory or the repository root."""
    from utils.general import UserInputError

    candidates = [_Path.cwd() / f"{name}.pt", _ROOT / f"{name}.pt"]
    for path in candidates:
        if path.is_file():
            return path
    raise UserInputError(f"{name}: pretrained=True needs local weights {name}.pt (looked for "
                         f"{', '.join(map(str, candidates))}; nothing is downloaded). Use pretrained=False for random "
                         f"weights, or 'custom' with path=... for a trained model")


def _pretrained(path: _Path, channels: int, classes: int | None):
    """The checkpoint's model; for other ``classes``/``channels``, a new model with every tensor whose shape fits."""
    from models.loading import build_model, transfer_weights
    from models.modules.timm_backbone import without_weights_files
    from models.yolo import DetectionModel
    from utils.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    model = build_model(ckpt)
    if classes in (None, ckpt["nc"]) and channels == model.yaml.get("ch", 3):
        return model
    fresh = DetectionModel(without_weights_files(ckpt["yaml"]), ch=channels, nc=classes or ckpt["nc"], verbose=False)
    transfer_weights(fresh, model.state_dict(), path)
    return fresh


def _create(name: str, pretrained: bool = True, channels: int = 3, classes: int | None = None,
            autoshape: bool = True, verbose: bool = True, device=None, backbone_weights: str | None = None):
    """Model ``name`` (a models/*.yaml stem): local weights or random init; AutoShape-wrapped and folded."""
    from models.yolo import DetectionModel
    from models.backend import AutoShape
    from utils.general import LOGGER, set_logging

    set_logging(verbose)
    if pretrained:
        model = _pretrained(_local_weights(name), channels, classes)
    else:
        model = DetectionModel(f"{name}.yaml", ch=channels, nc=classes, verbose=verbose)
        LOGGER.info(f"{name}: randomly initialized weights (pretrained=False)")
    if backbone_weights:
        model.load_backbone(backbone_weights)
    model = model.to(_device(device))
    return AutoShape(model.eval().fuse()) if autoshape else model


def custom(path: str = "path/to/model.pt", autoshape: bool = True, _verbose: bool = True, device=None,
           backbone_weights: str | None = None, classes: int | None = None):
    """A trained model from a local .pt (ours or upstream YOLOv5's, read safely), .torchscript or .onnx file or
    OpenVINO folder (``*_openvino_model``, or its .xml), or a new one from a model YAML (``classes`` sets its class
    count).

    ``backbone_weights``: a published backbone checkpoint (official RepLKNet, RevCol, RepVGG, RepGhostNet, DAMO-YOLO,
    or timm) loaded into the .pt or YAML model's matching rows. ``autoshape=False`` returns the bare model: a
    trainable DetectionModel for .pt and YAML files, else the inference backend.
    """
    from models.backend import AutoShape, InferenceBackend
    from models.loading import build_model
    from models.yolo import DetectionModel
    from utils.checkpoint import load_checkpoint
    from utils.general import set_logging

    set_logging(_verbose)
    path = _Path(path)
    if path.suffix in (".yaml", ".yml") or (path.suffix == ".pt" and (backbone_weights or not autoshape)):
        if path.suffix == ".pt":
            model = build_model(load_checkpoint(path))
        else:
            model = DetectionModel(path, nc=classes, verbose=_verbose)
        if backbone_weights:
            model.load_backbone(backbone_weights)
        model = model.to(_device(device))
        return AutoShape(model.eval().fuse()) if autoshape else model
    backend = InferenceBackend(path, _device(device))
    return AutoShape(backend) if autoshape else backend


def _entry_point(cfg: _Path):
    """The hub function for one model YAML."""

    def entry(pretrained: bool = True, channels: int = 3, classes: int | None = None, autoshape: bool = True,
              _verbose: bool = True, device=None, backbone_weights: str | None = None):
        return _create(cfg.stem, pretrained, channels, classes, autoshape, _verbose, device, backbone_weights)

    entry.__name__ = entry.__qualname__ = cfg.stem
    entry.__doc__ = (f"YOLOv5 model from models/{cfg.name}. pretrained=True loads {cfg.stem}.pt (local only); "
                     "classes defaults to the weights' (or the YAML's) class count; backbone_weights loads a "
                     "published backbone checkpoint into the rows it fits.")
    return entry


globals().update({cfg.stem: _entry_point(cfg) for cfg in sorted((_ROOT / "models").glob("*.yaml"))})
