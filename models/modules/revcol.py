"""RevCol backbone for YOLOv5: reversible column networks with multi-level outputs.

Cai et al., "Reversible Column Networks", ICLR 2023 (arXiv:2212.11696). A RevCol is a sequence of
identical columns (sub-networks). Each column refines four feature levels (strides 4, 8, 16, 32)
of the previous column: ``c_i = alpha_i * c_i_prev + level_i(c_{i-1}, c_{i+1}_prev)``. Because
``alpha_i`` is invertible, a column's inputs can be recomputed from its outputs, so training
(``save_memory=True``) keeps only the column boundaries, not the activations inside the columns.

State-dict names follow the official implementation (``stem.0``, ``subnet3.alpha1``,
``subnet3.level1.fusion.up.channel_reschedule.0``, ``...blocks.0.pwconv1``): ``CHECKPOINT_FORMATS`` loads its
ImageNet weights into the :class:`FullNet` row (classifier and decoder heads skipped) and applies its alpha clamp.
Input sides must be multiples of 32.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from types import MappingProxyType

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch.utils.checkpoint import get_device_states, set_device_states

from models.common import variant_constructors
from models.pretrained import CheckpointError, CheckpointFormat, rows_of_type

ALPHA_MIN = 1e-3  # smallest |alpha|: the reconstruction in backward divides by alpha
ALPHA_INIT = 0.5


class LayerNorm(nn.Module):
    """LayerNorm over the channels of an NCHW ("channels_first") or NHWC ("channels_last") tensor."""

    def __init__(self, channels: int, eps: float = 1e-6, data_format: str = "channels_last"):
        super().__init__()
        if data_format not in ("channels_first", "channels_last"):
            raise ValueError(f"data_format must be 'channels_first' or 'channels_last', got {data_format!r}")
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps
        self.channels_first = data_format == "channels_first"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_first:
            x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2) if self.channels_first else x


class ConvNextBlock(nn.Module):
    """ConvNeXt block: depthwise conv, LayerNorm, MLP (Linear-GELU-Linear), layer scale, residual."""

    def __init__(self, cin: int, chidden: int, cout: int, k: int = 3, layer_scale_init: float = 1e-6,
                 drop_path: float = 0.0):
        super().__init__()
        self.dwconv = nn.Conv2d(cin, cin, k, padding=k // 2, groups=cin)
        self.norm = nn.LayerNorm(cin, eps=1e-6)
        self.pwconv1 = nn.Linear(cin, chidden)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(chidden, cout)
        self.gamma = nn.Parameter(torch.full((cout,), layer_scale_init))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        y = self.gamma * self.pwconv2(self.act(self.pwconv1(y)))
        return x + self.drop_path(y.permute(0, 3, 1, 2))


class UpSampleConvnext(nn.Module):
    """Channel projection (NHWC Linear + LayerNorm), then nearest upsampling by ``2**ratio``."""

    def __init__(self, ratio: int, cin: int, cout: int):
        super().__init__()
        self.channel_reschedule = nn.Sequential(nn.Linear(cin, cout), LayerNorm(cout, eps=1e-6))
        self.scale = 2**ratio

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.channel_reschedule(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return F.interpolate(x, scale_factor=self.scale, mode="nearest")


class Fusion(nn.Module):
    """Input of one level: the finer level of this column (downsampled) plus, after the first column,
    the coarser level of the previous column (upsampled)."""

    def __init__(self, level: int, channels: Sequence[int], first_col: bool):
        super().__init__()
        self.down = nn.Sequential(
            nn.Conv2d(channels[level - 1], channels[level], 2, stride=2),
            LayerNorm(channels[level], eps=1e-6, data_format="channels_first"),
        ) if level > 0 else nn.Identity()
        has_up = not first_col and level < len(channels) - 1
        self.up = UpSampleConvnext(1, channels[level + 1], channels[level]) if has_up else None

    def forward(self, c_down: torch.Tensor, c_up: torch.Tensor | None) -> torch.Tensor:
        x = self.down(c_down)
        return x if self.up is None else self.up(c_up) + x


class Level(nn.Module):
    """One level of a column: :class:`Fusion`, then ConvNeXt blocks (hidden width 4x channels)."""

    def __init__(self, level: int, channels: Sequence[int], layers: Sequence[int], kernel_size: int,
                 first_col: bool, drop_rates: Sequence[float]):
        super().__init__()
        start = sum(layers[:level])
        c = channels[level]
        self.fusion = Fusion(level, channels, first_col)
        self.blocks = nn.Sequential(*(ConvNextBlock(c, 4 * c, c, kernel_size, drop_path=drop_rates[start + j])
                                      for j in range(layers[level])))

    def forward(self, c_down: torch.Tensor, c_up: torch.Tensor | None) -> torch.Tensor:
        return self.blocks(self.fusion(c_down, c_up))


def _rng_state(x: torch.Tensor) -> tuple:
    """CPU and CUDA generator states (the CUDA ones of ``x``'s device), to replay DropPath masks."""
    return torch.get_rng_state(), get_device_states(x)


def _set_rng_state(state: tuple) -> None:
    cpu_state, (devices, cuda_states) = state
    torch.set_rng_state(cpu_state)
    set_device_states(devices, cuda_states)


def _leaf(t: torch.Tensor) -> torch.Tensor:
    """``t`` detached from its graph, as a leaf that collects its own gradient."""
    return t.detach().requires_grad_(True)


def _backprop_level(level: nn.Module, out: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor | None,
                    grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor | None]]:
    """Gradients of a recomputed level w.r.t. its two inputs and its parameters (None where frozen)."""
    params = list(level.parameters())
    inputs = [lower] if upper is None else [lower, upper]
    grads = torch.autograd.grad(out, inputs + [p for p in params if p.requires_grad], grad, allow_unused=True)
    trainable_grads = iter(grads[len(inputs):])
    param_grads = [next(trainable_grads) if p.requires_grad else None for p in params]
    return grads[0], None if upper is None else grads[1], param_grads


class ReversibleColumn(torch.autograd.Function):
    """One RevCol column run without keeping its activations.

    ``apply(levels, x, prev0..prev3, alpha0..alpha3, *params)``: ``prev`` are the previous column's
    states (the number 0 for the first column), ``params`` all parameters of ``levels`` in order.
    Forward runs the column under ``no_grad`` and saves only ``x`` and the outputs ``c0..c3``.
    Backward walks the levels from coarse to fine: it recomputes a level with the RNG state of the
    forward (so DropPath drops the same paths), back-propagates through it, and reconstructs the
    previous column's state ``prev_i = (c_i - level_i(...)) / alpha_i``, which the level below needs.
    Parameter gradients are returned, not accumulated, so ``torch.autograd.grad``, DDP hooks and
    frozen parameters behave as in the plain forward.
    """

    @staticmethod
    def forward(ctx, levels: Sequence[Level], x: torch.Tensor, *args):
        prev, alphas = args[:4], args[4:8]
        device_type = x.device.type
        ctx.levels, ctx.first_col = levels, not torch.is_tensor(prev[0])
        ctx.autocast = {"device_type": device_type, "enabled": torch.is_autocast_enabled(device_type),
                        "dtype": torch.get_autocast_dtype(device_type)}
        ctx.rng_states, outputs, lower = [], [], x
        for i, (level, alpha) in enumerate(zip(levels, alphas)):
            ctx.rng_states.append(_rng_state(x))
            lower = alpha * prev[i] + level(lower, prev[i + 1] if i < 3 else None)
            outputs.append(lower)
        ctx.save_for_backward(x, *outputs, *alphas)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grad_outputs):
        x, *saved = ctx.saved_tensors
        x, outputs, alphas = _leaf(x), [_leaf(c) for c in saved[:4]], saved[4:]
        grad_out = list(grad_outputs)  # d loss / d c_i, completed by the level above before level i is reached
        grad_prev: list[torch.Tensor | None] = [None] * 4
        grad_alpha: list[torch.Tensor] = [torch.zeros_like(a) for a in alphas]  # stay 0 in the first column
        grad_params: list[list[torch.Tensor | None]] = [[] for _ in range(4)]
        upper = None  # reconstructed previous-column state of the level above
        devices = get_device_states(x)[0]
        with torch.random.fork_rng(devices=devices), torch.enable_grad(), torch.autocast(**ctx.autocast):
            for i in reversed(range(4)):
                lower = x if i == 0 else outputs[i - 1]
                _set_rng_state(ctx.rng_states[i])
                out = ctx.levels[i](lower, upper)
                grad_lower, grad_upper, grad_params[i] = _backprop_level(ctx.levels[i], out, lower, upper, grad_out[i])
                if i > 0:
                    grad_out[i - 1] = grad_out[i - 1] + grad_lower
                else:
                    grad_x = grad_lower
                if grad_upper is not None:
                    grad_prev[i + 1] = grad_prev[i + 1] + grad_upper
                if ctx.first_col:
                    continue
                with torch.no_grad():
                    prev = (outputs[i] - out) / alphas[i]
                grad_prev[i] = grad_out[i] * alphas[i]
                grad_alpha[i] = (grad_out[i] * prev).sum((0, 2, 3), keepdim=True)
                upper = _leaf(prev)
        return None, grad_x, *grad_prev, *grad_alpha, *(g for grads in grad_params for g in grads)


class SubNet(nn.Module):
    """One column: four levels with learnable per-channel shortcut scales ``alpha0..alpha3``."""

    def __init__(self, channels: Sequence[int], layers: Sequence[int], kernel_size: int, first_col: bool,
                 drop_rates: Sequence[float], save_memory: bool):
        super().__init__()
        self.save_memory = save_memory
        for i, c in enumerate(channels):
            setattr(self, f"alpha{i}", nn.Parameter(torch.full((1, c, 1, 1), ALPHA_INIT)))
            setattr(self, f"level{i}", Level(i, channels, layers, kernel_size, first_col, drop_rates))

    @property
    def levels(self) -> tuple[Level, ...]:
        return self.level0, self.level1, self.level2, self.level3

    @property
    def alphas(self) -> tuple[nn.Parameter, ...]:
        return self.alpha0, self.alpha1, self.alpha2, self.alpha3

    @torch.no_grad()
    def clamp_alphas(self, keep_zero: bool = False) -> None:
        """Keep every |alpha| >= ALPHA_MIN, keeping its sign, in place.

        Training counts an exact zero as positive (the reversible backward divides by alpha); ``keep_zero`` applies
        the official rule instead, which leaves an exact zero at zero (what an official checkpoint computes with).
        """
        for alpha in self.alphas:
            sign = torch.sign(alpha) if keep_zero else torch.where(alpha < 0, -1.0, 1.0).to(alpha)
            alpha.copy_(sign * alpha.abs().clamp_min(ALPHA_MIN))

    def forward(self, x: torch.Tensor, *prev: torch.Tensor | float) -> list[torch.Tensor]:
        """New states c0..c3 from the stem output ``x`` and the previous column's ``prev`` (0s for the first)."""
        if self.training:  # in place; eval (and export) use the alphas as training or the checkpoint loader left them
            self.clamp_alphas()
        if self.save_memory and torch.is_grad_enabled():
            params = [p for level in self.levels for p in level.parameters()]
            return list(ReversibleColumn.apply(self.levels, x, *prev, *self.alphas, *params))
        states, lower = [], x
        for i, (level, alpha) in enumerate(zip(self.levels, self.alphas)):
            lower = alpha * prev[i] + level(lower, prev[i + 1] if i < 3 else None)
            states.append(lower)
        return states


class FullNet(nn.Module):
    """RevCol backbone: patchify stem, then ``num_subnet`` columns; returns [c0, c1, c2, c3] at strides 4-32."""

    def __init__(self, channels: Sequence[int], layers: Sequence[int], num_subnet: int, kernel_size: int = 3,
                 drop_path: float = 0.0, save_memory: bool = True, in_channels: int = 3):
        super().__init__()
        if len(channels) != 4 or len(layers) != 4:
            raise ValueError(f"RevCol needs 4 levels, got channels {channels} and layers {layers}")
        self.channels = list(channels)
        self.num_subnet = num_subnet
        self.stem = nn.Sequential(nn.Conv2d(in_channels, channels[0], 4, stride=4),
                                  LayerNorm(channels[0], eps=1e-6, data_format="channels_first"))
        n_blocks = sum(layers)
        drop_rates = [drop_path * j / max(n_blocks - 1, 1) for j in range(n_blocks)]  # linear 0 -> drop_path
        for i in range(num_subnet):
            self.add_module(f"subnet{i}", SubNet(channels, layers, kernel_size, i == 0, drop_rates, save_memory))
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        states = [0.0] * 4
        for i in range(self.num_subnet):
            states = getattr(self, f"subnet{i}")(x, *states)
        return states


def _init_weights(module: nn.Module) -> None:
    """Truncated-normal (std 0.02) conv and linear weights, zero biases."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)


# variant -> FullNet keyword arguments: channels and blocks per level, columns, drop-path rate
VARIANTS = MappingProxyType({
    "tiny": {"channels": (64, 128, 256, 512), "layers": (2, 2, 4, 2), "num_subnet": 4, "drop_path": 0.1},
    "small": {"channels": (64, 128, 256, 512), "layers": (2, 2, 4, 2), "num_subnet": 8, "drop_path": 0.3},
    "base": {"channels": (72, 144, 288, 576), "layers": (1, 1, 3, 2), "num_subnet": 16, "drop_path": 0.4},
    "large": {"channels": (128, 256, 512, 1024), "layers": (1, 2, 6, 2), "num_subnet": 8, "drop_path": 0.5},
    "xlarge": {"channels": (224, 448, 896, 1792), "layers": (1, 2, 6, 2), "num_subnet": 8, "drop_path": 0.5},
})


def revcol_backbone(c1: int = 3, **config) -> FullNet:
    """A :class:`FullNet` on ``c1`` input channels (``config``: its other keyword arguments)."""
    return FullNet(in_channels=c1, **config)


BACKBONES = variant_constructors("revcol", revcol_backbone, VARIANTS)  # revcol_tiny(c1=3, **overrides), ...

YAML_MODULES = {name: (constructor, "backbone") for name, constructor in BACKBONES.items()}


# ---- official checkpoints (megvii-research/RevCol: {'model': state_dict}, FullNet's names) ---------------------------
_COLUMN = re.compile(r"subnet(\d+)\.")
_HEADS = ("cls_blocks.", "decoder_blocks.", "cls.")  # ImageNet classifiers, reconstruction decoders, fine-tune head


def _is_official(state: Mapping[str, torch.Tensor]) -> bool:
    return "stem.0.weight" in state and "subnet0.alpha0" in state


def _map_official_keys(keys: Sequence[str], rows: nn.Sequential) -> dict[str, str]:
    """Every official backbone key onto the first FullNet row under the same name; refuses a column-count mismatch,
    whose columns would otherwise load partly (a revcol_tiny file into revcol_small has the same shapes)."""
    found = rows_of_type(rows, FullNet)
    if not found:
        return {}
    index, net = found[0]
    columns = {int(m.group(1)) for k in keys if (m := _COLUMN.match(k))}
    if columns and max(columns) + 1 != net.num_subnet:
        raise CheckpointError(f"RevCol checkpoint with {max(columns) + 1} columns (up to 'subnet{max(columns)}.*'), "
                              f"but the FullNet in layer {index} has {net.num_subnet}: build the YAML of its size")
    return {k: f"{index}.{k}" for k in keys}


def _clamp_loaded_alphas(row: nn.Module) -> None:
    """The official forward's in-place clamp, applied once at load: the official features were computed with it, and
    our eval forward leaves alphas as they are."""
    for m in row.modules():
        if isinstance(m, SubNet):
            m.clamp_alphas(keep_zero=True)


CHECKPOINT_FORMATS = (CheckpointFormat(
    name="RevCol",
    recognise=_is_official,
    is_head=lambda key: key.startswith(_HEADS),
    map_keys=_map_official_keys,
    bn_eps=None,  # LayerNorms only, built with the official eps 1e-6
    after_load=_clamp_loaded_alphas,
    no_rows_hint="build the model from a RevCol YAML (models/yolov5_RevCol*.yaml: tiny, -small, -base, ...)",
),)
