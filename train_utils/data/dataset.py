"""The contract every detection dataset of this project follows, and the machinery they share.

Each annotation format (VOC, COCO, YOLO, labelme, or any format registered in
``train_utils.data.catalog``) only knows how to read its files into :class:`Annotations` (one
:class:`RawImage` per image, boxes as written). :class:`DetectionDataSet` turns those into ready
targets the same way for every format: one error per kind of fatal problem (missing files, invalid
annotations, unknown classes), image headers read without decoding pixels, sizes checked against
what the annotation declares (with the EXIF rotation rule), boxes clipped and degenerate ones
dropped, and an image that fails to decode (:mod:`train_utils.data.images`) later replaced by the
next one.
``tools/check_dataset.py`` builds its lint on the same readers and helpers.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from train_utils.data.classes import AUTO_CLASSES, NAMES_SOURCE, ClassesArg, choose_classes, names_in_data
from train_utils.data.images import DECODE_ERRORS, decode_image, read_image_header
# The records are also importable from here, the path format plugins were written against.
from train_utils.data.records import Annotations, ImageRecord, RawImage, RawObject  # noqa: F401

Target = dict[str, torch.Tensor]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")  # preference order if a stem has several files
STRAY_FILES = {"desktop.ini", "thumbs.db"}
ROTATING_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that swap width and height
_LISTED = 5  # how many offending files an error or warning names


# ---------------------------------------------------------------------------- small helpers
def first_few(items: Sequence[str]) -> str:
    """Comma-separated first few entries, with a count of the rest."""
    shown = ", ".join(items[:_LISTED])
    return shown + (f", ... ({len(items) - _LISTED} more)" if len(items) > _LISTED else "")


def split_stem(split: str) -> str:
    """The split name without a ``.txt`` suffix (``train.txt`` -> ``train``)."""
    return split[:-len(".txt")] if split.endswith(".txt") else split


def read_id_list(path: Path, owner: str) -> list[str]:
    """Ids from a split file: first token of each non-blank line (CRLF and per-class lists ok)."""
    if not path.is_file():
        listing = sorted(p.name for p in path.parent.glob("*.txt"))[:10] if path.parent.is_dir() else []
        raise FileNotFoundError(f"{owner}: split file {path} not found; available: {listing or 'none'}")
    try:
        lines = path.read_bytes().decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"{owner}: split file {path} is not UTF-8 text ({err})") from None
    ids = [line.split()[0] for line in lines if line.strip()]
    if not ids:
        raise ValueError(f"{owner}: split file {path} lists no image ids")
    return ids


def index_images(folder: Path, owner: str) -> dict[str, Path]:
    """Map file stem -> image path for every image in ``folder`` (any extension case, strays ignored)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{owner}: image folder {folder} does not exist")
    index: dict[str, Path] = {}
    rank: dict[str, int] = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            name = entry.name
            if name.startswith(".") or name.lower() in STRAY_FILES:
                continue
            stem, ext = os.path.splitext(name)
            ext = ext.lower()
            if ext in IMAGE_EXTENSIONS and IMAGE_EXTENSIONS.index(ext) < rank.get(stem, len(IMAGE_EXTENSIONS)):
                index[stem] = Path(entry.path)
                rank[stem] = IMAGE_EXTENSIONS.index(ext)
    return index


# ---------------------------------------------------------------------------- images and boxes
def settle_size(stored: tuple[int, int], orientation: Optional[int], declared: Optional[tuple[int, int]],
                exif_upright: bool) -> tuple[Optional[tuple[int, int]], bool]:
    """((height, width) of the image as returned, whether to EXIF-transpose it on load).

    exif_upright: the annotation tool showed the EXIF-transposed image (YOLO, labelme). Otherwise
    the stored pixels were annotated, unless ``declared`` equals the stored size with width and
    height swapped and the EXIF orientation rotates (then the image was annotated upright).
    The size is None when ``declared`` (height, width) disagrees with the image.
    """
    if exif_upright:
        transpose = orientation is not None and 2 <= orientation <= 8
    else:
        transpose = declared == stored[::-1] and declared != stored and orientation in ROTATING_ORIENTATIONS
    size = stored[::-1] if transpose and orientation in ROTATING_ORIENTATIONS else stored
    if declared is not None and declared != size:
        return None, transpose
    return size, transpose


def clip_boxes(boxes: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(boxes clipped to the image, bool mask of the non-degenerate ones); boxes [N, 4] xyxy."""
    clipped = boxes.astype(np.float64).reshape(-1, 4)
    clipped[:, 0::2] = clipped[:, 0::2].clip(0, width)
    clipped[:, 1::2] = clipped[:, 1::2].clip(0, height)
    keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    return clipped, keep


# ---------------------------------------------------------------------------- the dataset
class DetectionDataSet(Dataset):
    """Base of every dataset: ``dataset[idx] -> (image, target)``.

    image is an RGB PIL image (a float32 [3, H, W] tensor after ``ToTensor``); target holds
    ``boxes`` float32 [N, 4] xyxy pixels, ``labels`` int64 [N] in 1..num_classes, ``image_id``
    int64 0-d (= idx), ``area`` float32 [N] and ``iscrowd`` int64 [N]. ``transforms(image, target)``
    is applied last. An image that fails to decode in ``__getitem__`` is recorded in ``unreadable``
    and the next readable index is returned instead (with DataLoader workers each worker keeps its
    own record). ``skipped`` counts what was left out; ``summary()`` says it in one line.

    Build one with :meth:`from_annotations` from any reader's :class:`Annotations` (that is what
    the catalog does); the format classes read their files in ``__init__`` and call :meth:`_setup`,
    which subclasses extend to keep format-specific attributes. ``split_file`` is what defines the
    image list, ``classes_json`` where the class names come from.
    """

    _missing_kind = "files"  # "N <kind> listed in <split_file> are missing"
    _invalid_kind = "invalid annotations"
    _size_source = "their annotation"  # "images whose size differs from <source>"

    transforms: Optional[Callable]
    split_file: Path
    img_root: Path
    classes_json: Union[Path, str]  # a classes json, or where the names come from

    @classmethod
    def from_annotations(cls, annotations: Annotations, transforms: Optional[Callable] = None,
                         classes_json: Optional[ClassesArg] = None,
                         skip_unknown_classes: bool = False) -> DetectionDataSet:
        """The dataset of what a reader found. classes_json (optional) imposes names and labels;
        without it the reader's own class list is numbered 1..K (a reader without one needs it)."""
        dataset = cls.__new__(cls)
        dataset._setup(annotations, transforms, classes_json, skip_unknown_classes)
        return dataset

    def _setup(self, annotations: Annotations, transforms: Optional[Callable],
               classes_json: Optional[ClassesArg], skip_unknown_classes: bool) -> None:
        """Choose the classes, then check every image and build the records."""
        self.transforms = transforms
        self.split_file = annotations.split_file
        self.img_root = annotations.img_root
        if classes_json == AUTO_CLASSES:
            classes_json = names_in_data(annotations)
        self._set_classes(*choose_classes(annotations.class_names, classes_json, annotations.class_source))
        self._build(annotations, skip_unknown_classes)

    def _set_classes(self, class_dict: dict[str, int], source: Path) -> None:
        self.classes_json = source
        self.class_dict = class_dict
        self.class_names = sorted(class_dict, key=class_dict.__getitem__)
        self.num_classes = len(class_dict)

    def _build(self, annotations: Annotations, skip_unknown: bool) -> None:
        """Raise one error per kind of fatal problem, then check every image and build records."""
        name = type(self).__name__
        self.skipped = {"degenerate_boxes": 0, "unknown_class_objects": 0, "unreadable_images": 0,
                        "size_mismatch_images": 0, **annotations.skipped}
        self.unreadable: dict[Path, str] = {}  # image path -> reason, filled at construction and on load
        self._bad_indices: set[int] = set()
        self._mismatches: list[str] = []  # descriptions of annotation/image size disagreements
        if annotations.missing:
            raise FileNotFoundError(f"{name}: {len(annotations.missing)} {self._missing_kind} listed in "
                                    f"{self.split_file} are missing: {first_few(annotations.missing)}")
        if annotations.invalid:
            raise ValueError(f"{name}: {len(annotations.invalid)} {self._invalid_kind}: "
                             f"{first_few(annotations.invalid)}")
        unknown: dict[str, str] = {}
        for raw in annotations.images:
            for obj in raw.objects:
                if obj.name not in self.class_dict:
                    unknown.setdefault(obj.name, str(raw.annotation_path))
        listing = first_few([f"{n!r} (e.g. {path})" for n, path in sorted(unknown.items())])
        if unknown and len(unknown) == len(names_in_data(annotations)):  # even with skip_unknown: nothing left
            hint = (f"pass --classes-json {AUTO_CLASSES} to take the class names from the data"
                    if self.classes_json != NAMES_SOURCE else "give every split the same classes")
            raise ValueError(f"{name}: none of the classes of {self.split_file} is in {self.classes_json}: "
                             f"{listing}; {hint}")
        if unknown and not skip_unknown:
            fix = "add them there" if self.classes_json != NAMES_SOURCE else "give every split the same classes"
            raise ValueError(f"{name}: classes not in {self.classes_json}: {listing}; "
                             f"{fix} or pass --skip-unknown-classes")
        self._unknown_examples = unknown  # unknown class name -> one annotation file using it

        self._records: list[ImageRecord] = []
        for raw in annotations.images:
            record = self._check_image(raw)
            if record is not None:
                self._records.append(record)
        self.ids = [record.id for record in self._records]
        if not self._records:
            raise ValueError(f"{name}: no usable image in {self.split_file}: {self.summary()}")
        if any(self.skipped.values()):
            warnings.warn(f"{name}({self.split_file}): {self.summary()}", stacklevel=3)

    def _check_image(self, raw: RawImage) -> Optional[ImageRecord]:
        """Read the image header (no pixel decode), settle its size and build the clipped target."""
        try:
            stored_h, stored_w, orientation = read_image_header(raw.image_path)
        except DECODE_ERRORS as err:
            self.unreadable[raw.image_path] = f"cannot open: {err}"
            self.skipped["unreadable_images"] += 1
            return None
        size, transpose = settle_size((stored_h, stored_w), orientation, raw.declared_size, raw.exif_upright)
        if size is None:
            declared_h, declared_w = raw.declared_size
            self._mismatches.append(f"{raw.annotation_path.name} says {declared_w}x{declared_h}, "
                                    f"{raw.image_path.name} is {stored_w}x{stored_h}")
            self.skipped["size_mismatch_images"] += 1
            return None
        height, width = size
        known = [obj for obj in raw.objects if obj.name in self.class_dict]
        self.skipped["unknown_class_objects"] += len(raw.objects) - len(known)
        boxes = np.array([obj.box for obj in known], dtype=np.float64).reshape(-1, 4)
        if raw.normalised:
            boxes *= np.array([width, height, width, height], dtype=np.float64)
        boxes, keep = clip_boxes(boxes, height, width)
        self.skipped["degenerate_boxes"] += int((~keep).sum())
        return ImageRecord(
            id=raw.id,
            image_path=raw.image_path,
            annotation_path=raw.annotation_path,
            height=height,
            width=width,
            exif_transpose=transpose,
            boxes=boxes[keep].astype(np.float32),
            labels=np.array([self.class_dict[obj.name] for obj in known], dtype=np.int64)[keep],
            iscrowd=np.array([obj.iscrowd for obj in known], dtype=np.int64)[keep],
        )

    def summary(self) -> str:
        """One line describing everything skipped so far (empty problems are omitted)."""
        parts = []
        for key, count in self.skipped.items():
            if not count:
                continue
            if key == "degenerate_boxes":
                parts.append(f"dropped {count} degenerate boxes (empty after clipping)")
            elif key == "unknown_class_objects":
                names = first_few([f"{n!r} ({Path(p).name})" for n, p in sorted(self._unknown_examples.items())])
                parts.append(f"skipped {count} objects of unknown classes: {names}")
            elif key == "unreadable_images":
                files = first_few([f"{p.name}: {why}" for p, why in self.unreadable.items()])
                parts.append(f"skipped {count} unreadable images: {files}")
            elif key == "size_mismatch_images":
                parts.append(f"skipped {count} images whose size differs from {self._size_source}: "
                             f"{first_few(self._mismatches)}")
            else:
                parts.append(f"skipped {count} {key.replace('_', ' ')}")
        return "; ".join(parts) if parts else "nothing skipped"

    # ---------------------------------------------------------------- access
    def __len__(self) -> int:
        return len(self._records)

    def _index(self, idx: int) -> int:
        if not -len(self) <= idx < len(self):
            raise IndexError(f"{type(self).__name__} index {idx} out of range for {len(self)} images")
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
            "iscrowd": torch.from_numpy(record.iscrowd.copy()),
        }

    def __getitem__(self, idx: int) -> tuple[object, Target]:
        start = self._index(idx)
        for step in range(len(self)):
            current = (start + step) % len(self)
            if current in self._bad_indices:
                continue
            record = self._records[current]
            try:
                image = decode_image(record.image_path, record.exif_transpose)
            except DECODE_ERRORS as err:
                self._record_unreadable(current, err)
                continue
            target = self._target(current)
            if self.transforms is not None:
                image, target = self.transforms(image, target)
            return image, target
        raise RuntimeError(f"{type(self).__name__}: none of the {len(self)} images in {self.img_root} "
                           f"can be decoded")

    def _record_unreadable(self, idx: int, err: Exception) -> None:
        path = self._records[idx].image_path
        self._bad_indices.add(idx)
        self.unreadable[path] = f"cannot decode: {err}"
        self.skipped["unreadable_images"] += 1
        warnings.warn(f"{type(self).__name__}: skipping unreadable image {path} ({err}); "
                      f"using the next image instead", stacklevel=3)

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
