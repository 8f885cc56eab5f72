"""Why a detector is weak: AP and precision/recall, best-F1 score thresholds, a confusion matrix with
background, and the TIDE error breakdown, all at one IoU threshold (0.5). Pure numpy.

Everything starts from :func:`match_detections`, one matching of detections to ground truth that
follows pycocotools' COCOeval rules (area "all", at most 100 detections per image and class), so
:func:`average_precision` of the unmodified matching equals COCOeval's AP@0.5 per class:

- per image and class, detections by descending score (a stable sort) each take the unmatched
  ground-truth object of highest IoU >= the threshold (the last of equal maxima, as COCOeval);
- ignored objects (VOC ``difficult``, COCO ``iscrowd``) are tried only when no other object
  matches; a detection on one is left out of every count, and the object is never "missed";
- IoU with an ignored object divides by the detection's area (COCOeval's crowd rule);
- an unmatched detection of area w * h outside [0, 1e10] (a negative width) is left out too;
- 101-point interpolation: the precision envelope (best precision at this recall or beyond) read
  at recall 0, 0.01, ..., 1 at the first rank reaching it; 0 where the recall is never reached.

TIDE (Bolya et al., ECCV 2020, "TIDE: A General Toolbox for Identifying Object Detection Errors"),
with t_f = the matching threshold (0.5) and t_b = 0.1. Each false positive gets one type, tested in
the order of the authors' toolbox (the paper lists the types without an order):

1. Loc: IoU with an object of its class in [t_b, t_f);
2. Cls: IoU >= t_f with an object of another class;
3. Dupe: IoU >= t_f with an object of its class (already taken by a higher-scoring detection);
4. Bkg: IoU < t_b with every object (always so in an image without objects);
5. Both: the rest (IoU in [t_b, t_f) with an object of another class only).

Missed: objects no detection found that no Cls or Loc error aims at (an error aims at the object
of highest IoU in the class it tests). The paper's oracles, each applied alone to the detections:
Cls: the detection takes the object's class and becomes a true positive; Loc: the detection takes
the object's box and becomes a true positive. Either, when the object is already found or a
higher-scoring error of the same type aims at it, removes the detection instead (the paper's
"suppress the lower-scoring duplicate"). Both, Dupe, Bkg: the detection is removed. Missed: the
number of ground-truth objects of the class shrinks by its missed objects. dAP of a type = AP
after its fix - AP, per class and for the mean over the classes with ground truth (a class whose
every object is forgiven by the Missed fix keeps AP 0 and stays in the mean).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np

IOU_THRESHOLD = 0.5
BACKGROUND_IOU = 0.1
MAX_DETECTIONS = 100  # per image and class, as COCOeval's largest maxDets
AREA_RANGE = (0.0, 1e10)  # COCOeval's area "all": unmatched detections outside it are ignored
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)

# outcome of a detection
DROPPED, IGNORED, FALSE_POSITIVE, TRUE_POSITIVE = -2, -1, 0, 1
# TIDE type of a false positive (NONE for every other detection)
NONE, CLS, LOC, BOTH, DUPE, BKG = 0, 1, 2, 3, 4, 5
ERROR_NAMES = {CLS: "cls", LOC: "loc", BOTH: "both", DUPE: "dupe", BKG: "bkg"}
TIDE_TYPES = ("cls", "loc", "both", "dupe", "bkg", "missed")


# ---------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class ImageData:
    """Ground truth and detections of one image; boxes are COCO ``[x, y, w, h]`` float64.

    gt_boxes [G, 4], gt_labels int [G], gt_ignore bool [G] (difficult / iscrowd);
    det_boxes [D, 4], det_scores [D], det_labels int [D] (in the detector's output order).
    """

    image_id: int
    gt_boxes: np.ndarray
    gt_labels: np.ndarray
    gt_ignore: np.ndarray
    det_boxes: np.ndarray
    det_scores: np.ndarray
    det_labels: np.ndarray


def images_from_coco(coco_gt, detections: Mapping[int, Sequence[Mapping]],
                     image_ids: Optional[Iterable[int]] = None) -> list[ImageData]:
    """One :class:`ImageData` per image id (default: every image of ``coco_gt``), sorted by id.

    coco_gt: a pycocotools COCO (only its ``imgToAnns`` / ``imgs`` are read); detections: image
    id -> COCO results (``bbox``, ``score``, ``category_id``), e.g. ``CocoEvaluator.detections``.
    """
    images = []
    for image_id in sorted(int(i) for i in (coco_gt.imgs if image_ids is None else image_ids)):
        anns = coco_gt.imgToAnns.get(image_id, [])
        dets = detections.get(image_id, [])
        images.append(ImageData(
            image_id,
            np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4),
            np.array([a["category_id"] for a in anns], dtype=np.int64),
            np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool),
            np.array([d["bbox"] for d in dets], dtype=np.float64).reshape(-1, 4),
            np.array([d["score"] for d in dets], dtype=np.float64),
            np.array([d["category_id"] for d in dets], dtype=np.int64),
        ))
    return images


def box_iou(dets: np.ndarray, gts: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """IoU [D, G] of ``[x, y, w, h]`` boxes dets [D, 4] and gts [G, 4], computed as pycocotools
    does (same operations, so equal to the last bit); a crowd column divides by the detection area."""
    width = np.minimum(dets[:, None, 0] + dets[:, None, 2], gts[None, :, 0] + gts[None, :, 2]) \
        - np.maximum(dets[:, None, 0], gts[None, :, 0])
    height = np.minimum(dets[:, None, 1] + dets[:, None, 3], gts[None, :, 1] + gts[None, :, 3]) \
        - np.maximum(dets[:, None, 1], gts[None, :, 1])
    overlap = (width > 0) & (height > 0)
    inter = np.where(overlap, width * height, 0.0)
    det_area = (dets[:, 2] * dets[:, 3])[:, None]
    union = np.where(crowd[None, :], det_area, det_area + (gts[:, 2] * gts[:, 3])[None, :] - inter)
    return np.divide(inter, union, out=np.zeros_like(inter), where=overlap)


def _last_argmax(values: np.ndarray) -> int:
    """Index of the last maximum (COCOeval's ``>=`` scan keeps the last of equal IoUs)."""
    return len(values) - 1 - int(np.argmax(values[::-1]))


# ---------------------------------------------------------------------------------- matching
@dataclass
class ImageMatch:
    """The matching of one image. Detection arrays are in the image's ranking order (descending
    score, stable); ``det_index`` maps them back to the image's detection list.

    det_index, det_outcome (DROPPED/IGNORED/FALSE_POSITIVE/TRUE_POSITIVE), det_gt (object of a
    true positive or ignored match, else -1), det_error (TIDE type), det_target (object a Cls/Loc
    error aims at, else -1): [D] each; iou [D, G] in ranking order x object order.
    """

    det_index: np.ndarray
    det_outcome: np.ndarray
    det_gt: np.ndarray
    det_error: np.ndarray
    det_target: np.ndarray
    iou: np.ndarray


def _match_class(iou: np.ndarray, dets: np.ndarray, gts: np.ndarray, ignore: np.ndarray, threshold: float,
                 outcome: np.ndarray, matched: np.ndarray) -> None:
    """COCOeval's greedy matching of ranked detections ``dets`` to objects ``gts`` (one class);
    fills ``outcome`` and ``matched`` (indexed by rank) in place."""
    real, crowd = gts[~ignore[gts]], gts[ignore[gts]]
    taken = np.zeros(len(real), dtype=bool)
    real_iou, crowd_iou = iou[np.ix_(dets, real)], iou[np.ix_(dets, crowd)]
    hits = (real_iou >= threshold).any(axis=1) | (crowd_iou >= threshold).any(axis=1)
    outcome[dets] = FALSE_POSITIVE
    for row in np.flatnonzero(hits):
        free = np.where(taken, -1.0, real_iou[row])
        best = _last_argmax(free) if len(real) else -1
        if best >= 0 and free[best] >= threshold:
            taken[best] = True
            outcome[dets[row]], matched[dets[row]] = TRUE_POSITIVE, real[best]
        elif len(crowd) and crowd_iou[row].max() >= threshold:
            outcome[dets[row]], matched[dets[row]] = IGNORED, crowd[_last_argmax(crowd_iou[row])]


def _tide_types(iou: np.ndarray, det_labels: np.ndarray, gt_labels: np.ndarray, real: np.ndarray,
                false_positive: np.ndarray, t_f: float, t_b: float) -> tuple[np.ndarray, np.ndarray]:
    """(TIDE type [D], aimed-at object [D]) of ranked detections, the order of tests as in the
    module docstring; only false positives get a type. Objects ``real``: the non-ignored ones."""
    error = np.full(len(det_labels), NONE, dtype=np.int8)
    target = np.full(len(det_labels), -1, dtype=np.int64)
    if not false_positive.any():
        return error, target
    if len(real) == 0:
        error[false_positive] = BKG
        return error, target
    sub = iou[:, real]
    same = det_labels[:, None] == gt_labels[real][None, :]
    same_iou, other_iou = np.where(same, sub, 0.0), np.where(same, 0.0, sub)
    best_same, best_other = same_iou.max(axis=1), other_iou.max(axis=1)
    loc = (best_same >= t_b) & (best_same < t_f)
    cls = ~loc & (best_other >= t_f)
    dupe = ~loc & ~cls & (best_same >= t_f)
    bkg = ~loc & ~cls & ~dupe & (sub.max(axis=1) < t_b)
    kinds = np.select([loc, cls, dupe, bkg], [LOC, CLS, DUPE, BKG], default=BOTH).astype(np.int8)
    error[false_positive] = kinds[false_positive]
    target[false_positive & loc] = real[same_iou.argmax(axis=1)][false_positive & loc]
    target[false_positive & cls] = real[other_iou.argmax(axis=1)][false_positive & cls]
    return error, target


def match_image(image: ImageData, iou_threshold: float = IOU_THRESHOLD, background_iou: float = BACKGROUND_IOU,
                max_detections: int = MAX_DETECTIONS) -> ImageMatch:
    """Match one image's detections (see the module docstring) and type its false positives."""
    order = np.argsort(-image.det_scores, kind="mergesort")
    labels = image.det_labels[order]
    iou = box_iou(image.det_boxes[order], image.gt_boxes, image.gt_ignore)
    outcome = np.full(len(order), DROPPED, dtype=np.int8)
    matched = np.full(len(order), -1, dtype=np.int64)
    threshold = min(iou_threshold, 1 - 1e-10)  # COCOeval's cap
    for label in np.unique(labels):
        dets = np.flatnonzero(labels == label)[:max_detections]
        _match_class(iou, dets, np.flatnonzero(image.gt_labels == label), image.gt_ignore, threshold,
                     outcome, matched)
    area = image.det_boxes[order, 2] * image.det_boxes[order, 3]
    outside = (outcome == FALSE_POSITIVE) & ((area < AREA_RANGE[0]) | (area > AREA_RANGE[1]))
    outcome[outside] = IGNORED
    real = np.flatnonzero(~image.gt_ignore)
    error, target = _tide_types(iou, labels, image.gt_labels, real, outcome == FALSE_POSITIVE,
                                iou_threshold, background_iou)
    return ImageMatch(order, outcome, matched, error, target, iou)


@dataclass
class Matching:
    """Every image's matching, flattened. Detections [N] are in COCOeval's accumulation order
    (images by id, each image's in ranking order); objects [M] image by image. ``det_gt`` and
    ``det_target`` index the objects [M]; ``rank`` [N] orders the detections by descending score
    (stable), the order AP reads them in."""

    images: list[ImageData]
    matches: list[ImageMatch]
    class_ids: list[int]
    det_image: np.ndarray
    det_label: np.ndarray
    det_score: np.ndarray
    det_outcome: np.ndarray
    det_gt: np.ndarray
    det_error: np.ndarray
    det_target: np.ndarray
    gt_image: np.ndarray
    gt_label: np.ndarray
    gt_ignore: np.ndarray
    gt_found: np.ndarray  # bool [M]: matched by a true positive
    rank: np.ndarray
    det_start: np.ndarray = field(repr=False)  # [images + 1] offsets into the detections
    gt_start: np.ndarray = field(repr=False)  # [images + 1] offsets into the objects

    def num_gt(self) -> dict[int, int]:
        """class id -> number of non-ignored objects."""
        real = self.gt_label[~self.gt_ignore]
        return {c: int((real == c).sum()) for c in self.class_ids}


def match_detections(images: Iterable[ImageData], class_ids: Sequence[int], iou_threshold: float = IOU_THRESHOLD,
                     background_iou: float = BACKGROUND_IOU) -> Matching:
    """Match every image (pass images sorted by id for COCOeval's tie order) and flatten."""
    kept, matches = [], []
    for image in images:
        kept.append(image)
        matches.append(match_image(image, iou_threshold, background_iou))
    det_counts = [len(m.det_index) for m in matches]
    gt_counts = [len(i.gt_labels) for i in kept]
    det_start = np.concatenate([[0], np.cumsum(det_counts)]).astype(np.int64)
    gt_start = np.concatenate([[0], np.cumsum(gt_counts)]).astype(np.int64)

    def joined(parts: list, dtype) -> np.ndarray:
        return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype=dtype)

    def shifted(values: np.ndarray, offset: int) -> np.ndarray:
        return np.where(values >= 0, values + offset, -1)

    det_gt = joined([shifted(m.det_gt, gt_start[i]) for i, m in enumerate(matches)], np.int64)
    det_score = joined([i.det_scores[m.det_index] for i, m in zip(kept, matches)], np.float64)
    gt_found = np.zeros(int(gt_start[-1]), dtype=bool)
    outcome = joined([m.det_outcome for m in matches], np.int8)
    gt_found[det_gt[outcome == TRUE_POSITIVE]] = True
    return Matching(
        kept, matches, [int(c) for c in class_ids],
        det_image=np.repeat(np.arange(len(kept)), det_counts),
        det_label=joined([i.det_labels[m.det_index] for i, m in zip(kept, matches)], np.int64),
        det_score=det_score, det_outcome=outcome, det_gt=det_gt,
        det_error=joined([m.det_error for m in matches], np.int8),
        det_target=joined([shifted(m.det_target, gt_start[i]) for i, m in enumerate(matches)], np.int64),
        gt_image=np.repeat(np.arange(len(kept)), gt_counts),
        gt_label=joined([i.gt_labels for i in kept], np.int64),
        gt_ignore=joined([i.gt_ignore for i in kept], bool),
        gt_found=gt_found, rank=np.argsort(-det_score, kind="mergesort"),
        det_start=det_start, gt_start=gt_start)


# ---------------------------------------------------------------------------------- AP, PR, F1
def interpolated_precision(is_tp: np.ndarray, num_gt: int) -> np.ndarray:
    """COCOeval's precision [101] at recall 0, 0.01, ..., 1 of detections ranked best first
    (is_tp bool [n]) against ``num_gt`` > 0 objects."""
    tp = np.cumsum(is_tp, dtype=np.float64)
    fp = np.cumsum(~is_tp, dtype=np.float64)
    recall = tp / num_gt
    precision = np.maximum.accumulate((tp / (tp + fp + np.spacing(1)))[::-1])[::-1]
    where = np.searchsorted(recall, RECALL_THRESHOLDS, side="left")
    result = np.zeros(len(RECALL_THRESHOLDS))
    reached = where < len(precision)
    result[reached] = precision[where[reached]]
    return result


def average_precision(is_tp: np.ndarray, num_gt: int) -> float:
    """101-point interpolated AP (COCOeval's) of ranked detections; 0 without objects."""
    return float(interpolated_precision(is_tp, num_gt).mean()) if num_gt > 0 else 0.0


def ranked_by_class(matching: Matching, labels: np.ndarray, keep: np.ndarray,
                    is_tp: np.ndarray) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """class id -> (is_tp [n], scores [n]) of the kept detections carrying that label, best first."""
    ranked = matching.rank[keep[matching.rank]]
    grouping = np.argsort(labels[ranked], kind="stable")
    ranked = ranked[grouping]
    sorted_labels = labels[ranked]
    result = {}
    for class_id in matching.class_ids:
        lo, hi = np.searchsorted(sorted_labels, class_id, "left"), np.searchsorted(sorted_labels, class_id, "right")
        result[class_id] = (is_tp[ranked[lo:hi]], matching.det_score[ranked[lo:hi]])
    return result


def class_aps(matching: Matching, labels: np.ndarray, keep: np.ndarray, is_tp: np.ndarray,
              num_gt: Mapping[int, int], classes: Iterable[int]) -> dict[int, float]:
    """class id -> AP@threshold for ``classes`` under the given labels / kept detections / hits."""
    ranked = ranked_by_class(matching, labels, keep, is_tp)
    return {c: average_precision(ranked[c][0], num_gt[c]) for c in classes}


def base_scenario(matching: Matching) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, keep, is_tp) [N] each of the matching as it is: true and false positives count."""
    outcome = matching.det_outcome
    keep = (outcome == TRUE_POSITIVE) | (outcome == FALSE_POSITIVE)
    return matching.det_label.copy(), keep, outcome == TRUE_POSITIVE


@dataclass
class F1Point:
    """The score threshold (keep detections scoring >= it) of best F1, with what it gives."""

    threshold: Optional[float]
    precision: float
    recall: float
    f1: float
    true_positives: int
    false_positives: int
    num_gt: int


def best_f1(is_tp: np.ndarray, scores: np.ndarray, num_gt: int) -> F1Point:
    """Best F1 = 2TP / (2TP + FP + FN) over the thresholds at the scores of ranked detections
    (tied scores stand or fall together); the highest such threshold on ties. Threshold None
    when no threshold finds anything (F1 0)."""
    tp = np.cumsum(is_tp)
    fp = np.cumsum(~is_tp)
    ends = np.flatnonzero(np.r_[scores[1:] != scores[:-1], True]) if len(scores) else np.zeros(0, np.int64)
    f1 = 2 * tp[ends] / np.maximum(tp[ends] + fp[ends] + num_gt, 1)
    if len(ends) == 0 or f1.max() <= 0:
        return F1Point(None, 0.0, 0.0, 0.0, 0, 0, int(num_gt))
    end = ends[int(np.argmax(f1))]
    found, wrong = int(tp[end]), int(fp[end])
    return F1Point(float(scores[end]), found / (found + wrong), found / num_gt, float(f1.max()), found, wrong,
                   int(num_gt))


def f1_table(matching: Matching) -> tuple[dict[int, Optional[F1Point]], F1Point]:
    """(class id -> best-F1 point, None for a class without objects; the best F1 of all classes
    pooled at one threshold, the "micro" F1)."""
    labels, keep, is_tp = base_scenario(matching)
    num_gt = matching.num_gt()
    ranked = ranked_by_class(matching, labels, keep, is_tp)
    per_class = {c: best_f1(*ranked[c], num_gt[c]) if num_gt[c] else None for c in matching.class_ids}
    pooled = matching.rank[keep[matching.rank]]
    return per_class, best_f1(is_tp[pooled], matching.det_score[pooled], sum(num_gt.values()))


# ---------------------------------------------------------------------------------- confusion matrix
@dataclass
class Confusion:
    """Counts [K + 1, K + 1] at one score threshold: row = ground-truth class, column = predicted
    class, index K = background (last column: missed objects; last row: false detections).
    Per image [images]: true positives, false positives (confusions included) and false negatives
    (objects not found by a detection of their class). ``det_object`` [N]: the object a counted
    detection is assigned to (-1: background, -2: not counted); ``gt_found`` bool [M]: found by a
    detection of its class."""

    threshold: float
    counts: np.ndarray
    image_tp: np.ndarray
    image_fp: np.ndarray
    image_fn: np.ndarray
    det_object: np.ndarray
    gt_found: np.ndarray

    def normalised(self) -> np.ndarray:
        """Each row divided by its sum (rows without any count stay 0)."""
        sums = self.counts.sum(axis=1, keepdims=True)
        return np.divide(self.counts, sums, out=np.zeros(self.counts.shape), where=sums > 0)


def _confuse_image(matching: Matching, index: int, wrong: np.ndarray, taken: np.ndarray, threshold: float,
                   det_object: np.ndarray) -> None:
    """Give the image's wrong detections (flat indices ``wrong``, ranked) the untaken object of
    another class of highest IoU >= threshold, else background (-1), in ``det_object``; marks
    ``taken``."""
    start, gt_start = matching.det_start[index], matching.gt_start[index]
    image = matching.images[index]
    real = np.flatnonzero(~image.gt_ignore)
    iou = matching.matches[index].iou
    for det in wrong:
        det_object[det] = -1
        if len(real) == 0:
            continue
        other = image.gt_labels[real] != matching.det_label[det]
        free = np.where(other & ~taken[gt_start + real], iou[det - start, real], -1.0)
        best = _last_argmax(free)
        if free[best] >= threshold:
            taken[gt_start + real[best]] = True
            det_object[det] = gt_start + real[best]


def _class_rows(class_ids: Sequence[int], labels: np.ndarray) -> np.ndarray:
    """Row / column [n] of each label in a K + 1 matrix (K for a label outside ``class_ids``)."""
    lookup = {c: k for k, c in enumerate(class_ids)}
    return np.array([lookup.get(int(c), len(lookup)) for c in labels], dtype=np.int64).reshape(-1)


def confusion_matrix(matching: Matching, score_threshold: float,
                     iou_threshold: float = IOU_THRESHOLD) -> Confusion:
    """Confusion at a score threshold (keep scores >= it): true positives of the matching on the
    diagonal; each other kept detection, best first, then takes the untaken object of another
    class of highest IoU >= ``iou_threshold`` (a confusion) or counts as a false detection;
    objects left are missed. Ignored objects and detections on them are left out."""
    size = len(matching.class_ids)
    kept = (matching.det_score >= score_threshold) & (matching.det_outcome >= FALSE_POSITIVE)
    hit = kept & (matching.det_outcome == TRUE_POSITIVE)
    taken = np.zeros(len(matching.gt_label), dtype=bool)
    taken[matching.det_gt[hit]] = True
    found = taken.copy()
    det_object = np.full(len(matching.det_label), -2, dtype=np.int64)
    det_object[hit] = matching.det_gt[hit]
    wrong = kept & ~hit
    for image in np.unique(matching.det_image[wrong]):
        lo, hi = matching.det_start[image], matching.det_start[image + 1]
        _confuse_image(matching, int(image), lo + np.flatnonzero(wrong[lo:hi]), taken, iou_threshold, det_object)
    gt_row = _class_rows(matching.class_ids, matching.gt_label)
    assigned = det_object[kept]
    rows = np.where(assigned >= 0, gt_row[np.maximum(assigned, 0)] if len(gt_row) else size, size)
    counts = np.zeros((size + 1, size + 1), dtype=np.int64)
    np.add.at(counts, (rows, _class_rows(matching.class_ids, matching.det_label[kept])), 1)
    missed = ~matching.gt_ignore & ~taken
    np.add.at(counts, (gt_row[missed], size), 1)
    images = len(matching.images)
    return Confusion(score_threshold, counts,
                     np.bincount(matching.det_image[hit], minlength=images),
                     np.bincount(matching.det_image[wrong], minlength=images),
                     np.bincount(matching.gt_image[~matching.gt_ignore & ~found], minlength=images),
                     det_object, found)


# ---------------------------------------------------------------------------------- TIDE
@dataclass
class Tide:
    """TIDE at one IoU threshold: AP per class (ap, None without objects) and its mean ``map``;
    ``delta[type]`` the mean-AP gain of fixing that type alone, ``class_delta[type][class]`` per
    class; ``counts[type]`` how many detections (objects for "missed") have that type."""

    ap: dict[int, Optional[float]]
    map: Optional[float]
    delta: dict[str, float]
    class_delta: dict[str, dict[int, Optional[float]]]
    counts: dict[str, int]


def _fix_by_moving(matching: Matching, error: int, relabel: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The Cls (relabel) or Loc oracle: the best-ranked error of the type aimed at each object not
    found becomes a true positive (with the object's class for Cls); the other errors are removed."""
    labels, keep, is_tp = base_scenario(matching)
    position = np.empty_like(matching.rank)
    position[matching.rank] = np.arange(len(matching.rank))
    errors = np.flatnonzero(matching.det_error == error)
    errors = errors[np.argsort(position[errors], kind="stable")]
    targets = matching.det_target[errors]
    _, first = np.unique(targets, return_index=True)
    winners = errors[first]
    winners = winners[~matching.gt_found[matching.det_target[winners]]]
    keep[errors] = False
    keep[winners] = True
    is_tp[winners] = True
    if relabel:
        labels[winners] = matching.gt_label[matching.det_target[winners]]
    return labels, keep, is_tp


def missed_objects(matching: Matching) -> np.ndarray:
    """bool [M]: TIDE's missed objects: not ignored, not found, aimed at by no Cls or Loc error."""
    aimed = np.zeros(len(matching.gt_label), dtype=bool)
    moving = (matching.det_error == CLS) | (matching.det_error == LOC)
    aimed[matching.det_target[moving]] = True
    return ~matching.gt_ignore & ~matching.gt_found & ~aimed


def tide(matching: Matching) -> Tide:
    """The TIDE breakdown of the matching (see the module docstring)."""
    num_gt = matching.num_gt()
    scored = [c for c in matching.class_ids if num_gt[c] > 0]
    base = class_aps(matching, *base_scenario(matching), num_gt, scored)
    missed = missed_objects(matching)
    fixes = {"cls": (_fix_by_moving(matching, CLS, True), num_gt),
             "loc": (_fix_by_moving(matching, LOC, False), num_gt)}
    for name, code in (("both", BOTH), ("dupe", DUPE), ("bkg", BKG)):
        labels, keep, is_tp = base_scenario(matching)
        keep[matching.det_error == code] = False
        fixes[name] = ((labels, keep, is_tp), num_gt)
    fewer = {c: n - int((matching.gt_label[missed] == c).sum()) for c, n in num_gt.items()}
    fixes["missed"] = (base_scenario(matching), fewer)
    mean = float(np.mean(list(base.values()))) if scored else None
    delta, class_delta = {}, {}
    for name, (scenario, counts) in fixes.items():
        fixed = class_aps(matching, *scenario, counts, scored)
        class_delta[name] = {c: fixed[c] - base[c] if c in base else None for c in matching.class_ids}
        delta[name] = float(np.mean(list(fixed.values()))) - mean if scored else 0.0
    counts = {name: int((matching.det_error == code).sum()) for code, name in ERROR_NAMES.items()}
    counts["missed"] = int(missed.sum())
    return Tide({c: base.get(c) for c in matching.class_ids}, mean, delta, class_delta, counts)


# ---------------------------------------------------------------------------------- per image
def image_f1(confusion: Confusion) -> np.ndarray:
    """F1 [images] = 2TP / (2TP + FP + FN) per image at the confusion's threshold; NaN for an image
    with nothing to find and nothing found."""
    tp, fp, fn = confusion.image_tp, confusion.image_fp, confusion.image_fn
    total = 2 * tp + fp + fn
    return np.divide(2.0 * tp, total, out=np.full(len(tp), np.nan), where=total > 0)


def worst_and_best(confusion: Confusion, count: int) -> tuple[list[int], list[int]]:
    """Image indices: up to ``count`` of lowest F1 (most errors first on ties) and up to ``count``
    of highest F1 (most objects first on ties) among images with an F1, disjoint (with fewer than
    2 * count such images, the worse half is "worst" and the rest "best")."""
    f1 = image_f1(confusion)
    valid = np.flatnonzero(~np.isnan(f1))
    errors = confusion.image_fp + confusion.image_fn
    worst = valid[np.lexsort((-errors[valid], f1[valid]))][:min(count, (len(valid) + 1) // 2)]
    objects = confusion.image_tp + confusion.image_fn
    rest = np.setdiff1d(valid, worst)
    best = rest[np.lexsort((-objects[rest], -f1[rest]))][:count]
    return [int(i) for i in worst], [int(i) for i in best]


# ---------------------------------------------------------------------------------- COCOeval's arrays
def class_precision(coco_eval, area: str = "all") -> dict[int, np.ndarray]:
    """The one reader of an accumulated pycocotools COCOeval's ``eval["precision"]`` [T, R, K, A, M]:
    class id -> precision [T IoU thresholds, R recall thresholds] of area range ``area`` at the most
    detections (-1 where the class has no such object). Classes are found through ``params.catIds``
    (the K axis), so a category missing from the ground truth never takes another's row."""
    params, precision = coco_eval.params, coco_eval.eval["precision"]
    area_index, most = list(params.areaRngLbl).index(area), int(np.argmax(params.maxDets))
    return {int(class_id): precision[:, :, k, area_index, most] for k, class_id in enumerate(params.catIds)}


def iou50_row(coco_eval) -> int:
    """The row of IoU 0.5 on the T axis of :func:`class_precision`'s arrays."""
    return int(np.flatnonzero(np.isclose(coco_eval.params.iouThrs, 0.5))[0])


def _mean_valid(values: np.ndarray) -> Optional[float]:
    """Mean of the entries other than -1 (None: there are none)."""
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else None


def coco_curves(coco_eval) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Class id -> (precision [101] at IoU 0.5, precision [101] averaged over IoU 0.5:0.95) against
    recall :data:`RECALL_THRESHOLDS`, area "all". Classes without objects (-1) are left out."""
    iou50 = iou50_row(coco_eval)
    return {class_id: (values[iou50].copy(), values.mean(axis=0))
            for class_id, values in class_precision(coco_eval).items() if (values > -1).all()}


def coco_ap_per_class(coco_eval) -> dict[int, tuple[Optional[float], Optional[float]]]:
    """Class id -> (AP@0.5, AP@[.5:.95]) of area "all"; None for a class without (non-crowd) objects."""
    iou50 = iou50_row(coco_eval)
    return {class_id: (_mean_valid(values[iou50]), _mean_valid(values))
            for class_id, values in class_precision(coco_eval).items()}


def coco_size_aps(coco_eval) -> dict[int, dict[str, Optional[float]]]:
    """Class id -> {"small", "medium", "large"} -> AP@[.5:.95] of objects of that size (None: no
    object of that size)."""
    by_size = {size: class_precision(coco_eval, size) for size in ("small", "medium", "large")}
    return {class_id: {size: _mean_valid(by_size[size][class_id]) for size in by_size}
            for class_id in by_size["small"]}
