"""Memory layout of CPU training (train.py --memory-format): channels-last (NHWC, oneDNN's native layout) or NCHW.

Channels-last training is a CPU eager path. It needs every batch norm to be ``models.common.BatchNorm2d`` (PyTorch's
own NHWC batch norm loses precision on its statistics; timm backbones keep theirs), and strided 1x1 convolutions with
under 16 input channels stay NCHW because oneDNN's NHWC weight gradient of such a convolution corrupts memory in
torch 2.14.1, which only the convolutions that read the (NCHW) image can.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from models.common import BatchNorm2d
from utils.general import LOGGER, UserInputError, colorstr

MEMORY_FORMATS = ("auto", "channels-last", "nchw")
AUTO_CHANNELS_LAST = False  # what --memory-format auto picks where channels-last is possible (see the README)


def _kept_nchw(m: nn.Module) -> bool:
    """A convolution oneDNN must not run NHWC in training (strided 1x1, under 16 input channels)."""
    return isinstance(m, nn.Conv2d) and m.in_channels < 16 and m.kernel_size == (1, 1) and m.stride != (1, 1)


def channels_last_blocker(model: nn.Module, device: torch.device, compile_model: bool, distributed: bool) -> str:
    """Why ``model`` cannot train channels-last here ('' when it can)."""
    if device.type != "cpu":
        return f"it is a CPU training path (device is {device.type})"
    if distributed:
        return "it is not supported with DDP"
    if compile_model:
        return "--compile trains NCHW"
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not all(isinstance(m, BatchNorm2d) for m in norms):
        return "the model has batch norms other than models.common.BatchNorm2d (e.g. a timm backbone)"
    first_layer, image_channels = set(model.model[0].modules()), model.yaml["ch"]
    if any(_kept_nchw(m) and (m not in first_layer or m.in_channels != image_channels) for m in model.modules()):
        return "the model has a strided 1x1 convolution of under 16 input channels past its input layer"
    return ""


def channels_last_training(model: nn.Module, device: torch.device, compile_model: bool = False,
                           memory_format: str = "auto", distributed: bool = False) -> bool:
    """Apply --memory-format: store the convolution weights channels-last in place where chosen and possible;
    returns whether it did. 'auto' is the CPU default (the README's speed section gives the choice and its reason),
    'nchw' never converts, 'channels-last' converts or stops with the reason it cannot."""
    if memory_format not in MEMORY_FORMATS:
        raise UserInputError(f"--memory-format {memory_format}: expected one of {', '.join(MEMORY_FORMATS)}")
    if memory_format == "nchw" or (memory_format == "auto" and not AUTO_CHANNELS_LAST):
        return False
    reason = channels_last_blocker(model, device, compile_model, distributed)
    if reason:
        if memory_format == "channels-last":
            raise UserInputError(f"--memory-format channels-last: not possible for this run: {reason}")
        return False
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and not _kept_nchw(m):
            m.to(memory_format=torch.channels_last)
    LOGGER.info(f"{colorstr('memory format: ')}channels-last training (NHWC)")
    return True
