"""Convolution followed by BatchNorm, folded into one convolution when the statistics are fixed.

With fixed statistics (a FrozenBatchNorm2d, or a BatchNorm2d in eval mode) the normalisation is
an affine map per channel, so ``bn(conv(x))`` equals a single convolution with scaled weights and
a bias: one pass over the activations instead of two, forward and backward. The scaling is part
of the autograd graph, so in training the gradients reach the convolution's weight (and a
BatchNorm2d's affine parameters) as they would without folding. The module structure and state
dict are unchanged; a BatchNorm2d in training mode (batch statistics) never folds.
"""
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from network_files.ops import fast_path

from .frozen_bn import FrozenBatchNorm2d

_NORMS = (FrozenBatchNorm2d, nn.BatchNorm2d)


def folded_parameters(conv: nn.Conv2d, bn: nn.Module) -> Tuple[Tensor, Tensor]:
    """``(weight, bias)`` of the single convolution equal to ``bn(conv(x))`` with fixed statistics.

    Computed on every call (a per-channel scale of the weights, cheap next to the convolution),
    so changed weights are always honoured; in training the scaled copy lives until the backward
    pass (ResNet-50 layers 2-4: about 90 MB). On the CPU no second copy of the weights is kept
    in inference; where the CUDA levers apply, :func:`cached_folded_parameters` keeps one per
    convolution whose parameters get no gradient (a kernel launch saved beats the memory there).
    """
    gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_var)
    scale = gamma * torch.rsqrt(bn.running_var + bn.eps)
    conv_bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
    weight = conv.weight * scale.reshape(-1, 1, 1, 1)
    bias = (conv_bias - bn.running_mean) * scale + beta
    return weight, bias


def can_fold(bn: nn.Module, device: torch.device) -> bool:
    """Folding is exact only with fixed statistics (not batch statistics). In mixed-precision
    training only where the CUDA levers apply (``fast_path.cuda_levers``): there the folded
    convolution returns autocast-dtype activations instead of the float32 ones of the unfolded
    BatchNorm (the point: the backbone stays in bf16/fp16); elsewhere training keeps the float32."""
    if getattr(bn, "running_var", None) is None:  # GroupNorm (--norm gn), BatchNorm without statistics
        return False
    fixed_statistics = isinstance(bn, FrozenBatchNorm2d) or (not bn.training and bn.running_var is not None)
    mixed_training = torch.is_grad_enabled() and torch.is_autocast_enabled(device.type)
    return fast_path.enabled() and fixed_statistics and (not mixed_training or fast_path.cuda_levers(device))


def _fixed_parameters(conv: nn.Conv2d, bn: nn.Module) -> bool:
    """Whether no gradient reaches the folded parameters in this call (a frozen stage, or no
    autograd), so a folded copy made earlier from the same tensor versions is still right."""
    tensors = [t for t in (conv.weight, conv.bias, bn.weight, bn.bias) if t is not None]
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def cached_folded_parameters(conv: nn.Conv2d, bn: nn.Module, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """:func:`folded_parameters` with the weight in ``dtype`` (the autocast dtype: no cast per
    call), kept on ``bn`` until a tensor it was made from is replaced or changed in place (the
    tensors' version counters: an optimiser step, ``load_state_dict``). For parameters that get
    no gradient (see :func:`_fixed_parameters`); the float32 bias is returned as computed."""
    sources = [t for t in (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
               if t is not None]
    if any(torch.is_inference(t) for t in sources):  # no version counter to watch
        weight, bias = folded_parameters(conv, bn)
        return weight.to(dtype), bias
    # Tensor._version (the in-place version counter autograd keeps) has no public accessor; it is the
    # one signal of an in-place change (an optimiser step, load_state_dict's copy_).
    # tests/test_cuda_levers.py::test_torch_still_counts_tensor_versions fails if torch drops it.
    key = (dtype, tuple((t.data_ptr(), t._version) for t in sources))
    cached = bn.__dict__.get("_folded_cache")
    if cached is None or cached[0] != key:
        # Normal tensors even when made in inference mode: a training step may reuse them.
        with torch.inference_mode(False), torch.no_grad():
            weight, bias = folded_parameters(conv, bn)
        cached = (key, weight.to(dtype), bias)
        bn.__dict__["_folded_cache"] = cached  # a plain attribute: not in the state dict
    return cached[1], cached[2]


def conv_bn(x: Tensor, conv: nn.Conv2d, bn: nn.Module) -> Tensor:
    """``bn(conv(x))``, as one folded convolution when :func:`can_fold` allows it.

    x: [N, C_in, H, W] -> [N, C_out, H', W']. Under autocast the convolution runs in the autocast
    dtype without its bias, and the float32 folded bias is added to its output in place (one
    rounding to the output dtype, instead of a bias rounded first). Where the CUDA levers apply,
    folded parameters that get no gradient are cached (:func:`cached_folded_parameters`), except
    under ``torch.compile``.
    """
    if not can_fold(bn, x.device):
        return bn(conv(x))
    autocast = torch.is_autocast_enabled(x.device.type)
    # Under torch.compile (--compile) the folding is part of the graph: no cache keyed on tensor
    # versions, which would break the graph at every convolution.
    if fast_path.cuda_levers(x.device) and _fixed_parameters(conv, bn) and not torch.compiler.is_compiling():
        dtype = torch.get_autocast_dtype(x.device.type) if autocast else conv.weight.dtype
        weight, bias = cached_folded_parameters(conv, bn, dtype)
    else:
        weight, bias = folded_parameters(conv, bn)
    if not autocast:
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    out = F.conv2d(x, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
    return out.add_(bias.reshape(1, -1, 1, 1))


class ConvBNSequential(nn.Sequential):
    """An ``nn.Sequential`` (same state-dict keys) that folds each Conv2d + BatchNorm pair."""

    def forward(self, x: Tensor) -> Tensor:
        layers = list(self)
        i = 0
        while i < len(layers):
            layer = layers[i]
            if isinstance(layer, nn.Conv2d) and i + 1 < len(layers) and isinstance(layers[i + 1], _NORMS):
                x = conv_bn(x, layer, layers[i + 1])
                i += 2
            else:
                x = layer(x)
                i += 1
        return x
