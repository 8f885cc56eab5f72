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
"""
from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch
from lxml import etree
from PIL import Image, ImageOps
from torch.utils.data import Dataset

Target = dict[str, torch.Tensor]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")  # preference order if an id has several files
_STRAY_FILES = {"desktop.ini", "thumbs.db"}
_YEAR_FOLDER = re.compile(r"^VOC(\d{4})$")
_ROTATING_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that swap width and height
_EXIF_ORIENTATION_TAG = 0x0112
_DECODE_ERRORS = (OSError, SyntaxError, ValueError)  # what PIL raises on unreadable image data
_MODULE_DIR = Path(__file__).resolve().parent
_LISTED = 5  # how many offending files an error or warning names
_XML_PARSER = etree.XMLParser(resolve_entities=False, no_network=True)  # no external entities


@dataclass(frozen=True)
class _Record:
    """One usable image with its checked annotation.

    boxes: float32 [N, 4] xyxy clipped to (width, height); labels, difficult: int64 [N].
    height/width describe the image as returned (after the optional EXIF transpose).
    """

    image_path: Path
    xml_path: Path
    height: int
    width: int
    exif_transpose: bool
    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray


@dataclass(frozen=True)
class _Object:
    """One ``<object>`` as written in the XML (unclipped)."""

    name: str
    box: tuple[float, float, float, float]
    difficult: int


# (image path, XML path, (height, width) from <size> or None, objects) for one listed id
_Parsed = tuple[Path, Path, Optional[tuple[int, int]], list[_Object]]


def resolve_classes_json(json_path: Union[str, Path]) -> Path:
    """The classes json path; a relative path missing from the working folder is tried in the repo."""
    path = Path(json_path)
    if not path.is_file() and not path.is_absolute() and (_MODULE_DIR / path).is_file():
        return _MODULE_DIR / path
    return path


def load_class_dict(json_path: Union[str, Path]) -> dict[str, int]:
    """Read a WZ-style classes json ``{"aeroplane": 1, ...}`` and check ids are exactly 1..K."""
    path = resolve_classes_json(json_path)
    if not path.is_file():
        raise FileNotFoundError(f"classes json {path} does not exist")

    def no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
        names = [name for name, _ in pairs]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"classes json {path}: class names repeated: {repeated}")
        return dict(pairs)

    try:
        data = json.loads(path.read_bytes().decode("utf-8"), object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"classes json {path} is not valid UTF-8 JSON: {err}") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"classes json {path} must be a non-empty object {{name: id}}")
    bad = [name for name, cid in data.items() if not name.strip() or type(cid) is not int]
    if bad:
        raise ValueError(f"classes json {path}: entries need a non-empty name and an integer id: {bad}")
    ids = sorted(data.values())
    if ids != list(range(1, len(data) + 1)):
        raise ValueError(f"classes json {path}: ids must be 1..{len(data)} without gaps or repeats, got {ids}")
    return dict(data)


def _resolve_voc_folder(voc_root: Union[str, Path], year: Optional[str]) -> tuple[Path, Optional[str]]:
    """Find the ``VOC<year>`` folder from any of the three accepted roots."""
    root = Path(voc_root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"VOCDataSet: data folder {root} does not exist")
    if (root / "Annotations").is_dir():  # the VOC<year> folder itself
        match = _YEAR_FOLDER.match(root.name)
        found = match.group(1) if match else None
        if year is not None and found is not None and found != year:
            raise ValueError(f"VOCDataSet: year={year} but {root} is the VOC{found} folder")
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
        raise ValueError(f"VOCDataSet: several VOC folders in {devkit}: {available}; choose one with year=")
    if f"VOC{year}" not in available:
        raise FileNotFoundError(
            f"VOCDataSet: {devkit / f'VOC{year}'} not found; available in {devkit}: {available or 'none'}"
        )
    return devkit / f"VOC{year}", year


def _read_split(path: Path) -> list[str]:
    """Image ids from a split file: first token of each non-blank line (CRLF and per-class lists ok)."""
    if not path.is_file():
        listing = sorted(p.name for p in path.parent.glob("*.txt"))[:10] if path.parent.is_dir() else []
        raise FileNotFoundError(f"VOCDataSet: split file {path} not found; available: {listing or 'none'}")
    try:
        lines = path.read_bytes().decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"VOCDataSet: split file {path} is not UTF-8 text ({err})") from None
    ids = [line.split()[0] for line in lines if line.strip()]
    if not ids:
        raise ValueError(f"VOCDataSet: split file {path} lists no image ids")
    return ids


def _index_images(folder: Path) -> dict[str, Path]:
    """Map file stem -> image path for every image in ``folder`` (any extension case, strays ignored)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"VOCDataSet: image folder {folder} does not exist")
    index: dict[str, Path] = {}
    rank: dict[str, int] = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            name = entry.name
            if name.startswith(".") or name.lower() in _STRAY_FILES:
                continue
            stem, ext = os.path.splitext(name)
            ext = ext.lower()
            if ext in IMAGE_EXTENSIONS and IMAGE_EXTENSIONS.index(ext) < rank.get(stem, len(IMAGE_EXTENSIONS)):
                index[stem] = Path(entry.path)
                rank[stem] = IMAGE_EXTENSIONS.index(ext)
    return index


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


def _parse_annotation(data: bytes) -> tuple[Optional[tuple[int, int]], list[_Object]]:
    """Parse VOC XML bytes into ((height, width) or None, objects); ValueError says what is wrong."""
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
        objects.append(_Object(name, (coords[0], coords[1], coords[2], coords[3]), difficult))
    return _parse_size(root), objects


def _first(items: list[str]) -> str:
    """Comma-separated first few entries, with a count of the rest."""
    shown = ", ".join(items[:_LISTED])
    return shown + (f", ... ({len(items) - _LISTED} more)" if len(items) > _LISTED else "")


class VOCDataSet(Dataset):
    """PASCAL VOC detection dataset.

    ``dataset[idx] -> (image, target)``: image is an RGB PIL image (a float32 [3, H, W] tensor
    after ``ToTensor``); target holds ``boxes`` float32 [N, 4] xyxy pixels, ``labels`` int64 [N]
    in 1..num_classes, ``image_id`` int64 0-d (= idx), ``area`` float32 [N] and ``iscrowd``
    int64 [N] (the VOC difficult flag). ``transforms(image, target)`` is applied last.

    year=None picks the only VOC<year> folder present. An image that fails to decode in
    ``__getitem__`` is recorded in ``unreadable`` and the next readable index is returned instead
    (with DataLoader workers each worker keeps its own record). ``skipped`` counts what was left out.
    """

    def __init__(
        self,
        voc_root: Union[str, Path],
        year: Optional[str] = None,
        transforms: Optional[Callable] = None,
        txt_name: str = "train.txt",
        classes_json: Union[str, Path] = "./pascal_voc_classes.json",
        skip_unknown_classes: bool = False,
    ) -> None:
        self.root, self.year = _resolve_voc_folder(voc_root, None if year is None else str(year))
        self.img_root = self.root / "JPEGImages"
        self.annotations_root = self.root / "Annotations"
        self.split_file = self.root / "ImageSets" / "Main" / txt_name
        self.transforms = transforms
        self.classes_json = resolve_classes_json(classes_json)
        self.class_dict = load_class_dict(self.classes_json)
        self.class_names = sorted(self.class_dict, key=self.class_dict.__getitem__)
        self.num_classes = len(self.class_dict)
        self.skipped = {"degenerate_boxes": 0, "unknown_class_objects": 0, "unreadable_images": 0,
                        "size_mismatch_images": 0}
        self.unreadable: dict[Path, str] = {}  # image path -> reason, filled at construction and on load
        self._bad_indices: set[int] = set()
        self._unknown_examples: dict[str, str] = {}  # unknown class name -> one XML file using it
        self._mismatches: list[str] = []  # descriptions of XML/image size disagreements

        parsed = self._parse_all(_read_split(self.split_file), skip_unknown_classes)
        self._records = self._check_images(parsed)
        self.ids = [record.xml_path.stem for record in self._records]
        if not self._records:
            raise ValueError(f"VOCDataSet: no usable image in {self.split_file}: {self.summary()}")
        if any(self.skipped.values()):
            warnings.warn(f"VOCDataSet({self.split_file}): {self.summary()}", stacklevel=2)

    # ---------------------------------------------------------------- construction
    def _parse_all(self, ids: list[str], skip_unknown: bool) -> list[_Parsed]:
        """Locate and parse every id's files; raise one error per kind of fatal problem."""
        images = _index_images(self.img_root)
        missing = [str(self.annotations_root / f"{i}.xml") for i in ids
                   if not (self.annotations_root / f"{i}.xml").is_file()]
        missing += [f"{self.img_root / i}.(jpg|jpeg|png|bmp)" for i in ids if i not in images]
        if missing:
            raise FileNotFoundError(
                f"VOCDataSet: {len(missing)} annotation/image files listed in {self.split_file} are missing: "
                f"{_first(missing)}"
            )
        parsed, invalid, unknown = [], [], {}
        for image_id in ids:
            xml_path = self.annotations_root / f"{image_id}.xml"
            try:
                size, objects = _parse_annotation(xml_path.read_bytes())
            except ValueError as err:
                invalid.append(f"{xml_path}: {err}")
                continue
            for obj in objects:
                if obj.name not in self.class_dict:
                    unknown.setdefault(obj.name, str(xml_path))
            parsed.append((images[image_id], xml_path, size, objects))
        if invalid:
            raise ValueError(f"VOCDataSet: {len(invalid)} invalid annotation files: {_first(invalid)}")
        if unknown and not skip_unknown:
            listing = _first([f"{name!r} (e.g. {path})" for name, path in sorted(unknown.items())])
            raise ValueError(
                f"VOCDataSet: classes not in {self.classes_json}: {listing}; "
                f"add them there or pass skip_unknown_classes=True"
            )
        self._unknown_examples = unknown
        return parsed

    def _check_images(self, parsed: list[_Parsed]) -> list[_Record]:
        """Read each image header (no pixel decode), settle its size and build clipped targets."""
        records = []
        for image_path, xml_path, xml_size, objects in parsed:
            try:
                with Image.open(image_path) as image:
                    stored = (image.height, image.width)
                    rotated = (xml_size == stored[::-1] and xml_size != stored
                               and image.getexif().get(_EXIF_ORIENTATION_TAG) in _ROTATING_ORIENTATIONS)
            except _DECODE_ERRORS as err:
                self.unreadable[image_path] = f"cannot open: {err}"
                self.skipped["unreadable_images"] += 1
                continue
            if xml_size is not None and xml_size != stored and not rotated:
                self._mismatches.append(f"{xml_path.name} says {xml_size[1]}x{xml_size[0]}, "
                                        f"{image_path.name} is {stored[1]}x{stored[0]}")
                self.skipped["size_mismatch_images"] += 1
                continue
            height, width = xml_size if xml_size is not None else stored
            records.append(self._make_record(image_path, xml_path, height, width, rotated, objects))
        return records

    def _make_record(self, image_path: Path, xml_path: Path, height: int, width: int,
                     rotated: bool, objects: list[_Object]) -> _Record:
        """Drop unknown-class objects, clip boxes to the image and drop degenerate ones."""
        known = [obj for obj in objects if obj.name in self.class_dict]
        self.skipped["unknown_class_objects"] += len(objects) - len(known)
        boxes = np.array([obj.box for obj in known], dtype=np.float64).reshape(-1, 4)
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        self.skipped["degenerate_boxes"] += int((~keep).sum())
        return _Record(
            image_path=image_path,
            xml_path=xml_path,
            height=height,
            width=width,
            exif_transpose=rotated,
            boxes=boxes[keep].astype(np.float32),
            labels=np.array([self.class_dict[obj.name] for obj in known], dtype=np.int64)[keep],
            difficult=np.array([obj.difficult for obj in known], dtype=np.int64)[keep],
        )

    def summary(self) -> str:
        """One line describing everything skipped so far (empty problems are omitted)."""
        parts = []
        if self.skipped["degenerate_boxes"]:
            parts.append(f"dropped {self.skipped['degenerate_boxes']} degenerate boxes (empty after clipping)")
        if self.skipped["unknown_class_objects"]:
            names = _first([f"{n!r} ({Path(p).name})" for n, p in sorted(self._unknown_examples.items())])
            parts.append(f"skipped {self.skipped['unknown_class_objects']} objects of unknown classes: {names}")
        if self.skipped["unreadable_images"]:
            files = _first([f"{p.name}: {why}" for p, why in self.unreadable.items()])
            parts.append(f"skipped {self.skipped['unreadable_images']} unreadable images: {files}")
        if self.skipped["size_mismatch_images"]:
            parts.append(f"skipped {self.skipped['size_mismatch_images']} images whose size differs from "
                         f"their XML <size>: {_first(self._mismatches)}")
        return "; ".join(parts) if parts else "nothing skipped"

    # ---------------------------------------------------------------- access
    def __len__(self) -> int:
        return len(self._records)

    def _index(self, idx: int) -> int:
        if not -len(self) <= idx < len(self):
            raise IndexError(f"VOCDataSet index {idx} out of range for {len(self)} images")
        return idx % len(self)

    def _target(self, idx: int) -> Target:
        """Fresh target tensors for record ``idx`` (callers may modify them in place)."""
        record = self._records[idx]
        boxes = torch.from_numpy(record.boxes.copy())
        return {
            "boxes": boxes,
            "labels": torch.from_numpy(record.labels.copy()),
            "image_id": torch.tensor(idx, dtype=torch.int64),
            "area": (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
            "iscrowd": torch.from_numpy(record.difficult.copy()),
        }

    def _load_image(self, idx: int) -> Image.Image:
        record = self._records[idx]
        with Image.open(record.image_path) as image:
            if record.exif_transpose:
                return ImageOps.exif_transpose(image).convert("RGB")
            return image.convert("RGB")

    def __getitem__(self, idx: int) -> tuple[object, Target]:
        start = self._index(idx)
        for step in range(len(self)):
            current = (start + step) % len(self)
            if current in self._bad_indices:
                continue
            try:
                image = self._load_image(current)
            except _DECODE_ERRORS as err:
                self._record_unreadable(current, err)
                continue
            target = self._target(current)
            if self.transforms is not None:
                image, target = self.transforms(image, target)
            return image, target
        raise RuntimeError(f"VOCDataSet: none of the {len(self)} images in {self.img_root} can be decoded")

    def _record_unreadable(self, idx: int, err: Exception) -> None:
        path = self._records[idx].image_path
        self._bad_indices.add(idx)
        self.unreadable[path] = f"cannot decode: {err}"
        self.skipped["unreadable_images"] += 1
        warnings.warn(f"VOCDataSet: skipping unreadable image {path} ({err}); using the next image instead",
                      stacklevel=3)

    def get_height_and_width(self, idx: int) -> tuple[int, int]:
        """(height, width) of image ``idx`` as returned, without reading any file."""
        record = self._records[self._index(idx)]
        return record.height, record.width

    def coco_index(self, idx: int) -> tuple[int, int, Target]:
        """(height, width, target) for building COCO ground truth; no image is read, no transforms."""
        idx = self._index(idx)
        record = self._records[idx]
        return record.height, record.width, self._target(idx)

    @staticmethod
    def collate_fn(batch: list[tuple[object, Target]]) -> tuple[tuple, ...]:
        """Keep images and targets as tuples (images differ in size)."""
        return tuple(zip(*batch))
