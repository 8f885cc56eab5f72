"""Anchor coverage: how well a detector's anchors fit the ground-truth boxes of a split, and
anchor sizes / aspect ratios that fit them better.

Boxes are resized as the model resizes images (``GeneralizedRCNNTransform``: scale = min(min_size /
shorter side, max_size / longer side), sides ``floor(side * scale)``). Anchors are placed as
``AnchorsGenerator`` places them: the image is padded to P, a multiple of 32; a feature map of
stride s has ``ceil(P / s)`` positions per side, ``P // positions`` pixels apart, starting at 0,
and each position holds the map's cell anchors. A box is covered at threshold t when its best
anchor over all maps has IoU >= t; 0.7 makes that anchor an RPN positive by itself (the RPN also
takes each box's best anchor as a positive, whatever its IoU, but a poor one is a poor target).

Speed: the IoU of two boxes of fixed shapes only falls as their centres move apart in x or in y,
so the best anchor of each cell-anchor shape sits at the grid position nearest the box centre.
The best IoU of a box therefore needs one IoU per cell anchor: O(boxes x cell anchors), no
anchor tensor.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np
import torch

from backbone.registry import DetectorParts
from train_utils.model.builder import anchor_generator, build_backbone
from train_utils.model.config import ModelConfig

SIZE_DIVISIBLE = 32  # GeneralizedRCNNTransform pads to a multiple of this (FasterRCNN's default)
PROBE_SIZE = 256  # side of the blank image the backbone's strides are measured on
POSITIVE_IOU, LOOSE_IOU = 0.7, 0.5  # an RPN positive; a box the detector can still learn from
SMALL_AREA, MEDIUM_AREA = 32 ** 2, 96 ** 2  # COCO's size groups, here in resized pixels
SEARCH_BOXES = 100_000  # boxes the suggestion search looks at (a fixed random subset beyond this)
# Suggested sizes on one map differ by at least this factor (sqrt(2) less some room for rounding
# to whole pixels): concentric anchors of one shape then overlap with IoU <= 0.55. Without it the
# search packs near-equal sizes onto the split's few box sizes; a spread set also serves the sizes
# the split has few of (zoom-out augmentation, other images), as the usual factor-2 sets do.
MIN_SIZE_STEP = 1.35
# Below this share of boxes at IoU >= 0.5 the chosen sizes leave most objects to the RPN's
# low-quality matches: the cause lies elsewhere (objects small for the stride, or odd shapes).
LOW_COVERAGE = 0.5

ImageBoxes = tuple[int, int, np.ndarray, np.ndarray]  # (height, width, boxes [n, 4] xyxy, labels [n])


@dataclass(frozen=True)
class BoxSet:
    """Ground-truth boxes at the model's input scale.

    boxes: float64 [N, 4] xyxy in resized pixels; labels: int64 [N]; image_sizes: int64 [N, 2]
    (height, width) of the resized image each box lies in.
    """

    boxes: np.ndarray
    labels: np.ndarray
    image_sizes: np.ndarray

    def __len__(self) -> int:
        return len(self.boxes)

    def subset(self, index: np.ndarray) -> BoxSet:
        return BoxSet(self.boxes[index], self.labels[index], self.image_sizes[index])

    def sides(self) -> tuple[np.ndarray, np.ndarray]:
        """(widths [N], heights [N])."""
        return self.boxes[:, 2] - self.boxes[:, 0], self.boxes[:, 3] - self.boxes[:, 1]

    def scales(self) -> np.ndarray:
        """[N] sqrt(w * h): the size of each box, as anchor sizes are given."""
        widths, heights = self.sides()
        return np.sqrt(widths * heights)


def dataset_boxes(dataset) -> list[ImageBoxes]:
    """(height, width, boxes, labels) of every image of a DetectionDataSet; no image is read."""
    images = []
    for index in range(len(dataset)):
        height, width, target = dataset.coco_index(index)
        images.append((height, width, target["boxes"].numpy(), target["labels"].numpy()))
    return images


def resized_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """(height, width) of an image after GeneralizedRCNNTransform's resize."""
    scale = min(min_size / min(height, width), max_size / max(height, width))
    return max(1, math.floor(height * scale)), max(1, math.floor(width * scale))


def resize_boxes(images: Sequence[ImageBoxes], min_sizes: Sequence[int], max_size: int) -> BoxSet:
    """Every box resized at each of ``min_sizes`` (multi-scale training: once per scale)."""
    boxes, labels, sizes = [], [], []
    for min_size in min_sizes:
        for height, width, image_boxes, image_labels in images:
            new_h, new_w = resized_size(height, width, min_size, max_size)
            ratio = np.array([new_w / width, new_h / height] * 2)
            boxes.append(np.asarray(image_boxes, dtype=np.float64).reshape(-1, 4) * ratio)
            labels.append(np.asarray(image_labels, dtype=np.int64).reshape(-1))
            sizes.append(np.tile([new_h, new_w], (len(labels[-1]), 1)))
    if not boxes or not sum(len(b) for b in boxes):
        return BoxSet(np.zeros((0, 4)), np.zeros(0, dtype=np.int64), np.zeros((0, 2), dtype=np.int64))
    return BoxSet(np.concatenate(boxes), np.concatenate(labels), np.concatenate(sizes).astype(np.int64))


# ---------------------------------------------------------------------------- anchors and IoU
@dataclass(frozen=True)
class AnchorLayout:
    """The anchors of a detector: per feature map its stride and its zero-centred cell anchors
    (float64 [A_i, 4] xyxy, exactly AnchorsGenerator's); ``sizes``/``aspect_ratios`` as the
    flags take them."""

    strides: tuple[int, ...]
    cell_anchors: tuple[np.ndarray, ...]
    sizes: tuple[int, ...]
    aspect_ratios: tuple[float, ...]


class DetectorAnchors:
    """The anchor layouts a detector config can have: its backbone's strides are measured once
    (a dry run with random weights on a blank image; torch's random state is left as it was, so
    a training run continues exactly as with the chosen sizes typed in), then :meth:`layout`
    places any sizes."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            self.parts: DetectorParts = build_backbone(config)
            features = self.parts.backbone.eval()(torch.zeros(1, 3, PROBE_SIZE, PROBE_SIZE))
        maps = [features] if isinstance(features, torch.Tensor) else list(features.values())
        self.strides = tuple(PROBE_SIZE // int(f.shape[-1]) for f in maps)
        sizes = config.anchor_sizes or [s for level in self.parts.anchor_sizes for s in level]
        self.default = self.layout(sizes, config.aspect_ratios)

    def layout(self, sizes: Sequence[int], aspect_ratios: Sequence[float]) -> AnchorLayout:
        """The layout of ``sizes`` (one per map, or all on the single map) and ``aspect_ratios``;
        ValueError when the count does not fit the backbone."""
        config = self.config.replace(anchor_sizes=tuple(int(s) for s in sizes),
                                     aspect_ratios=tuple(float(r) for r in aspect_ratios))
        generator = anchor_generator(config, self.parts)
        cells = tuple(cell.double().numpy() for cell in generator.cell_anchors)
        return AnchorLayout(self.strides, cells, config.anchor_sizes, config.aspect_ratios)


def pairwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of xyxy boxes ``a [..., 4]`` and ``b [..., 4]`` (broadcast) -> ``[...]``."""
    width = (np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0])).clip(min=0)
    height = (np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1])).clip(min=0)
    inter = width * height
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter / (area_a + area_b - inter)


def best_anchor_iou(box_set: BoxSet, layout: AnchorLayout) -> np.ndarray:
    """float64 [N]: the IoU of each box with its best anchor (see the module docstring)."""
    boxes = box_set.boxes
    centres = (boxes[:, None, :2] + boxes[:, None, 2:]) / 2  # [N, 1, 2] (x, y)
    padded = np.ceil(box_set.image_sizes[:, ::-1] / SIZE_DIVISIBLE) * SIZE_DIVISIBLE  # [N, 2] (w, h)
    best = np.zeros(len(boxes))
    for stride, cells in zip(layout.strides, layout.cell_anchors):
        positions = np.ceil(padded / stride)[:, None]  # [N, 1, 2] grid positions per side
        step = (padded[:, None] // positions)  # AnchorsGenerator: padded size // grid size
        offsets = (cells[None, :, :2] + cells[None, :, 2:]) / 2  # [1, A, 2] cell anchor centres
        index = np.clip(np.round((centres - offsets) / step), 0, positions - 1)  # [N, A, 2] nearest position
        shift = index * step
        anchors = np.concatenate([shift + cells[None, :, :2], shift + cells[None, :, 2:]], axis=2)  # [N, A, 4]
        best = np.maximum(best, pairwise_iou(boxes[:, None], anchors).max(axis=1))
    return best


# ---------------------------------------------------------------------------- the report
def size_groups(box_set: BoxSet) -> list[tuple[str, np.ndarray]]:
    """COCO's small / medium / large (area in the resized image) as (name, mask [N])."""
    widths, heights = box_set.sides()
    area = widths * heights
    return [("small", area < SMALL_AREA), ("medium", (area >= SMALL_AREA) & (area < MEDIUM_AREA)),
            ("large", area >= MEDIUM_AREA)]


def coverage_table(box_set: BoxSet, best: np.ndarray, class_names: Sequence[str]) -> list[str]:
    """Lines: per group (all, each size, each class) the box count and the shares whose best
    anchor reaches IoU 0.7 and 0.5; ``best`` [N] from :func:`best_anchor_iou`."""
    groups = [("all", np.ones(len(best), dtype=bool))] + size_groups(box_set)
    groups += [(f"class {name}", box_set.labels == label) for label, name in enumerate(class_names, start=1)]
    width = max(len(name) for name, _ in groups)
    lines = [f"  {'boxes':<{width}}  {'count':>7}  {'IoU>=0.7':>8}  {'IoU>=0.5':>8}  {'median IoU':>10}"]
    for name, mask in groups:
        values = best[mask]
        if len(values):
            shares = f"{(values >= POSITIVE_IOU).mean():>8.1%}  {(values >= LOOSE_IOU).mean():>8.1%}"
            lines.append(f"  {name:<{width}}  {len(values):>7}  {shares}  {np.median(values):>10.3f}")
        else:
            lines.append(f"  {name:<{width}}  {0:>7}  {'-':>8}  {'-':>8}  {'-':>10}")
    return lines


def sizes_text(layout: AnchorLayout) -> str:
    """``32,64,128``: the sizes as --anchor-sizes takes them."""
    return ",".join(str(s) for s in layout.sizes)


def ratios_text(layout: AnchorLayout) -> str:
    """``0.5,1,2``: the aspect ratios as --aspect-ratios takes them."""
    return ",".join(f"{r:g}" for r in layout.aspect_ratios)


def describe_layout(layout: AnchorLayout) -> str:
    """``--anchor-sizes 32,64 --aspect-ratios 0.5,1,2``: the flags of a layout."""
    return f"--anchor-sizes {sizes_text(layout)} --aspect-ratios {ratios_text(layout)}"


# ---------------------------------------------------------------------------- suggestions
@dataclass(frozen=True)
class Scored:
    """An anchor layout with the shares of boxes whose best anchor reaches IoU 0.7 / 0.5."""

    layout: AnchorLayout
    positive: float
    loose: float

    @property
    def key(self) -> tuple[float, float]:
        """What the search maximises: the share at IoU 0.7 plus the share at 0.5 (a box gains 1 for
        an anchor of IoU 0.5 and 1 more at 0.7, so no group is given up for a few more positives);
        ties go to more positives."""
        return self.positive + self.loose, self.positive


def score_layout(box_set: BoxSet, layout: AnchorLayout) -> Scored:
    best = best_anchor_iou(box_set, layout)
    return Scored(layout, float((best >= POSITIVE_IOU).mean()), float((best >= LOOSE_IOU).mean()))


class _Search:
    """Memoised scores of candidate (sizes, ratios) on a box set (at most SEARCH_BOXES of it)."""

    def __init__(self, box_set: BoxSet, anchors: DetectorAnchors) -> None:
        if len(box_set) > SEARCH_BOXES:
            chosen = np.random.default_rng(0).choice(len(box_set), SEARCH_BOXES, replace=False)
            box_set = box_set.subset(np.sort(chosen))
        self.box_set, self.anchors = box_set, anchors
        self.cache: dict[tuple, Scored] = {}

    def score(self, sizes: Sequence[int], ratios: Sequence[float]) -> Scored:
        key = (tuple(sizes), tuple(ratios))
        if key not in self.cache:
            self.cache[key] = score_layout(self.box_set, self.anchors.layout(sizes, ratios))
        return self.cache[key]

    def best(self, candidates: Sequence[tuple[tuple[int, ...], tuple[float, ...]]]) -> Scored:
        return max((self.score(*candidate) for candidate in candidates), key=lambda scored: scored.key)

    def refine(self, start: Scored, move: Callable[[Scored, int, float], Optional[tuple]]) -> Scored:
        """Greedy search: change one value, or all (index = their count), by a factor (2^(1/4),
        then 2^(1/8)) while the score rises; ``move(scored, i, factor)`` gives the candidate (None:
        not a valid one)."""
        best = start
        for step in (2 ** 0.25, 2 ** 0.125):
            improved = True
            while improved:
                improved = False
                for i in range(max(len(best.layout.sizes), len(best.layout.aspect_ratios)) + 1):
                    for factor in (step, 1 / step):
                        candidate = move(best, i, factor)
                        if candidate is not None and self.score(*candidate).key > best.key:
                            best, improved = self.score(*candidate), True
        return best


def _int_sizes(values: Sequence[float], single_map: bool) -> Optional[tuple[int, ...]]:
    """Sizes rounded to whole pixels (at least 1), sorted on a single map; None when two sizes of
    a single map are closer than MIN_SIZE_STEP."""
    sizes = tuple(max(1, int(round(v))) for v in values)
    if not single_map:
        return sizes
    sizes = tuple(sorted(sizes))
    return sizes if all(b >= MIN_SIZE_STEP * a for a, b in zip(sizes, sizes[1:])) else None


def _ratios(values: Sequence[float]) -> Optional[tuple[float, ...]]:
    """Ratios to two significant digits, sorted; None when two coincide."""
    ratios = tuple(sorted(float(f"{v:.2g}") for v in values))
    return None if len(set(ratios)) < len(ratios) or min(ratios) <= 0 else ratios


def _log_kmeans(values: np.ndarray, k: int, iterations: int = 20) -> np.ndarray:
    """1-D k-means of log(values) started at the (i + 0.5) / k quantiles -> k centres (not logs)."""
    logs = np.log(values)
    centres = np.quantile(logs, (np.arange(k) + 0.5) / k)
    for _ in range(iterations):
        nearest = np.abs(logs[:, None] - centres[None]).argmin(axis=1)
        centres = np.array([logs[nearest == j].mean() if (nearest == j).any() else centres[j] for j in range(k)])
    return np.exp(np.sort(centres))


def _size_candidates(box_set: BoxSet, start: Sequence[int], single_map: bool) -> list[tuple[int, ...]]:
    """The start sizes scaled by 2^(k/4), k = -12..8; for a single map also sets spread over the
    box sizes: geometric between quantiles, geometric with steps sqrt(2) .. 2 from a low quantile,
    and k-means of the log sizes (those with sizes too close are dropped)."""
    candidates = [_int_sizes([s * 2 ** (k / 4) for s in start], single_map) for k in range(-12, 9)]
    if single_map:
        logs, n = np.log(box_set.scales()), len(start)
        for low in (0.02, 0.05, 0.1, 0.2):
            ends = np.quantile(logs, [low, 1 - low]) if n > 1 else np.quantile(logs, [0.5, 0.5])
            candidates.append(_int_sizes(np.exp(np.linspace(ends[0], ends[1], n)), single_map))
            for step in (2 ** 0.5, 2 ** 0.75, 2.0):
                candidates.append(_int_sizes(np.exp(ends[0]) * step ** np.arange(n), single_map))
        candidates.append(_int_sizes(_log_kmeans(np.exp(logs), n), single_map))
    return [c for c in candidates if c is not None]


def _ratio_candidates(box_set: BoxSet, start: Sequence[float]) -> list[tuple[float, ...]]:
    """The start ratios, ratios at the (i + 0.5) / n quantiles of the boxes' h / w, and geometric
    sets (spread 1.5, 2, 3) around the median."""
    widths, heights = box_set.sides()
    logs, n = np.log(heights / widths), len(start)
    candidates = [_ratios(start), _ratios(np.exp(np.quantile(logs, (np.arange(n) + 0.5) / n)))]
    for spread in (1.5, 2.0, 3.0):
        candidates.append(_ratios(np.exp(np.median(logs) + (np.arange(n) - (n - 1) / 2) * np.log(spread))))
    return [c for c in candidates if c is not None]


def suggest_anchors(box_set: BoxSet, anchors: DetectorAnchors, search_ratios: bool,
                    start: Optional[AnchorLayout] = None) -> Scored:
    """Anchors (as many sizes and ratios as ``start``, default: the detector's) covering the boxes
    best: the best of the candidate size sets, refined one size at a time; with ``search_ratios``
    the same for the ratios, then the sizes again; ``start`` itself unless that covers more boxes
    (where no box reaches IoU 0.5 every candidate ties, and an arbitrary one would be returned).
    Scored on every box of ``box_set``."""
    start = start or anchors.default
    single_map = len(anchors.strides) == 1
    search = _Search(box_set, anchors)

    def move_size(scored: Scored, i: int, factor: float) -> Optional[tuple]:
        sizes = list(scored.layout.sizes)
        if i > len(sizes):
            return None
        sizes = [s * factor for s in sizes] if i == len(sizes) else sizes[:i] + [sizes[i] * factor] + sizes[i + 1:]
        sized = _int_sizes(sizes, single_map)
        return None if sized is None else (sized, scored.layout.aspect_ratios)

    def move_ratio(scored: Scored, i: int, factor: float) -> Optional[tuple]:
        ratios = list(scored.layout.aspect_ratios)
        if i >= len(ratios):
            return None
        ratios[i] *= factor
        changed = _ratios(ratios)
        return None if changed is None else (scored.layout.sizes, changed)

    ratios = start.aspect_ratios
    best = search.best([(sizes, ratios) for sizes in _size_candidates(search.box_set, start.sizes, single_map)])
    best = search.refine(best, move_size)
    if search_ratios:
        best = search.best([(best.layout.sizes, r) for r in _ratio_candidates(search.box_set, ratios)] +
                           [(best.layout.sizes, best.layout.aspect_ratios)])
        best = search.refine(search.refine(best, move_ratio), move_size)
    if best.key <= search.score(start.sizes, start.aspect_ratios).key:
        best = search.score(start.sizes, start.aspect_ratios)
    return score_layout(box_set, best.layout)


def larger_inputs(images: Sequence[ImageBoxes], config: ModelConfig, anchors: DetectorAnchors,
                  search_ratios: bool, factors: Sequence[float] = (1.5, 2.0)
                  ) -> list[tuple[tuple[int, ...], int, Scored]]:
    """For images enlarged by each factor (``--min-size`` and ``--max-size`` scaled): (min sizes,
    max size, the suggested anchors there). Small objects on a coarse map need this: no anchor
    size makes up for a stride as large as the object."""
    found = []
    for factor in factors:
        min_sizes = tuple(int(round(m * factor)) for m in config.min_size)
        max_size = int(round(config.max_size * factor))
        box_set = resize_boxes(images, min_sizes, max_size)
        found.append((min_sizes, max_size, suggest_anchors(box_set, anchors, search_ratios)))
    return found


class AutoAnchors(NamedTuple):
    """What ``--anchor-sizes auto`` found: the config's anchors scored; the suggested sizes with
    the config's aspect ratios (the config's own when no sizes cover more boxes); the number of
    boxes; a hint when even the chosen anchors miss most boxes."""

    current: Scored
    chosen: Scored
    count: int
    hint: Optional[str]


def fit_anchor_sizes(box_set: BoxSet, anchors: DetectorAnchors) -> AutoAnchors:
    """The sizes ``--anchor-sizes auto`` trains with, for the boxes ``box_set`` (resized)."""
    current = score_layout(box_set, anchors.default)
    chosen = suggest_anchors(box_set, anchors, search_ratios=False)
    return AutoAnchors(current, chosen, len(box_set), low_coverage_hint(chosen, box_set))


def auto_anchor_sizes(dataset, config: ModelConfig) -> AutoAnchors:
    """:func:`fit_anchor_sizes` on ``dataset`` (the training split) resized as ``config`` resizes."""
    box_set = resize_boxes(dataset_boxes(dataset), config.min_size, config.max_size)
    if not len(box_set):
        raise ValueError("--anchor-sizes auto: the training split holds no boxes to fit anchors to")
    return fit_anchor_sizes(box_set, DetectorAnchors(config))


def describe_auto_anchors(fit: AutoAnchors) -> str:
    """The lines training prints for ``--anchor-sizes auto``: the sizes, their coverage against the
    backbone's, and the hint if any."""
    chosen, current = fit.chosen, fit.current
    if chosen.layout.sizes == current.layout.sizes:
        text = (f"--anchor-sizes auto: no sizes cover more of the {fit.count} training boxes than the backbone's "
                f"{sizes_text(current.layout)} (best anchor IoU >= {POSITIVE_IOU} for {current.positive:.1%}, "
                f">= {LOOSE_IOU} for {current.loose:.1%}): keeping them")
    else:
        text = (f"--anchor-sizes auto: {sizes_text(chosen.layout)} (best anchor IoU >= {POSITIVE_IOU} for "
                f"{chosen.positive:.1%} of the {fit.count} training boxes, >= {LOOSE_IOU} for {chosen.loose:.1%}; "
                f"the backbone's {sizes_text(current.layout)}: {current.positive:.1%}, {current.loose:.1%})")
    return text if fit.hint is None else f"{text}\n{fit.hint}"


def low_coverage_hint(chosen: Scored, box_set: BoxSet) -> Optional[str]:
    """A one-line hint when ``chosen`` reaches IoU 0.5 for fewer than LOW_COVERAGE of the boxes,
    naming the likely cause: boxes small for the finest stride (median side under two strides),
    else box shapes the aspect ratios do not fit; None when coverage is fine."""
    if chosen.loose >= LOW_COVERAGE:
        return None
    side, stride = float(np.median(box_set.scales())), min(chosen.layout.strides)
    start = (f"--anchor-sizes auto: the chosen anchors reach IoU >= {LOOSE_IOU} for only {chosen.loose:.1%} of "
             "the boxes: ")
    if side >= 2 * stride:
        return start + (f"their shapes do not fit --aspect-ratios {ratios_text(chosen.layout)}; "
                        "tools/check_dataset.py --anchors suggests ratios that cover more")
    fpn = " or an FPN backbone" if len(chosen.layout.strides) == 1 else ""
    return start + (f"they are small (median side {side:.0f} px after resizing) for the feature stride {stride}; "
                    f"a larger --min-size{fpn} helps more (tools/check_dataset.py --anchors suggests a size), "
                    "and compare a run with the default anchors before keeping these")
