"""Switch for speed-ups that change no algorithm, only the order of the arithmetic.

When enabled (the default), each BatchNorm with fixed statistics is folded into the convolution
before it (``backbone/conv_bn.py``), in inference and in training; on the CPU the backbone runs
on a channels-last batch (oneDNN's faster layout); and in CPU training the 3x3 convolutions of
the RPN head and of the FPN outputs compute their gradients only where the sampled anchors and
RoIs put one (``sparse_grad_conv.py``). Results, losses and gradients equal the reference path
to float rounding (tested). ``reference_mode()`` turns all of it off so the model performs
exactly torchvision's sequence of operations; the strict parity tests use it.
"""
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn

_enabled = True


def enabled() -> bool:
    return _enabled


def set_enabled(flag: bool) -> None:
    global _enabled
    _enabled = bool(flag)


def use_channels_last(batch: Tensor) -> bool:
    """Whether the backbone should see ``batch`` [B, 3, H, W] in channels-last memory order: on
    the CPU, in inference and in training (a training step measured 3-12% faster with every
    registered backbone at 320 px, none slower; MobileNetV2 included)."""
    return _enabled and batch.device.type == "cpu"


def sparse_backward(module: nn.Module, x: Tensor) -> bool:
    """Whether ``module``'s convolution of ``x``, whose output gradient is mostly zero in training
    (the RPN head's, the FPN outputs'), should use
    :func:`network_files.ops.sparse_grad_conv.sparse_grad_conv2d`: CPU training, not traced."""
    return (_enabled and module.training and torch.is_grad_enabled() and x.device.type == "cpu"
            and not torch.jit.is_tracing() and not torch.jit.is_scripting())


@contextmanager
def reference_mode() -> Iterator[None]:
    """Run the block with every fast path off."""
    previous = _enabled
    set_enabled(False)
    try:
        yield
    finally:
        set_enabled(previous)
