"""Devices: choosing one from a flag, moving batches onto it, mixed precision and TF32 on it."""
import argparse
from contextlib import contextmanager, nullcontext
from typing import Dict, Iterator, Optional, Sequence

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


# cuDNN's benchmark mode times every convolution algorithm once per input shape and keeps the
# fastest. Padded batches come in few shapes (multiples of 32, one short side per training size),
# so the timing pays for itself unless multi-scale training multiplies them.
MAX_BENCHMARK_SIZES = 3


def cudnn_benchmark_wanted(device: torch.device, min_sizes: Sequence[int], deterministic: bool) -> bool:
    """Whether a training run turns ``torch.backends.cudnn.benchmark`` on: on CUDA, without
    --deterministic, and with at most MAX_BENCHMARK_SIZES training sizes (--min-size values)."""
    return device.type == "cuda" and not deterministic and len(set(min_sizes)) <= MAX_BENCHMARK_SIZES


# TF32 (TensorFloat-32, Ampere and later GPUs): float32 convolutions and matmuls computed with
# 10-bit mantissas. PyTorch's defaults: cuDNN convolutions in TF32, matmuls in full float32.
# The project's policy: training keeps those defaults (--tf32 on/off changes them), evaluation
# runs in full float32 unless asked (exact scores, the CPU's ranking of near-tied detections).
# Only the legacy ``allow_tf32`` switches are used: they work on torch 2.11..2.14 without a
# deprecation warning, and torch refuses to read them once the newer ``fp32_precision``
# settings have been mixed in.
TF32_CHOICES = {"torch": None, "on": True, "off": False}  # training's --tf32; torch: as PyTorch sets it
TF32_EVAL_HELP = ("evaluate with TF32 convolutions and matmuls on Ampere or later GPUs (faster; "
                  "scores move slightly and near-tied detections may swap); "
                  "default: full float32, repeatable and matching the CPU's")


def tf32_flags() -> Dict[str, bool]:
    """The two TF32 switches as they stand: cuDNN (convolutions) and cuBLAS (matmuls)."""
    return {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32}


@contextmanager
def tf32_mode(enabled: Optional[bool]) -> Iterator[None]:
    """TF32 convolutions and matmuls on (True) or off (False) inside the block, the flags as they
    are for None; the previous flags come back on exit (also on an error)."""
    if enabled is None:
        yield
        return
    saved = tf32_flags()
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved["cudnn"]
        torch.backends.cuda.matmul.allow_tf32 = saved["matmul"]


def add_tf32_flag(parser: argparse.ArgumentParser, flag: str = "--tf32") -> None:
    """The evaluation TF32 switch (``--tf32`` of validation.py / predict.py, ``--eval-tf32`` of training)."""
    parser.add_argument(flag, action="store_true", help=TF32_EVAL_HELP)
