"""labelme detection dataset: a folder of labelme ``*.json`` files beside their images.

Each json's ``imagePath`` is relative to the json (Windows separators accepted); when that file
is gone, an image with the json's stem in the same folder is used. ``rectangle`` shapes (two
corners in any order) and ``polygon`` shapes (their bounding box) become objects; other shape
types are skipped and counted. Classes come from a WZ classes json or, without one, the sorted
labels of every json in the folder (so every split of the folder gets the same labels). An
optional split file lists json stems. As labelme does, boxes refer to the EXIF-transposed image,
and ``imageWidth``/``imageHeight`` are checked against it.

Registered in the catalog as "labelme" (reader :func:`read_labelme_split`).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Optional, Union

from train_utils.data.catalog import register_format
from train_utils.data.dataset import DetectionDataSet, index_images, read_id_list
from train_utils.data.records import Annotations, RawImage, RawObject

_OWNER = "LabelmeDataSet"
_MIN_POINTS = {"rectangle": 2, "polygon": 3}


def _box(points: object, shape_type: str) -> Optional[tuple[float, float, float, float]]:
    """Bounding box of a shape's points; None unless they are enough finite [x, y] pairs."""
    if not isinstance(points, list) or len(points) < _MIN_POINTS[shape_type] \
            or (shape_type == "rectangle" and len(points) != 2):
        return None
    if not all(isinstance(p, list) and len(p) == 2 and all(type(v) in (int, float) and math.isfinite(v) for v in p)
               for p in points):
        return None
    xs, ys = [float(p[0]) for p in points], [float(p[1]) for p in points]
    return min(xs), min(ys), max(xs), max(ys)


def _declared_size(data: dict) -> Optional[tuple[int, int]]:
    height, width = data.get("imageHeight"), data.get("imageWidth")
    return (height, width) if type(height) is int and type(width) is int and height > 0 and width > 0 else None


def _read_shapes(path: Path, shapes: list) -> tuple[list[RawObject], list[str], list[str]]:
    """(objects, problems, descriptions of skipped shapes) of one file's ``shapes``."""
    objects, problems, unsupported = [], [], []
    for number, shape in enumerate(shapes, start=1):
        where = f"shape {number}"
        if not isinstance(shape, dict) or not isinstance(shape.get("label"), str) or not shape["label"].strip():
            problems.append(f"{path}: {where}: needs a non-empty 'label'")
            continue
        shape_type = shape.get("shape_type") or "polygon"  # labelme's own default
        if shape_type not in _MIN_POINTS:
            unsupported.append(f"{path}: {where}: {shape_type!r} shape skipped")
            continue
        box = _box(shape.get("points"), shape_type)
        if box is None:
            need = "exactly 2" if shape_type == "rectangle" else "at least 3"
            problems.append(f"{path}: {where} ({shape['label']}): a {shape_type} needs {need} finite [x, y] points")
            continue
        objects.append(RawObject(shape["label"].strip(), box, 0, where))
    return objects, problems, unsupported


def read_labelme(root: Union[str, Path], split_file: Optional[Union[str, Path]] = None) -> Annotations:
    """Read every labelme json in ``root`` (json files without ``shapes`` are not labelme files and
    are ignored); keep the stems listed in ``split_file`` when given."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{_OWNER}: data folder {root} does not exist")
    split_path = Path(split_file) if split_file is not None else None
    wanted = read_id_list(split_path, _OWNER) if split_path is not None else None
    wanted_set = set(wanted or [])
    siblings = index_images(root, _OWNER)
    found = Annotations([], None, root, split_path or root, root)
    labels: set[str] = set()
    seen: set[str] = set()
    for path in sorted(root.glob("*.json")):
        if path.name.startswith("."):
            continue
        selected = wanted is None or path.stem in wanted_set
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            if selected:
                found.invalid.append(f"{path}: not valid UTF-8 JSON ({err})")
            continue
        if not isinstance(data, dict) or "shapes" not in data:
            continue
        seen.add(path.stem)
        if not isinstance(data["shapes"], list):
            if selected:
                found.invalid.append(f"{path}: 'shapes' is not a list")
            continue
        objects, problems, unsupported = _read_shapes(path, data["shapes"])
        labels.update(obj.name for obj in objects)
        if not selected:
            continue
        found.invalid += problems
        found.notes += unsupported
        found.skipped["unsupported_shapes"] = found.skipped.get("unsupported_shapes", 0) + len(unsupported)
        image_ref = data.get("imagePath")
        image_path = path.parent / image_ref.replace("\\", "/") if isinstance(image_ref, str) and image_ref else None
        if image_path is None or not image_path.is_file():
            if path.stem not in siblings:
                found.missing.append(f"{image_path or path.with_suffix('.*')} (image of {path.name})")
                continue
            image_path = siblings[path.stem]
        found.images.append(RawImage(path.stem, image_path, path, _declared_size(data), objects, exif_upright=True))
    if wanted is not None:
        found.missing += [f"{root / stem}.json" for stem in wanted if stem not in seen]
    found.class_names = sorted(labels)
    found.skipped.setdefault("unsupported_shapes", 0)
    return found


def read_labelme_split(data_path: Union[str, Path], split: str) -> Annotations:
    """The catalog reader: the labelme folder ``data_path``; split is a txt of json stems (a relative
    path is inside the folder), '' for every json."""
    if not split:
        return read_labelme(data_path)
    return read_labelme(data_path, Path(split) if Path(split).is_absolute() else Path(data_path) / split)


class LabelmeDataSet(DetectionDataSet):
    """labelme detection dataset (see :class:`DetectionDataSet` for items and skipping).

    ids are the json stems (sorted). split_file: optional txt of json stems. classes_json
    (optional, WZ format) fixes names and labels; labels missing from it are unknown classes.
    """

    _invalid_kind = "invalid labelme entries"
    _size_source = "their imageWidth/imageHeight"

    def __init__(
        self,
        root: Union[str, Path],
        split_file: Optional[Union[str, Path]] = None,
        transforms: Optional[Callable] = None,
        classes_json: Optional[Union[str, Path]] = None,
        skip_unknown_classes: bool = False,
    ) -> None:
        self._setup(read_labelme(root, split_file), transforms, classes_json, skip_unknown_classes)

    def _setup(self, annotations: Annotations, transforms: Optional[Callable],
               classes_json: Optional[Union[str, Path]], skip_unknown_classes: bool) -> None:
        self.root = annotations.img_root  # the labelme folder
        super()._setup(annotations, transforms, classes_json, skip_unknown_classes)


register_format(
    "labelme", read_labelme_split, default_splits=("", ""), dataset_type=LabelmeDataSet,
    layout="--data-path is the folder of labelme jsons and their images, a split is a txt of json "
           "stems in it ('' = all)",
)
