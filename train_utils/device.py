"""Devices: choosing one from a flag, moving batches onto it, mixed precision on it."""
from contextlib import nullcontext
from typing import Dict, Optional, Sequence

import torch


def resolve_device(name: str) -> torch.device:
    """The device a `--device` value names; "auto" is the first GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return device


AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def amp_dtype(device: torch.device, name: Optional[str] = None) -> torch.dtype:
    """The autocast dtype of ``--amp`` (``--amp-dtype`` ``name``): bfloat16 (float32's range, no
    GradScaler) on the CPU and on CUDA GPUs with bf16 tensor cores (compute capability 8.0 on:
    Ampere, Hopper), float16 with a GradScaler on older GPUs; or the dtype named."""
    if name is not None:
        return AMP_DTYPES[name]
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        return torch.float16
    return torch.bfloat16


def autocast_context(device: torch.device, dtype: Optional[torch.dtype]):
    """Autocast to ``dtype`` on ``device``; a no-op for None (full precision)."""
    return nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


def move_to_device(images: Sequence[torch.Tensor], targets: Sequence[Dict], device: torch.device):
    non_blocking = device.type == "cuda"
    images = [img.to(device, non_blocking=non_blocking) for img in images]
    targets = [{k: v.to(device, non_blocking=non_blocking) for k, v in t.items()} for t in targets]
    return images, targets
