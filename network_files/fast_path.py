"""Switch for inference speed-ups that change no algorithm, only the order of the arithmetic.

When enabled (the default), inference without autograd folds each BatchNorm into the
convolution before it (``backbone/conv_bn.py``) and, on the CPU, runs the backbone on a
channels-last batch (oneDNN's faster layout). The results equal the reference path to float
rounding (tested). ``reference_mode()`` turns both off so the model performs exactly
torchvision's sequence of operations; the strict parity tests use it.
"""
from contextlib import contextmanager
from typing import Iterator

_enabled = True


def enabled() -> bool:
    return _enabled


def set_enabled(flag: bool) -> None:
    global _enabled
    _enabled = bool(flag)


@contextmanager
def reference_mode() -> Iterator[None]:
    """Run the block with every fast path off."""
    previous = _enabled
    set_enabled(False)
    try:
        yield
    finally:
        set_enabled(previous)
