"""YOLO-format detection dataset (the layout of ultralytics / darknet exports).

Layout: ``root/images/<split>/*.jpg|png`` and ``root/labels/<split>/<stem>.txt`` with one
``class cx cy w h`` line per object, coordinates normalised to the image size and class ids
counted from 0 (label = class id + 1). Class names come from ``root/classes.txt`` (one per line)
or the ``names:`` list of ``root/data.yaml`` (read without a yaml library: the flow list
``[a, b]``, a block of ``- a`` items or a block of ``0: a`` items). An image without label file
has no objects. As ultralytics does, boxes refer to the EXIF-transposed image.

Registered in the catalog as "yolo" (reader :func:`read_yolo_split`).
"""
from __future__ import annotations

import ast
import math
import re
from pathlib import Path
from typing import Callable, Optional, Union

from train_utils.data.catalog import register_format
from train_utils.data.dataset import DetectionDataSet, index_images, split_stem
from train_utils.data.records import Annotations, RawImage, RawObject

_OWNER = "YoloDataSet"
_NAMES_KEY = re.compile(r"^names\s*:(.*)$")
_BLOCK_ITEM = re.compile(r"^(?:\s*-\s+(?P<item>.*)|\s+(?P<key>\d+)\s*:\s*(?P<value>.*))$")
_FLOW_ITEM = re.compile(r"'[^']*'|\"[^\"]*\"|[^,]+")


def _scalar(text: str) -> str:
    """A YAML scalar without quotes or trailing comment."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return re.sub(r"\s+#.*$", "", text).strip()


def _yaml_names(text: str, path: Path) -> list[str]:
    """The ``names:`` list of a data.yaml (flow list, ``- name`` block or ``index: name`` block)."""
    lines = text.splitlines()
    for number, line in enumerate(lines):
        match = _NAMES_KEY.match(line)
        if match is None:
            continue
        rest = match.group(1).strip()
        if rest.startswith("["):
            flow = rest[:rest.rfind("]") + 1]
            try:
                items = ast.literal_eval(flow)
            except (ValueError, SyntaxError):
                items = [_scalar(item) for item in _FLOW_ITEM.findall(flow[1:-1])]
            return [str(item) for item in items]
        if _scalar(rest):
            break
        listed, keyed = [], {}
        for item_line in lines[number + 1:]:
            if not item_line.strip() or item_line.lstrip().startswith("#"):
                continue
            item = _BLOCK_ITEM.match(item_line)
            if item is None:
                break
            if item.group("key") is not None:
                keyed[int(item.group("key"))] = _scalar(item.group("value"))
            else:
                listed.append(_scalar(item.group("item")))
        if keyed and not listed and sorted(keyed) == list(range(len(keyed))):
            return [keyed[i] for i in range(len(keyed))]
        if listed and not keyed:
            return listed
        break
    raise ValueError(f"{_OWNER}: cannot read a 'names:' list from {path}; "
                     f"write the class names one per line in classes.txt instead")


def read_class_names(path: Path) -> list[str]:
    """Class names (index = YOLO class id) from a classes.txt or a data.yaml."""
    if not path.is_file():
        raise FileNotFoundError(f"{_OWNER}: class names file {path} does not exist")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{_OWNER}: {path} is not UTF-8 text ({err})") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        names = [name.strip() for name in _yaml_names(text, path)]
    else:
        names = [line.strip() for line in text.splitlines()]
        while names and not names[-1]:
            names.pop()
    if not names or not all(names):
        raise ValueError(f"{_OWNER}: {path} must list one non-empty class name per class")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"{_OWNER}: {path}: class names repeated: {repeated}")
    return names


def _parse_label_file(path: Path, names: list[str], names_file: Path) -> tuple[list[RawObject], list[str]]:
    """(objects with normalised xyxy boxes, one problem per malformed line naming file and line)."""
    try:
        lines = path.read_bytes().decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        return [], [f"{path}: not UTF-8 text ({err})"]
    objects, problems = [], []
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}: line {number}"
        if len(fields) != 5:
            problems.append(f"{where}: expected 5 values 'class cx cy w h', got {len(fields)}: {line.strip()!r}")
            continue
        try:
            class_id, cx, cy, w, h = (float(v) for v in fields)
        except ValueError:
            problems.append(f"{where}: not numbers: {line.strip()!r}")
            continue
        if not all(math.isfinite(v) for v in (cx, cy, w, h)):
            problems.append(f"{where}: coordinates must be finite: {line.strip()!r}")
        elif not class_id.is_integer() or not 0 <= class_id < len(names):
            problems.append(f"{where}: class id {fields[0]} is not one of 0..{len(names) - 1} ({names_file.name})")
        else:
            box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
            objects.append(RawObject(names[int(class_id)], box, 0, f"line {number}"))
    return objects, problems


def default_names_file(root: Path) -> Path:
    """``root/classes.txt``, else ``root/data.yaml``."""
    for name in ("classes.txt", "data.yaml"):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f"{_OWNER}: no classes.txt or data.yaml in {root} to name the classes")


def read_yolo(root: Union[str, Path], split: str, classes_file: Optional[Union[str, Path]] = None) -> Annotations:
    """Read ``root/images/<split>`` and the matching ``root/labels/<split>`` files (``extras["root"]``
    is ``root``)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{_OWNER}: data folder {root} does not exist")
    image_dir, label_dir = root / "images" / split, root / "labels" / split
    if not image_dir.is_dir():
        available = sorted(p.name for p in (root / "images").iterdir() if p.is_dir()) \
            if (root / "images").is_dir() else []
        raise FileNotFoundError(f"{_OWNER}: image folder {image_dir} does not exist; "
                                f"splits in {root / 'images'}: {available or 'none'}")
    if not label_dir.is_dir():
        raise FileNotFoundError(f"{_OWNER}: label folder {label_dir} does not exist")
    names_file = Path(classes_file) if classes_file is not None else default_names_file(root)
    names = read_class_names(names_file)
    images = index_images(image_dir, _OWNER)
    found = Annotations([], names, names_file, image_dir, image_dir, extras={"root": root})
    for stem in sorted(images):
        label_path = label_dir / f"{stem}.txt"
        objects: list[RawObject] = []
        if label_path.is_file():
            objects, problems = _parse_label_file(label_path, names, names_file)
            found.invalid += problems
        found.images.append(RawImage(stem, images[stem], label_path, None, objects, normalised=True,
                                     exif_upright=True))
    found.notes += [f"label file without image: {path}" for path in sorted(label_dir.glob("*.txt"))
                    if path.stem not in images]
    return found


def read_yolo_split(data_path: Union[str, Path], split: str) -> Annotations:
    """The catalog reader: ``data_path/images/SPLIT`` and ``data_path/labels/SPLIT`` (SPLIT = split
    without ``.txt``), class names from ``data_path/classes.txt`` or ``data.yaml``."""
    return read_yolo(data_path, split_stem(split))


class YoloDataSet(DetectionDataSet):
    """YOLO detection dataset (see :class:`DetectionDataSet` for items and skipping).

    ids are the image file stems (sorted). classes_file: the class names file (default
    ``root/classes.txt`` or ``root/data.yaml``). classes_json (optional) maps those names to labels
    instead of their file order; names missing from it are unknown classes.
    """

    _invalid_kind = "malformed label lines"

    def __init__(
        self,
        root: Union[str, Path],
        split: str = "train",
        transforms: Optional[Callable] = None,
        classes_file: Optional[Union[str, Path]] = None,
        classes_json: Optional[Union[str, Path]] = None,
        skip_unknown_classes: bool = False,
    ) -> None:
        self._setup(read_yolo(root, split, classes_file), transforms, classes_json, skip_unknown_classes)

    def _setup(self, annotations: Annotations, transforms: Optional[Callable],
               classes_json: Optional[Union[str, Path]], skip_unknown_classes: bool) -> None:
        self.root = annotations.extras["root"]
        super()._setup(annotations, transforms, classes_json, skip_unknown_classes)


register_format(
    "yolo", read_yolo_split, default_splits=("train", "val"), dataset_type=YoloDataSet,
    layout="--data-path holds images/SPLIT/, labels/SPLIT/ and classes.txt (or data.yaml)",
)
