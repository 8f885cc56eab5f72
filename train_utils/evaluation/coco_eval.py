"""COCO-style detection evaluation through pycocotools' own COCOeval.

Usage: ``update`` with each batch's predictions, ``synchronize_between_processes`` (no-op without
torch.distributed), ``accumulate``, ``summarize``; then ``stats`` (COCOeval's 12 numbers) and
``coco_eval["bbox"]`` (the COCOeval object, e.g. ``.eval["precision"]`` per class).
"""
from __future__ import annotations

import contextlib
import copy
import io
from typing import Mapping, Sequence

import torch
import torch.distributed as dist
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

Detections = dict[int, list[dict]]  # image id -> detections in COCO result format


def merge_detections(parts: Sequence[Detections]) -> Detections:
    """Union of per-process detections keeping each image id once (first part wins).

    DistributedSampler pads its last batches by repeating images, so one image can be evaluated
    by two processes; counting it twice would bias the metrics.
    """
    merged: Detections = {}
    for part in parts:
        for image_id, detections in part.items():
            merged.setdefault(image_id, detections)
    return merged


class CocoEvaluator:
    """Collect detections per image and evaluate them against ``coco_gt`` with COCOeval."""

    def __init__(self, coco_gt: COCO, iou_types: Sequence[str] = ("bbox",)) -> None:
        unsupported = [t for t in iou_types if t != "bbox"]
        if unsupported or not iou_types:
            raise ValueError(f"CocoEvaluator supports iou_types=('bbox',) only, got {tuple(iou_types)}")
        self.coco_gt = copy.deepcopy(coco_gt)
        self.iou_types = list(iou_types)
        self.coco_eval = {t: COCOeval(self.coco_gt, iouType=t) for t in self.iou_types}
        self.detections: Detections = {}

    def update(self, predictions: Mapping[int, Mapping[str, torch.Tensor]]) -> None:
        """Add predictions ``{image_id: {"boxes": [N, 4] xyxy, "scores": [N], "labels": [N]}}``.

        An image may have no detections (it still counts as evaluated). An image id already added
        keeps its first predictions.
        """
        known = self.coco_gt.imgs
        for key, prediction in predictions.items():
            image_id = int(key)
            if image_id not in known:
                raise KeyError(f"CocoEvaluator: image id {image_id} is not in the ground truth")
            if image_id in self.detections:
                continue
            boxes = prediction["boxes"].tolist()
            scores = prediction["scores"].tolist()
            labels = prediction["labels"].tolist()
            self.detections[image_id] = [
                {"image_id": image_id, "category_id": int(label), "bbox": [x1, y1, x2 - x1, y2 - y1],
                 "score": float(score)}
                for (x1, y1, x2, y2), score, label in zip(boxes, scores, labels)
            ]

    def synchronize_between_processes(self) -> None:
        """Gather every process's detections (each image once) when torch.distributed is running."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, self.detections)
        self.detections = merge_detections(parts)

    def _results(self) -> COCO:
        """Detections as a pycocotools result object (copies: loadRes edits the dicts it is given)."""
        results = [dict(d) for detections in self.detections.values() for d in detections]
        if results:
            return self.coco_gt.loadRes(results)
        empty = COCO()  # loadRes cannot take an empty list
        empty.dataset = {"images": list(self.coco_gt.dataset["images"]), "annotations": [],
                         "categories": copy.deepcopy(self.coco_gt.dataset["categories"])}
        empty.createIndex()
        return empty

    def accumulate(self) -> None:
        """Run COCOeval.evaluate and .accumulate on the images seen by ``update``."""
        if not self.detections:
            raise RuntimeError("CocoEvaluator.accumulate: no predictions were added with update()")
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
            results = self._results()
            for coco_eval in self.coco_eval.values():
                coco_eval.cocoDt = results
                coco_eval.params.imgIds = sorted(self.detections)
                coco_eval.evaluate()
                coco_eval.accumulate()
                coco_eval.stats = []  # invalidated until summarize() runs again

    def summarize(self) -> None:
        """Print pycocotools' summary table for each IoU type."""
        for iou_type, coco_eval in self.coco_eval.items():
            print(f"IoU metric: {iou_type}")
            coco_eval.summarize()

    @property
    def stats(self) -> list[float]:
        """COCOeval's 12 summary numbers (AP@[.5:.95], AP50, AP75, AP S/M/L, AR@1/10/100, AR S/M/L)."""
        coco_eval = self.coco_eval[self.iou_types[0]]
        if not coco_eval.eval:
            raise RuntimeError("CocoEvaluator.stats: call accumulate() first")
        if len(coco_eval.stats) == 0:
            with contextlib.redirect_stdout(io.StringIO()):
                coco_eval.summarize()
        return [float(value) for value in coco_eval.stats]
