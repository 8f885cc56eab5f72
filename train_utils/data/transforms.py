"""Joint image/target transforms for detection: ``t(image, target) -> (image, target)``.

Images may be PIL images or [C, H, W] tensors; targets follow the dataset format (``boxes``
float32 [N, 4] xyxy pixels plus per-box ``labels``, ``area``, ``iscrowd``). Geometric transforms
move the boxes exactly and return a new target dict (the input dict is not modified). The
deterministic kernels (`hflip`, `zoom_out`, `crop`, `resize`, `place`, `paste_with_boxes`) are
public; the ``Random*`` classes only draw their parameters from torch's global generator (so
``torch.manual_seed`` and DataLoader worker seeding apply).

A training policy (``--augment``) is a comma list of elements and presets, applied in the
canonical order of :data:`AUGMENT_ELEMENTS` whatever order it is typed in. Boxes a transform
removes (cut off, under a pixel, degenerate) are counted in the target under :data:`DROPPED_KEY`
(an int64 0-d tensor the model ignores), so the count travels with the sample out of DataLoader
worker processes.
"""
from __future__ import annotations

import argparse
from typing import Callable, Optional, Sequence, Union

import torch
from PIL import Image as PILImage
from torchvision.ops import box_iou
from torchvision.transforms import functional as F

ImageLike = Union[PILImage.Image, torch.Tensor]
Target = dict[str, torch.Tensor]
Transform = Callable[[ImageLike, Target], tuple[ImageLike, Target]]

# Entries indexed by box. No dataset of this project emits "difficult" (VOC's flag becomes iscrowd);
# a user's own Dataset using these transforms may (torchvision-style VOC targets), and it stays aligned.
PER_BOX_KEYS = ("boxes", "labels", "area", "iscrowd", "difficult")
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # canvas colour of zoom-out, jitter and mosaic, in [0, 1]
DROPPED_KEY = "augment_dropped_boxes"  # target key: boxes the training transforms removed
# The elements of a policy in the order they are applied (mosaic combines 4 images at the dataset
# level, see train_utils/data/mosaic.py: the elements before it apply to each of the 4 images).
AUGMENT_ELEMENTS = ("photometric", "zoomout", "ioucrop", "lsj", "mosaic", "hflip")
AUGMENT_PRESETS = {  # name -> elements; their meaning and random draws never change
    "none": (),
    "hflip": ("hflip",),
    "photometric": ("photometric", "hflip"),
    "full": ("photometric", "zoomout", "ioucrop", "hflip"),
}
AUGMENT_POLICIES = tuple(AUGMENT_PRESETS)  # the named presets
PER_IMAGE_ELEMENTS = AUGMENT_ELEMENTS[:AUGMENT_ELEMENTS.index("mosaic")]  # on each image before a mosaic


def image_size(image: ImageLike) -> tuple[int, int]:
    """(height, width) of a PIL image or a [..., H, W] tensor."""
    _, height, width = F.get_dimensions(image)
    return height, width


def _box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Area of xyxy boxes [N, 4] -> [N]."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def keep_boxes(target: Target, keep: torch.Tensor) -> Target:
    """A new target with the boxes of bool mask ``keep`` [N] (and their per-box entries); the
    removed ones are added to ``target[DROPPED_KEY]``."""
    target = {key: value[keep] if key in PER_BOX_KEYS else value for key, value in target.items()}
    removed = int(keep.numel() - keep.sum())
    target[DROPPED_KEY] = torch.as_tensor(target.get(DROPPED_KEY, 0), dtype=torch.int64) + removed
    return target


def clip_to_window(target: Target, left: float, top: float, window: tuple[int, int, int, int],
                   min_side: float) -> Target:
    """Shift the boxes by (left, top), clip them to ``window`` (x0, y0, x1, y1) and drop (counting
    them) those narrower or lower than ``min_side`` pixels after clipping; ``area`` is recomputed."""
    boxes = target["boxes"] + torch.tensor([left, top, left, top], dtype=target["boxes"].dtype)
    x0, y0, x1, y1 = window
    boxes[:, 0::2] = boxes[:, 0::2].clamp(x0, x1)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(y0, y1)
    target = {**target, "boxes": boxes}
    if "area" in target:
        target["area"] = _box_area(boxes).to(target["area"].dtype)
    keep = (boxes[:, 2] - boxes[:, 0] >= min_side) & (boxes[:, 3] - boxes[:, 1] >= min_side)
    return keep_boxes(target, keep)


def hflip(image: ImageLike, target: Target) -> tuple[ImageLike, Target]:
    """Mirror left-right: x -> width - x, so [x1, x2] becomes [width - x2, width - x1]."""
    width = image_size(image)[1]
    target = dict(target)
    if "boxes" in target:
        boxes = target["boxes"]
        target["boxes"] = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
    return F.hflip(image), target


def blank_canvas(like: ImageLike, width: int, height: int, fill: Sequence[float] = IMAGENET_MEAN) -> ImageLike:
    """A ``width`` x ``height`` image of colour ``fill`` (in [0, 1]) of the kind of ``like``
    (PIL mode, or tensor dtype and channels; integer images get the rounded 0-255 colour)."""
    if isinstance(like, PILImage.Image):
        return PILImage.new(like.mode, (width, height), tuple(round(255 * value) for value in fill))
    scale = 1.0 if like.is_floating_point() else 255.0
    values = torch.tensor(fill, dtype=torch.float64) * scale
    if not like.is_floating_point():
        values = values.round()
    return values.to(like.dtype).view(-1, 1, 1).expand(like.shape[-3], height, width).clone()


def paste(canvas: ImageLike, image: ImageLike, left: int, top: int) -> ImageLike:
    """``image`` drawn on ``canvas`` with its top-left pixel at (left, top); either may be
    negative or reach past the canvas (the part outside is cut). Tensors are written in place."""
    if isinstance(canvas, PILImage.Image):
        canvas.paste(image, (left, top))
        return canvas
    height, width = image_size(image)
    x0, y0 = max(left, 0), max(top, 0)
    x1, y1 = min(left + width, canvas.shape[-1]), min(top + height, canvas.shape[-2])
    if x1 > x0 and y1 > y0:
        canvas[:, y0:y1, x0:x1] = image[:, y0 - top:y1 - top, x0 - left:x1 - left]
    return canvas


def zoom_out(
    image: ImageLike, target: Target, canvas_width: int, canvas_height: int, left: int, top: int,
    fill: Sequence[float] = IMAGENET_MEAN,
) -> tuple[ImageLike, Target]:
    """Paste the image at (left, top) on a canvas of colour ``fill`` (in [0, 1]); boxes shift with it."""
    height, width = image_size(image)
    if not (0 <= left <= canvas_width - width and 0 <= top <= canvas_height - height):
        raise ValueError(f"zoom_out: a {width}x{height} image does not fit at ({left}, {top}) "
                         f"in a {canvas_width}x{canvas_height} canvas")
    canvas = paste(blank_canvas(image, canvas_width, canvas_height, fill), image, left, top)
    target = dict(target)
    if "boxes" in target:
        target["boxes"] = target["boxes"] + torch.tensor([left, top, left, top], dtype=target["boxes"].dtype)
    return canvas, target


def crop(image: ImageLike, target: Target, left: int, top: int, width: int, height: int) -> tuple[ImageLike, Target]:
    """Cut the window [left, left + width) x [top, top + height).

    Boxes whose centre lies strictly inside the window are kept, shifted and clipped to it; the
    others are removed with their per-box entries (and counted). ``area`` is recomputed from the
    clipped boxes.
    """
    target = dict(target)
    if "boxes" in target:
        boxes = target["boxes"]
        cx = (boxes[:, 0] + boxes[:, 2]) / 2
        cy = (boxes[:, 1] + boxes[:, 3]) / 2
        target = keep_boxes(target, (cx > left) & (cx < left + width) & (cy > top) & (cy < top + height))
        shifted = target["boxes"] - torch.tensor([left, top, left, top], dtype=boxes.dtype)
        shifted[:, 0::2] = shifted[:, 0::2].clamp(0, width)
        shifted[:, 1::2] = shifted[:, 1::2].clamp(0, height)
        target["boxes"] = shifted
        if "area" in target:
            target["area"] = _box_area(shifted).to(target["area"].dtype)
    return F.crop(image, top, left, height, width), target


def resize(image: ImageLike, target: Target, height: int, width: int) -> tuple[ImageLike, Target]:
    """Resize to ``height`` x ``width`` (bilinear, antialiased); boxes and ``area`` scale with it."""
    old_height, old_width = image_size(image)
    image = F.resize(image, [height, width], antialias=True)
    target = dict(target)
    if "boxes" in target:
        sx, sy = width / old_width, height / old_height
        target["boxes"] = target["boxes"] * torch.tensor([sx, sy, sx, sy], dtype=target["boxes"].dtype)
        if "area" in target:
            target["area"] = _box_area(target["boxes"]).to(target["area"].dtype)
    return image, target


def place(image: ImageLike, target: Target, canvas_width: int, canvas_height: int, left: int, top: int,
          fill: Sequence[float] = IMAGENET_MEAN, min_side: float = 1.0) -> tuple[ImageLike, Target]:
    """The image at (left, top) of a ``fill`` canvas: padded where it is smaller, cut where it
    reaches past (offsets may be negative). Boxes move with it, are clipped to the visible part,
    and those under ``min_side`` pixels wide or high after clipping are dropped and counted."""
    return paste_with_boxes(blank_canvas(image, canvas_width, canvas_height, fill), image, target, left, top, min_side)


def paste_with_boxes(canvas: ImageLike, image: ImageLike, target: Target, left: int, top: int,
                     min_side: float = 1.0) -> tuple[ImageLike, Target]:
    """``image`` drawn on ``canvas`` at (left, top) as :func:`paste` draws it, and ``target``'s
    boxes moved with it, clipped to the visible part, those under ``min_side`` pixels wide or high
    after clipping dropped and counted (:func:`place` on a blank canvas, :func:`mosaic` on its own)."""
    height, width = image_size(image)
    canvas_height, canvas_width = image_size(canvas)
    window = (max(left, 0), max(top, 0), min(left + width, canvas_width), min(top + height, canvas_height))
    return paste(canvas, image, left, top), clip_to_window(target, left, top, window, min_side)


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


class RandomScaleJitter:
    """Large-scale jitter: rescale by ``U(scale_range)`` times the factor that fits the image in a
    ``size`` x ``size`` square, then place it at a uniformly random offset on a ``size`` x ``size``
    canvas of colour ``fill``: a random crop when it is larger, a pad when smaller. Boxes are
    clipped; those under ``min_side`` pixels after clipping are dropped and counted."""

    def __init__(self, size: int, scale_range: tuple[float, float] = (0.1, 2.0), fill: Sequence[float] = IMAGENET_MEAN,
                 min_side: float = 1.0) -> None:
        if size < 1 or not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"RandomScaleJitter: need size >= 1 and 0 < low <= high, got {size}, {scale_range}")
        self.size, self.scale_range, self.fill, self.min_side = size, tuple(scale_range), tuple(fill), min_side

    def __call__(self, image: ImageLike, target: Target) -> tuple[ImageLike, Target]:
        height, width = image_size(image)
        scale = min(self.size / height, self.size / width) * _uniform(*self.scale_range)
        new_height, new_width = max(1, round(height * scale)), max(1, round(width * scale))
        image, target = resize(image, target, new_height, new_width)
        left = int((self.size - new_width) * torch.rand(()).item())  # negative: a crop
        top = int((self.size - new_height) * torch.rand(()).item())
        return place(image, target, self.size, self.size, left, top, self.fill, self.min_side)

    def __repr__(self) -> str:
        return f"RandomScaleJitter(size={self.size}, scale_range={self.scale_range}, min_side={self.min_side})"


class DropDegenerateBoxes:
    """The last training transform: drops (and counts) boxes of zero or negative width or height
    and puts the count key in every target."""

    def __call__(self, image: ImageLike, target: Target) -> tuple[ImageLike, Target]:
        boxes = target["boxes"]
        return image, keep_boxes(target, (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]))

    def __repr__(self) -> str:
        return "DropDegenerateBoxes()"


def parse_policy(text: str) -> tuple[str, ...]:
    """The elements of a policy ``text`` (comma list of elements and presets) in canonical order.

    Raises:
        ValueError: an unknown name (the message lists the choices).
    """
    chosen: set[str] = set()
    for name in (part.strip() for part in text.split(",")):
        if name in AUGMENT_PRESETS:
            chosen.update(AUGMENT_PRESETS[name])
        elif name in AUGMENT_ELEMENTS:
            chosen.add(name)
        else:
            raise ValueError(f"unknown augmentation element {name!r} in {text!r}; choose a comma list of "
                             f"{', '.join(AUGMENT_ELEMENTS)} or a preset ({', '.join(AUGMENT_PRESETS)})")
    return tuple(element for element in AUGMENT_ELEMENTS if element in chosen)


def augment_policy(text: str) -> str:
    """``--augment``'s argparse type: the policy checked, in its canonical form (what args and
    checkpoints store, so one policy is one string): the name of the preset with exactly its
    elements, else the elements comma-joined in the order they run (``hflip,lsj`` -> ``lsj,hflip``)."""
    try:
        elements = parse_policy(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    preset = next((name for name, chosen in AUGMENT_PRESETS.items() if chosen == elements), None)
    return preset or ",".join(elements)


def training_size(min_size: Sequence[int], max_size: int) -> int:
    """The side of the square lsj and mosaic produce: the side the model resizes a square image
    to at its largest training scale (the largest --min-size, at most --max-size)."""
    return min(max(min_size), max_size)


def _per_image(name: str, size: Optional[int]) -> Transform:
    """The transform of a per-image element (one before the mosaic)."""
    if name == "lsj":
        if size is None:
            raise ValueError("augmentation element 'lsj' needs the training size")
        return RandomScaleJitter(size)
    return {"photometric": RandomPhotometricDistort, "zoomout": RandomZoomOut, "ioucrop": RandomIoUCrop}[name]()


def get_transforms(train: bool, augment: str = "hflip", size: Optional[int] = None) -> Compose:
    """Transforms of one image. Evaluation always gets ToTensor only. Training: the per-image
    elements of the policy ``augment`` (those before ``mosaic``) in canonical order, then (without
    mosaic) :func:`final_transforms`. So the presets keep their draws: ``hflip`` = ToTensor, flip;
    ``photometric`` = photometric, ToTensor, flip; ``full`` = photometric, zoom-out, IoU crop,
    ToTensor, flip. ``size``: the training size (:func:`training_size`) that ``lsj`` needs. With
    ``mosaic`` these are the transforms of each of its 4 images (train_utils/data/mosaic.py).
    """
    if not train:
        return Compose([ToTensor()])
    elements = parse_policy(augment)
    transforms = [_per_image(name, size) for name in elements if name in PER_IMAGE_ELEMENTS]
    if "mosaic" not in elements:
        transforms += final_transforms(augment).transforms
    return Compose(transforms)


def final_transforms(augment: str) -> Compose:
    """The last training transforms (after the mosaic, when the policy has one): ToTensor, the
    flip when the policy has ``hflip``, :class:`DropDegenerateBoxes`."""
    flip = [RandomHorizontalFlip(0.5)] if "hflip" in parse_policy(augment) else []
    return Compose([ToTensor(), *flip, DropDegenerateBoxes()])
