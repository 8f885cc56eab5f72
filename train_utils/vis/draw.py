"""Draw detections on an image: one colour per class, a filled "name score" label per box.

The outline of a box (x1, y1, x2, y2) in continuous pixel coordinates is drawn on the outermost
pixels it touches, columns ``floor(x1)`` .. ``ceil(x2) - 1`` and rows ``floor(y1)`` .. ``ceil(y2) - 1``,
growing inwards with the line thickness (see :func:`outline_pixels`).
"""
from __future__ import annotations

import colorsys
import math
from functools import lru_cache
from typing import Optional, Sequence

from PIL import Image, ImageDraw, ImageFont

Colour = tuple[int, int, int]
_GOLDEN_FRACTION = 0.6180339887498949  # successive hues as far apart as possible
_DARK_TEXT, _LIGHT_TEXT = (0, 0, 0), (255, 255, 255)


def class_colour(label: int) -> Colour:
    """A saturated RGB colour for class ``label``; neighbouring labels get very different hues."""
    hue = (0.05 + label * _GOLDEN_FRACTION) % 1.0
    value = 0.95 if label % 2 else 0.75  # alternate brightness to separate close hues further
    red, green, blue = colorsys.hsv_to_rgb(hue, 0.9, value)
    return round(red * 255), round(green * 255), round(blue * 255)


def _linear(channel: int) -> float:
    """sRGB channel 0..255 -> linear light 0..1."""
    value = channel / 255
    return value / 12.92 if value <= 0.04045 else ((value + 0.055) / 1.055) ** 2.4


def text_colour(background: Colour) -> Colour:
    """Black or white, whichever has the higher WCAG contrast ratio with ``background``.

    With relative luminance L, black wins when (L + 0.05) / 0.05 > 1.05 / (L + 0.05), i.e. L > ~0.179.
    """
    red, green, blue = (_linear(c) for c in background)
    luminance = 0.2126 * red + 0.7152 * green + 0.0722 * blue
    return _DARK_TEXT if (luminance + 0.05) ** 2 > 1.05 * 0.05 else _LIGHT_TEXT


@lru_cache(maxsize=16)
def load_font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans (or matplotlib's default sans font) at ``size`` pixels; Pillow's built-in scalable
    font when no TrueType font can be found or opened."""
    try:
        from matplotlib import font_manager

        path = font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans"))
        return ImageFont.truetype(path, size)
    except (ImportError, OSError, ValueError):
        return ImageFont.load_default(size=size)


def default_line_thickness(width: int, height: int) -> int:
    """About 0.4% of the longer side, at least 2 pixels."""
    return max(2, round(0.004 * max(width, height)))


def default_font_size(width: int, height: int) -> int:
    """About 2.5% of the longer side, at least 10 pixels."""
    return max(10, round(0.025 * max(width, height)))


def outline_pixels(box: Sequence[float], width: int, height: int) -> Optional[tuple[int, int, int, int]]:
    """Inclusive pixel rectangle (left, top, right, bottom) the outline of ``box`` is drawn on,
    clipped to the image; None when the box lies outside the image."""
    x1, y1, x2, y2 = (float(v) for v in box)
    left, top = max(math.floor(x1), 0), max(math.floor(y1), 0)
    right, bottom = min(math.ceil(x2) - 1, width - 1), min(math.ceil(y2) - 1, height - 1)
    if right < left or bottom < top:
        return None
    return left, top, right, bottom


def draw_detections(
    image: Image.Image,
    boxes: Sequence[Sequence[float]],
    labels: Sequence[int],
    scores: Sequence[float],
    class_names: Sequence[str],
    line_thickness: Optional[int] = None,
    font_size: Optional[int] = None,
) -> Image.Image:
    """A copy of ``image`` (converted to RGB) with the detections drawn.

    Args:
        boxes: [N, 4] xyxy pixel coordinates; labels: [N] class ids (``class_names[label - 1]``);
            scores: [N].
        line_thickness, font_size: pixels; None scales them with the image size.
    Boxes are drawn first, labels last, so no outline crosses a label. A label sits above its box
    when there is room, otherwise just inside the box's top edge.
    """
    canvas = image.convert("RGB")  # always a copy
    draw = ImageDraw.Draw(canvas)
    thickness = line_thickness or default_line_thickness(*canvas.size)
    font = load_font(font_size or default_font_size(*canvas.size))
    placed = []
    for box, label, score in zip(boxes, labels, scores):
        rect = outline_pixels(box, *canvas.size)
        if rect is None:
            continue
        colour = class_colour(int(label))
        draw.rectangle(rect, outline=colour, width=thickness)
        placed.append((rect, int(label), float(score), colour))
    for rect, label, score, colour in placed:
        name = class_names[label - 1] if 1 <= label <= len(class_names) else f"class {label}"
        draw_label(draw, f"{name} {score:.2f}", rect, colour, font, canvas.size)
    return canvas


def draw_label(draw: ImageDraw.ImageDraw, text: str, rect: tuple[int, int, int, int], colour: Colour,
               font, image_size: tuple[int, int], below: bool = False) -> None:
    """Filled label box in ``colour`` with contrasting ``text``, kept inside the image: above the
    box's top edge (``below``: under its bottom edge), or just inside it when there is no room."""
    text_left, text_top, text_right, text_bottom = draw.textbbox((0, 0), text, font=font)
    pad = 2
    label_w = text_right - text_left + 2 * pad
    label_h = text_bottom - text_top + 2 * pad
    left = min(rect[0], max(image_size[0] - label_w, 0))
    if below:
        top = rect[3] + 1 if rect[3] + label_h < image_size[1] else rect[3] - label_h
    else:
        top = rect[1] - label_h if rect[1] - label_h >= 0 else rect[1]
    draw.rectangle((left, top, left + label_w - 1, top + label_h - 1), fill=colour)
    draw.text((left + pad - text_left, top + pad - text_top), text, fill=text_colour(colour), font=font)


# ------------------------------------------------------------------------- ground truth next to predictions
GT_LIGHT, GT_DARK, GT_IGNORED = (255, 255, 255), (0, 0, 0), (150, 150, 150)


def draw_dashed_rectangle(draw: ImageDraw.ImageDraw, rect: tuple[int, int, int, int], colour: Colour,
                          thickness: int, dash: int, gap_colour: Colour) -> None:
    """Outline of the inclusive pixel rectangle ``rect`` in dashes of ``dash`` pixels growing
    inwards with ``thickness``; the gaps are painted ``gap_colour``, so it shows on any background."""
    left, top, right, bottom = rect
    draw.rectangle(rect, outline=gap_colour, width=thickness)
    inner = thickness - 1
    edges = [((left, top), (right, top + inner)), ((left, bottom - inner), (right, bottom)),
             ((left, top), (left + inner, bottom)), ((right - inner, top), (right, bottom))]
    for (x0, y0), (x1, y1) in edges:
        horizontal = x1 - x0 >= y1 - y0
        start, stop = (x0, x1) if horizontal else (y0, y1)
        for begin in range(start, stop + 1, 2 * dash):
            end = min(begin + dash - 1, stop)
            draw.rectangle((begin, y0, end, y1) if horizontal else (x0, begin, x1, end), fill=colour)


def draw_evaluation(
    image: Image.Image,
    gt_boxes: Sequence[Sequence[float]],
    gt_texts: Sequence[Optional[str]],
    gt_ignored: Sequence[bool],
    det_boxes: Sequence[Sequence[float]],
    det_labels: Sequence[int],
    det_texts: Sequence[str],
    min_long_side: int = 0,
) -> Image.Image:
    """A copy of ``image`` (RGB) with ground truth and predictions told apart.

    Ground truth [G, 4] xyxy: dashed black-and-white outlines (ignored objects: dotted
    grey-and-black, which shows on light backgrounds as well as dark ones), with a
    white label under the box when ``gt_texts`` has one (e.g. "missed circle"). Predictions [D, 4]
    xyxy: solid outlines in their class colour (``det_labels`` [D], see :func:`class_colour`) with
    ``det_texts`` (e.g. "circle 0.91 Loc") above. The image and boxes are first enlarged to
    ``min_long_side`` pixels on the longer side when smaller, so labels stay legible.
    """
    scale = max(1.0, min_long_side / max(image.size)) if min_long_side else 1.0
    canvas = image.convert("RGB")
    if scale > 1:
        canvas = canvas.resize((round(canvas.width * scale), round(canvas.height * scale)), Image.BILINEAR)
    draw = ImageDraw.Draw(canvas)
    thickness = default_line_thickness(*canvas.size)
    font = load_font(default_font_size(*canvas.size))
    labels = []
    for box, text, ignored in zip(gt_boxes, gt_texts, gt_ignored):
        rect = outline_pixels([v * scale for v in box], *canvas.size)
        if rect is not None:
            draw_dashed_rectangle(draw, rect, GT_IGNORED if ignored else GT_LIGHT, thickness,
                                  thickness if ignored else 3 * thickness, GT_DARK)
            if text:
                labels.append((True, text, rect, GT_LIGHT))
    for box, label, text in zip(det_boxes, det_labels, det_texts):
        rect = outline_pixels([v * scale for v in box], *canvas.size)
        if rect is not None:
            colour = class_colour(int(label))
            draw.rectangle(rect, outline=colour, width=thickness)
            labels.append((False, text, rect, colour))
    for below, text, rect, colour in labels:
        draw_label(draw, text, rect, colour, font, canvas.size, below)
    return canvas
