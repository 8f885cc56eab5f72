"""``--deterministic``: a training run whose every kernel gives the same bits each time on the
same machine, so that an interrupted and resumed GPU run can be compared with ``torch.equal``.

:func:`make_deterministic` sets:

- ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (an existing value is kept), before CUDA initialises:
  cuBLAS's reductions otherwise depend on how its workspace is split between streams;
- ``torch.use_deterministic_algorithms(True)``: an op with a deterministic implementation uses
  it, one without raises instead of running;
- cuDNN: deterministic algorithms only, no benchmarking (``benchmark`` picks the fastest
  algorithm per shape at run time, which may differ between runs).

The data side already repeats: each image's augmentation is seeded by (--seed, epoch, image)
(``SeededSamples``), the sampler by (--seed, epoch) and the loaders' generator by --seed, for
any number of loader workers. On the CPU every op we call is deterministic anyway.

What the detector calls on CUDA, and how each op behaves in this mode (torch's list under
``use_deterministic_algorithms``). Checked on an H200 with torch 2.11 / torchvision 0.26 on
torchvision's own R50-FPN detector, not this project's (same ops, but our poolers merge the
levels with our own indexing): two 3-step training runs, float32 and float16 AMP, gave equal
weights and no op raised. ``tests/test_cuda.py`` checks resumes of our MobileNetV2 detector
bit for bit.

| op | where | in this mode |
| --- | --- | --- |
| conv2d, its backward | backbones, FPN, RPN head | cuDNN's deterministic algorithms |
| batch_norm, FrozenBatchNorm2d | backbones | deterministic (elementwise, or cuDNN) |
| max_pool2d backward | ResNet stem, FPN's pool level | deterministic (not on torch's list; ran) |
| interpolate ``nearest`` backward | FPN top-down path | deterministic (only the linear modes raise) |
| interpolate ``bilinear`` | image resize in the transform | forward only (no gradient) |
| torchvision ``roi_align`` backward | ``MultiScaleRoIAlign`` | torchvision switches to its PyTorch version, whose backward is deterministic |
| torchvision ``roi_pool`` backward | ``MultiScaleRoIPool`` (``--roi-op pool``, the VGG16 recipe) | none: raises, so refused before training (:func:`check_model`) |
| nms, batched_nms | RPN proposals, detections | forward only, deterministic kernel |
| indexing, gather, index_put (no accumulate), where | matcher, sampler, box coder, pooler level merge | deterministic in this mode |
| randperm | positive/negative sampler | seeded: deterministic |
| cross_entropy, binary_cross_entropy_with_logits, smooth_l1 | losses | deterministic |
| linear, matmul | box head | cuBLAS with the fixed workspace |
"""
import os
import sys

import torch

from train_utils.model.config import ModelConfig

CUBLAS_WORKSPACE = ":4096:8"


def make_deterministic() -> None:
    """Switch this process to deterministic kernels (see the module docstring)."""
    if "CUBLAS_WORKSPACE_CONFIG" not in os.environ and torch.cuda.is_available() and torch.cuda.is_initialized():
        print("warning: --deterministic: CUDA was initialised before CUBLAS_WORKSPACE_CONFIG could be set; set "
              f"CUBLAS_WORKSPACE_CONFIG={CUBLAS_WORKSPACE} in the environment", file=sys.stderr)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def check_model(config: ModelConfig, device: torch.device) -> None:
    """Refuse a model with an op that has no deterministic CUDA implementation (it would raise
    at the first backward pass)."""
    if device.type == "cuda" and config.roi_op == "pool":
        raise ValueError("--deterministic: RoIPool (--roi-op pool) has no deterministic CUDA backward in torchvision; "
                         "use --roi-op align, or train without --deterministic")
