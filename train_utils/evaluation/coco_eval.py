"""COCO-style detection evaluation through pycocotools' own COCOeval.

Usage: ``update`` with each batch's predictions, ``synchronize_between_processes`` (no-op without
torch.distributed), ``accumulate``, ``summarize``; then ``stats`` (COCOeval's 12 numbers) and
``coco_eval["bbox"]`` (the COCOeval object, e.g. ``.eval["precision"]`` per class).

Under torch.distributed every rank calls ``accumulate`` after ``synchronize_between_processes``:
the per-image matching (``COCOeval.evaluate``, the costly part) is shared among the ranks, their
results are gathered on rank 0 in COCOeval's own order and rank 0 alone accumulates; the scores
exist on rank 0 only. They equal a single process's exactly (the matching of one image never
depends on another).
"""
from __future__ import annotations

import contextlib
import copy
import io
from typing import Mapping, Sequence

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from train_utils.distributed import gather_objects, gather_to_rank0, get_rank, get_world_size

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
        self.world_size, self.rank = 1, 0  # the ranks sharing accumulate() (set by synchronize)

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
        self.detections = merge_detections(gather_objects(self.detections))
        self.world_size, self.rank = get_world_size(), get_rank()

    def _results(self, image_ids: Sequence[int]) -> COCO:
        """The detections of ``image_ids`` as a pycocotools result object (copies: loadRes edits
        the dicts it is given)."""
        results = [dict(d) for image_id in image_ids for d in self.detections[image_id]]
        if results:
            return self.coco_gt.loadRes(results)
        empty = COCO()  # loadRes cannot take an empty list
        empty.dataset = {"images": list(self.coco_gt.dataset["images"]), "annotations": [],
                         "categories": copy.deepcopy(self.coco_gt.dataset["categories"])}
        empty.createIndex()
        return empty

    def accumulate(self) -> None:
        """Run COCOeval.evaluate and .accumulate on the images seen by ``update`` (shared among
        the ranks after ``synchronize_between_processes``; see the module docstring)."""
        if not self.detections:
            raise RuntimeError("CocoEvaluator.accumulate: no predictions were added with update()")
        image_ids = sorted(self.detections)
        share = image_ids[self.rank::self.world_size]
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
            for coco_eval in self.coco_eval.values():
                coco_eval.cocoDt = self._results(share)
                coco_eval.params.imgIds = share
                coco_eval.evalImgs = []
                if share:  # COCOeval reads an empty id list as "every image"
                    coco_eval.evaluate()
                if self.world_size > 1:
                    parts = gather_to_rank0((share, _compact(coco_eval.evalImgs) if self.rank else None))
                    if self.rank != 0:
                        continue
                    parts[0] = (share, coco_eval.evalImgs)
                    _join_shares(coco_eval, image_ids, parts)
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


def _compact(eval_images: list) -> list:
    """Per-image results with just what ``COCOeval.accumulate`` reads, matches as booleans (it
    only tests them against zero): a sixth of the bytes to send."""
    return [None if e is None else {"dtScores": e["dtScores"], "dtMatches": e["dtMatches"].astype(bool),
                                    "dtIgnore": e["dtIgnore"], "gtIgnore": e["gtIgnore"]}
            for e in eval_images]


def _join_shares(coco_eval: COCOeval, image_ids: list[int], parts: list) -> None:
    """Make ``coco_eval`` (evaluated on rank 0's share) hold every rank's per-image results, in
    the order COCOeval.evaluate lays them out: category, then area range, then image."""
    params = coco_eval.params
    categories = len(params.catIds) if params.useCats else 1
    areas = len(params.areaRng)
    where = {image_id: (share_ids, results, j) for share_ids, results in parts
             for j, image_id in enumerate(share_ids)}
    joined = []
    for k in range(categories):
        for a in range(areas):
            for image_id in image_ids:
                share_ids, results, j = where[image_id]
                joined.append(results[(k * areas + a) * len(share_ids) + j])
    params.imgIds = list(image_ids)
    coco_eval.evalImgs = joined
    coco_eval._paramsEval = copy.deepcopy(params)
