"""Detections as a COCO results file that pycocotools' ``COCO.loadRes`` reads.

Each record is ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` plus, for people
reading the file, the image path (``"image"``) and the class name (``"category_name"``).
With a COCO ground-truth json the image ids are the ground truth's (an input matches the image
whose ``file_name`` is the longest ending of its path, e.g. ``b/x.jpg`` for ``/data/b/x.jpg``) and the
category ids its ids of the same class names; without one the images are numbered 1..N in the
order they were processed and listed, with their sizes, in ``<name>_images.json`` beside the
results (``images`` and ``categories`` sections, a ground-truth skeleton for pycocotools).
No pycocotools import: plain json.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import torch


class CocoResults:
    """Collects one image's detections at a time and writes the results file."""

    def __init__(self, class_names: Sequence[str], coco_gt: Optional[Path] = None) -> None:
        self.class_names = list(class_names)
        self.records: list[dict[str, Any]] = []
        self.images: list[dict[str, Any]] = []
        self.unmatched: list[str] = []
        self.gt_images: Optional[list[tuple[tuple[str, ...], int]]] = None  # (file_name parts, id)
        self.taken: dict[int, Path] = {}  # ground-truth id -> the input given it
        self.category_ids = {label: label for label in range(1, len(self.class_names) + 1)}
        if coco_gt is not None:
            self._read_ground_truth(coco_gt)

    def _read_ground_truth(self, path: Path) -> None:
        """Image ids by file name and category ids by class name from a COCO ground-truth json."""
        try:
            data = json.loads(Path(path).read_text())
            self.gt_images = [(Path(image["file_name"]).parts, int(image["id"])) for image in data["images"]]
            by_name = {category["name"]: int(category["id"]) for category in data["categories"]}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"--coco-gt {path}: not a readable COCO ground-truth json ({exc})") from None
        missing = [name for name in self.class_names if name not in by_name]
        if missing:
            raise ValueError(f"--coco-gt {path}: no category named {missing[:5]}; its categories are "
                             f"{sorted(by_name)[:10]}")
        self.category_ids = {label: by_name[name] for label, name in enumerate(self.class_names, start=1)}

    def add(self, image: Path, height: int, width: int, boxes: torch.Tensor, labels: torch.Tensor,
            scores: torch.Tensor) -> None:
        """The kept detections of one image (boxes [D, 4] x1y1x2y2 in its pixels)."""
        image_id = self._image_id(image, height, width)
        if image_id is None:
            return
        for (x1, y1, x2, y2), label, score in zip(boxes.tolist(), labels.tolist(), scores.tolist()):
            self.records.append({
                "image_id": image_id,
                "category_id": self.category_ids.get(int(label), int(label)),
                "bbox": [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)],
                "score": round(float(score), 5),
                "image": str(image),
                "category_name": self._name(int(label)),
            })

    def _image_id(self, image: Path, height: int, width: int) -> Optional[int]:
        if self.gt_images is not None:
            return self._ground_truth_id(image)
        image_id = len(self.images) + 1
        self.images.append({"id": image_id, "file_name": image.name, "width": width, "height": height,
                            "path": str(image)})
        return image_id

    def _ground_truth_id(self, image: Path) -> Optional[int]:
        """The id of the ground-truth image whose file_name is the longest ending of ``image``'s
        path; None (reported) when none is; ValueError when the match is ambiguous."""
        parts = image.resolve().parts
        matches = [(len(gt), image_id) for gt, image_id in self.gt_images if parts[-len(gt):] == gt]
        if not matches:
            self.unmatched.append(str(image))
            return None
        longest = max(length for length, _ in matches)
        ids = [image_id for length, image_id in matches if length == longest]
        if len(ids) > 1 or ids[0] in self.taken:
            other = f"ground-truth ids {ids}" if len(ids) > 1 else f"the image {self.taken[ids[0]]}"
            raise ValueError(f"--coco-gt: {image} matches {other} by file name; give the ground truth's "
                             "file_name with enough of the folder path to tell them apart")
        self.taken[ids[0]] = image
        return ids[0]

    def _name(self, label: int) -> str:
        return self.class_names[label - 1] if 1 <= label <= len(self.class_names) else f"class {label}"

    def images_path(self, path: Path) -> Path:
        return path.with_name(f"{path.stem}_images.json")

    def write(self, path: Path) -> list[str]:
        """Write the results (and, without ground truth, the images file); returns what to report."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.records, indent=1) + "\n")
        lines = [f"wrote {len(self.records)} detections to {path}"]
        if not self.records:
            lines.append("the results file is empty (no detection kept): pycocotools' loadRes cannot read an "
                         "empty list")
        if self.gt_images is None:
            categories = [{"id": self.category_ids[label], "name": self._name(label)}
                          for label in range(1, len(self.class_names) + 1)]
            skeleton = {"images": self.images, "categories": categories, "annotations": []}
            self.images_path(path).write_text(json.dumps(skeleton, indent=1) + "\n")
            lines.append(f"wrote the image ids to {self.images_path(path)}")
        if self.unmatched:
            lines.append(f"{len(self.unmatched)} images are not in the ground truth and were left out of the "
                         f"results: {', '.join(self.unmatched[:5])}")
        return lines
