"""PyTorch helpers: devices, seeding, model summaries, FLOP counting, timing."""

from __future__ import annotations

import copy
import ctypes
import math
import os
import platform
import random
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from utils.general import LOGGER, UserInputError, first_line


def select_device(device: str = "", batch_size: int = 0) -> torch.device:
    """'' (CUDA if available else CPU), 'cpu', '0', '0,1' or 'cuda:0' -> torch.device, logging what was chosen."""
    spec = str(device).strip().lower().replace("cuda:", "").replace("none", "")
    if spec == "cpu" or (spec == "" and not torch.cuda.is_available()):
        LOGGER.info(f"YOLOv5 torch-{torch.__version__} CPU ({torch.get_num_threads()} threads)")
        return torch.device("cpu")
    if spec in ("mps",):
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise UserInputError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    ids = [int(x) for x in spec.split(",")] if spec else [0]
    bad = [i for i in ids if i >= torch.cuda.device_count()]
    if bad:
        raise UserInputError(f"--device {device}: no CUDA device {bad[0]} (found {torch.cuda.device_count()})")
    if len(ids) > 1 and batch_size and batch_size % len(ids):
        raise UserInputError(f"--batch-size {batch_size} must be a multiple of the GPU count {len(ids)}")
    local_rank = int(os.getenv("LOCAL_RANK", -1))
    index = local_rank if local_rank >= 0 else ids[0]
    props = torch.cuda.get_device_properties(index)
    LOGGER.info(f"YOLOv5 torch-{torch.__version__} CUDA:{index} ({props.name}, {props.total_memory / 2**20:.0f}MiB)")
    return torch.device("cuda", index)


def init_seeds(seed: int = 0, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (all devices); optionally ask for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        # deterministic mode also fills every new tensor with NaN to expose reads of uninitialised memory; that
        # costs time in every training step and changes no result, so it is switched off (docs/BENCHMARKS.md)
        torch.utils.deterministic.fill_uninitialized_memory = False
        torch.backends.cudnn.deterministic = True
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"


def retain_freed_memory() -> bool:
    """Let freed tensor memory stay in the process for the next allocation instead of going back to the OS.

    glibc returns large freed blocks (mmap'ed ones, and the heap's free top) to the OS, so an eager CPU training
    step, which frees and re-allocates its activations, page-faults them in again every step. With mmap off and
    trimming raised to 2 GiB the step runs without faults; the resident size then stays at its peak (a little
    higher, as the heap fragments). Measurements: docs/BENCHMARKS.md.
    Process-wide, for the training scripts' processes; glibc (Linux) only. Returns whether it applied.
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    mallopt = ctypes.CDLL("libc.so.6").mallopt
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def time_sync() -> float:
    """time.perf_counter() after waiting for pending CUDA work."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def de_parallel(model: nn.Module) -> nn.Module:
    """The bare model inside DataParallel / DistributedDataParallel."""
    return model.module if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else model


def convs_channels_last(model: nn.Module) -> nn.Module:
    """Store every 2-D convolution weight channels-last (NHWC), oneDNN's preferred layout on the CPU; given NHWC
    input, the network then runs without layout conversions (outputs equal to float rounding). In place."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.to(memory_format=torch.channels_last)
    return model


def count_flops(model: nn.Module, x: torch.Tensor) -> float:
    """FLOPs (multiply and add counted separately) of one forward pass, from PyTorch's FlopCounterMode."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return float(counter.get_total_flops())


def model_gflops(model: nn.Module, imgsz: int | list = 640) -> float | None:
    """GFLOPs at ``imgsz``: counted on a stride-sized input and scaled by area, like upstream's printout."""
    imgsz = [imgsz, imgsz] if isinstance(imgsz, int) else imgsz
    p = next(model.parameters())
    if p.device.type == "meta":
        return None
    stride = max(int(model.stride.max()), 32) if hasattr(model, "stride") else 32
    ch = getattr(model, "yaml", {}).get("ch", 3)
    was_training = model.training
    try:
        flops = count_flops(model.eval(), torch.zeros(1, ch, stride, stride, device=p.device, dtype=p.dtype))
    except (RuntimeError, ValueError, TypeError, NotImplementedError):
        return None
    finally:
        model.train(was_training)
    return flops / 1e9 * imgsz[0] / stride * imgsz[1] / stride


def log_parameter_table(model: nn.Module) -> None:
    """One line per parameter tensor: index, name, trainable, size, shape, mean, standard deviation, dtype."""
    LOGGER.info(f"{'#':>5} {'parameter':>40} {'trainable':>9} {'numel':>12} {'shape':>20} {'mean':>10} {'std':>10}")
    for index, (name, t) in enumerate(model.named_parameters()):
        spread = t.std().item() if t.numel() > 1 else 0.0
        LOGGER.info(f"{index:5d} {name:>40} {t.requires_grad!s:>9} {t.numel():12d} {list(t.shape)!s:>20} "
                    f"{t.mean().item():10.3g} {spread:10.3g} {t.dtype}")


def model_info(model: nn.Module, verbose: bool = False, imgsz: int | list = 640) -> tuple[int, int, int, float | None]:
    """Log 'NAME summary: P parameters (T trainable), M modules, F GFLOPs'; returns (M, P, T, F)."""
    sizes = [(t.numel(), t.requires_grad) for t in model.parameters()]
    n_params, n_trainable = sum(n for n, _ in sizes), sum(n for n, grad in sizes if grad)
    n_modules = sum(1 for _ in model.modules())
    if verbose:
        log_parameter_table(model)
    gflops = model_gflops(model, imgsz)
    source = Path(str(getattr(model, "yaml_file", "") or "Model")).stem
    flops = "" if gflops is None else f", {gflops:.1f} GFLOPs"
    LOGGER.info(f"{source.replace('yolov5', 'YOLOv5')} summary: {n_params} parameters ({n_trainable} trainable), "
                f"{n_modules} modules{flops}")
    return n_modules, n_params, n_trainable, gflops


def profile_layer(m: nn.Module, x, runs: int = 10) -> tuple[float, float]:
    """(milliseconds per forward, GFLOPs) of one layer on input ``x``."""
    flops = count_flops(m, x)
    with torch.no_grad():
        m(x)
        t0 = time_sync()
        for _ in range(runs):
            m(x)
        dt = (time_sync() - t0) / runs * 1e3
    return dt, flops / 1e9


@contextmanager
def torch_distributed_zero_first(local_rank: int):
    """Run the ``with`` block on the local leader (rank 0) before the other ranks of a DDP run.

    The other ranks (``local_rank`` > 0) wait at a barrier that the leader reaches only after its block, so that,
    e.g., a dataset cache it writes exists when they read it. Without DDP (``local_rank`` -1) nothing waits.
    """
    follower = local_rank > 0
    if follower:
        torch.distributed.barrier()  # released once the leader has finished its block
    yield
    if local_rank == 0:
        torch.distributed.barrier()  # releases the followers


TTA_PAD_VALUE = 0.447  # grey fill of scale_img's padding (a mean image intensity in [0, 1])


def scale_img(img: torch.Tensor, ratio: float = 1.0, same_shape: bool = False, gs: int = 32) -> torch.Tensor:
    """A (b, c, h, w) batch resized by ``ratio`` (bilinear), for test-time augmentation.

    The result is placed at the top left of a canvas filled with TTA_PAD_VALUE: of the original size with
    ``same_shape`` (cropped when ``ratio`` > 1), else of the scaled size rounded up to multiples of ``gs``.
    """
    if ratio == 1.0:
        return img
    original = img.shape[-2:]
    scaled = [int(n * ratio) for n in original]
    canvas = list(original) if same_shape else [gs * math.ceil(n * ratio / gs) for n in original]
    resized = nn.functional.interpolate(img, size=scaled, mode="bilinear", align_corners=False)
    out = resized.new_full((*img.shape[:-2], *canvas), TTA_PAD_VALUE)
    rows, cols = min(scaled[0], canvas[0]), min(scaled[1], canvas[1])
    out[..., :rows, :cols] = resized[..., :rows, :cols]
    return out


def smart_optimizer(model: nn.Module, name: str = "SGD", lr: float = 0.001, momentum: float = 0.9, decay: float = 1e-5,
                    no_decay: set[int] | None = None) -> torch.optim.Optimizer:
    """Optimizer with upstream's three parameter groups: 0 biases, 1 weights with decay, 2 norm weights without.

    ``no_decay`` holds ids of further weights to keep out of weight decay (e.g. those under a custom L2 penalty).
    """
    biases, decayed, undecayed = [], [], []
    for module in model.modules():
        for p_name, p in module.named_parameters(recurse=False):
            if p_name == "bias":
                biases.append(p)
            elif (p_name == "weight" and "Norm" in type(module).__name__) or id(p) in (no_decay or set()):
                undecayed.append(p)
            else:
                decayed.append(p)
    if name == "Adam":
        optimizer = torch.optim.Adam(biases, lr=lr, betas=(momentum, 0.999))
    elif name == "AdamW":
        optimizer = torch.optim.AdamW(biases, lr=lr, betas=(momentum, 0.999), weight_decay=0.0)
    elif name == "RMSProp":
        optimizer = torch.optim.RMSprop(biases, lr=lr, momentum=momentum)
    elif name == "SGD":
        optimizer = torch.optim.SGD(biases, lr=lr, momentum=momentum, nesterov=True)
    else:
        raise UserInputError(f"--optimizer {name}: expected SGD, Adam, AdamW or RMSProp")
    optimizer.add_param_group({"params": decayed, "weight_decay": decay})
    optimizer.add_param_group({"params": undecayed, "weight_decay": 0.0})
    LOGGER.info(f"optimizer: {type(optimizer).__name__}(lr={lr}) with parameter groups {len(undecayed)} "
                f"weight(decay=0.0), {len(decayed)} weight(decay={decay}), {len(biases)} bias")
    return optimizer


def ema_decay(updates: int, decay: float = 0.9999, tau: float = 2000.0) -> float:
    """Weight of the old average at update number ``updates`` (1, 2, ...): it ramps from 0 towards ``decay``
    with time constant ``tau``, so the first updates follow the model closely."""
    return decay * (1 - math.exp(-updates / tau))


class ModelEMA:
    """Exponential moving average of a model's floating-point weights and buffers (YOLOv5's EMA): after each optimizer
    step, average = d * average + (1 - d) * model with d = ``ema_decay(updates)``. Integer buffers (batch counters)
    keep their value. ``ema`` (also ``module``) is the averaged model, in eval mode and without gradients."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000.0, updates: int = 0):
        self.ema = copy.deepcopy(de_parallel(model)).eval()
        self.ema.requires_grad_(False)
        self.decay, self.tau, self.updates = decay, tau, updates

    @property
    def module(self) -> nn.Module:
        return self.ema

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        current = de_parallel(model).state_dict()
        pairs = [(v, current[k].detach()) for k, v in self.ema.state_dict().items() if v.is_floating_point()]
        averages, values = (list(x) for x in zip(*pairs))
        d = ema_decay(self.updates, self.decay, self.tau)
        torch._foreach_mul_(averages, d)
        torch._foreach_add_(averages, torch._foreach_mul(values, 1 - d))


class EarlyStopping:
    """Ends training once fitness has gone ``patience`` epochs without improving (0 or None: never).

    Calling it with (epoch, fitness) records a new best when fitness is at least the best so far and returns
    True when ``epoch - best_epoch >= patience``. ``possible_stop`` says the next epoch may be the last.
    """

    def __init__(self, patience: int = 30):
        self.patience = patience if patience else math.inf
        self.best_fitness, self.best_epoch = 0.0, 0
        self.possible_stop = False

    def stale_epochs(self, epoch: int) -> int:
        """Epochs since the best one."""
        return epoch - self.best_epoch

    def __call__(self, epoch: int, fitness: float) -> bool:
        if fitness >= self.best_fitness:
            self.best_fitness, self.best_epoch = fitness, epoch
        stale = self.stale_epochs(epoch)
        self.possible_stop = stale + 1 >= self.patience
        if stale < self.patience:
            return False
        LOGGER.info(f"EarlyStopping: no better fitness in the {stale} epochs since epoch {self.best_epoch} "
                    f"(patience {self.patience}), so training ends here; best.pt holds that epoch's weights. "
                    "Pass a larger --patience to train on, or --patience 0 to never stop early.")
        return True


class ShapeCompiledForward:
    """``model(x)`` through ``torch.compile`` for the input shape of the first call and eagerly for any other shape
    (an epoch's last, smaller batch; --multi-scale sizes), so that nothing is compiled twice. Parameters and buffers
    stay the model's own. When compiling fails (no C++ compiler, an unsupported module) it warns once and runs eagerly.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.compiled = torch.compile(model, dynamic=False)
        self.shape: torch.Size | None = None
        self.calls = {"compiled": 0, "eager": 0}

    def __call__(self, x: torch.Tensor):
        if self.shape is None:
            self.shape = x.shape
            try:
                y = self.compiled(x)
            except Exception as e:  # whatever the compiler stack raises, training goes on eagerly
                LOGGER.warning(f"WARNING --compile: torch.compile failed ({first_line(e)}); training without it")
                self.compiled = None
            else:
                self.calls["compiled"] += 1
                return y
        if self.compiled is not None and x.shape == self.shape:
            self.calls["compiled"] += 1
            return self.compiled(x)
        self.calls["eager"] += 1
        return self.model(x)
