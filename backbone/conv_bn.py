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

from network_files import fast_path

from .frozen_bn import FrozenBatchNorm2d

_NORMS = (FrozenBatchNorm2d, nn.BatchNorm2d)


def folded_parameters(conv: nn.Conv2d, bn: nn.Module) -> Tuple[Tensor, Tensor]:
    """``(weight, bias)`` of the single convolution equal to ``bn(conv(x))`` with fixed statistics.

    Computed on every call (a per-channel scale of the weights, cheap next to the convolution),
    so changed weights are always honoured; in inference no second copy of the weights is kept,
    in training the scaled copy lives until the backward pass (ResNet-50 layers 2-4: about 90 MB).
    """
    gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_var)
    scale = gamma * torch.rsqrt(bn.running_var + bn.eps)
    conv_bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
    weight = conv.weight * scale.reshape(-1, 1, 1, 1)
    bias = (conv_bias - bn.running_mean) * scale + beta
    return weight, bias


def can_fold(bn: nn.Module) -> bool:
    """Folding is exact only with fixed statistics (not batch statistics). Not in mixed-precision
    training: there the unfolded BatchNorm returns float32 activations, the folded convolution
    would return low-precision ones with a rounded bias."""
    if getattr(bn, "running_var", None) is None:  # GroupNorm (--norm gn), BatchNorm without statistics
        return False
    fixed_statistics = isinstance(bn, FrozenBatchNorm2d) or (not bn.training and bn.running_var is not None)
    mixed_training = torch.is_grad_enabled() and torch.is_autocast_enabled(bn.running_var.device.type)
    return fast_path.enabled() and fixed_statistics and not mixed_training


def conv_bn(x: Tensor, conv: nn.Conv2d, bn: nn.Module) -> Tensor:
    """``bn(conv(x))``, as one folded convolution when :func:`can_fold` allows it."""
    if not can_fold(bn):
        return bn(conv(x))
    weight, bias = folded_parameters(conv, bn)
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


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
