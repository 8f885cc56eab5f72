"""One entry point from (format, --data-path, split) to a dataset, for the training scripts,
validation.py and tools/check_dataset.py.

What ``data_path`` and ``split`` mean per format (``SPLIT`` is the split with any ``.txt`` removed):

- voc: the folder holding VOCdevkit (or VOCdevkit, or VOC20xx); split = ``ImageSets/Main/<split>``.
- coco: a folder with ``annotations/instances_SPLIT.json`` and the image folder ``SPLIT/``.
- yolo: a folder with ``images/SPLIT/``, ``labels/SPLIT/`` and ``classes.txt`` (or ``data.yaml``).
- labelme: a folder of labelme jsons beside their images; split = a txt of json stems relative
  to the folder ('' = every json).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from .voc import VOCDataSet, read_voc, resolve_voc_folder

from train_utils.data.coco import CocoDataSet, read_coco
from train_utils.data.dataset import Annotations, DetectionDataSet
from train_utils.data.labelme import LabelmeDataSet, read_labelme
from train_utils.data.yolo import YoloDataSet, read_yolo

FORMATS = ("voc", "coco", "yolo", "labelme")
DEFAULT_VOC_CLASSES = "./pascal_voc_classes.json"
LAYOUT_HELP = (
    "voc: --data-path holds VOCdevkit and a split is a file in ImageSets/Main; "
    "coco: --data-path holds annotations/instances_SPLIT.json and the images in SPLIT/; "
    "yolo: --data-path holds images/SPLIT/, labels/SPLIT/ and classes.txt (or data.yaml); "
    "labelme: --data-path is the folder of labelme jsons and their images, a split is a txt of json "
    "stems in it ('' = all). SPLIT is the split name without .txt (train.txt -> train). "
    "--classes-json is required for voc (default pascal_voc_classes.json) and optional for the others, "
    "which otherwise take their class names from the data"
)

PathLike = Union[str, Path]


def split_stem(split: str) -> str:
    """The split name without a ``.txt`` suffix (``train.txt`` -> ``train``)."""
    return split[:-len(".txt")] if split.endswith(".txt") else split


def _check_format(fmt: str, year: Optional[str]) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown dataset format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if year is not None and fmt != "voc":
        raise ValueError(f"a year ({year}) only applies to the voc format, not {fmt}")


def _coco_paths(data_path: PathLike, split: str) -> tuple[Path, Path]:
    """(image folder, annotation json) of a COCO split."""
    name = split_stem(split)
    if not name:
        raise ValueError("coco needs a split name such as 'train' or 'val'")
    return Path(data_path) / name, Path(data_path) / "annotations" / f"instances_{name}.json"


def _labelme_split(data_path: PathLike, split: str) -> Optional[Path]:
    """The split file of a labelme folder (relative paths are inside the folder); None for ''."""
    if not split:
        return None
    return Path(split) if Path(split).is_absolute() else Path(data_path) / split


def build_dataset(
    fmt: str,
    data_path: PathLike,
    split: str,
    transforms: Optional[Callable],
    classes_json: Optional[PathLike] = None,
    year: Optional[str] = None,
    skip_unknown_classes: bool = False,
    expected_class_names: Optional[Sequence[str]] = None,
) -> DetectionDataSet:
    """The dataset of ``split`` in ``data_path`` read as ``fmt`` (see the module docstring).

    classes_json: for voc the classes file (None = pascal_voc_classes.json); for the other
    formats an optional file imposing names and labels. expected_class_names: the class list the
    dataset must end up with (e.g. the training split's), checked so labels always agree.
    """
    _check_format(fmt, year)
    if fmt == "voc":
        dataset: DetectionDataSet = VOCDataSet(data_path, year, transforms, split, classes_json or DEFAULT_VOC_CLASSES,
                                               skip_unknown_classes)
    elif fmt == "coco":
        images_dir, annotation_json = _coco_paths(data_path, split)
        dataset = CocoDataSet(images_dir, annotation_json, transforms, classes_json=classes_json,
                                       skip_unknown_classes=skip_unknown_classes)
    elif fmt == "yolo":
        dataset = YoloDataSet(data_path, split_stem(split), transforms, classes_json=classes_json,
                              skip_unknown_classes=skip_unknown_classes)
    else:
        dataset = LabelmeDataSet(data_path, _labelme_split(data_path, split), transforms, classes_json,
                                 skip_unknown_classes)
    if expected_class_names is not None and list(dataset.class_names) != list(expected_class_names):
        raise ValueError(f"{dataset.split_file} has classes {dataset.class_names} but {list(expected_class_names)} "
                         f"were expected (the training split's); give every split the same classes or pass "
                         f"a classes json")
    return dataset


def read_annotations(fmt: str, data_path: PathLike, split: str, year: Optional[str] = None) -> Annotations:
    """What the dataset of the same arguments would read, problems included (nothing is raised
    for missing images or invalid annotations; they are listed)."""
    _check_format(fmt, year)
    if fmt == "voc":
        voc_dir, _ = resolve_voc_folder(data_path, year)
        return read_voc(voc_dir, voc_dir / "ImageSets" / "Main" / split)
    if fmt == "coco":
        return read_coco(*_coco_paths(data_path, split))[0]
    if fmt == "yolo":
        return read_yolo(data_path, split_stem(split))
    return read_labelme(data_path, _labelme_split(data_path, split))
