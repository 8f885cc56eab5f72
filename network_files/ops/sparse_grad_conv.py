"""A convolution whose backward pass visits only the output positions with a non-zero gradient.

The RPN's losses look at ``rpn_batch_size_per_image`` sampled anchors per image (256 of about
100,000 at 800 px), so the gradient reaching its 3x3 convolution is exactly zero at every other
position, and the FPN's 3x3 output convolutions get gradient only around those anchors and the
sampled RoIs; yet the dense backward pass multiplies every zero, as much work as the forward pass
twice over. Here the forward pass is the usual convolution and the backward pass computes the
same sums without the terms that are exactly zero:

    grad_weight [D, k*k*C] = g[P, D]^T @ patches[P, k*k*C]
    grad_input             = each position's  g[P, D] @ weight[D, k*k*C]  added back onto its patch
    grad_bias   [D]        = g.sum(0)

Shape shorthand: N images, C input channels, D output channels, k x k kernel, H x W input,
Ho x Wo output, P output positions (n, y, x) where any channel of the gradient is non-zero.
When more than ``DENSE_FRACTION`` of the positions are non-zero, the dense backward runs instead.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

DENSE_FRACTION = 0.5  # measured (256 channels, 3x3): the sparse pass is faster below about 60%
CHUNK = 4096


def _taps(positions: Tensor, x_shape: torch.Size, kernel: Tuple[int, int],
          geometry: Tuple[Tuple[int, int], ...]) -> Tuple[Tensor, Tensor]:
    """positions [P, 3] (n, y, x) of the output -> for every tap (ky, kx) of each position, its
    row in x viewed as rows [N * H * W, C] and whether it lies inside x (not in the zero padding):
    two [k*k, P] tensors (taps outside point at a valid row, to be masked)."""
    stride, padding, dilation = geometry
    _, _, h, w = x_shape
    n, y, x = positions.unbind(1)
    ky = torch.arange(kernel[0], device=positions.device) * dilation[0]
    kx = torch.arange(kernel[1], device=positions.device) * dilation[1]
    iy = (y * stride[0] - padding[0])[None, None] + ky[:, None, None]  # [kh, 1, P]
    ix = (x * stride[1] - padding[1])[None, None] + kx[None, :, None]  # [1, kw, P]
    inside = ((iy >= 0) & (iy < h)) & ((ix >= 0) & (ix < w))  # [kh, kw, P]
    rows = (n * h)[None, None] + iy.clamp(0, h - 1)
    rows = rows * w + ix.clamp(0, w - 1)
    taps = kernel[0] * kernel[1]
    return rows.reshape(taps, positions.shape[0]), inside.reshape(taps, positions.shape[0])


class _SparseGradConv2d(torch.autograd.Function):
    """``F.conv2d`` forward; backward through _SparseBackward, or the dense one when the gradient is dense."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Tuple[int, int],
                padding: Tuple[int, int], dilation: Tuple[int, int]) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.geometry = stride, padding, dilation
        return F.conv2d(x, weight, bias, stride, padding, dilation)

    @staticmethod
    @once_differentiable  # the zero terms it skips would matter to a second derivative
    def backward(ctx, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        x, weight = ctx.saved_tensors
        stride, padding, dilation = ctx.geometry
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        positions = grad.ne(0).any(dim=1).nonzero()  # [P, 3]
        if positions.shape[0] > DENSE_FRACTION * grad[:, 0].numel():
            grads = torch.ops.aten.convolution_backward(
                grad, x, weight, [weight.shape[0]] if ctx.has_bias else None, list(stride), list(padding),
                list(dilation), False, [0, 0], 1, [need_x, need_w, need_b and ctx.has_bias])
            return grads[0], grads[1], grads[2], None, None, None
        sparse = _SparseBackward(grad, x, weight, (stride, padding, dilation), (need_x, need_w, need_b and ctx.has_bias))
        sparse.add(positions)
        return (*sparse.result(), None, None, None)


class _SparseBackward:
    """Accumulates (grad_input, grad_weight, grad_bias) from the gradient at some positions,
    ``CHUNK`` positions at a time (the patches of all of them could take hundreds of megabytes)."""

    def __init__(self, grad: Tensor, x: Tensor, weight: Tensor, geometry: Tuple[Tuple[int, int], ...],
                 needs: Tuple[bool, bool, bool]) -> None:
        self.grad, self.x, self.geometry = grad.permute(0, 2, 3, 1), x, geometry  # grad as [N, Ho, Wo, D]
        d, c, kh, kw = self.shape = weight.shape
        self.x_rows = x.permute(0, 2, 3, 1).reshape(-1, c)  # [N*H*W, C], a view when x is channels-last
        self.flat_weight = weight.permute(0, 2, 3, 1).reshape(d, kh * kw * c)  # taps in (ky, kx) order, then C
        self.grad_rows = self.x_rows.new_zeros(self.x_rows.shape) if needs[0] else None
        self.grad_w = weight.new_zeros(self.flat_weight.shape) if needs[1] else None
        self.grad_b = weight.new_zeros(d) if needs[2] else None

    def add(self, positions: Tensor) -> None:
        """Positions whose taps all lie inside x go without masking; the few at the border are masked."""
        taps, inside = _taps(positions, self.x.shape, self.shape[2:], self.geometry)  # [k*k, P]
        interior = inside.all(dim=0)
        for group, masked in ((interior, False), (~interior, True)):
            chunks = zip(positions[group].split(CHUNK), taps[:, group].split(CHUNK, dim=1),
                         inside[:, group].split(CHUNK, dim=1))
            for chunk in chunks:
                self._add_chunk(*chunk, masked=masked)

    def _add_chunk(self, positions: Tensor, taps: Tensor, inside: Tensor, masked: bool) -> None:
        """positions [P, 3], and their taps' rows and inside flags [k*k, P] from _taps."""
        d, c, kh, kw = self.shape
        g = self.grad[positions[:, 0], positions[:, 1], positions[:, 2]]  # [P, D]
        outside = ~inside.t().unsqueeze(-1)  # [P, k*k, 1]: taps in the zero padding
        rows = taps.t().reshape(-1)  # [P*k*k], position-major
        if self.grad_w is not None:
            patches = self.x_rows.index_select(0, rows).reshape(-1, kh * kw, c)  # [P, k*k, C]
            patches = patches.masked_fill(outside, 0) if masked else patches
            self.grad_w.addmm_(g.t(), patches.reshape(-1, kh * kw * c))
        if self.grad_rows is not None:
            contributions = (g @ self.flat_weight).reshape(-1, kh * kw, c)  # [P, k*k, C]
            contributions = contributions.masked_fill(outside, 0) if masked else contributions
            self.grad_rows.index_add_(0, rows, contributions.reshape(-1, c))
        if self.grad_b is not None:
            self.grad_b += g.sum(0)

    def result(self) -> List[Optional[Tensor]]:
        d, c, kh, kw = self.shape
        grad_x = grad_w = None
        if self.grad_rows is not None:
            n, _, h, w = self.x.shape
            layout = torch.channels_last if self.x.is_contiguous(memory_format=torch.channels_last) \
                else torch.contiguous_format
            grad_x = self.grad_rows.reshape(n, h, w, c).permute(0, 3, 1, 2).contiguous(memory_format=layout)
        if self.grad_w is not None:
            grad_w = self.grad_w.reshape(d, kh, kw, c).permute(0, 3, 1, 2).contiguous()
        return [grad_x, grad_w, self.grad_b]


def sparse_grad_conv2d(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """``conv(x)`` [N, C, H, W] -> [N, D, Ho, Wo], with the sparse backward pass above (a plain
    nn.Conv2d without hooks, groups 1, numeric zero padding, float32/float64, no autocast: other
    convolutions are run as usual)."""
    usable = (type(conv) is nn.Conv2d and not conv._forward_hooks and not conv._forward_pre_hooks
              and conv.groups == 1 and not isinstance(conv.padding, str) and conv.padding_mode == "zeros"
              and x.dtype in (torch.float32, torch.float64) and not torch.is_autocast_enabled(x.device.type))
    if not usable:
        return conv(x)
    return _SparseGradConv2d.apply(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation)
