"""Multi-scale RoI pooling for FPN heads, a drop-in for ``torchvision.ops.MultiScaleRoIAlign``.

Each box is pooled from one pyramid level chosen by its size (Eq. 1 of the FPN paper):
``k = floor(canonical_level + log2(sqrt(area) / canonical_scale) + eps)``, clamped to the
available levels. Level scales are inferred from the feature-map size versus the largest image
size along that image's longer side, rounded to a power of two. All levels are pooled together by
``network_files.ops.roi_align.pyramid_roi_align``; results come back in box order.
``MultiScaleRoIPool`` maps boxes to levels the same way and max-pools them with RoIPool.

Unlike torchvision, scales are recomputed on every call instead of being cached on the first one,
and measured along the longer side instead of the height: for ordinary images the result is the
same, but the height of a very elongated image (resized to a few pixels, then padded to a multiple
of the stride) would give a wrong power of two. The module has no parameters or buffers.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor, nn
from torchvision.ops import roi_pool

from .roi_align import boxes_to_rois, level_members, pyramid_roi_align, pyramid_roi_align_linear

_LEVEL_EPS = 1e-6


def infer_scale(feature: Tensor, image_size: tuple[int, int]) -> float:
    """Feature size / image size along the image's longer side, rounded to a power of two (log2
    rounded in float32). Padding to a multiple of the stride changes that side least.

    feature: Tensor[N, C, H, W]; image_size: (height, width) of the largest image.
    """
    axis = 0 if image_size[0] >= image_size[1] else 1
    ratio = float(feature.shape[2 + axis]) / float(image_size[axis])
    exponent = float(torch.tensor(ratio, dtype=torch.float32).log2().round())
    return 2.0**exponent


def map_levels(
    boxes: list[Tensor], level_min: int, level_max: int, canonical_scale: int, canonical_level: int
) -> Tensor:
    """Pyramid level of every box, counted from level_min.

    boxes: list of Tensor[L_i, 4] (x1, y1, x2, y2). Returns Tensor[sum L_i] int64 in
    [0, level_max - level_min].
    """
    concat = torch.cat(boxes, dim=0)
    size = torch.sqrt((concat[:, 2] - concat[:, 0]) * (concat[:, 3] - concat[:, 1]))
    # A Python float, not a tensor: no host-to-device copy per forward on a GPU (same value).
    level = torch.floor(canonical_level + torch.log2(size / canonical_scale) + _LEVEL_EPS)
    level = level.clamp(min=level_min, max=level_max)
    return level.to(torch.int64) - level_min


class _PyramidPooler(nn.Module):
    """What both poolers share: which maps to pool, the output size, and the box-to-level rule.

    featmap_names: keys of the feature dict to pool from (taken in the dict's order).
    output_size: PH or (PH, PW) bins.
    canonical_scale, canonical_level: a box of side canonical_scale maps to canonical_level.
    """

    def __init__(
        self,
        featmap_names: list[str],
        output_size: Union[int, tuple[int, int], list[int]],
        canonical_scale: int,
        canonical_level: int,
    ):
        super().__init__()
        if isinstance(output_size, int):
            output_size = (output_size, output_size)
        self.featmap_names = list(featmap_names)
        self.output_size = tuple(output_size)
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level

    def select_levels(
        self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> tuple[list[Tensor], list[float], Optional[Tensor]]:
        """(pooled maps finest first, the scale of each, the level of every box or None for one map).

        Levels are Tensor[sum L_i] int64 counted from the finest map.
        """
        name = type(self).__name__
        features = [v for k, v in x.items() if k in self.featmap_names]
        if not features:
            raise ValueError(f"{name}: none of {self.featmap_names} found in features {list(x)}")
        if not image_shapes:
            raise ValueError(f"{name}: image_shapes is empty")
        largest = (max(s[0] for s in image_shapes), max(s[1] for s in image_shapes))
        scales = [infer_scale(f, largest) for f in features]
        if len(features) == 1:
            return features, scales, None
        level_min = int(-math.log2(scales[0]))
        level_max = int(-math.log2(scales[-1]))
        return features, scales, map_levels(boxes, level_min, level_max, self.canonical_scale, self.canonical_level)


class MultiScaleRoIAlign(_PyramidPooler):
    """RoIAlign over the feature maps named in featmap_names, one level per box.

    sampling_ratio: RoIAlign samples per bin and axis; the other arguments as _PyramidPooler.
    """

    def __init__(
        self,
        featmap_names: list[str],
        output_size: Union[int, tuple[int, int], list[int]],
        sampling_ratio: int,
        *,
        canonical_scale: int = 224,
        canonical_level: int = 4,
    ):
        super().__init__(featmap_names, output_size, canonical_scale, canonical_level)
        self.sampling_ratio = sampling_ratio

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        """Pool every box from its level.

        x: feature maps Tensor[N, C, H_l, W_l] by name; boxes: one Tensor[L_i, 4] per image in image
        coordinates; image_shapes: (height, width) of each image before the backbone.
        Returns Tensor[sum L_i, C, PH, PW] in box order, in the dtype of the first pooled level.
        """
        features, scales, levels = self.select_levels(x, boxes, image_shapes)
        rois = boxes_to_rois(boxes)
        return pyramid_roi_align(features, rois, levels, scales, self.output_size, self.sampling_ratio)

    def forward_linear(
        self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]],
        weight: Tensor, bias: Optional[Tensor],
    ) -> Tensor:
        """``F.linear(self(x, boxes, image_shapes).flatten(1), weight, bias)``: Tensor[sum L_i, D].

        In training on the CPU (autograd on, float32, no autocast) the pooled features are fed to
        the linear layer chunk by chunk and never stored, which saves their memory and their
        gradient's; otherwise this is exactly that composition.
        """
        features, scales, levels = self.select_levels(x, boxes, image_shapes)
        rois = boxes_to_rois(boxes)
        return pyramid_roi_align_linear(
            features, rois, levels, scales, self.output_size, self.sampling_ratio, weight, bias
        )

    def extra_repr(self) -> str:
        return (
            f"featmap_names={self.featmap_names}, output_size={self.output_size}, "
            f"sampling_ratio={self.sampling_ratio}"
        )


class MultiScaleRoIPool(_PyramidPooler):
    """RoIPool (max over quantised bins, as in Fast R-CNN) with MultiScaleRoIAlign's level mapping.

    Pooling is ``torchvision.ops.roi_pool`` on each level. No parameters or buffers.
    """

    def __init__(
        self,
        featmap_names: list[str],
        output_size: Union[int, tuple[int, int], list[int]],
        *,
        canonical_scale: int = 224,
        canonical_level: int = 4,
    ):
        super().__init__(featmap_names, output_size, canonical_scale, canonical_level)

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        """x: maps Tensor[N, C, H_l, W_l] by name; boxes: one Tensor[L_i, 4] per image (image
        coordinates); image_shapes: (height, width) per image. Returns Tensor[sum L_i, C, PH, PW]."""
        features, scales, levels = self.select_levels(x, boxes, image_shapes)
        rois = boxes_to_rois(boxes)
        if levels is None:
            return roi_pool(features[0], rois, self.output_size, scales[0])
        first = features[0]
        result = first.new_zeros((rois.shape[0], first.shape[1]) + self.output_size)
        for index, feature, scale in zip(level_members(levels, len(features)), features, scales):
            result[index] = roi_pool(feature, rois[index], self.output_size, scale).to(result.dtype)
        return result

    def extra_repr(self) -> str:
        return f"featmap_names={self.featmap_names}, output_size={self.output_size}"
