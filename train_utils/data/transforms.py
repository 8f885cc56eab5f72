"""Joint image/target transforms for detection: ``t(image, target) -> (image, target)``.

Images may be PIL images or [C, H, W] tensors; targets follow the dataset format (``boxes``
float32 [N, 4] xyxy pixels plus per-box ``labels``, ``area``, ``iscrowd``). Geometric transforms
move the boxes exactly and return a new target dict (the input dict is not modified). The
deterministic kernels (`hflip`, `zoom_out`, `crop`) are public; the ``Random*`` classes only
draw their parameters from torch's global generator (so ``torch.manual_seed`` and DataLoader
worker seeding apply).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
from PIL import Image as PILImage
from torchvision.ops import box_iou
from torchvision.transforms import functional as F

ImageLike = Union[PILImage.Image, torch.Tensor]
Target = dict[str, torch.Tensor]
Transform = Callable[[ImageLike, Target], tuple[ImageLike, Target]]

PER_BOX_KEYS = ("boxes", "labels", "area", "iscrowd")  # entries indexed by box
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # zoom-out canvas colour, in [0, 1]
AUGMENT_POLICIES = ("none", "hflip", "photometric", "full")


def image_size(image: ImageLike) -> tuple[int, int]:
    """(height, width) of a PIL image or a [..., H, W] tensor."""
    _, height, width = F.get_dimensions(image)
    return height, width


def _box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Area of xyxy boxes [N, 4] -> [N]."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def hflip(image: ImageLike, target: Target) -> tuple[ImageLike, Target]:
    """Mirror left-right: x -> width - x, so [x1, x2] becomes [width - x2, width - x1]."""
    width = image_size(image)[1]
    target = dict(target)
    if "boxes" in target:
        boxes = target["boxes"]
        target["boxes"] = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
    return F.hflip(image), target


def zoom_out(
    image: ImageLike, target: Target, canvas_width: int, canvas_height: int, left: int, top: int,
    fill: Sequence[float] = IMAGENET_MEAN,
) -> tuple[ImageLike, Target]:
    """Paste the image at (left, top) on a canvas of colour ``fill`` (in [0, 1]); boxes shift with it."""
    height, width = image_size(image)
    if not (0 <= left <= canvas_width - width and 0 <= top <= canvas_height - height):
        raise ValueError(f"zoom_out: a {width}x{height} image does not fit at ({left}, {top}) "
                         f"in a {canvas_width}x{canvas_height} canvas")
    if isinstance(image, PILImage.Image):
        colour = tuple(round(255 * value) for value in fill)
        canvas = PILImage.new(image.mode, (canvas_width, canvas_height), colour)
        canvas.paste(image, (left, top))
    else:
        scale = 1.0 if image.is_floating_point() else 255.0
        values = torch.tensor(fill, dtype=torch.float64) * scale
        if not image.is_floating_point():
            values = values.round()
        canvas = values.to(image.dtype).view(-1, 1, 1).expand(image.shape[-3], canvas_height, canvas_width).clone()
        canvas[:, top:top + height, left:left + width] = image
    target = dict(target)
    if "boxes" in target:
        target["boxes"] = target["boxes"] + torch.tensor([left, top, left, top], dtype=target["boxes"].dtype)
    return canvas, target


def crop(image: ImageLike, target: Target, left: int, top: int, width: int, height: int) -> tuple[ImageLike, Target]:
    """Cut the window [left, left + width) x [top, top + height).

    Boxes whose centre lies strictly inside the window are kept, shifted and clipped to it; the
    others are removed with their per-box entries. ``area`` is recomputed from the clipped boxes.
    """
    target = dict(target)
    if "boxes" in target:
        boxes = target["boxes"]
        cx = (boxes[:, 0] + boxes[:, 2]) / 2
        cy = (boxes[:, 1] + boxes[:, 3]) / 2
        keep = (cx > left) & (cx < left + width) & (cy > top) & (cy < top + height)
        for key in PER_BOX_KEYS:
            if key in target:
                target[key] = target[key][keep]
        shifted = target["boxes"] - torch.tensor([left, top, left, top], dtype=boxes.dtype)
        shifted[:, 0::2] = shifted[:, 0::2].clamp(0, width)
        shifted[:, 1::2] = shifted[:, 1::2].clamp(0, height)
        target["boxes"] = shifted
        if "area" in target:
            target["area"] = _box_area(shifted).to(target["area"].dtype)
    return F.crop(image, top, left, height, width), target


def _uniform(low: float, high: float) -> float:
    """One draw from U(low, high) using torch's global generator."""
    return low + (high - low) * torch.rand(()).item()


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: ImageLike, target: Target) -> tuple[ImageLike, Target]:
        for transform in self.transforms:
            image, target = transform(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"Compose({', '.join(repr(t) for t in self.transforms)})"


class ToTensor:
    """PIL image -> float32 [3, H, W] tensor in [0, 1]; the target is unchanged."""

    def __call__(self, image: ImageLike, target: Target) -> tuple[torch.Tensor, Target]:
        return F.to_tensor(image), target

    def __repr__(self) -> str:
        return "ToTensor()"


class RandomHorizontalFlip:
    """Flip image and boxes left-right with probability ``prob``."""

    def __init__(self, prob: float = 0.5) -> None:
        self.prob = prob

    def __call__(self, image: ImageLike, target: Target) -> tuple[ImageLike, Target]:
        if torch.rand(()).item() < self.prob:
            return hflip(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(prob={self.prob})"


class RandomPhotometricDistort:
    """SSD colour distortion: each of brightness, contrast, saturation and hue is applied with
    probability ``p`` with a factor drawn uniformly from its range; contrast goes first or last
    with equal chance. Boxes are untouched. (No channel shuffling: colour is a class cue.)
    """

    def __init__(
        self,
        brightness: tuple[float, float] = (0.875, 1.125),
        contrast: tuple[float, float] = (0.5, 1.5),
        saturation: tuple[float, float] = (0.5, 1.5),
        hue: tuple[float, float] = (-0.05, 0.05),
        p: float = 0.5,
    ) -> None:
        self.brightness, self.contrast, self.saturation, self.hue, self.p = brightness, contrast, saturation, hue, p

    def _maybe(self, value_range: tuple[float, float]) -> Optional[float]:
        return _uniform(*value_range) if torch.rand(()).item() < self.p else None

    def __call__(self, image: ImageLike, target: Target) -> tuple[ImageLike, Target]:
        brightness, contrast = self._maybe(self.brightness), self._maybe(self.contrast)
        saturation, hue = self._maybe(self.saturation), self._maybe(self.hue)
        contrast_first = torch.rand(()).item() < 0.5
        if brightness is not None:
            image = F.adjust_brightness(image, brightness)
        if contrast is not None and contrast_first:
            image = F.adjust_contrast(image, contrast)
        if saturation is not None:
            image = F.adjust_saturation(image, saturation)
        if hue is not None:
            image = F.adjust_hue(image, hue)
        if contrast is not None and not contrast_first:
            image = F.adjust_contrast(image, contrast)
        return image, target

    def __repr__(self) -> str:
        return (f"RandomPhotometricDistort(brightness={self.brightness}, contrast={self.contrast}, "
                f"saturation={self.saturation}, hue={self.hue}, p={self.p})")


class RandomZoomOut:
    """With probability ``p`` place the image on a canvas ``r`` times larger per side,
    ``r ~ U(side_range)``, at a uniformly random position (objects become smaller)."""

    def __init__(self, fill: Sequence[float] = IMAGENET_MEAN, side_range: tuple[float, float] = (1.0, 4.0),
                 p: float = 0.5) -> None:
        if not 1.0 <= side_range[0] <= side_range[1]:
            raise ValueError(f"RandomZoomOut: side_range must satisfy 1 <= low <= high, got {side_range}")
        self.fill, self.side_range, self.p = tuple(fill), tuple(side_range), p

    def __call__(self, image: ImageLike, target: Target) -> tuple[ImageLike, Target]:
        if torch.rand(()).item() >= self.p:
            return image, target
        height, width = image_size(image)
        ratio = _uniform(*self.side_range)
        canvas_width, canvas_height = int(width * ratio), int(height * ratio)
        left = int((canvas_width - width) * torch.rand(()).item())
        top = int((canvas_height - height) * torch.rand(()).item())
        return zoom_out(image, target, canvas_width, canvas_height, left, top, self.fill)

    def __repr__(self) -> str:
        return f"RandomZoomOut(fill={self.fill}, side_range={self.side_range}, p={self.p})"


class RandomIoUCrop:
    """SSD crop: draw a minimum IoU from ``sampler_options`` (a value >= 1 means no crop), then up
    to ``trials`` windows of scale U(min_scale, max_scale) per side and aspect ratio within
    [min_aspect_ratio, max_aspect_ratio]; accept the first window containing some box centre and
    overlapping a kept box with IoU >= the drawn minimum. Images without boxes are left as is.
    """

    def __init__(
        self,
        min_scale: float = 0.3,
        max_scale: float = 1.0,
        min_aspect_ratio: float = 0.5,
        max_aspect_ratio: float = 2.0,
        sampler_options: Sequence[float] = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0),
        trials: int = 40,
        max_rounds: int = 100,
    ) -> None:
        self.min_scale, self.max_scale = min_scale, max_scale
        self.min_aspect_ratio, self.max_aspect_ratio = min_aspect_ratio, max_aspect_ratio
        self.options = tuple(sampler_options)
        self.trials = trials
        self.max_rounds = max_rounds  # bounds the search when no option means "leave as is"

    def sample_window(self, boxes: torch.Tensor, height: int, width: int) -> Optional[tuple[int, int, int, int]]:
        """(left, top, width, height) of an accepted window, or None to keep the whole image."""
        if boxes.numel() == 0:
            return None
        for _ in range(self.max_rounds):
            min_iou = self.options[int(torch.randint(len(self.options), ()).item())]
            if min_iou >= 1.0:
                return None
            for _ in range(self.trials):
                new_w = int(width * _uniform(self.min_scale, self.max_scale))
                new_h = int(height * _uniform(self.min_scale, self.max_scale))
                if new_w == 0 or new_h == 0 or not self.min_aspect_ratio <= new_w / new_h <= self.max_aspect_ratio:
                    continue
                left = int((width - new_w) * torch.rand(()).item())
                top = int((height - new_h) * torch.rand(()).item())
                cx = (boxes[:, 0] + boxes[:, 2]) / 2
                cy = (boxes[:, 1] + boxes[:, 3]) / 2
                inside = (cx > left) & (cx < left + new_w) & (cy > top) & (cy < top + new_h)
                if not inside.any():
                    continue
                window = torch.tensor([[left, top, left + new_w, top + new_h]], dtype=boxes.dtype)
                if box_iou(boxes[inside], window).max() >= min_iou:
                    return left, top, new_w, new_h
        return None

    def __call__(self, image: ImageLike, target: Target) -> tuple[ImageLike, Target]:
        height, width = image_size(image)
        window = self.sample_window(target["boxes"], height, width)
        if window is None:
            return image, target
        return crop(image, target, *window)

    def __repr__(self) -> str:
        return (f"RandomIoUCrop(min_scale={self.min_scale}, max_scale={self.max_scale}, "
                f"aspect_ratio=({self.min_aspect_ratio}, {self.max_aspect_ratio}), options={self.options}, "
                f"trials={self.trials})")


def get_transforms(train: bool, augment: str = "hflip") -> Compose:
    """Transforms for a dataset split. Evaluation always gets ToTensor only; training policies:

    - ``none``: ToTensor
    - ``hflip``: ToTensor, RandomHorizontalFlip(0.5)  (WZ's default)
    - ``photometric``: RandomPhotometricDistort, ToTensor, RandomHorizontalFlip(0.5)
    - ``full``: RandomPhotometricDistort, RandomZoomOut, RandomIoUCrop, RandomHorizontalFlip(0.5), ToTensor
    """
    if augment not in AUGMENT_POLICIES:
        raise ValueError(f"unknown augmentation policy {augment!r}; choose one of {AUGMENT_POLICIES}")
    if not train or augment == "none":
        return Compose([ToTensor()])
    if augment == "hflip":
        return Compose([ToTensor(), RandomHorizontalFlip(0.5)])
    if augment == "photometric":
        return Compose([RandomPhotometricDistort(), ToTensor(), RandomHorizontalFlip(0.5)])
    return Compose([RandomPhotometricDistort(), RandomZoomOut(), RandomIoUCrop(), RandomHorizontalFlip(0.5),
                    ToTensor()])
