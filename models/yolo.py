"""YOLOv5 detection model built from a model YAML, and its Detect head.

Usage:
    python models/yolo.py --cfg yolov5s.yaml
"""

from __future__ import annotations

import argparse
import ast
import copy
import importlib
import itertools
import math
import pkgutil
import re
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run as a script: make the repository importable
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import models.modules  # noqa: E402
from models.common import (  # noqa: E402
    C3, C3SPP, C3TR, SPP, SPPF, BatchNorm2d, Bottleneck, BottleneckCSP, C3Ghost, C3x, Concat, Contract, Conv,
    CrossConv, DWConv, Expand, Focus, GhostBottleneck, GhostConv,
)
from utils.general import ROOT, LOGGER, UserInputError, first_line, make_divisible, set_logging, yaml_load  # noqa: E402
from utils.torch_utils import model_info, profile_layer, scale_img, select_device  # noqa: E402

MODELS_DIR = ROOT / "models"


def anchors_run_against_strides(anchors: torch.Tensor, stride: torch.Tensor) -> bool:
    """Whether the levels of ``anchors`` (nl, na, 2) grow in the opposite direction to ``stride`` (nl,).

    Only the two end levels are compared, by their mean anchor area; equal end areas count as in order.
    """
    mean_area = anchors.prod(-1).mean(-1)
    if mean_area.device.type == "meta":  # shape-only model: no values to compare
        return False
    growth = float(mean_area[-1] - mean_area[0])
    step = float(stride[-1] - stride[0])
    return growth * step < 0


def check_anchor_order(m: Any) -> bool:
    """Reverse the level order of ``m.anchors`` (pixels) in place if their sizes run against ``m.stride`` (``m``: a
    Detect head or anything with those two tensors).

    Returns True when it reversed them, so the smallest anchors always sit on the finest stride.
    """
    if not anchors_run_against_strides(m.anchors, m.stride):
        return False
    LOGGER.info("AutoAnchor: anchor sizes ran against the strides; levels put in stride order")
    m.anchors.copy_(m.anchors.flip(0))
    return True


def cell_offsets(ny: int, nx: int, stride: torch.Tensor) -> torch.Tensor:
    """(1, 1, ny, nx, 2) pixel (x, y) of every cell's top-left corner moved back half a cell: (col - 0.5) * stride.

    The decode's box centre is then ``2 * stride * sigmoid + offset``, i.e. (2 * sigmoid - 0.5 + col) * stride.
    """
    rows = torch.arange(ny, device=stride.device, dtype=torch.float32).sub(0.5).mul(stride)
    cols = torch.arange(nx, device=stride.device, dtype=torch.float32).sub(0.5).mul(stride)
    yy, xx = torch.meshgrid(rows, cols, indexing="ij")  # traces to shape-following ops for dynamic exports
    return torch.stack((xx, yy), -1).unsqueeze(0).unsqueeze(0)


class Detect(nn.Module):
    """YOLOv5 head: a 1x1 conv per level giving ``na`` anchors x (4 box + 1 objectness + nc class) logits per cell.

    Training mode returns the raw maps, one (bs, na, ny, nx, no) tensor per level (what utils/loss.py reads).
    Eval mode returns ``(decoded, raw maps)``, where ``decoded`` is (bs, N, no): pixel xywh, objectness and class
    probabilities, rows ordered by level, anchor, grid row, grid column. With ``export`` set (by export.py) only
    ``(decoded,)`` comes back. ``anchors`` is an (nl, na, 2) buffer in grid units (pixels / stride) once the model
    has measured its strides; ``set_anchors_px`` is the one way to change it.
    """

    export = False  # exporters set this on their instances: eval output without the raw maps

    def __init__(self, nc: int = 80, anchors: list | tuple = (), ch: list | tuple = (), inplace: bool = True):
        super().__init__()
        table = torch.tensor([[float(v) for v in row] for row in anchors])  # (nl, 2 * na) pixels, one row per level
        levels, pairs = table.shape
        self.nc, self.no = nc, 5 + nc
        self.nl, self.na = levels, pairs // 2
        self.inplace = inplace  # decode by writing into the sigmoid tensor (less memory) instead of concatenating
        self.dynamic = False  # rebuild the cell offsets on every call (traced exports with dynamic shapes)
        self.register_buffer("anchors", table.view(levels, self.na, 2))
        self.register_buffer("stride", torch.ones(levels), persistent=False)
        self.m = nn.ModuleList([nn.Conv2d(c, self.na * self.no, kernel_size=1) for c in ch])
        self._offsets: dict[int, torch.Tensor] = {}  # level -> cached cell_offsets for the last map size

    def anchors_px(self) -> torch.Tensor:
        """Anchor sizes (nl, na, 2) in input pixels."""
        return self.anchors * self.stride.view(-1, 1, 1)

    def set_anchors_px(self, anchors_px: torch.Tensor | Any) -> None:
        """Store anchor sizes given in pixels (any shape holding nl x na pairs) in stride order, in grid units.

        Writes into the existing buffer, so holders of ``self.anchors`` (the loss) see the new values.
        """
        new = torch.as_tensor(anchors_px).to(self.anchors).reshape(self.anchors.shape)
        self.anchors.copy_(new)
        check_anchor_order(self)
        self.anchors.div_(self.stride.view(-1, 1, 1))

    def forward(self, x: list[torch.Tensor]):
        maps = [self._level_map(conv, feature) for conv, feature in zip(self.m, x)]
        if self.training:
            return maps
        decoded = torch.cat([self._decode(level, p).flatten(1, 3) for level, p in enumerate(maps)], 1)
        return (decoded,) if self.export else (decoded, maps)

    def _level_map(self, conv: nn.Module, feature: torch.Tensor) -> torch.Tensor:
        """Conv output (bs, na * no, ny, nx) rearranged to (bs, na, ny, nx, no)."""
        out = conv(feature)
        bs, _, ny, nx = out.shape  # sizes read off the tensor, so traced exports keep them dynamic
        return out.view(bs, self.na, self.no, ny, nx).movedim(2, -1).contiguous()

    def _decode(self, level: int, p: torch.Tensor) -> torch.Tensor:
        """Raw map (bs, na, ny, nx, no) -> pixel boxes and probabilities of the same shape.

        centre = (2 * sigmoid - 0.5 + cell) * stride and size = (2 * sigmoid)^2 * anchor, written as
        centre = sigmoid * 2 * stride + offset and size = sigmoid^2 * 4 * anchor.
        """
        prob = p.sigmoid()
        centre_gain = 2 * self.stride[level]
        offset = self._cell_offsets(level, p)
        size_gain = (self.anchors[level] * (4 * self.stride[level])).view(1, self.na, 1, 1, 2)
        if self.inplace:
            prob[..., :2] = prob[..., :2] * centre_gain + offset
            prob[..., 2:4] = prob[..., 2:4].square() * size_gain
            return prob
        centre, size, scores = prob.split((2, 2, self.no - 4), -1)
        return torch.cat((centre * centre_gain + offset, size.square() * size_gain, scores), -1)

    def _cell_offsets(self, level: int, p: torch.Tensor) -> torch.Tensor:
        """``cell_offsets`` for this map, cached per level until the map's size, device or dtype changes."""
        ny, nx = p.shape[2], p.shape[3]
        cached = self._offsets.get(level)
        stale = (cached is None or tuple(cached.shape[2:4]) != (ny, nx) or cached.device != p.device
                 or cached.dtype != p.dtype)
        if self.dynamic or stale:
            cached = cell_offsets(ny, nx, self.stride[level]).to(p.dtype)
            self._offsets[level] = cached
        return cached


class BackboneSlot(nn.Module):
    """Placeholder that keeps layer indices 1-4 aligned with pyramid levels after a multi-output backbone.

    It holds no parameters and is skipped in the forward pass: the backbone at index 0 fills all five slots.
    """

    def __init__(self, level: int):
        super().__init__()
        self.level = level


# ---------------------------------------------------------------------------------------------------------------------
# Module registry: YAML names -> (constructor, argument convention). See models/modules/__init__.py for the kinds.
CORE_MODULES: dict[str, tuple[Callable, str]] = {
    **{m.__name__: (m, "conv") for m in (Conv, DWConv, GhostConv, Focus, CrossConv, Bottleneck, GhostBottleneck,
                                         SPP, SPPF, C3SPP)},
    **{m.__name__: (m, "csp") for m in (C3, C3x, C3TR, C3Ghost, BottleneckCSP)},
    "nn.ConvTranspose2d": (nn.ConvTranspose2d, "conv"),
    "nn.Upsample": (nn.Upsample, "plain"),
    "nn.MaxPool2d": (nn.MaxPool2d, "plain"),
    "nn.Identity": (nn.Identity, "plain"),
    "nn.BatchNorm2d": (BatchNorm2d, "bn"),  # accurate in channels-last CPU training
    "Concat": (Concat, "concat"),
    "Contract": (Contract, "contract"),
    "Expand": (Expand, "expand"),
    "Detect": (Detect, "detect"),
}


def module_registry() -> dict[str, tuple[Callable, str]]:
    """All YAML module names: the core blocks plus every family's ``YAML_MODULES`` in models/modules/."""
    registry = dict(CORE_MODULES)
    for info in pkgutil.iter_modules(models.modules.__path__):
        family = importlib.import_module(f"models.modules.{info.name}")
        for name, entry in getattr(family, "YAML_MODULES", {}).items():
            if name in registry and registry[name] != entry:
                raise RuntimeError(f"models/modules/{info.name}.py: YAML module name '{name}' is already registered")
            registry[name] = entry
    return registry


class ModelConfigError(UserInputError):
    """A model YAML that cannot be built; the message names the file and the row."""


ACTIVATIONS = {name: getattr(nn, name) for name in ("SiLU", "ReLU", "ReLU6", "LeakyReLU", "Hardswish", "Mish", "GELU",
                                                   "ELU", "Sigmoid", "Tanh", "Identity", "PReLU", "Hardsigmoid")}


def parse_activation(text: str, source: str) -> nn.Module:
    """'nn.LeakyReLU(0.1)' -> nn.LeakyReLU(0.1), without evaluating the string."""
    match = re.fullmatch(r"\s*(?:nn\.|torch\.nn\.)?(\w+)\s*\((.*)\)\s*", str(text))
    if not match or match[1] not in ACTIVATIONS:
        raise ModelConfigError(f"{source}: activation '{text}' is not one of nn.{'(), nn.'.join(ACTIVATIONS)}()")
    try:
        args = ast.literal_eval(f"({match[2]},)") if match[2].strip() else ()
    except (ValueError, SyntaxError):
        raise ModelConfigError(f"{source}: activation '{text}' has arguments that are not plain numbers") from None
    return ACTIVATIONS[match[1]](*args)


def _apply_activation(module: nn.Module, act: nn.Module) -> None:
    """Replace the default SiLU of every YOLOv5 Conv inside ``module`` by a copy of ``act``."""
    for m in module.modules():
        if isinstance(m, Conv) and isinstance(m.act, nn.SiLU):
            m.act = copy.deepcopy(act)


def _resolve_arg(a: Any, names: dict[str, Any]) -> Any:
    """YAML argument: the symbols nc / anchors / None resolve, lists recurse, anything else stays as is."""
    if isinstance(a, str):
        return names.get(a, a)
    if isinstance(a, list):
        return [_resolve_arg(x, names) for x in a]
    return a


def _check_row(row: Any, layer: int, where: str) -> tuple[list[int], int, str, list]:
    if not (isinstance(row, (list, tuple)) and len(row) == 4):
        raise ModelConfigError(f"{where}: expected [from, number, module, args], got {row!r}")
    f, n, m, args = row
    froms = [f] if isinstance(f, int) else f
    if not isinstance(froms, list) or not froms or not all(isinstance(j, int) and not isinstance(j, bool) for j in froms):
        raise ModelConfigError(f"{where}: 'from' must be an integer or a list of integers, got {f!r}")
    for j in froms:
        if not (-layer <= j < layer or (layer == 0 and j == -1)):
            raise ModelConfigError(f"{where}: 'from' index {j} refers to no earlier layer (this is layer {layer})")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ModelConfigError(f"{where}: 'number' must be a positive integer, got {n!r}")
    if not isinstance(m, str):
        raise ModelConfigError(f"{where}: module must be a name, got {m!r}")
    if not isinstance(args, list):
        raise ModelConfigError(f"{where}: args must be a list, got {args!r}")
    return froms, n, m, args


def _measure_levels(module: nn.Module, c1: int, where: str) -> tuple[list[int | None], list[int]]:
    """For a multi-output backbone: list position per level (P1..P5) and channels per level, from a dummy forward."""
    size = 128
    was_training = module.training
    with torch.no_grad():
        feats = module.eval()(torch.zeros(1, c1, size, size))
    module.train(was_training)
    if not isinstance(feats, (list, tuple)) or not feats:
        raise ModelConfigError(f"{where}: a backbone row must return a list of feature maps")
    slots: list[int | None] = [None] * 5
    chans = [0] * 5
    for k, f in enumerate(feats):
        level = round(math.log2(size / f.shape[-2]))
        if not 1 <= level <= 5 or slots[level - 1] is not None or 2**level * f.shape[-2] != size:
            raise ModelConfigError(f"{where}: backbone output {k} has stride {size / f.shape[-2]:g}; "
                                   "expected distinct strides among 2, 4, 8, 16, 32")
        slots[level - 1], chans[level - 1] = k, f.shape[1]
    return slots, chans


def _check_anchors(anchors: Any, source: str) -> None:
    """'anchors': None, a positive count per level, or rows of [w, h, w, h, ...] positive pixel sizes of one length."""
    if anchors is None or (isinstance(anchors, int) and not isinstance(anchors, bool) and anchors > 0):
        return
    rows_ok = isinstance(anchors, list) and anchors and all(
        isinstance(row, list) and row and len(row) % 2 == 0 and len(row) == len(anchors[0])
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf for v in row)
        for row in anchors)
    if not rows_ok:
        raise ModelConfigError(f"{source}: 'anchors' must be a positive count or rows of [w, h, w, h, ...] pixel "
                               f"sizes of equal length, got {anchors!r}")


def parse_model(d: dict, ch: int, source: str = "model.yaml",
                extra_modules: dict[str, tuple[Callable, str]] | None = None,
                verbose: bool = True) -> tuple[nn.Sequential, list[int]]:
    """Build the layers of a model dict (the YAML). Returns (layers, sorted indices whose outputs later rows use).

    ``extra_modules`` adds user-defined YAML names, {name: (constructor, kind)}, to the registry.
    """
    for key in ("backbone", "head"):
        if not isinstance(d.get(key), list):
            raise ModelConfigError(f"{source}: missing or invalid '{key}' (a list of [from, number, module, args] rows)")
    nc, gd, gw = d.get("nc"), d.get("depth_multiple", 1.0), d.get("width_multiple", 1.0)
    anchors = d.get("anchors")
    if not isinstance(nc, int) or isinstance(nc, bool) or nc < 1:
        raise ModelConfigError(f"{source}: 'nc' must be a positive integer, got {nc!r}")
    for key, v in (("depth_multiple", gd), ("width_multiple", gw)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v < math.inf:
            raise ModelConfigError(f"{source}: '{key}' must be a positive number, got {v!r}")
    _check_anchors(anchors, source)
    act = parse_activation(d["activation"], source) if d.get("activation") else None
    na = (len(anchors[0]) // 2) if isinstance(anchors, list) else anchors
    no = (na or 3) * (nc + 5)
    registry = {**module_registry(), **(extra_modules or {})}
    symbols = {"nc": nc, "anchors": anchors, "None": None}

    log = LOGGER.info if verbose else (lambda *_: None)
    log(f"\n{'':>3}{'from':>18}{'n':>3}{'params':>10}  {'module':<40}{'arguments':<30}")
    layers: list[nn.Module] = []
    chans: list[int | None] = []  # output channels per layer index (None: empty backbone slot)
    save: set[int] = set()
    rows = [("backbone", k, r) for k, r in enumerate(d["backbone"])] + [("head", k, r) for k, r in enumerate(d["head"])]
    for section, k, row in rows:
        i = len(layers)
        where = f"{source}: {section} row {k} (layer {i})"
        froms, n, name, args = _check_row(row, i, where)
        if name not in registry:
            raise ModelConfigError(f"{where}: unknown module '{name}'")
        ctor, kind = registry[name]
        if len(froms) > 1 and kind not in ("concat", "detect"):
            raise ModelConfigError(f"{where}: {name} takes one input, but 'from' lists {len(froms)} layers")
        inputs = [chans[j] for j in froms] if i else [ch]
        if any(c is None for c in inputs):
            raise ModelConfigError(f"{where}: 'from' {row[0]} refers to an empty backbone slot")
        args = _resolve_arg(args, symbols)
        n_ = max(round(n * gd), 1) if n > 1 else n
        try:
            module, c2, args = _build_row(ctor, kind, inputs, args, n_, gw, no, where)
        except ModelConfigError:
            raise
        except (TypeError, ValueError, IndexError, KeyError, RuntimeError, ArithmeticError) as e:
            raise ModelConfigError(f"{where}: cannot build {name}{args}: {first_line(e)}") from None
        if act is not None:
            _apply_activation(module, act)
        takes_list = kind in ("concat", "detect") and isinstance(row[0], list)  # e.g. Detect on one level: [17]
        f = froms if takes_list or len(froms) > 1 else froms[0]
        module.i, module.f, module.type = i, f, f"{ctor.__module__}.{getattr(ctor, '__name__', name)}".replace(
            "__main__.", "models.yolo.")
        module.np = sum(x.numel() for x in module.parameters())
        save.update(j % i for j in froms if j != -1)
        if kind == "backbone":
            if i != 0:
                raise ModelConfigError(f"{where}: a multi-output backbone ({name}) must be the first row")
            module.slots, level_chans = _measure_levels(module, ch, where)
            slots = [BackboneSlot(level) for level in range(1, 5)]
            for level, slot in enumerate(slots, start=1):
                slot.i, slot.f = level, -1
            layers += [module, *slots]
            chans += [c if pos is not None else None for c, pos in zip(level_chans, module.slots)]
            idx = "0-4"
        else:
            layers.append(module)
            chans.append(c2)
            idx = str(i)
        log(f"{idx:>3}{str(f):>18}{n_:>3}{module.np:10.0f}  {module.type:<40}{str(args):<30}")
    return nn.Sequential(*layers), sorted(save)


def _build_row(ctor: Callable, kind: str, inputs: list[int], args: list, n: int, gw: float, no: int, where: str):
    """Construct one row's module according to its argument convention. Returns (module, out channels, args).

    A mapping as the last argument is passed as keyword arguments (``[-1, 1, revcol_tiny, [{num_subnet: 2}]]``).
    """
    c1 = inputs[0]
    kwargs = {}
    if args and isinstance(args[-1], dict):
        args, kwargs = args[:-1], args[-1]
    if kind in ("conv", "csp"):
        if not args:
            raise ModelConfigError(f"{where}: missing output channels (args[0])")
        c2 = args[0]
        if not isinstance(c2, int) or isinstance(c2, bool) or c2 < 1:
            raise ModelConfigError(f"{where}: output channels args[0] must be a positive integer, got {c2!r}")
        if c2 != no:
            c2 = make_divisible(c2 * gw, 8)
        args = [c1, c2, *args[1:]]
        if kind == "csp":
            args.insert(2, n)
            n = 1
    elif kind == "fixed":
        c2, args = args[0], args[1:]
    elif kind == "backbone":
        c2, args = None, [c1, *args]
    elif kind == "bn":
        c2, args = c1, [c1]
    elif kind == "concat":
        c2 = sum(inputs)
    elif kind == "contract":
        c2 = c1 * args[0] ** 2
    elif kind == "expand":
        c2 = c1 // args[0] ** 2
    elif kind == "detect":
        args = list(args) + [inputs]
        if isinstance(args[1], int):
            args[1] = [list(range(args[1] * 2))] * len(inputs)
        if len(args[1]) != len(inputs):
            raise ModelConfigError(f"{where}: {len(args[1])} anchor rows for {len(inputs)} detection inputs")
        c2 = None
    else:  # plain
        c2 = c1
    module = nn.Sequential(*(ctor(*args, **kwargs) for _ in range(n))) if n > 1 else ctor(*args, **kwargs)
    return module, c2, args + [kwargs] if kwargs else args


# ---------------------------------------------------------------------------------------------------------------------
def _layer_input(layer: nn.Module, previous: Any, saved: dict[int, Any]) -> Any:
    """What a row consumes: ``from`` -1 is the previous row's output, other indices (negative ones count back from
    the row) are saved outputs; a list ``from`` gives a list."""

    def pick(j: int) -> Any:
        if j == -1:
            return previous
        return saved[j if j >= 0 else layer.i + j]

    return [pick(j) for j in layer.f] if isinstance(layer.f, list) else pick(layer.f)


def _layer_outputs(layer: nn.Module, out: Any) -> tuple[list[tuple[int, Any]], Any]:
    """(layer index, output) pairs a row produces, and what flows on to the next row.

    A multi-output backbone row produces the five pyramid slots P1..P5 (indices 0-4, None where it has no such
    level) and passes P5 on.
    """
    slots = getattr(layer, "slots", None)
    if slots is None:
        return [(layer.i, out)], out
    levels = [None if k is None else out[k] for k in slots]
    return list(enumerate(levels)), levels[-1]


def _log_layer_cost(layer: nn.Module, inputs: Any) -> None:
    ms, gflops = profile_layer(layer, inputs)
    LOGGER.info(f"{ms:10.2f} {gflops:10.2f} {layer.np:10.0f}  {layer.type}")


class BaseModel(nn.Module):
    """Layer-by-layer forward over ``self.model`` with saved outputs, folding and summaries."""

    model: nn.Sequential
    save: list[int]

    def forward(self, x: torch.Tensor, profile: bool = False, visualize: bool | Path = False):
        """Run the rows in order; outputs that a later row reads (``self.save``) are kept by layer index."""
        keep = set(self.save)
        saved: dict[int, torch.Tensor | None] = {}
        if profile:
            LOGGER.info(f"{'ms/call':>10s} {'GFLOPs':>10s} {'params':>10s}  layer")
        for layer in self.model:
            if isinstance(layer, BackboneSlot):  # filled by the backbone row before it
                continue
            inputs = _layer_input(layer, x, saved)
            if profile:
                _log_layer_cost(layer, inputs)
            produced, x = _layer_outputs(layer, layer(inputs))
            saved.update((index, out) for index, out in produced if index in keep)
            if visualize:
                from utils.plots import feature_visualization

                feature_visualization(x, layer.type, layer.i, save_dir=visualize)
        return x

    def fuse(self) -> "BaseModel":
        """Fold every re-parameterizable module (Conv+BN, multi-branch blocks) for inference, in place."""
        LOGGER.info("Fusing layers... ")

        def fold(module: nn.Module) -> None:
            for child in module.children():
                if hasattr(child, "reparameterize"):
                    child.reparameterize()
                fold(child)

        fold(self)
        self.info()
        return self

    def info(self, verbose: bool = False, img_size: int = 640):
        return model_info(self, verbose, img_size)


TTA_PASSES = ((1.0, False), (0.83, True), (0.67, False))  # (image scale, mirrored left-right) per TTA view


def _level_rows(maps: list[torch.Tensor], levels: range) -> slice:
    """Rows of the decoded tensor that come from ``levels`` (consecutive), given the raw maps (bs, na, ny, nx, no)."""
    ends = [0, *itertools.accumulate(math.prod(m.shape[1:4]) for m in maps)]
    if not levels:
        return slice(0, 0)
    return slice(ends[levels[0]], ends[levels[-1] + 1])


def _tta_to_input_pixels(pred: torch.Tensor, scale: float, mirrored: bool, width: int) -> torch.Tensor:
    """Decoded rows (bs, n, no) of a scaled and maybe mirrored view, with their xywh in the original image's pixels."""
    box = pred[..., :4] / scale
    if mirrored:
        box = torch.cat((width - box[..., :1], box[..., 1:]), -1)
    return torch.cat((box, pred[..., 4:]), -1)


class DetectionModel(BaseModel):
    """YOLOv5 detection model from a YAML path, a bare YAML name in models/, or a model dict.

    ``backbone_weights``: a published checkpoint (an official ImageNet backbone, a DAMO-YOLO detector, a timm
    file) loaded into the rows it fits after initialization (:func:`models.pretrained.load_backbone_weights`);
    ``backbone_rows`` then lists the layer indices it loaded.
    """

    def __init__(self, cfg: str | Path | dict = "yolov5s.yaml", ch: int = 3, nc: int | None = None,
                 anchors: int | list | None = None, extra_modules: dict[str, tuple[Callable, str]] | None = None,
                 verbose: bool = True, backbone_weights: str | Path | None = None):
        super().__init__()
        if isinstance(cfg, dict):
            self.yaml, self.yaml_file = copy.deepcopy(cfg), "model.yaml"
        else:
            path = find_model_yaml(cfg)
            self.yaml, self.yaml_file = yaml_load(path), path.name
        source = self.yaml_file
        ch = self.yaml["ch"] = self.yaml.get("ch", ch)
        if nc is not None and nc != self.yaml.get("nc"):
            LOGGER.info(f"Overriding {source} nc={self.yaml.get('nc')} with nc={nc}: the caller's class count wins")
            self.yaml["nc"] = nc
        if anchors is not None:
            LOGGER.info(f"Overriding {source} anchors with anchors={anchors}")
            self.yaml["anchors"] = anchors if isinstance(anchors, list) else round(anchors)
        self.model, self.save = parse_model(self.yaml, ch, source, extra_modules, verbose)
        self.names = {i: f"class{i}" for i in range(self.yaml["nc"])}
        self.inplace = self.yaml.get("inplace", True)
        self.hyp: dict = {}

        m = self.model[-1]
        if not isinstance(m, Detect):
            raise ModelConfigError(f"{source}: the last row must be a Detect head")
        strides = self._measure_strides(ch, source)
        m.stride.copy_(torch.tensor(strides, dtype=m.stride.dtype))
        m.inplace = self.inplace
        m.set_anchors_px(m.anchors.clone())  # the YAML's pixel sizes, now that the strides are known
        self.stride = m.stride
        self._initialize_biases(strides)
        initialize_weights(self)
        self.backbone_rows: list[int] = list(self.yaml.get("backbone_rows", []))  # kept in checkpoints' yaml
        self._keep_published_bn_eps()
        if backbone_weights:
            self.load_backbone(backbone_weights)
        if verbose:
            self.info()
            LOGGER.info("")

    def load_backbone(self, path: str | Path) -> list[int]:
        """Load a published checkpoint into the rows it fits (all or nothing); returns and records those rows."""
        from models.pretrained import load_backbone_weights

        self.backbone_rows = self.yaml["backbone_rows"] = load_backbone_weights(self, path).rows
        self._record_bn_eps(self.backbone_rows)
        return self.backbone_rows

    def _record_bn_eps(self, rows: list[int]) -> None:
        """Keep in the YAML the BatchNorm eps that published weights came with (eps is not in a state_dict), so a
        model rebuilt from a checkpoint computes what was trained."""
        recorded = dict(self.yaml.get("backbone_bn_eps", {}))
        for i in rows:
            eps = [m.eps for m in self.model[i].modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            if eps:
                recorded[i] = eps[0]
        if recorded:
            self.yaml["backbone_bn_eps"] = recorded

    def _keep_published_bn_eps(self) -> None:
        """The recorded eps back on their rows, and the eps of rows that loaded their own weights file (a timm row
        with a ``weights`` argument) recorded."""
        self._record_bn_eps([i for i, row in enumerate(self.model) if getattr(row, "keeps_bn_eps", False)])
        for i, eps in self.yaml.get("backbone_bn_eps", {}).items():
            for m in self.model[int(i)].modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eps = eps

    def _measure_strides(self, ch: int, source: str) -> list[float]:
        """Strides of the Detect inputs, from a forward pass of a blank image (eval mode, no side effects)."""
        s = 128  # small but enough for stride 64 (P6) heads
        was_training = self.training
        self.eval()
        m = self.model[-1]
        try:
            with torch.no_grad():
                m.training = True  # raw maps, no decoding
                outs = self.forward(torch.zeros(1, ch, s, s))
        except (RuntimeError, ValueError, TypeError, IndexError, ArithmeticError) as e:
            raise ModelConfigError(f"{source}: the layers do not fit together (a test forward failed: "
                                   f"{first_line(e)})") from None
        finally:
            self.train(was_training)
        return [s / x.shape[-2] for x in outs]

    def forward(self, x: torch.Tensor, augment: bool = False, profile: bool = False, visualize: bool | Path = False):
        """Training: raw maps per level. Eval: (decoded, raw maps), or (decoded, None) with ``augment`` (TTA)."""
        return self._forward_augment(x) if augment else super().forward(x, profile, visualize)

    def _forward_augment(self, x: torch.Tensor):
        """Test-time augmentation: merged predictions of the ``TTA_PASSES`` views of ``x``, as (decoded, None).

        Every view's boxes are mapped back to ``x``'s pixels. The full-size view leaves out its coarsest level
        (large objects) and the smallest view its finest level (small objects), as each sees those poorly.
        """
        grid = int(self.stride.max())
        last = len(TTA_PASSES) - 1
        merged = []
        for k, (scale, mirrored) in enumerate(TTA_PASSES):
            view = scale_img(x.flip(-1) if mirrored else x, scale, gs=grid)
            decoded, maps = super().forward(view)
            levels = range(1 if k == last else 0, len(maps) - 1 if k == 0 else len(maps))
            rows = _level_rows(maps, levels)
            merged.append(_tta_to_input_pixels(decoded[:, rows], scale, mirrored, x.shape[-1]))
        return torch.cat(merged, 1), None

    def _initialize_biases(self, strides: list[float], class_freq: torch.Tensor | None = None) -> None:
        """Start the output biases at priors instead of 0.5 probabilities.

        Objectness: about 8 objects in a 640x640 image spread over the level's (640 / stride)^2 cells. Classes:
        probability 0.6 / (nc - 0.99999) each, or each class's share of ``class_freq`` (label counts) when given.
        """
        head = self.model[-1]
        if class_freq is None:
            class_logit = torch.full((head.nc,), math.log(0.6 / (head.nc - 0.99999)))
        else:
            counts = torch.as_tensor(class_freq, dtype=torch.float32)
            class_logit = (counts / counts.sum()).log()
        with torch.no_grad():
            for conv, stride in zip(head.m, strides):
                prior = conv.bias.new_zeros(head.no)  # per anchor: x, y, w, h, objectness, classes
                prior[4] = math.log(8 / (640 / stride) ** 2)
                prior[5:] = class_logit
                conv.bias.view(head.na, head.no).add_(prior)

    def _apply(self, fn, *args, **kwargs):
        """After .to() / .half(): ``self.stride`` points at Detect's converted buffer again."""
        super()._apply(fn, *args, **kwargs)
        self.stride = self.model[-1].stride
        return self


Model = DetectionModel  # upstream alias


def initialize_weights(model: nn.Module) -> None:
    """Upstream's BatchNorm settings (eps 1e-3, momentum 0.03) and in-place activations. Rows that loaded published
    weights themselves (``keeps_bn_eps``) keep their BatchNorm eps."""
    kept = {id(b) for m in model.modules() if getattr(m, "keeps_bn_eps", False) for b in m.modules()}
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.03
            m.eps = m.eps if id(m) in kept else 1e-3
        elif isinstance(m, (nn.Hardswish, nn.LeakyReLU, nn.ReLU, nn.ReLU6, nn.SiLU)):
            m.inplace = True


def find_model_yaml(cfg: str | Path) -> Path:
    """A model YAML by path, or by bare name ('yolov5s', 'yolov5s.yaml') from models/ and its subfolders."""
    path = Path(cfg)
    if path.suffix not in (".yaml", ".yml"):
        path = path.with_suffix(".yaml")
    if path.is_file():
        return path
    candidates = [MODELS_DIR / path.name, *sorted(MODELS_DIR.rglob(path.name))]
    for c in candidates:
        if c.is_file():
            return c
    raise UserInputError(f"{cfg}: model YAML not found (looked at {path} and in {MODELS_DIR})")


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Build a YOLOv5 model from its YAML and print it")
    parser.add_argument("--cfg", type=str, default="yolov5s.yaml", help="model.yaml")
    parser.add_argument("--batch-size", type=int, default=1, help="images in the profiling batch")
    parser.add_argument("--imgsz", "--img", "--img-size", type=int, default=640, help="square input side in pixels")
    parser.add_argument("--device", default="", help="where to run: cpu, or CUDA indices such as 0 or 0,1")
    parser.add_argument("--profile", action="store_true", help="time one forward pass of each layer and log it")
    parser.add_argument("--line-profile", action="store_true", help="alias of --profile")
    parser.add_argument("--test", action="store_true", help="build every models/*.yaml")
    return parser.parse_args(argv)


def main(opt: argparse.Namespace) -> None:
    device = select_device(opt.device)
    if opt.test:
        for cfg in sorted(MODELS_DIR.rglob("*.yaml")):
            try:
                DetectionModel(cfg)
            except UserInputError as e:
                LOGGER.error(f"ERROR: {e}")
        return
    model = DetectionModel(opt.cfg).to(device)
    if opt.profile or opt.line_profile:
        im = torch.rand(opt.batch_size, 3, opt.imgsz, opt.imgsz, device=device)
        model.eval()(im, profile=True)


if __name__ == "__main__":
    set_logging()
    try:
        main(parse_opt())
    except UserInputError as e:
        LOGGER.error(f"ERROR: {e}")
        sys.exit(2)
