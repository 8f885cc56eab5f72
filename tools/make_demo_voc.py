"""Generate a small deterministic VOC2012-style dataset of coloured shapes for demos and smoke runs.

    python tools/make_demo_voc.py [--out data/demo] [--num-images 300] [--seed 0] [--size 192]
                                  [--object-size 0.2 0.45] [--objects 1 4] [--one-colour]

Writes ``<out>/VOCdevkit/VOC2012/{Annotations,JPEGImages,ImageSets/Main/{train,val}.txt}`` (about
80/20) and ``<out>/classes.json``. Classes differ in shape and colour family: red circles, green
squares, blue triangles, solid filled, 20-45% of the image side, on low-saturation gradient and
noise backgrounds with a few thin lines. Images hold 1-4 objects (about 5% hold none). Objects
cut by the border are ``truncated``; small or mostly hidden ones are ``difficult``.

Boxes are the tight box of each object's visible pixels in continuous pixel coordinates:
pixel columns c0..c1 give xmin = c0, xmax = c1 + 1 (the dataset does not shift coordinates).
Each image is drawn from its own generator seeded with (seed, index), so the output is
byte-identical for the same arguments.

``--object-size``, ``--objects`` and ``--one-colour`` make harder sets (a :class:`Recipe`): e.g.
``--object-size 0.04 0.08 --objects 8 20`` asks for 8-20 objects of 4-8% of the side per image
(fewer where a placement would hide an earlier object too much), the small-object set of the
anchor experiments in docs/anchors.md.
"""
from __future__ import annotations

import argparse
import colorsys
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.voc_writer import VocWriter, check_pair  # noqa: E402

CLASSES = ("circle", "square", "triangle")
HUE_RANGES = {"circle": (-0.03, 0.05), "square": (0.25, 0.42), "triangle": (0.55, 0.68)}  # red, green, blue
SIZE_RANGE = (0.20, 0.45)  # object side as a fraction of the image side
SMALL_SIZE_RANGE = (0.10, 0.14)  # occasional small objects, marked difficult
SMALL_PROBABILITY = 0.03
OBJECTS_RANGE = (1, 4)  # objects per non-empty image, both ends included
EMPTY_PROBABILITY = 0.05
BORDER_PROBABILITY = 0.12  # chance an object may stick out of the image
MIN_VISIBLE = 0.6  # placements hiding more than 40% of an earlier object are rejected
DIFFICULT_VISIBLE = 0.7  # objects less visible than this are difficult
VAL_FRACTION = 0.2
JPEG_QUALITY = 90


@dataclass(frozen=True)
class Recipe:
    """How the objects look: side as a fraction of the image side (low, high); objects asked for
    per non-empty image (both ends included; fewer where a placement would hide an earlier object
    too much); the chance of a small difficult object (None: SMALL_PROBABILITY with the default
    sizes, else none); ``one_colour``: every class drawn in any hue, told apart by shape alone.
    The size and count messages name their command-line flags."""

    size_range: tuple[float, float] = SIZE_RANGE
    objects: tuple[int, int] = OBJECTS_RANGE
    small_probability: Optional[float] = None
    one_colour: bool = False

    def __post_init__(self) -> None:
        check_pair("--object-size", self.size_range, "0 < LOW <= HIGH <= 1", lambda low, high: 0 < low <= high <= 1)
        check_pair("--objects", self.objects, "1 <= LOW <= HIGH", lambda low, high: 1 <= low <= high)
        if self.small_probability is not None and not 0 <= self.small_probability <= 1:
            raise ValueError(f"the small-object probability must lie in [0, 1], got {self.small_probability:g}")

    @property
    def small_chance(self) -> float:
        if self.small_probability is not None:
            return self.small_probability
        return SMALL_PROBABILITY if self.size_range == SIZE_RANGE else 0.0

    def hue_range(self, name: str) -> tuple[float, float]:
        return (0.0, 1.0) if self.one_colour else HUE_RANGES[name]


@dataclass
class DemoObject:
    """A drawn object: class name, visible-pixel box (xmin, ymin, xmax, ymax), VOC flags and the
    RGB fill colour (before JPEG compression)."""

    name: str
    box: tuple[int, int, int, int]
    truncated: int
    difficult: int
    colour: tuple[int, int, int]


def _hsv_to_rgb(hue: float, saturation: float, value: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(hue % 1.0, saturation, value)) * 255.0


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """float [size, size, 3]: a muted two-colour linear gradient with Gaussian noise."""
    start, end = (_hsv_to_rgb(rng.random(), rng.uniform(0, 0.25), rng.uniform(0.35, 0.9)) for _ in range(2))
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    t = xs * np.cos(angle) + ys * np.sin(angle)
    t = (t - t.min()) / max(t.max() - t.min(), 1e-9)
    image = start * (1 - t[..., None]) + end * t[..., None]
    return image + rng.normal(0, rng.uniform(3, 12), image.shape)


def _draw_lines(rng: np.random.Generator, image: Image.Image) -> None:
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(0, 4))):
        colour = tuple(int(c) for c in _hsv_to_rgb(rng.random(), rng.uniform(0, 0.3), rng.uniform(0.2, 0.95)))
        points = [tuple(float(v) for v in rng.uniform(0, image.width, 2)) for _ in range(2)]
        draw.line(points, fill=colour, width=int(rng.integers(1, 3)))


def _shape_mask(rng: np.random.Generator, name: str, size: int, x0: float, y0: float, side: float) -> np.ndarray:
    """bool [3 * size, 3 * size] mask of one shape with bounding square (x0, y0, side), drawn on a
    canvas extending one image side beyond each edge so the part outside the image is kept."""
    mask = Image.new("L", (3 * size, 3 * size), 0)
    draw = ImageDraw.Draw(mask)
    x0, y0 = x0 + size, y0 + size
    x1, y1 = x0 + side, y0 + side
    if name == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=255)
    elif name == "square":
        draw.rectangle([x0, y0, x1, y1], fill=255)
    else:
        apex = x0 + side * rng.uniform(0.3, 0.7)
        draw.polygon([(x0, y1), (x1, y1), (apex, y0)], fill=255)
    return np.asarray(mask) > 0


def _sample_mask(rng: np.random.Generator, name: str, size: int, recipe: Recipe) -> tuple[np.ndarray, bool, bool]:
    """(bool [size, size] mask, cut by the border, small) for one random placement."""
    small = rng.random() < recipe.small_chance
    side = size * rng.uniform(*(SMALL_SIZE_RANGE if small else recipe.size_range))
    if rng.random() < BORDER_PROBABILITY:  # up to 30% of the side may stick out
        low, high = -0.3 * side, size - 0.7 * side
    else:
        low, high = 0.0, size - side - 1
    x0, y0 = rng.uniform(low, high, 2)
    whole = _shape_mask(rng, name, size, x0, y0, side)
    mask = whole[size:2 * size, size:2 * size]
    return mask, bool(mask.sum() < whole.sum()), small


def _tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(xmin, ymin, xmax, ymax) enclosing the True pixels of a non-empty mask."""
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def draw_image(seed: int, index: int, size: int, recipe: Recipe = Recipe()) -> tuple[Image.Image, list[DemoObject]]:
    """Render image ``index`` of the dataset generated with ``seed``."""
    rng = np.random.default_rng([seed, index])
    canvas = Image.fromarray(np.clip(_background(rng, size), 0, 255).round().astype(np.uint8))
    _draw_lines(rng, canvas)
    pixels = np.asarray(canvas).copy()
    count = 0 if rng.random() < EMPTY_PROBABILITY else int(rng.integers(recipe.objects[0], recipe.objects[1] + 1))
    owner = np.full((size, size), -1)  # index of the object visible at each pixel
    placed: list[tuple[str, np.ndarray, bool, bool, tuple[int, int, int]]] = []
    for _ in range(count):
        name = CLASSES[int(rng.integers(len(CLASSES)))]
        for _attempt in range(20):
            mask, truncated, small = _sample_mask(rng, name, size, recipe)
            trial = np.where(mask, len(placed), owner)
            areas = [p[1].sum() for p in placed]
            if mask.any() and all((trial == j).sum() >= MIN_VISIBLE * a for j, a in enumerate(areas)):
                owner = trial
                hue = rng.uniform(*recipe.hue_range(name))
                rgb = _hsv_to_rgb(hue, rng.uniform(0.65, 1.0), rng.uniform(0.55, 1.0)).round().astype(np.uint8)
                pixels[mask] = rgb
                placed.append((name, mask, truncated, small, (int(rgb[0]), int(rgb[1]), int(rgb[2]))))
                break
    objects = []
    for j, (name, mask, truncated, small, colour) in enumerate(placed):
        visible = owner == j
        hidden = visible.sum() < DIFFICULT_VISIBLE * mask.sum()
        objects.append(DemoObject(name, _tight_box(visible), int(truncated), int(small or hidden), colour))
    return Image.fromarray(pixels), objects


def make_demo_voc(out: Path, num_images: int = 300, seed: int = 0, size: int = 192,
                  recipe: Recipe = Recipe()) -> dict[str, int]:
    """Write the dataset under ``out`` and return counts (images, objects per class, difficult, ...)."""
    if num_images < 2 or size < 32:
        raise ValueError(f"make_demo_voc: need num_images >= 2 and size >= 32, got {num_images}, {size}")
    writer = VocWriter(out, CLASSES)
    stats = {"images": num_images, "empty_images": 0, "difficult": 0, "truncated": 0, **{c: 0 for c in CLASSES}}
    for index in range(num_images):
        image, objects = draw_image(seed, index, size, recipe)
        writer.add(f"demo_{index:05d}", image, objects, JPEG_QUALITY)
        stats["empty_images"] += not objects
        for obj in objects:
            stats[obj.name] += 1
            stats["difficult"] += obj.difficult
            stats["truncated"] += obj.truncated
    writer.finish(seed, VAL_FRACTION)
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/demo"), help="output folder")
    parser.add_argument("--num-images", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=192, help="image side in pixels")
    parser.add_argument("--object-size", type=float, nargs=2, default=SIZE_RANGE, metavar=("LOW", "HIGH"),
                        help="object side as a fraction of the image side (other than the default: no "
                             "small difficult objects)")
    parser.add_argument("--objects", type=int, nargs=2, default=OBJECTS_RANGE, metavar=("LOW", "HIGH"),
                        help="objects asked for per non-empty image (fewer where they do not fit)")
    parser.add_argument("--one-colour", action="store_true",
                        help="any hue for every class: classes told apart by shape alone")
    args = parser.parse_args()
    if args.num_images < 2 or args.size < 32:
        parser.error(f"--num-images must be at least 2 and --size at least 32, got {args.num_images} and {args.size}")
    try:
        recipe = Recipe(tuple(args.object_size), tuple(args.objects), one_colour=args.one_colour)
    except ValueError as exc:
        parser.error(str(exc))
    start = time.perf_counter()
    stats = make_demo_voc(args.out, args.num_images, args.seed, args.size, recipe)
    print(f"wrote {args.out / 'VOCdevkit' / 'VOC2012'} and {args.out / 'classes.json'} "
          f"in {time.perf_counter() - start:.1f}s: {stats}")


if __name__ == "__main__":
    main()
