"""Mosaic augmentation (as in YOLOv4 / ultralytics): four training images on one square canvas.

It needs other samples, so it lives at the dataset level: :class:`Mosaic` wraps the dataset
(whose own transforms are the per-image elements of the policy) and draws the three other images
and the centre point from torch's global generator, so under
:class:`~train_utils.data.samplers.SeededSamples` a sample is a function of (seed, epoch, index)
in the main process and in DataLoader workers alike.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch.utils.data import Dataset

from train_utils.data.transforms import (DROPPED_KEY, IMAGENET_MEAN, PER_BOX_KEYS, ImageLike, Target, Transform,
                                         blank_canvas, final_transforms, image_size, parse_policy, paste_with_boxes,
                                         resize)

# Quadrant order: top-left, top-right, bottom-left, bottom-right; an image's corner touches the
# centre point, so (left of the centre, above the centre) says where the image lies.
QUADRANTS = ((True, True), (False, True), (True, False), (False, False))


def concat_targets(targets: Sequence[Target]) -> Target:
    """One target of several: per-box entries concatenated, the dropped counts summed, any other
    entry (``image_id``) taken from the first."""
    merged = dict(targets[0])
    for key in PER_BOX_KEYS:
        if key in merged:
            merged[key] = torch.cat([t[key] for t in targets])
    merged[DROPPED_KEY] = sum((torch.as_tensor(t.get(DROPPED_KEY, 0), dtype=torch.int64) for t in targets),
                              torch.tensor(0, dtype=torch.int64))
    return merged


def mosaic(samples: Sequence[tuple[ImageLike, Target]], size: int, centre: tuple[int, int],
           fill: Sequence[float] = IMAGENET_MEAN, min_side: float = 1.0) -> tuple[ImageLike, Target]:
    """Four (image, target) pairs on a ``size`` x ``size`` canvas of colour ``fill``, in the
    quadrants around ``centre`` (x, y) in QUADRANTS order. Each image is resized so its longer
    side is ``size`` and placed with a corner at the centre; what reaches past the canvas is cut.
    Boxes are clipped to the visible part; those under ``min_side`` pixels are dropped and counted.
    """
    if len(samples) != 4:
        raise ValueError(f"mosaic: needs 4 images, got {len(samples)}")
    cx, cy = centre
    canvas = blank_canvas(samples[0][0], size, size, fill)
    placed = []
    for (image, target), (left_of, above) in zip(samples, QUADRANTS):
        height, width = image_size(image)
        scale = size / max(height, width)
        image, target = resize(image, target, max(1, round(height * scale)), max(1, round(width * scale)))
        height, width = image_size(image)
        left, top = (cx - width if left_of else cx), (cy - height if above else cy)
        canvas, target = paste_with_boxes(canvas, image, target, left, top, min_side)
        placed.append(target)
    return canvas, concat_targets(placed)


class Mosaic(Dataset):
    """``dataset`` with every item made a mosaic: item ``index`` and three images drawn uniformly
    from the dataset, in a random quadrant order, around a centre drawn uniformly in the middle
    half of a ``size`` x ``size`` canvas; ``after`` (ToTensor, flip...) is applied to the result.
    The target's ``image_id`` is item ``index``'s."""

    def __init__(self, dataset: Dataset, size: int, after: Transform, fill: Sequence[float] = IMAGENET_MEAN) -> None:
        if size < 1:
            raise ValueError(f"Mosaic: size must be >= 1, got {size}")
        self.dataset, self.size, self.after, self.fill = dataset, size, after, tuple(fill)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[ImageLike, Target]:
        low, high = self.size // 4, self.size - self.size // 4
        centre = (int(torch.randint(low, high + 1, ()).item()), int(torch.randint(low, high + 1, ()).item()))
        indices = [index] + torch.randint(len(self.dataset), (3,)).tolist()
        slots = torch.randperm(4).tolist()  # slots[k]: the quadrant of indices[k]
        samples: list = [None] * 4
        for slot, item in zip(slots, indices):
            samples[slot] = self.dataset[item]
        image, target = mosaic(samples, self.size, centre, self.fill)
        target["image_id"] = samples[slots[0]][1]["image_id"]
        return self.after(image, target)

    def get_height_and_width(self, idx: int) -> tuple[int, int]:
        """Every mosaic is ``size`` x ``size``."""
        return self.size, self.size


def policy_dataset(dataset: Dataset, augment: str, size: Optional[int]) -> Dataset:
    """What training reads: ``dataset`` itself (built with ``get_transforms(True, augment, size)``),
    or its :class:`Mosaic` when the policy has ``mosaic``."""
    if "mosaic" not in parse_policy(augment):
        return dataset
    if size is None:
        raise ValueError("augmentation element 'mosaic' needs the training size")
    return Mosaic(dataset, size, final_transforms(augment))
