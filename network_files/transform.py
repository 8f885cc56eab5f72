"""Turns a list of images (and targets) into one normalised, resized, padded batch, and back."""
import math
import struct
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .det_utils import ConstantCache, device_constant
from .image_list import ImageList
from .ops.tracing import Size, is_tracing, size_tensor


def resize_boxes(boxes: Tensor, original_size: Sequence[Size], new_size: Sequence[Size]) -> Tensor:
    """Scale boxes ``[N, 4]`` from an image of ``original_size (h, w)`` to one of ``new_size``.
    The ratios are float32 quotients; in eager mode they are Python numbers (no tensor copied to
    the device per call), exactly the float32 values, so float32 and float64 boxes scale the same."""
    if is_tracing():
        ratio_h, ratio_w = (
            size_tensor(new, torch.float32, boxes.device) / size_tensor(old, torch.float32, boxes.device)
            for new, old in zip(new_size, original_size)
        )
    else:
        ratio_h, ratio_w = (_float32_ratio(new, old) for new, old in zip(new_size, original_size))
    x1, y1, x2, y2 = boxes.unbind(1)
    return torch.stack((x1 * ratio_w, y1 * ratio_h, x2 * ratio_w, y2 * ratio_h), dim=1)


def _float32_ratio(new: int, old: int) -> float:
    """``float32(new) / float32(old)`` rounded to float32, for sizes below 2**24 (exact in float32).
    The float64 quotient rounded to float32 is that value: double rounding is innocuous for a
    division when float64 has at least 2 * 24 + 2 bits of precision."""
    return struct.unpack("f", struct.pack("f", new / old))[0]


class GeneralizedRCNNTransform(nn.Module):
    """Normalise, resize (shorter side to ``min_size``, longer side at most ``max_size``) and batch.

    Args:
        min_size: target shorter side; a sequence picks one at random per image in training
            (multi-scale training), and the last one in evaluation.
        max_size: upper bound on the longer side.
        image_mean, image_std: per-channel normalisation.
        size_divisible: the batch is padded to a multiple of this (the backbone's largest stride).
        fixed_size: ``(width, height)`` to resize every image to, ignoring the aspect ratio.
    """

    def __init__(
        self,
        min_size: Union[int, Sequence[int]],
        max_size: int,
        image_mean: Sequence[float],
        image_std: Sequence[float],
        size_divisible: int = 32,
        fixed_size: Optional[Tuple[int, int]] = None,
    ) -> None:
        super().__init__()
        self.min_size = tuple(min_size) if isinstance(min_size, (list, tuple)) else (min_size,)
        self.max_size = max_size
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.size_divisible = size_divisible
        self.fixed_size = fixed_size
        self._constants: ConstantCache = {}

    def forward(
        self, images: List[Tensor], targets: Optional[List[Dict[str, Tensor]]] = None
    ) -> Tuple[ImageList, Optional[List[Dict[str, Tensor]]]]:
        """``images``: list of ``[C, H_i, W_i]`` float tensors in [0, 1]. Targets are shallow-copied
        so the caller's dicts are never modified."""
        if targets is not None:
            targets = [dict(t) for t in targets]
        resized = []
        for index, image in enumerate(images):
            if image.dim() != 3:
                raise ValueError(f"image {index}: expected a [C, H, W] tensor, got shape {tuple(image.shape)}")
            image = self.normalize(image)
            target = targets[index] if targets is not None else None
            image, target = self.resize(image, target)
            resized.append(image)
            if targets is not None:
                targets[index] = target
        # Python ints in eager mode; traced sizes while exporting.
        image_sizes = [(img.shape[-2], img.shape[-1]) for img in resized]
        return ImageList(self.batch_images(resized, self.size_divisible), image_sizes), targets

    def normalize(self, image: Tensor) -> Tensor:
        if not image.is_floating_point():
            raise TypeError(
                f"images must be float tensors scaled to [0, 1], got dtype {image.dtype} "
                "(convert with image.float() / 255 or train_utils.data.transforms.ToTensor)"
            )
        mean = device_constant(self._constants, self.image_mean, image.dtype, image.device)
        std = device_constant(self._constants, self.image_std, image.dtype, image.device)
        return (image - mean[:, None, None]) / std[:, None, None]

    def random_min_size(self) -> int:
        """Uniform choice among ``min_size`` using torch's generator (seedable, like the samplers)."""
        index = int(torch.empty(1).uniform_(0.0, float(len(self.min_size))).item())
        return self.min_size[index]

    def resize(self, image: Tensor, target: Optional[Dict[str, Tensor]]) -> Tuple[Tensor, Optional[Dict[str, Tensor]]]:
        """Bilinear resize of ``image [C, H, W]``; the target's boxes follow."""
        height, width = image.shape[-2:]
        shorter = self.random_min_size() if self.training else self.min_size[-1]
        if self.fixed_size is not None:
            out = F.interpolate(
                image[None], size=[self.fixed_size[1], self.fixed_size[0]], mode="bilinear", align_corners=False
            )
        elif is_tracing():
            out = F.interpolate(
                image[None], size=self._traced_output_size(height, width, shorter), mode="bilinear", align_corners=False
            )
        else:
            scale = min(shorter / min(height, width), self.max_size / max(height, width))
            out_h, out_w = math.floor(height * scale), math.floor(width * scale)  # as interpolate computes them
            if out_h >= 1 and out_w >= 1:
                out = F.interpolate(
                    image[None], scale_factor=scale, mode="bilinear", recompute_scale_factor=True, align_corners=False
                )
            else:  # so elongated that a side would vanish (torchvision fails here): keep one pixel
                out = F.interpolate(image[None], size=[max(1, out_h), max(1, out_w)], mode="bilinear", align_corners=False)
        image = out[0]
        if target is not None:
            target["boxes"] = resize_boxes(target["boxes"], (height, width), image.shape[-2:])
        return image, target

    def _traced_output_size(self, height: Tensor, width: Tensor, shorter: int) -> List[Tensor]:
        """The eager resize's output size as tensor operations: ``floor(side * scale)`` in float64,
        the arithmetic ``F.interpolate`` does with a Python float scale, and at least 1."""
        sides = torch.stack((height, width)).to(torch.float64)
        # Tensor / tensor: a Python number over a tensor would be exported in float32.
        limits = torch.tensor([shorter, self.max_size], dtype=torch.float64, device=sides.device)
        scale = (limits / torch.stack((sides.min(), sides.max()))).min()
        out_h, out_w = torch.floor(sides * scale).clamp(min=1).to(torch.int64).unbind(0)
        return [out_h, out_w]

    @staticmethod
    def batch_images(images: List[Tensor], size_divisible: int = 32) -> Tensor:
        """Zero-pad images to a common ``[B, C, H, W]`` with H and W multiples of ``size_divisible``."""
        if is_tracing():
            return GeneralizedRCNNTransform._traced_batch_images(images, size_divisible)
        channels = max(img.shape[0] for img in images)
        height = int(math.ceil(max(img.shape[1] for img in images) / size_divisible) * size_divisible)
        width = int(math.ceil(max(img.shape[2] for img in images) / size_divisible) * size_divisible)
        batch = images[0].new_zeros((len(images), channels, height, width))
        for slot, img in zip(batch, images):
            slot[: img.shape[0], : img.shape[1], : img.shape[2]].copy_(img)
        return batch

    @staticmethod
    def _traced_batch_images(images: List[Tensor], size_divisible: int) -> Tensor:
        """:meth:`batch_images` with the padded size computed by tensor operations."""
        shapes = torch.stack([torch.stack(list(img.shape)) for img in images])
        largest = shapes.max(dim=0).values
        spatial = torch.ceil(largest[1:].to(torch.float32) / size_divisible).to(torch.int64) * size_divisible
        padded = [
            F.pad(img, (0, spatial[1] - img.shape[2], 0, spatial[0] - img.shape[1], 0, largest[0] - img.shape[0]))
            for img in images
        ]
        return torch.stack(padded)

    def postprocess(
        self,
        detections: List[Dict[str, Tensor]],
        image_shapes: List[Tuple[int, int]],
        original_image_sizes: List[Tuple[int, int]],
    ) -> List[Dict[str, Tensor]]:
        """Map detected boxes back from the resized images to the caller's original sizes."""
        if self.training:
            return detections
        for det, resized_size, original_size in zip(detections, image_shapes, original_image_sizes):
            det["boxes"] = resize_boxes(det["boxes"], resized_size, original_size)
        return detections

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(\n    Normalize(mean={self.image_mean}, std={self.image_std})\n"
            f"    Resize(min_size={self.min_size}, max_size={self.max_size}, mode='bilinear')\n)"
        )
