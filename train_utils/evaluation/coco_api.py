"""Build pycocotools ground truth from a detection dataset without decoding images."""
from __future__ import annotations

import contextlib
import io
from typing import Optional, Sequence

import torch
from pycocotools.coco import COCO
from torch.utils.data import Subset


def _image_and_target(dataset, idx: int) -> tuple[int, int, dict]:
    """(height, width, target) via ``coco_index`` when available, else by loading ``dataset[idx]``."""
    if hasattr(dataset, "coco_index"):
        return dataset.coco_index(idx)
    image, target = dataset[idx]
    if isinstance(image, torch.Tensor):
        height, width = image.shape[-2:]
    else:  # PIL image
        width, height = image.size
    return int(height), int(width), target


def convert_to_coco_api(dataset, indices: Optional[Sequence[int]] = None) -> COCO:
    """COCO ground truth for ``dataset`` (or the given ``indices`` of it).

    Image ids are ``target["image_id"]``; each box becomes one annotation with ``bbox`` [x, y, w, h],
    ``area`` = w * h, ``category_id`` = label and the target's ``iscrowd``; annotation ids count
    from 1. Categories are ``dataset.class_names`` (id i + 1 for name i) when present, else the
    labels that occur.
    """
    images, annotations, seen_labels = [], [], set()
    for idx in range(len(dataset)) if indices is None else indices:
        height, width, target = _image_and_target(dataset, int(idx))
        image_id = int(target["image_id"])
        images.append({"id": image_id, "height": height, "width": width})
        boxes = target["boxes"].tolist()
        labels = target["labels"].tolist()
        crowd = target["iscrowd"].tolist() if "iscrowd" in target else [0] * len(boxes)
        for (x1, y1, x2, y2), label, iscrowd in zip(boxes, labels, crowd):
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image_id,
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": (x2 - x1) * (y2 - y1),
                "category_id": int(label),
                "iscrowd": int(iscrowd),
            })
            seen_labels.add(int(label))
    names = getattr(dataset, "class_names", None)
    if names is not None:
        categories = [{"id": i, "name": name} for i, name in enumerate(names, start=1)]
    else:
        categories = [{"id": label, "name": str(label)} for label in sorted(seen_labels)]
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations, "categories": categories}
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress lines
        coco.createIndex()
    return coco


def get_coco_api_from_dataset(dataset) -> COCO:
    """Ground truth for ``dataset``; nested ``Subset`` wrappers are unwrapped so only the subset's
    images are converted (with the underlying dataset's image ids)."""
    indices: Optional[list[int]] = None
    while isinstance(dataset, Subset):
        outer = list(range(len(dataset))) if indices is None else indices
        indices = [int(dataset.indices[i]) for i in outer]
        dataset = dataset.dataset
    return convert_to_coco_api(dataset, indices)
