"""Generate a deterministic VOC2012-style dataset of harder, more realistic synthetic scenes.

    python tools/make_scenes_voc.py [--out data/scenes] [--num-images 300] [--seed 0] [--size 256 512]
                                    [--classes disc ring ...] [--object-scale 0.03 0.6] [--objects 1 9]
                                    [--val-fraction 0.2]

A second generator beside ``make_demo_voc.py``, aimed at realism rather than easy learning:

* classes differ by shape AND texture, never by colour (each object gets two random colours):
  disc (spots), ring (stripes), cross (checker), star (radial gradient), box (grid, any aspect
  ratio), triangle (value noise); every shape but the disc and ring is rotated at random;
* procedural backgrounds per image (fractal value noise, gradients, stripes, tiles, grids, spots)
  that reuse the object textures, so a texture alone never tells an object;
* unannotated clutter (irregular blobs, elongated ellipses, thick polylines) behind and in front
  of the objects;
* occlusion: later objects and front clutter overlap earlier ones;
* scale variety: object side log-uniform from 3% to 60% of the shorter image side;
* lighting (brightness, contrast, colour cast, vignette, a soft shadow), blur, sensor noise and
  JPEG quality 35-95; image sides uniform in ``--size`` (so varying aspect ratios).

Boxes follow the PASCAL VOC guidelines: each is the tight box of the object's VISIBLE pixels,
once every later object and the front clutter are drawn, in continuous pixel coordinates (visible
pixel columns c0..c1 give xmin = c0, xmax = c1 + 1); an object with no visible pixel is not
annotated. ``truncated=1`` for objects cut by the image border; ``difficult=1`` for objects with
more than 60% of their pixels hidden (by objects or clutter in front, or outside the image) or
whose visible box's longer side is under 10 pixels. The layout is the one ``make_demo_voc.py``
writes (``tools/voc_writer.py``). Each image is drawn from its own generator seeded with (seed,
index), so the output is byte-identical for the same arguments.
"""
from __future__ import annotations

import argparse
import colorsys
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.voc_writer import VocWriter, check_pair  # noqa: E402

CLASS_TEXTURES = {"disc": "spots", "ring": "stripes", "cross": "checker", "star": "radial",
                  "box": "grid", "triangle": "noise"}
CLASSES = tuple(CLASS_TEXTURES)
PATTERNS = ("spots", "stripes", "checker", "radial", "grid", "noise", "linear")
SIZE_RANGE = (256, 512)  # image side in pixels, width and height drawn separately
SCALE_RANGE = (0.03, 0.60)  # object side as a fraction of the shorter image side, log-uniform
OBJECTS_RANGE = (1, 9)  # objects asked for per non-empty image, both ends included
EMPTY_PROBABILITY = 0.03
BORDER_PROBABILITY = 0.15  # chance an object may stick out of the image (up to 45% of its side)
MIN_VISIBLE = 0.15  # placements leaving an earlier object less visible than this are rejected
DIFFICULT_VISIBLE = 0.4  # objects less visible than this (more than 60% hidden) are difficult
TINY_SIDE = 10  # objects whose visible box's longer side is shorter (pixels) are difficult
VAL_FRACTION = 0.2
CLUTTER = -2  # owner value of front clutter pixels (-1: background)


@dataclass(frozen=True)
class SceneRecipe:
    """What the scenes hold: image sides drawn from ``size_range`` (pixels, both ends included),
    the ``classes`` drawn, object side as a fraction of the shorter image side (log-uniform in
    ``scale_range``) and objects asked for per non-empty image (both ends included; fewer where a
    placement would hide an earlier object too much). Bad values raise one line naming the flag."""

    size_range: tuple[int, int] = SIZE_RANGE
    classes: tuple[str, ...] = CLASSES
    scale_range: tuple[float, float] = SCALE_RANGE
    objects: tuple[int, int] = OBJECTS_RANGE

    def __post_init__(self) -> None:
        check_pair("--size", self.size_range, "64 <= LOW <= HIGH", lambda low, high: 64 <= low <= high)
        if not self.classes or set(self.classes) - set(CLASSES) or len(set(self.classes)) < len(self.classes):
            raise ValueError(f"--classes takes distinct names from {', '.join(CLASSES)}, got {' '.join(self.classes)}")
        check_pair("--object-scale", self.scale_range, "0 < LOW <= HIGH <= 0.9",
                   lambda low, high: 0 < low <= high <= 0.9)
        check_pair("--objects", self.objects, "1 <= LOW <= HIGH", lambda low, high: 1 <= low <= high)


@dataclass
class SceneObject:
    """An annotated object: class name, tight box (xmin, ymin, xmax, ymax) of its visible pixels,
    VOC flags and the fraction of its pixels that are visible."""

    name: str
    box: tuple[int, int, int, int]
    truncated: int
    difficult: int
    visible: float


# ---------------------------------------------------------------------------- textures
def _colours(rng: np.random.Generator) -> np.ndarray:
    """float [2, 3]: two random RGB colours (0-255) of clearly different brightness."""
    value = rng.uniform(0.15, 0.55)
    values = (value, value + rng.uniform(0.3, 0.45))[::rng.choice([-1, 1])]
    rgb = [colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.9), v) for v in values]
    return np.array(rgb) * 255.0


def _value_noise(rng: np.random.Generator, height: int, width: int, cell: float) -> np.ndarray:
    """float [height, width] in [0, 1]: two octaves of bicubic-interpolated random grids."""
    total = np.zeros((height, width), np.float32)
    for octave, weight in ((1, 0.65), (3, 0.35)):
        step = max(cell / octave, 2.0)
        grid = rng.random((int(height / step) + 2, int(width / step) + 2)).astype(np.float32)
        total += weight * np.asarray(Image.fromarray(grid, "F").resize((width, height), Image.BICUBIC))
    low, high = total.min(), total.max()
    return (total - low) / max(high - low, 1e-6)


def _pattern(rng: np.random.Generator, kind: str, height: int, width: int, period: float) -> np.ndarray:
    """float [height, width] in [0, 1]: pattern ``kind`` (one of PATTERNS) with the given period in
    pixels, rotated by a random angle about a random origin."""
    if kind == "noise":
        return _value_noise(rng, height, width, period)
    ys, xs = (grid.astype(np.float32) - side / 2 for grid, side in zip(np.ogrid[0:height, 0:width], (height, width)))
    period = float(period)
    angle = float(rng.uniform(0, np.pi))
    cos, sin = math.cos(angle), math.sin(angle)
    u = xs * cos + ys * sin + float(rng.uniform(0, period))
    v = ys * cos - xs * sin + float(rng.uniform(0, period))
    if kind == "stripes":
        return np.clip(0.5 + 2.0 * np.sin(2 * np.pi * u / period), 0, 1)
    if kind == "checker":
        return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    if kind == "spots":
        du, dv = u % period - period / 2, v % period - period / 2
        return (du * du + dv * dv < (0.3 * period) ** 2).astype(np.float32)
    if kind == "grid":
        line = max(0.18 * period, 1.0)
        return ((u % period < line) | (v % period < line)).astype(np.float32)
    if kind == "radial":
        radius = np.hypot(xs, ys)
        return np.clip(1.0 - radius / max(width, height) * 2.0, 0, 1)
    if kind == "linear":
        return (u - u.min()) / max(float(u.max() - u.min()), 1e-6)
    raise ValueError(f"unknown pattern {kind!r}")


def _paint(rng: np.random.Generator, kind: str, height: int, width: int, period: float) -> np.ndarray:
    """float [height, width, 3]: pattern ``kind`` in two random colours, with a linear shading."""
    low, high = _colours(rng).astype(np.float32)
    p = _pattern(rng, kind, height, width, period)[..., None]
    shade = _pattern(rng, "linear", height, width, 1.0)[..., None]
    strength = np.float32(rng.uniform(0.0, 0.35))
    return (low + (high - low) * p) * (1 - strength / 2 + strength * shade)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """float [height, width, 3]: one pattern at a large period, modulated by fractal noise."""
    kind = PATTERNS[int(rng.integers(len(PATTERNS)))]
    image = _paint(rng, kind, height, width, rng.uniform(8, 0.4 * min(height, width)))
    texture = _value_noise(rng, height, width, rng.uniform(6, 60))[..., None]
    return image * (1 + np.float32(rng.uniform(0.1, 0.5)) * (texture - 0.5))


# ---------------------------------------------------------------------------- shapes
def _polygon_mask(points: np.ndarray, side: int) -> np.ndarray:
    """bool [side, side]: the filled polygon ``points`` (float [N, 2], x y about the centre)."""
    mask = Image.new("1", (side, side), 0)
    ImageDraw.Draw(mask).polygon([(float(x), float(y)) for x, y in points + side / 2], fill=1)
    return np.asarray(mask)


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return points @ rotation.T


def _outline(rng: np.random.Generator, name: str, radius: float) -> np.ndarray:
    """float [N, 2]: polygon of a rotated cross, star, box or triangle of half-side ``radius``."""
    if name == "cross":
        a, r = radius * rng.uniform(0.15, 0.22), radius  # half arm width, arm length
        quarter = np.array([[a, a], [a, r], [-a, r]])
        points = np.concatenate([_rotate(quarter, k * np.pi / 2) for k in range(4)])
    elif name == "star":
        angles = np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, radius, radius * rng.uniform(0.38, 0.5))
        points = np.stack([radii * np.sin(angles), -radii * np.cos(angles)], axis=1)
    elif name == "box":
        half_height = radius * rng.uniform(0.35, 1.0)
        points = np.array([[-radius, -half_height], [radius, -half_height], [radius, half_height],
                           [-radius, half_height]])
    else:  # triangle: jittered equilateral
        angles = np.arange(3) * 2 * np.pi / 3 + rng.uniform(-0.25, 0.25, 3)
        points = radius * np.stack([np.sin(angles), -np.cos(angles)], axis=1)
    return _rotate(points, rng.uniform(0, 2 * np.pi))


def _shape_mask(rng: np.random.Generator, name: str, side: float) -> np.ndarray:
    """bool [n, n] (n = ceil(side) + 2): class ``name`` inside a centred square of ``side`` pixels."""
    n = int(np.ceil(side)) + 2
    if name in ("disc", "ring"):
        ys, xs = np.mgrid[0:n, 0:n] - (n - 1) / 2
        radius = np.hypot(xs, ys) / (side / 2)
        inner = rng.uniform(0.45, 0.65) if name == "ring" else -1.0
        return (radius <= 1.0) & (radius >= inner)
    return _polygon_mask(_outline(rng, name, side / 2), n)


def _clutter_mask(rng: np.random.Generator, side: float) -> np.ndarray:
    """bool [n, n]: an unannotated distractor: irregular blob, elongated ellipse or thick polyline."""
    n = int(np.ceil(side)) + 2
    kind = rng.integers(3)
    if kind == 0:  # blob: smooth random radius around the centre
        angles = np.linspace(0, 2 * np.pi, 24, endpoint=False)
        phases = rng.uniform(0, 2 * np.pi, 3)
        radii = 1 + sum(rng.uniform(0, 0.25) * np.sin(k * angles + p) for k, p in zip((2, 3, 5), phases))
        points = np.stack([np.cos(angles), np.sin(angles)], axis=1) * (radii / radii.max() * side / 2)[:, None]
        return _polygon_mask(points, n)
    if kind == 1:  # ellipse, at most half as wide as long
        points = np.stack([np.cos(t := np.linspace(0, 2 * np.pi, 32, endpoint=False)),
                           rng.uniform(0.12, 0.45) * np.sin(t)], axis=1) * side / 2
        return _polygon_mask(_rotate(points, rng.uniform(0, np.pi)), n)
    mask = Image.new("1", (n, n), 0)
    points = [tuple(float(c) for c in rng.uniform(1, n - 1, 2)) for _ in range(int(rng.integers(2, 5)))]
    ImageDraw.Draw(mask).line(points, fill=1, width=max(1, int(side * rng.uniform(0.04, 0.12))))
    return np.asarray(mask)


# ---------------------------------------------------------------------------- composition
Window = tuple[slice, slice]


def _overlap(n: int, x0: int, y0: int, width: int, height: int) -> tuple[Window, Window]:
    """(rows and columns in the image, the same in the n-pixel square) where a square with top-left
    corner (x0, y0) overlaps a width x height image (empty slices when it does not)."""
    xa, xb = min(max(x0, 0), width), max(min(x0 + n, width), 0)
    ya, yb = min(max(y0, 0), height), max(min(y0 + n, height), 0)
    xb, yb = max(xa, xb), max(ya, yb)
    return (slice(ya, yb), slice(xa, xb)), (slice(ya - y0, yb - y0), slice(xa - x0, xb - x0))


class _Scene:
    """The image being drawn, the owner of each pixel (object index, -1 background, CLUTTER) and
    each placed object's name, window in the image, truncation, pixel area and visible pixel count."""

    def __init__(self, pixels: np.ndarray) -> None:
        self.pixels = pixels
        self.owner = np.full(pixels.shape[:2], -1, np.int64)
        self.objects: list[tuple[str, Window, bool]] = []
        self.areas: list[int] = []
        self.visible: list[int] = []

    def place(self, mask: np.ndarray, x0: int, y0: int, paint: np.ndarray, name: Optional[str]) -> bool:
        """Paint ``mask`` (bool [n, n]) with top-left corner (x0, y0) as object ``name`` (None:
        front clutter); False, and nothing drawn, when it would hide an earlier object too much."""
        height, width = self.owner.shape
        inside, part = _overlap(mask.shape[0], x0, y0, width, height)
        local = mask[part]
        if not local.any():
            return False
        covered = self.owner[inside][local]
        lost = np.bincount(covered[covered >= 0], minlength=len(self.areas))
        if any(v - lost[j] < MIN_VISIBLE * a for j, (v, a) in enumerate(zip(self.visible, self.areas))):
            return False
        self.visible = [v - int(lost[j]) for j, v in enumerate(self.visible)]
        self.owner[inside][local] = CLUTTER if name is None else len(self.areas)
        self.pixels[inside][local] = paint[part][local]
        if name is not None:
            self.objects.append((name, inside, bool(local.sum() < mask.sum())))
            self.areas.append(int(mask.sum()))
            self.visible.append(int(local.sum()))
        return True

    def visible_box(self, index: int) -> Optional[tuple[int, int, int, int]]:
        """Tight box (xmin, ymin, xmax, ymax) of the pixels object ``index`` still owns; None when
        it owns none."""
        rows_window, cols_window = self.objects[index][1]
        rows, cols = np.nonzero(self.owner[rows_window, cols_window] == index)
        if rows.size == 0:
            return None
        x0, y0 = cols_window.start, rows_window.start
        return (x0 + int(cols.min()), y0 + int(rows.min()), x0 + int(cols.max()) + 1, y0 + int(rows.max()) + 1)

    def annotations(self) -> list[SceneObject]:
        """The objects with a visible pixel, boxed tightly around their visible pixels, with their
        VOC flags."""
        found = []
        for index, ((name, _, truncated), area, visible) in enumerate(zip(self.objects, self.areas, self.visible)):
            box = self.visible_box(index)
            if box is None:
                continue
            tiny = max(box[2] - box[0], box[3] - box[1]) < TINY_SIDE
            difficult = tiny or visible < DIFFICULT_VISIBLE * area
            found.append(SceneObject(name, box, int(truncated), int(difficult), round(visible / area, 4)))
        return found


def _corner(rng: np.random.Generator, n: int, width: int, height: int) -> tuple[int, int]:
    """Random top-left corner of an n-pixel square; it may stick out by up to 45% of n."""
    if rng.random() < BORDER_PROBABILITY:
        return int(rng.integers(-0.45 * n, width - 0.55 * n)), int(rng.integers(-0.45 * n, height - 0.55 * n))
    return int(rng.integers(0, max(width - n, 0) + 1)), int(rng.integers(0, max(height - n, 0) + 1))


def _add_clutter(rng: np.random.Generator, scene: _Scene, count: int, front: bool) -> None:
    """``count`` distractors of 2-25% of the shorter side: painted under everything (not front) or
    placed over the objects as occluders (front)."""
    height, width = scene.owner.shape
    for _ in range(count):
        side = min(height, width) * np.exp(rng.uniform(np.log(0.02), np.log(0.25)))
        mask = _clutter_mask(rng, side)
        paint = _paint(rng, PATTERNS[int(rng.integers(len(PATTERNS)))], *mask.shape, side / rng.uniform(2, 6))
        x0, y0 = _corner(rng, mask.shape[0], width, height)
        if front:
            scene.place(mask, x0, y0, paint, None)
        else:
            inside, part = _overlap(mask.shape[0], x0, y0, width, height)
            scene.pixels[inside][mask[part]] = paint[part][mask[part]]


def _add_objects(rng: np.random.Generator, scene: _Scene, recipe: SceneRecipe, count: int) -> None:
    """Up to ``count`` objects, each tried at 10 random placements."""
    height, width = scene.owner.shape
    low, high = np.log(recipe.scale_range[0]), np.log(recipe.scale_range[1])
    for _ in range(count):
        name = recipe.classes[int(rng.integers(len(recipe.classes)))]
        side = min(height, width) * np.exp(rng.uniform(low, high))
        mask = _shape_mask(rng, name, side)
        paint = _paint(rng, CLASS_TEXTURES[name], *mask.shape, max(side / rng.uniform(3, 6), 3.0))
        for _attempt in range(10):
            if scene.place(mask, *_corner(rng, mask.shape[0], width, height), paint, name):
                break


def _photograph(rng: np.random.Generator, pixels: np.ndarray) -> Image.Image:
    """Lighting (vignette, soft shadow, brightness, contrast, colour cast), blur and sensor noise."""
    height, width = pixels.shape[:2]
    ys, xs = (grid.astype(np.float32) for grid in np.ogrid[0:height, 0:width])
    light = np.ones((height, width), np.float32)
    if rng.random() < 0.5:  # vignette
        radius = np.hypot(xs / width - rng.uniform(0.3, 0.7), ys / height - rng.uniform(0.3, 0.7))
        light *= 1 - rng.uniform(0.2, 0.7) * radius ** 2
    if rng.random() < 0.4:  # soft shadow: a darker half-plane with a blurred edge
        angle = rng.uniform(0, 2 * np.pi)
        u = (xs - width * rng.random()) * np.cos(angle) + (ys - height * rng.random()) * np.sin(angle)
        light *= 1 - rng.uniform(0.25, 0.55) / (1 + np.exp(-u / rng.uniform(5, 40)))
    gain = (rng.uniform(0.6, 1.3) * rng.uniform(0.9, 1.1, 3)).astype(np.float32)
    image = pixels * light[..., None] * gain
    mean = image.mean()
    image = mean + (image - mean) * np.float32(rng.uniform(0.6, 1.3))
    picture = Image.fromarray(np.clip(image + 0.5, 0, 255).astype(np.uint8))
    if rng.random() < 0.3:
        picture = picture.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.5)))
    noise = rng.standard_normal((height, width, 3), np.float32) * np.float32(rng.uniform(0, 8))
    return Image.fromarray(np.clip(np.asarray(picture) + noise + 0.5, 0, 255).astype(np.uint8))


def draw_scene(seed: int, index: int, recipe: SceneRecipe = SceneRecipe()
               ) -> tuple[Image.Image, list[SceneObject], int]:
    """Render image ``index`` of the dataset generated with ``seed``: (image, objects, JPEG quality)."""
    rng = np.random.default_rng([seed, index])
    low, high = recipe.size_range
    width, height = (int(side) for side in rng.integers(low, high + 1, 2))
    scene = _Scene(_background(rng, height, width))
    _add_clutter(rng, scene, int(rng.integers(2, 10)), front=False)
    count = 0 if rng.random() < EMPTY_PROBABILITY else int(rng.integers(recipe.objects[0], recipe.objects[1] + 1))
    _add_objects(rng, scene, recipe, count)
    _add_clutter(rng, scene, int(rng.integers(0, 5)), front=True)
    return _photograph(rng, scene.pixels), scene.annotations(), int(rng.integers(35, 96))


def make_scenes_voc(out: Path, num_images: int = 300, seed: int = 0, recipe: SceneRecipe = SceneRecipe(),
                    val_fraction: float = VAL_FRACTION) -> dict[str, int]:
    """Write the dataset under ``out`` and return counts (images, objects per class, difficult,
    truncated, occluded: less than 90% visible and not truncated)."""
    if num_images < 2 or not 0 < val_fraction < 1:
        raise ValueError(f"make_scenes_voc: need num_images >= 2 and 0 < val_fraction < 1, "
                         f"got {num_images}, {val_fraction:g}")
    writer = VocWriter(out, recipe.classes, database="Synthetic scenes")
    stats = {"images": num_images, "empty_images": 0, "difficult": 0, "truncated": 0, "occluded": 0,
             **{c: 0 for c in recipe.classes}}
    for index in range(num_images):
        image, objects, quality = draw_scene(seed, index, recipe)
        writer.add(f"scene_{index:05d}", image, objects, quality)
        stats["empty_images"] += not objects
        for obj in objects:
            stats[obj.name] += 1
            stats["difficult"] += obj.difficult
            stats["truncated"] += obj.truncated
            stats["occluded"] += obj.visible < 0.9 and not obj.truncated
    writer.finish(seed, val_fraction)
    return stats


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[argparse.Namespace, SceneRecipe]:
    """Command-line flags and the recipe they ask for; a bad value is one ``parser.error`` line
    naming the flag."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/scenes"), help="output folder")
    parser.add_argument("--num-images", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, nargs=2, default=SIZE_RANGE, metavar=("LOW", "HIGH"),
                        help="image width and height drawn from LOW..HIGH pixels")
    parser.add_argument("--classes", nargs="+", default=list(CLASSES), metavar="NAME",
                        help=f"classes to draw, from {', '.join(CLASSES)} (default: all)")
    parser.add_argument("--object-scale", type=float, nargs=2, default=SCALE_RANGE, metavar=("LOW", "HIGH"),
                        help="object side as a fraction of the shorter image side (log-uniform)")
    parser.add_argument("--objects", type=int, nargs=2, default=OBJECTS_RANGE, metavar=("LOW", "HIGH"),
                        help="objects asked for per non-empty image (fewer where they do not fit)")
    parser.add_argument("--val-fraction", type=float, default=VAL_FRACTION,
                        help="fraction of the images listed in val.txt (at least one)")
    args = parser.parse_args(argv)
    if args.num_images < 2:
        parser.error(f"--num-images must be at least 2, got {args.num_images}")
    if not 0 < args.val_fraction < 1:
        parser.error(f"--val-fraction must lie strictly between 0 and 1, got {args.val_fraction:g}")
    try:
        recipe = SceneRecipe(tuple(args.size), tuple(args.classes), tuple(args.object_scale), tuple(args.objects))
    except ValueError as exc:
        parser.error(str(exc))
    return args, recipe


def main(argv: Optional[Sequence[str]] = None) -> None:
    args, recipe = parse_args(argv)
    start = time.perf_counter()
    stats = make_scenes_voc(args.out, args.num_images, args.seed, recipe, args.val_fraction)
    print(f"wrote {args.out / 'VOCdevkit' / 'VOC2012'} and {args.out / 'classes.json'} "
          f"in {time.perf_counter() - start:.1f}s: {stats}")


if __name__ == "__main__":
    main()
