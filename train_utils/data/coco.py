"""COCO-format detection dataset: an ``instances_*.json`` file and the folder of its images.

Categories become contiguous labels 1..K in category-id order (``category_to_label`` and
``label_to_category`` keep the mapping) unless a WZ classes json imposes names and ids. Boxes are
converted from ``[x, y, w, h]`` to xyxy; crowd annotations keep ``iscrowd=1`` (or are dropped with
``skip_crowd``); images without annotations are kept with empty targets. The json's
``width``/``height`` are checked against each image like VOC's ``<size>``.

Registered in the catalog as "coco" (reader :func:`read_coco_split`).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Optional, Union

from train_utils.data.catalog import register_format
from train_utils.data.dataset import DetectionDataSet, split_stem
from train_utils.data.records import Annotations, RawImage, RawObject

_OWNER = "CocoDataSet"


def _load(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{_OWNER}: annotation file {path} does not exist")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{_OWNER}: {path} is not valid UTF-8 JSON: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("categories"), list) or not isinstance(data.get("annotations", []), list):
        raise ValueError(f"{_OWNER}: {path} needs 'images' and 'categories' lists (and optionally 'annotations')")
    return data


def _is_int(value: object) -> bool:
    return type(value) is int


def _categories(data: dict, path: Path) -> list[tuple[int, str]]:
    """(category id, name) pairs sorted by id; any problem is fatal (the class list is undefined)."""
    pairs = []
    for number, category in enumerate(data["categories"]):
        if not isinstance(category, dict) or not _is_int(category.get("id")) \
                or not isinstance(category.get("name"), str) or not category["name"].strip():
            raise ValueError(f"{_OWNER}: {path}: categories[{number}] needs an integer 'id' and a non-empty 'name'")
        pairs.append((category["id"], category["name"]))
    if not pairs:
        raise ValueError(f"{_OWNER}: {path} lists no categories")
    for index, kind in ((0, "ids"), (1, "names")):
        values = [pair[index] for pair in pairs]
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            raise ValueError(f"{_OWNER}: {path}: category {kind} repeated: {repeated}")
    return sorted(pairs)


def _declared_size(image: dict) -> Optional[tuple[int, int]]:
    height, width = image.get("height"), image.get("width")
    return (height, width) if _is_int(height) and _is_int(width) and height > 0 and width > 0 else None


def _box(bbox: object) -> Optional[tuple[float, float, float, float]]:
    """xyxy from a COCO ``[x, y, w, h]``; None unless it is 4 finite numbers."""
    if not isinstance(bbox, list) or len(bbox) != 4 \
            or not all(type(v) in (int, float) and math.isfinite(v) for v in bbox):
        return None
    x, y, w, h = (float(v) for v in bbox)
    return x, y, x + w, y + h


def read_coco(images_dir: Union[str, Path], annotation_json: Union[str, Path]) -> Annotations:
    """Read a COCO instances file; images are ``images_dir / file_name``.

    extras: ``category_ids`` (the category id of each class, in class order) and ``image_ids``
    (the json's image id of each file name).
    """
    images_dir, path = Path(images_dir), Path(annotation_json)
    data = _load(path)
    categories = _categories(data, path)
    names = dict(categories)
    found = Annotations([], [name for _, name in categories], path, path, images_dir, skipped={"crowd_objects": 0})
    by_id: dict[Any, RawImage] = {}
    image_ids: dict[str, Any] = {}
    for number, image in enumerate(data["images"]):
        image_id = image.get("id") if isinstance(image, dict) else None
        file_name = image.get("file_name") if isinstance(image, dict) else None
        if type(image_id) not in (int, str) or not isinstance(file_name, str) or not file_name:
            found.invalid.append(f"{path}: images[{number}] needs an 'id' and a 'file_name'")
        elif image_id in by_id or file_name in image_ids:
            found.invalid.append(f"{path}: images[{number}] repeats image id {image_id!r} or file {file_name!r}")
        else:
            image_path = images_dir / file_name
            by_id[image_id] = RawImage(file_name, image_path, path, _declared_size(image), [])
            image_ids[file_name] = image_id
            if not image_path.is_file():
                found.missing.append(str(image_path))
    for number, ann in enumerate(data.get("annotations", [])):
        ann_id = ann.get("id", f"#{number}") if isinstance(ann, dict) else f"#{number}"
        where = f"annotation id {ann_id}"
        if not isinstance(ann, dict):
            found.invalid.append(f"{path}: {where}: not an object")
            continue
        box, crowd = _box(ann.get("bbox")), ann.get("iscrowd", 0)
        image_id, category_id = ann.get("image_id"), ann.get("category_id")
        if box is None:
            found.invalid.append(f"{path}: {where}: 'bbox' must be 4 finite numbers [x, y, w, h]")
        elif type(image_id) not in (int, str) or image_id not in by_id:
            found.invalid.append(f"{path}: {where}: unknown image_id {image_id!r}")
        elif not _is_int(category_id) or category_id not in names:
            found.invalid.append(f"{path}: {where}: unknown category_id {category_id!r}")
        elif crowd not in (0, 1):
            found.invalid.append(f"{path}: {where}: 'iscrowd' must be 0 or 1, got {crowd!r}")
        else:
            by_id[image_id].objects.append(RawObject(names[category_id], box, int(crowd), where))
    found.images = list(by_id.values())
    found.extras.update(category_ids=[cid for cid, _ in categories], image_ids=image_ids)
    return found


def read_coco_split(data_path: Union[str, Path], split: str) -> Annotations:
    """The catalog reader: ``data_path/annotations/instances_SPLIT.json`` with its images in
    ``data_path/SPLIT/`` (SPLIT = split without ``.txt``)."""
    name = split_stem(split)
    if not name:
        raise ValueError("coco needs a split name such as 'train' or 'val'")
    return read_coco(Path(data_path) / name, Path(data_path) / "annotations" / f"instances_{name}.json")


def _drop_crowd(annotations: Annotations) -> None:
    """Remove crowd objects, counted in ``skipped["crowd_objects"]``."""
    for raw in annotations.images:
        kept = [obj for obj in raw.objects if not obj.iscrowd]
        annotations.skipped["crowd_objects"] += len(raw.objects) - len(kept)
        raw.objects = kept


class CocoDataSet(DetectionDataSet):
    """COCO detection dataset (see :class:`DetectionDataSet` for items and skipping).

    ids are the json's ``file_name``s and ``coco_image_ids[idx]`` the json's image id of item idx.
    classes_json (optional) maps category names to labels instead of the category-id order;
    categories missing from it are unknown classes (an error unless ``skip_unknown_classes``).
    """

    _missing_kind = "image files"
    _invalid_kind = "invalid entries"
    _size_source = "the width/height in the annotation json"

    def __init__(
        self,
        images_dir: Union[str, Path],
        annotation_json: Union[str, Path],
        transforms: Optional[Callable] = None,
        skip_crowd: bool = False,
        classes_json: Optional[Union[str, Path]] = None,
        skip_unknown_classes: bool = False,
    ) -> None:
        annotations = read_coco(images_dir, annotation_json)
        if skip_crowd:
            _drop_crowd(annotations)
        self._setup(annotations, transforms, classes_json, skip_unknown_classes)

    def _setup(self, annotations: Annotations, transforms: Optional[Callable],
               classes_json: Optional[Union[str, Path]], skip_unknown_classes: bool) -> None:
        super()._setup(annotations, transforms, classes_json, skip_unknown_classes)
        category_of = dict(zip(annotations.class_names, annotations.extras["category_ids"]))
        self.label_to_category = {label: category_of[name] for name, label in self.class_dict.items()
                                  if name in category_of}
        self.category_to_label = {cid: label for label, cid in self.label_to_category.items()}
        self.coco_image_ids = [annotations.extras["image_ids"][file_name] for file_name in self.ids]


register_format(
    "coco", read_coco_split, default_splits=("train", "val"), dataset_type=CocoDataSet,
    layout="--data-path holds annotations/instances_SPLIT.json and the images in SPLIT/",
)
