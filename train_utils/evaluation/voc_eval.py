"""PASCAL VOC detection AP per class, following the rules of the official VOC devkit (VOCevaldet.m).

For one class: detections of all images are ranked by descending score (a stable sort, so ties
keep their input order, as MATLAB's ``sort`` does). Each detection is compared with the class's
ground-truth boxes in its image and takes the one of highest IoU; if that IoU is >= 0.5 the
detection is

- ignored (neither true nor false positive) when that object is ``difficult``,
- a true positive when the object was not claimed yet (it is now),
- a false positive otherwise (a duplicate).

Below 0.5 it is a false positive. Recall is measured against the non-difficult objects.

Rules for turning the precision/recall curve into AP:

- ``"07"``: VOC2007's 11-point interpolation, the mean over t in {0, 0.1, ..., 1} of the best
  precision at recall >= t (the thresholds are the exact decimals i / 10).
- ``"12"``: VOC2010+ area under the monotone (right-to-left maximum) precision envelope.

IoU deviation from the devkit: the devkit treats coordinates as inclusive integer pixels and adds
1 to every width and height. Our boxes are continuous pixel coordinates (``xmax`` is the right
edge of the last pixel), so IoU here is plain ``intersection / union`` without the +1.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Hashable, Iterable, Mapping, Optional, Sequence

import numpy as np
from pycocotools.coco import COCO

RULES = ("07", "12")
IOU_THRESHOLD = 0.5

# (image id, score, box [x1, y1, x2, y2]) of one detection of the class being scored
Detection = tuple[Hashable, float, Sequence[float]]
# image id -> (boxes float [N, 4] xyxy, difficult bool [N]) of the class being scored
GroundTruth = Mapping[Hashable, tuple[np.ndarray, np.ndarray]]


def iou_with_boxes(box: Sequence[float], boxes: np.ndarray) -> np.ndarray:
    """Plain IoU of one ``box`` [4] with ``boxes`` [N, 4] (xyxy, continuous coordinates) -> [N]."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    x1, y1, x2, y2 = (float(v) for v in box)
    inter_w = np.clip(np.minimum(boxes[:, 2], x2) - np.maximum(boxes[:, 0], x1), 0.0, None)
    inter_h = np.clip(np.minimum(boxes[:, 3], y2) - np.maximum(boxes[:, 1], y1), 0.0, None)
    intersection = inter_w * inter_h
    union = (x2 - x1) * (y2 - y1) + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) - intersection
    return np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)


def average_precision(recall: np.ndarray, precision: np.ndarray, rule: str) -> float:
    """AP of a precision/recall curve ([D] each, in ranking order) under the ``"07"`` or ``"12"`` rule."""
    recall = np.asarray(recall, dtype=np.float64)
    precision = np.asarray(precision, dtype=np.float64)
    if rule == "07":
        total = 0.0
        for step in range(11):
            reached = precision[recall >= step / 10]
            total += float(reached.max()) if reached.size else 0.0
        return total / 11
    if rule == "12":
        rec = np.concatenate(([0.0], recall, [1.0]))
        prec = np.concatenate(([0.0], precision, [0.0]))
        prec = np.maximum.accumulate(prec[::-1])[::-1]  # best precision at this recall or beyond
        steps = np.nonzero(rec[1:] != rec[:-1])[0] + 1
        return float(np.sum((rec[steps] - rec[steps - 1]) * prec[steps]))
    raise ValueError(f"unknown VOC AP rule {rule!r}; choose one of {RULES}")


def class_average_precision(detections: Iterable[Detection], ground_truth: GroundTruth, rule: str,
                            iou_threshold: float = IOU_THRESHOLD) -> Optional[float]:
    """VOC AP of one class; None when the class has no non-difficult object (AP is undefined)."""
    if rule not in RULES:
        raise ValueError(f"unknown VOC AP rule {rule!r}; choose one of {RULES}")
    positives = sum(int((~np.asarray(difficult, dtype=bool)).sum()) for _, difficult in ground_truth.values())
    if positives == 0:
        return None
    detections = list(detections)
    scores = np.array([float(score) for _, score, _ in detections], dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    claimed = {image_id: np.zeros(len(boxes), dtype=bool) for image_id, (boxes, _) in ground_truth.items()}

    outcomes = []  # True = true positive, False = false positive; ignored detections are left out
    for index in order:
        image_id, _, box = detections[index]
        if image_id not in ground_truth or len(ground_truth[image_id][0]) == 0:
            outcomes.append(False)
            continue
        boxes, difficult = ground_truth[image_id]
        overlaps = iou_with_boxes(box, boxes)
        best = int(np.argmax(overlaps))  # first of equal maxima, like the devkit's strict '>' scan
        if overlaps[best] < iou_threshold:
            outcomes.append(False)
        elif bool(difficult[best]):
            continue
        elif not claimed[image_id][best]:
            claimed[image_id][best] = True
            outcomes.append(True)
        else:
            outcomes.append(False)

    hits = np.array(outcomes, dtype=bool)
    true_positives = np.cumsum(hits)
    false_positives = np.cumsum(~hits)
    recall = true_positives / positives
    precision = true_positives / np.maximum(true_positives + false_positives, 1)
    return average_precision(recall, precision, rule)


def voc_ap_per_class(coco_gt: COCO, detections: Mapping[int, Sequence[Mapping]], rule: str,
                     image_ids: Optional[Iterable[int]] = None) -> dict[int, Optional[float]]:
    """VOC AP@0.5 for every category of ``coco_gt`` (None for a category without non-difficult objects).

    Args:
        coco_gt: ground truth; ``iscrowd`` marks VOC difficult objects, ``bbox`` is [x, y, w, h].
        detections: image id -> detections in COCO result format (``category_id``, ``score``,
            ``bbox`` [x, y, w, h]), e.g. ``CocoEvaluator.detections``.
        rule: ``"07"`` or ``"12"``.
        image_ids: the images scored (their ground truth counts even without detections);
            default: the keys of ``detections``.
    Returns:
        category id -> AP, for every category id of ``coco_gt`` in ascending order.
    """
    images = sorted(detections) if image_ids is None else sorted(int(i) for i in image_ids)
    extra = {int(i) for i in detections} - set(images)
    if extra:
        raise ValueError(f"voc_ap_per_class: detections for images outside image_ids: {sorted(extra)[:5]}")
    truth: dict[int, dict[int, tuple[list, list]]] = defaultdict(lambda: defaultdict(lambda: ([], [])))
    for image_id in images:
        for ann in coco_gt.imgToAnns.get(image_id, []):
            x, y, w, h = ann["bbox"]
            boxes, difficult = truth[int(ann["category_id"])][image_id]
            boxes.append((x, y, x + w, y + h))
            difficult.append(bool(ann.get("iscrowd", 0)))
    found: dict[int, list[Detection]] = defaultdict(list)
    for image_id in images:
        for det in detections.get(image_id, []):
            x, y, w, h = det["bbox"]
            found[int(det["category_id"])].append((image_id, float(det["score"]), (x, y, x + w, y + h)))

    result: dict[int, Optional[float]] = {}
    for category_id in sorted(coco_gt.getCatIds()):
        per_image = {image_id: (np.array(boxes, dtype=np.float64).reshape(-1, 4), np.array(difficult, dtype=bool))
                     for image_id, (boxes, difficult) in truth[category_id].items()}
        result[category_id] = class_average_precision(found[category_id], per_image, rule)
    return result


def mean_ap(per_class: Mapping[Hashable, Optional[float]]) -> Optional[float]:
    """Mean over the classes with an AP (classes without ground truth are left out); None if none."""
    values = [value for value in per_class.values() if value is not None]
    return float(np.mean(values)) if values else None
