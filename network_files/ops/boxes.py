"""Box helpers on ``[N, 4]`` tensors in ``(x1, y1, x2, y2)`` pixel format.

The quadratic kernels (IoU matrix, NMS) are torchvision's compiled ops; the rest is plain
tensor arithmetic.
"""
from typing import Tuple

import torch
from torch import Tensor
from torchvision.ops import batched_nms, box_iou, nms

from .tracing import Size

__all__ = ["box_iou", "batched_nms", "nms", "clip_boxes_to_image", "remove_small_boxes", "small_box_mask"]


def clip_boxes_to_image(boxes: Tensor, size: Tuple[Size, Size]) -> Tensor:
    """Clamp boxes ``[..., 4]`` into an image of ``size = (height, width)`` (ints, or 0-dim
    tensors while tracing)."""
    height, width = size
    if isinstance(width, Tensor):
        xs = boxes[..., 0::2].clamp(min=0).minimum(width.to(boxes.dtype))
        ys = boxes[..., 1::2].clamp(min=0).minimum(height.to(boxes.dtype))
    else:
        xs = boxes[..., 0::2].clamp(min=0, max=width)
        ys = boxes[..., 1::2].clamp(min=0, max=height)
    return torch.stack((xs, ys), dim=-1).reshape(boxes.shape)


def small_box_mask(boxes: Tensor, min_size: float) -> Tensor:
    """Mask ``[...]`` of the boxes ``[..., 4]`` whose width and height are both ``>= min_size``."""
    widths = boxes[..., 2] - boxes[..., 0]
    heights = boxes[..., 3] - boxes[..., 1]
    return (widths >= min_size) & (heights >= min_size)


def remove_small_boxes(boxes: Tensor, min_size: float) -> Tensor:
    """Indices of the boxes ``[N, 4]`` whose width and height are both ``>= min_size``."""
    return torch.where(small_box_mask(boxes, min_size))[0]
