"""Switch for speed-ups that change no algorithm, only the order of the arithmetic.

When enabled (the default), each BatchNorm with fixed statistics is folded into the convolution
before it (``backbone/conv_bn.py``), in inference and in training (in mixed-precision training
on CUDA only, see ``cuda_levers``); on the CPU and on CUDA the backbone runs on a channels-last
batch (oneDNN's and the tensor cores' faster layout); and in CPU training the 3x3 convolutions of
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
_cuda_levers_everywhere = False  # force_cuda_levers(): the CUDA-only levers on any device


def enabled() -> bool:
    return _enabled


def set_enabled(flag: bool) -> None:
    global _enabled
    _enabled = bool(flag)


def cuda_levers(device: torch.device) -> bool:
    """Whether the levers meant for GPUs apply on ``device``: BatchNorm folded in mixed-precision
    training (the backbone stays in the autocast dtype) and folded weights of parameters without
    gradient cached (``backbone/conv_bn.py``). On CUDA, or on any device in
    :func:`force_cuda_levers` (the CPU tests)."""
    return _enabled and (device.type == "cuda" or _cuda_levers_everywhere)


def use_channels_last(batch: Tensor) -> bool:
    """Whether the backbone (and so the FPN) should see ``batch`` [B, 3, H, W] in channels-last
    memory order, in inference and in training: on the CPU (oneDNN; a training step measured
    3-12% faster with every registered backbone at 320 px, none slower; MobileNetV2 included)
    and on CUDA (the tensor cores' NHWC layout)."""
    return _enabled and batch.device.type in ("cpu", "cuda")


def sparse_backward(module: nn.Module, x: Tensor) -> bool:
    """Whether ``module``'s convolution of ``x``, whose output gradient is mostly zero in training
    (the RPN head's, the FPN outputs'), should use
    :func:`network_files.ops.sparse_grad_conv.sparse_grad_conv2d`: CPU training, not traced."""
    return (_enabled and module.training and torch.is_grad_enabled() and x.device.type == "cpu"
            and not torch.jit.is_tracing() and not torch.jit.is_scripting())


@contextmanager
def force_cuda_levers() -> Iterator[None]:
    """Run the block with the CUDA-only levers (:func:`cuda_levers`) on every device, so that
    their code paths can be tested on the CPU. ``reference_mode`` still turns them off."""
    global _cuda_levers_everywhere
    previous = _cuda_levers_everywhere
    _cuda_levers_everywhere = True
    try:
        yield
    finally:
        _cuda_levers_everywhere = previous


@contextmanager
def reference_mode() -> Iterator[None]:
    """Run the block with every fast path off."""
    previous = _enabled
    set_enabled(False)
    try:
        yield
    finally:
        set_enabled(previous)
