"""Image sizes that stay symbolic while the model is traced for ONNX export.

In eager mode a size is a Python int. Under ``torch.jit.trace`` (which the ONNX exporter runs)
shape entries are 0-dim tensors, and Python arithmetic or comparisons on them would freeze the
example image's size into the graph. The few places that compute with sizes ask
:func:`is_tracing` and keep such values as tensor operations, so an exported model accepts
images of any size. Eager results are unchanged.
"""
from typing import Union

import torch
from torch import Tensor

Size = Union[int, Tensor]


def is_tracing() -> bool:
    return torch.jit.is_tracing()


def size_tensor(value: Size, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A size (an int, or a 0-dim tensor while tracing) as a 0-dim tensor of ``dtype``."""
    if isinstance(value, Tensor):
        return value.to(dtype=dtype, device=device)
    return torch.tensor(value, dtype=dtype, device=device)
