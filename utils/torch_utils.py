"""PyTorch helpers: devices, seeding, model summaries, FLOP counting, timing."""

from __future__ import annotations

import ctypes
import math
import os
import platform
import random
import time
from contextlib import contextmanager

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
        # deterministic mode also fills every new tensor with NaN to expose reads of uninitialised memory: 6% of a
        # CPU training step (yolov5s, 320, batch 16) and no effect on results, so it is switched off
        torch.utils.deterministic.fill_uninitialized_memory = False
        torch.backends.cudnn.deterministic = True
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"


def retain_freed_memory() -> bool:
    """Let freed tensor memory stay in the process for the next allocation instead of going back to the OS.

    glibc returns large freed blocks (mmap'ed ones, and the heap's free top) to the OS, so an eager CPU training
    step, which frees and re-allocates its activations, page-faults them in again every step (0.5-1 GB for yolov5s
    at 320, batch 16; the step ran 1.03-1.25x faster without). With mmap off and trimming raised to 2 GiB the step
    runs without faults. The resident size stays at its peak, which fragmentation raised by 4-5% in train.py runs.
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


def model_info(model: nn.Module, verbose: bool = False, imgsz: int | list = 640) -> tuple[int, int, int, float | None]:
    """Log 'NAME summary: L layers, P parameters, G gradients, F GFLOPs' and return those figures."""
    n_p = sum(x.numel() for x in model.parameters())
    n_g = sum(x.numel() for x in model.parameters() if x.requires_grad)
    n_l = len(list(model.modules()))
    if verbose:
        LOGGER.info(f"{'layer':>5} {'name':>40} {'gradient':>9} {'parameters':>12} {'shape':>20} {'mu':>10} {'sigma':>10}")
        for i, (name, p) in enumerate(model.named_parameters()):
            LOGGER.info(f"{i:5g} {name:>40} {str(p.requires_grad):>9} {p.numel():12g} {str(list(p.shape)):>20} "
                        f"{p.mean():10.3g} {p.std() if p.numel() > 1 else 0:10.3g} {p.dtype}")
    gflops = model_gflops(model, imgsz)
    fs = f", {gflops:.1f} GFLOPs" if gflops is not None else ""
    name = getattr(model, "yaml_file", "") or "Model"
    name = os.path.splitext(os.path.basename(str(name)))[0].replace("yolov5", "YOLOv5")
    LOGGER.info(f"{name} summary: {n_l} layers, {n_p} parameters, {n_g} gradients{fs}")
    return n_l, n_p, n_g, gflops


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
    """Let rank 0 do something (e.g. caching a dataset) while the other ranks wait at a barrier."""
    if local_rank not in {-1, 0}:
        torch.distributed.barrier()
    yield
    if local_rank == 0:
        torch.distributed.barrier()


def scale_img(img: torch.Tensor, ratio: float = 1.0, same_shape: bool = False, gs: int = 32) -> torch.Tensor:
    """Resize a batch by ``ratio`` and pad (value 0.447, the ImageNet mean) to a multiple of ``gs``."""
    if ratio == 1.0:
        return img
    h, w = img.shape[2:]
    size = (int(h * ratio), int(w * ratio))
    img = nn.functional.interpolate(img, size=size, mode="bilinear", align_corners=False)
    if not same_shape:
        h, w = (math.ceil(x * ratio / gs) * gs for x in (h, w))
    return nn.functional.pad(img, [0, w - size[1], 0, h - size[0]], value=0.447)


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


class ModelEMA(torch.optim.swa_utils.AveragedModel):
    """Exponential moving average of a model's weights and buffers, with upstream's warm-up ramp:
    decay = d * (1 - exp(-updates / tau)), so early updates follow the model closely."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000, updates: int = 0):
        def ema_update(ema_tensors: list, model_tensors: list, num_averaged) -> None:
            if not ema_tensors[0].is_floating_point():  # e.g. num_batches_tracked: copied
                for e, m in zip(ema_tensors, model_tensors):
                    e.copy_(m)
                return
            d = decay * (1 - math.exp(-(int(num_averaged) + 1) / tau))
            torch._foreach_lerp_(ema_tensors, model_tensors, 1 - d)

        super().__init__(de_parallel(model), multi_avg_fn=ema_update, use_buffers=True)
        self.n_averaged.fill_(updates)
        self.module.eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.update_parameters(de_parallel(model))

    @property
    def updates(self) -> int:
        return int(self.n_averaged)

    @property
    def ema(self) -> nn.Module:
        return self.module


class EarlyStopping:
    """Stop when fitness has not improved for ``patience`` epochs."""

    def __init__(self, patience: int = 30):
        self.best_fitness = 0.0
        self.best_epoch = 0
        self.patience = patience or float("inf")
        self.possible_stop = False

    def __call__(self, epoch: int, fitness: float) -> bool:
        if fitness >= self.best_fitness:
            self.best_epoch, self.best_fitness = epoch, fitness
        delta = epoch - self.best_epoch
        self.possible_stop = delta >= self.patience - 1
        stop = delta >= self.patience
        if stop:
            LOGGER.info(f"Stopping training early as no improvement observed in last {self.patience} epochs. "
                        f"Best results observed at epoch {self.best_epoch}, best model saved as best.pt.\n"
                        f"To update EarlyStopping(patience={self.patience}) pass a new patience value, "
                        f"i.e. `python train.py --patience 300` or use `--patience 0` to disable EarlyStopping.")
        return stop


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
