"""Detections as a COCO results file that pycocotools' ``COCO.loadRes`` reads.

Each record is ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` plus, for people
reading the file, the image path (``"image"``) and the class name (``"category_name"``).
With a COCO ground-truth json the image ids are the ground truth's (matched by file name) and the
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
        self.gt_ids: Optional[dict[str, int]] = None
        self.category_ids = {label: label for label in range(1, len(self.class_names) + 1)}
        if coco_gt is not None:
            self._read_ground_truth(coco_gt)

    def _read_ground_truth(self, path: Path) -> None:
        """Image ids by file name and category ids by class name from a COCO ground-truth json."""
        try:
            data = json.loads(Path(path).read_text())
            self.gt_ids = {Path(image["file_name"]).name: int(image["id"]) for image in data["images"]}
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
        if self.gt_ids is not None:
            image_id = self.gt_ids.get(image.name)
            if image_id is None:
                self.unmatched.append(str(image))
            return image_id
        image_id = len(self.images) + 1
        self.images.append({"id": image_id, "file_name": image.name, "width": width, "height": height,
                            "path": str(image)})
        return image_id

    def _name(self, label: int) -> str:
        return self.class_names[label - 1] if 1 <= label <= len(self.class_names) else f"class {label}"

    def images_path(self, path: Path) -> Path:
        return path.with_name(f"{path.stem}_images.json")

    def write(self, path: Path) -> list[str]:
        """Write the results (and, without ground truth, the images file); returns what to report."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.records, indent=1) + "\n")
        lines = [f"wrote {len(self.records)} detections to {path}"]
        if self.gt_ids is None:
            categories = [{"id": self.category_ids[label], "name": self._name(label)}
                          for label in range(1, len(self.class_names) + 1)]
            skeleton = {"images": self.images, "categories": categories, "annotations": []}
            self.images_path(path).write_text(json.dumps(skeleton, indent=1) + "\n")
            lines.append(f"wrote the image ids to {self.images_path(path)}")
        if self.unmatched:
            lines.append(f"{len(self.unmatched)} images are not in the ground truth and were left out of the "
                         f"results: {', '.join(self.unmatched[:5])}")
        return lines
