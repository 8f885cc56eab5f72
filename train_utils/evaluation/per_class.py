"""Per-class results of an evaluation: the rows, the printed table and WZ's ``record_mAP.txt``."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from train_utils.evaluation.analysis import coco_ap_per_class


@dataclass
class ClassResult:
    """Metrics of one class; an AP is None when the class has no (non-difficult) ground truth."""

    category_id: int
    name: str
    num_objects: int  # non-difficult ground-truth objects in the evaluated images
    num_difficult: int
    coco_ap50: Optional[float]
    coco_ap: Optional[float]
    voc_ap: Optional[float]


def count_objects(coco_gt: COCO, image_ids: Sequence[int]) -> dict[int, tuple[int, int]]:
    """category id -> (non-difficult objects, difficult objects) in ``image_ids``."""
    counts = {int(c): [0, 0] for c in coco_gt.getCatIds()}
    for image_id in image_ids:
        for ann in coco_gt.imgToAnns.get(image_id, []):
            counts.setdefault(int(ann["category_id"]), [0, 0])[1 if ann.get("iscrowd", 0) else 0] += 1
    return {c: (n[0], n[1]) for c, n in counts.items()}


def per_class_results(coco_eval: COCOeval, coco_gt: COCO, class_names: Sequence[str],
                      voc_ap: Optional[dict[int, Optional[float]]]) -> list[ClassResult]:
    """One row per class in label order (label i is ``class_names[i - 1]``) from an accumulated
    COCOeval (area all, most detections) and the VOC APs, if any."""
    coco = coco_ap_per_class(coco_eval)
    counts = count_objects(coco_gt, list(coco_eval.params.imgIds))
    return [
        ClassResult(label, name, *counts.get(label, (0, 0)), *coco.get(label, (None, None)),
                    (voc_ap or {}).get(label))
        for label, name in enumerate(class_names, start=1)
    ]


def format_table(rows: Sequence[ClassResult], voc_metric: str) -> str:
    """The per-class table printed after pycocotools' summary."""
    width = max([len("class")] + [len(r.name) for r in rows])
    voc_title = f"VOC{voc_metric} AP50" if voc_metric != "none" else ""
    lines = [f"{'class':<{width}}  {'AP50':>8}  {'AP[.5:.95]':>10}  {voc_title:>11}  {'objects':>7}  {'difficult':>9}"]

    def number(value: Optional[float], size: int) -> str:
        return f"{value:>{size}.4f}" if value is not None else f"{'-':>{size}}"

    for row in rows:
        if row.num_objects == 0:
            body = f"{'no ground truth':<35}"
        else:
            voc = number(row.voc_ap, 11) if voc_metric != "none" else " " * 11
            body = f"{number(row.coco_ap50, 8)}  {number(row.coco_ap, 10)}  {voc}"
        lines.append(f"{row.name:<{width}}  {body}  {row.num_objects:>7}  {row.num_difficult:>9}")
    return "\n".join(lines)


def write_record(path: Path, summary: Sequence[str], rows: Sequence[ClassResult]) -> None:
    """WZ's record_mAP.txt: the COCO summary, a blank line, then AP@0.5 per category."""
    lines = list(summary) + ["", "mAP(IoU=0.5) for each category:"]
    for row in rows:
        lines.append(f" {row.name}: {row.coco_ap50:.6f}" if row.coco_ap50 is not None
                     else f" {row.name}: no ground truth")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
