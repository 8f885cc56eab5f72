"""PASCAL VOC detection dataset read from a VOCdevkit folder (the `VOCDataSet` of WZ's project).

Layout: ``<voc_root>/VOCdevkit/VOC<year>/{Annotations,JPEGImages,ImageSets/Main}``. ``voc_root`` may
also be the ``VOCdevkit`` folder or the ``VOC<year>`` folder itself.

Every annotation is parsed and checked once at construction and kept in memory; only the
pixels are read in ``__getitem__``. Coordinates are kept exactly as written (floats, no ``-1``
shift), clipped to the image and degenerate boxes dropped. ``difficult`` objects are kept for
training and flagged as ``iscrowd`` so COCO evaluation ignores detections on them.

Image orientation: boxes refer to the pixels the annotation tool displayed. labelImg shows the
stored pixels, so by default EXIF orientation is ignored. Only when the XML ``<size>`` equals the
stored size with width and height swapped and the file carries a rotating EXIF orientation (5-8)
was the image annotated upright; then the image is EXIF-transposed on load.

Registered in the catalog as "voc" (reader :func:`read_voc_split`, option ``year``); every format
shares :class:`train_utils.data.dataset.DetectionDataSet`.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
from lxml import etree

from train_utils.data.catalog import register_format
from train_utils.data.dataset import DetectionDataSet, index_images, read_id_list
from train_utils.data.records import Annotations, RawImage, RawObject

_YEAR_FOLDER = re.compile(r"^VOC(\d{4})$")
_XML_PARSER = etree.XMLParser(resolve_entities=False, no_network=True)  # no external entities
_OWNER = "VOCDataSet"


def resolve_voc_folder(voc_root: Union[str, Path], year: Optional[str]) -> tuple[Path, Optional[str]]:
    """Find the ``VOC<year>`` folder from any of the three accepted roots."""
    root = Path(voc_root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"VOCDataSet: data folder {root} does not exist")
    if (root / "Annotations").is_dir():  # the VOC<year> folder itself
        match = _YEAR_FOLDER.match(root.name)
        found = match.group(1) if match else None
        if year is not None and found is not None and found != year:
            raise ValueError(f"VOCDataSet: --year {year} but {root} is the VOC{found} folder")
        return root, found or year
    devkit = root / "VOCdevkit" if (root / "VOCdevkit").is_dir() else root
    available = sorted(p.name for p in devkit.iterdir() if p.is_dir() and _YEAR_FOLDER.match(p.name))
    if year is None:
        if len(available) == 1:
            return devkit / available[0], available[0][3:]
        if not available:
            raise FileNotFoundError(
                f"VOCDataSet: no VOC20xx folder found in {devkit} "
                f"(expected <root>/VOCdevkit/VOC2012, <root>/VOC2012 or the VOC2012 folder itself)"
            )
        raise ValueError(f"VOCDataSet: several VOC folders in {devkit}: {available}; choose one with --year")
    if f"VOC{year}" not in available:
        raise FileNotFoundError(
            f"VOCDataSet: {devkit / f'VOC{year}'} not found; available in {devkit}: {available or 'none'}"
        )
    return devkit / f"VOC{year}", year


def _child_text(element: etree._Element, tag: str) -> Optional[str]:
    """Stripped text of the first direct child ``tag``; None if absent or blank."""
    child = element.find(tag)
    if child is None or child.text is None:
        return None
    return child.text.strip() or None


def _parse_flag(text: Optional[str], tag: str) -> int:
    """0/1 flag such as ``difficult``; a missing tag means 0."""
    if text is None:
        return 0
    words = {"true": 1, "yes": 1, "false": 0, "no": 0}
    if text.lower() in words:
        return words[text.lower()]
    try:
        return int(float(text) != 0)
    except ValueError:
        raise ValueError(f"<{tag}> is not a 0/1 flag: {text!r}") from None


def _parse_size(root: etree._Element) -> Optional[tuple[int, int]]:
    """(height, width) from ``<size>``; None when missing, zero or unreadable."""
    size = root.find("size")
    if size is None:
        return None
    try:
        width = int(float(_child_text(size, "width") or 0))
        height = int(float(_child_text(size, "height") or 0))
    except ValueError:
        return None
    return (height, width) if height > 0 and width > 0 else None


def _parse_annotation(data: bytes) -> tuple[Optional[tuple[int, int]], list[RawObject]]:
    """Parse VOC XML bytes into ((height, width) or None, objects); ValueError says what is wrong.

    Each object's ``iscrowd`` is its ``difficult`` flag.
    """
    try:
        root = etree.fromstring(data, _XML_PARSER)
    except etree.XMLSyntaxError as err:
        raise ValueError(f"not well-formed XML ({err})") from None
    if root.tag != "annotation":
        raise ValueError(f"root element is <{root.tag}>, expected <annotation>")
    objects = []
    for number, obj in enumerate(root.findall("object"), start=1):
        name = _child_text(obj, "name")
        bndbox = obj.find("bndbox")
        if name is None or bndbox is None:
            raise ValueError(f"object {number} lacks <name> or <bndbox>")
        coords = []
        for tag in ("xmin", "ymin", "xmax", "ymax"):
            text = _child_text(bndbox, tag)
            try:
                value = float(text) if text is not None else float("nan")
            except ValueError:
                value = float("nan")
            if not np.isfinite(value):
                raise ValueError(f"object {number} ({name}): <{tag}> is missing or not a number: {text!r}")
            coords.append(value)
        difficult = _parse_flag(_child_text(obj, "difficult"), "difficult")
        objects.append(RawObject(name, (coords[0], coords[1], coords[2], coords[3]), difficult, f"object {number}"))
    return _parse_size(root), objects


def read_voc(voc_dir: Path, split_file: Path) -> Annotations:
    """Locate and parse every id of ``split_file`` in the ``VOC<year>`` folder ``voc_dir``."""
    ids = read_id_list(split_file, _OWNER)
    annotations_root = voc_dir / "Annotations"
    img_root = voc_dir / "JPEGImages"
    images = index_images(img_root, _OWNER)
    found = Annotations([], None, split_file, split_file, img_root)
    missing_images = []
    for image_id in ids:
        xml_path = annotations_root / f"{image_id}.xml"
        if image_id not in images:
            missing_images.append(f"{img_root / image_id}.(jpg|jpeg|png|bmp)")
        if not xml_path.is_file():
            found.missing.append(str(xml_path))
            continue
        try:
            size, objects = _parse_annotation(xml_path.read_bytes())
        except ValueError as err:
            found.invalid.append(f"{xml_path}: {err}")
            continue
        if image_id in images:
            found.images.append(RawImage(image_id, images[image_id], xml_path, size, objects))
    found.missing += missing_images
    return found


def read_voc_split(data_path: Union[str, Path], split: str, year: Optional[str] = None) -> Annotations:
    """The catalog reader: split is a file of ``ImageSets/Main`` in the ``VOC<year>`` folder found
    from ``data_path`` (see :func:`resolve_voc_folder`); ``extras["year"]`` is the year found."""
    voc_dir, found_year = resolve_voc_folder(data_path, None if year is None else str(year))
    annotations = read_voc(voc_dir, voc_dir / "ImageSets" / "Main" / split)
    annotations.extras["year"] = found_year
    return annotations


class VOCDataSet(DetectionDataSet):
    """PASCAL VOC detection dataset (see :class:`DetectionDataSet` for items and skipping).

    Targets' ``iscrowd`` is the VOC difficult flag. year=None picks the only VOC<year> folder present.
    """

    _missing_kind = "annotation/image files"
    _invalid_kind = "invalid annotation files"
    _size_source = "their XML <size>"

    def __init__(
        self,
        voc_root: Union[str, Path],
        year: Optional[str] = None,
        transforms: Optional[Callable] = None,
        txt_name: str = "train.txt",
        classes_json: Union[str, Path] = "./pascal_voc_classes.json",
        skip_unknown_classes: bool = False,
    ) -> None:
        self._setup(read_voc_split(voc_root, txt_name, year), transforms, classes_json, skip_unknown_classes)

    def _setup(self, annotations: Annotations, transforms: Optional[Callable],
               classes_json: Optional[Union[str, Path]], skip_unknown_classes: bool) -> None:
        self.root = annotations.img_root.parent  # the VOC<year> folder
        self.year = annotations.extras.get("year")
        self.annotations_root = self.root / "Annotations"
        super()._setup(annotations, transforms, classes_json, skip_unknown_classes)


register_format(
    "voc", read_voc_split, default_splits=("train.txt", "val.txt"), options=("year",),
    layout="--data-path holds VOCdevkit (or is VOCdevkit or VOC20xx) and a split is a file in ImageSets/Main",
    default_classes_json="pascal_voc_classes.json", dataset_type=VOCDataSet,
)
