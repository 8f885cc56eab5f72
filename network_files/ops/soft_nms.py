"""Soft-NMS (Bodla et al. 2017, "Soft-NMS -- Improving Object Detection With One Line of Code"),
per class, as mmcv's ``soft_nms`` that mmdetection uses for the final detections.

Instead of removing every box that overlaps a kept one by more than a threshold, soft-NMS lowers
its score by a weight of the overlap ``o`` (the IoU with the box just kept, same class only):

- ``linear``: ``1 - o`` when ``o > iou_threshold``, else 1;
- ``gaussian``: ``exp(-o**2 / sigma)`` for every box.

The highest remaining score is kept next; boxes whose score falls below ``min_score`` are dropped.
A kept box's score never changes afterwards, so the boxes come out in non-increasing score order
and the first ``max_kept`` are the top ``max_kept`` of the full run (the loop stops there).
"""
from typing import Tuple

import torch
from torch import Tensor

from .boxes import box_iou

SOFT_NMS_METHODS = ("linear", "gaussian")


def soft_nms_weights(overlaps: Tensor, method: str, iou_threshold: float, sigma: float) -> Tensor:
    """The factor each score is multiplied by, for ``overlaps`` ``[N]`` with the box just kept."""
    if method == "linear":
        return torch.where(overlaps > iou_threshold, 1 - overlaps, torch.ones_like(overlaps))
    if method == "gaussian":
        return torch.exp(-(overlaps * overlaps) / sigma)
    raise ValueError(f"soft-NMS method must be one of {SOFT_NMS_METHODS}, got {method!r}")


def batched_soft_nms(
    boxes: Tensor, scores: Tensor, idxs: Tensor, method: str, iou_threshold: float = 0.3, sigma: float = 0.5,
    min_score: float = 1e-3, max_kept: int = -1,
) -> Tuple[Tensor, Tensor]:
    """Soft-NMS within each class of ``idxs`` (boxes of different classes never affect each other).

    Args:
        boxes: ``[N, 4]`` xyxy.
        scores: ``[N]``.
        idxs: ``[N]`` int class of each box.
        method: ``"linear"`` or ``"gaussian"``.
        iou_threshold: overlap above which the linear rule decays a score (unused by gaussian).
        sigma: the gaussian's width (unused by linear).
        min_score: boxes scoring below this (at the start or after a decay) are dropped.
        max_kept: stop after this many kept boxes (-1: no limit).
    Returns:
        ``(keep [K] int64, kept_scores [K])``: indices into ``boxes`` in the order kept (scores
        non-increasing; ties go to the lower index) and their decayed scores.
    """
    soft_nms_weights(scores.new_zeros(0), method, iou_threshold, sigma)  # an unknown method fails first
    current = scores.clone()
    alive = current >= min_score
    limit = boxes.shape[0] if max_kept < 0 else min(max_kept, boxes.shape[0])
    keep = []
    # One kept box per iteration: each choice depends on the decays of all before it.
    while len(keep) < limit and bool(alive.any()):
        best = int(torch.where(alive, current, torch.full_like(current, -float("inf"))).argmax())
        keep.append(best)
        alive[best] = False
        overlaps = box_iou(boxes[best:best + 1], boxes)[0]
        overlaps = torch.where(idxs == idxs[best], overlaps, torch.zeros_like(overlaps))
        decayed = current * soft_nms_weights(overlaps, method, iou_threshold, sigma)
        current = torch.where(alive, decayed, current)
        alive &= current >= min_score
    kept = torch.tensor(keep, dtype=torch.int64, device=boxes.device)
    return kept, current[kept]
