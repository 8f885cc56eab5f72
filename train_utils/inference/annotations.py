"""Predictions written back as annotations: Pascal VOC XML (labelImg's layout) and YOLO txt.

``--save-voc DIR`` makes DIR a ``VOC<year>``-style folder that labelImg opens and our VOC reader
trains on::

    DIR/JPEGImages/<id>.jpg          the image (the file itself, or an upright copy, see below)
    DIR/Annotations/<id>.xml         filename, size, one <object> per detection (integer bndbox)
    DIR/ImageSets/Main/<split>.txt   the ids written (added to the ids already listed)
    DIR/classes.json, classes.txt    the model's classes for --classes-json and labelImg (when absent)

``--save-yolo DIR`` writes ``DIR/images/<split>/``, ``DIR/labels/<split>/<id>.txt`` (``class cx cy w
h``, normalised) and ``DIR/classes.txt``, the layout our YOLO reader and ultralytics use.

Boxes refer to the pixels the model saw: the image upright (EXIF applied). A file whose stored
pixels are what a viewer shows is copied as it is; an EXIF-rotated photo, a format the readers do
not take (``.webp``, ``.tif``...) and a video frame are stored as an upright JPEG (quality 95).
Pre-labelling is followed by human correction, so an annotation already in DIR is never replaced
unless ``overwrite`` is set; such images are counted and reported.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional, Sequence

import torch
from lxml import etree
from PIL import Image

from train_utils.data.dataset import IMAGE_EXTENSIONS
from train_utils.data.images import DECODE_ERRORS, read_image_header

_UNSAFE_ID = re.compile(r"\s+")


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (never half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def pixel_box(box: Sequence[float], width: int, height: int) -> Optional[tuple[int, int, int, int]]:
    """A float xyxy box rounded and clipped to the image, or None when it rounds to nothing (zero
    width or height)."""
    left, top, right, bottom = (min(max(round(value), 0), limit)
                                for value, limit in zip(box, (width, height, width, height)))
    return (left, top, right, bottom) if right > left and bottom > top else None


def pixel_boxes(boxes: torch.Tensor, width: int, height: int) -> list[tuple[int, int, int, int]]:
    """[N, 4] float xyxy -> the integer boxes of :func:`pixel_box`, empty ones left out."""
    return [box for box in (pixel_box(b, width, height) for b in boxes.tolist()) if box is not None]


class AnnotationWriter:
    """Shared part of the writers: ids, image files, the split list and kept annotations.

    Args:
        root: the output folder. class_names: the model's classes (label i is ``class_names[i - 1]``).
        split: name of the id list / image sub-folder. overwrite: replace existing annotations.
    """

    kind = ""

    def __init__(self, root: Path, class_names: Sequence[str], split: str, overwrite: bool = False) -> None:
        self.root = Path(root)
        self.class_names = list(class_names)
        self.split = split
        self.overwrite = overwrite
        self.ids: list[str] = []
        self.taken: set[str] = set()
        self.kept: list[str] = []
        self.image_dir = self.root

    def new_id(self, hint: str) -> str:
        """A file-system and split-list safe id from ``hint``, unique in this run."""
        base = _UNSAFE_ID.sub("_", hint.strip()) or "image"
        image_id, number = base, 0
        while image_id in self.taken:
            number += 1
            image_id = f"{base}_{number}"
        self.taken.add(image_id)
        return image_id

    def label_path(self, image_id: str) -> Path:
        raise NotImplementedError

    def add(self, hint: str, source: Optional[Path], pixels: torch.Tensor, boxes: torch.Tensor,
            labels: torch.Tensor) -> None:
        """Store one image (uint8 [3, H, W], upright) and its detections, unless an annotation of
        that image exists (it is kept and counted)."""
        image_id = self.new_id(hint)
        while self.label_path(image_id).exists() and not self.overwrite and self._other_image(image_id, source, pixels):
            image_id = self.new_id(hint)  # another picture of the same name from an earlier run
        if self.label_path(image_id).exists() and not self.overwrite:
            self.kept.append(image_id)
            return
        image_path = store_image(source, pixels, self.image_dir, image_id)
        write_atomic(self.label_path(image_id), self.encode(image_path, pixels, boxes, labels))
        self.ids.append(image_id)

    def _other_image(self, image_id: str, source: Optional[Path], pixels: torch.Tensor) -> bool:
        """Whether the stored image of ``image_id`` is a copy of another file than ``source``. Only
        files stored as they are can be compared; a converted image or a video frame counts as
        the same picture."""
        if source is None or source.suffix.lower() not in IMAGE_EXTENSIONS or not _stored_upright(source, pixels):
            return False
        stored = self.image_dir / f"{image_id}{source.suffix.lower()}"
        return stored.is_file() and (stored.stat().st_size != source.stat().st_size
                                     or stored.read_bytes() != source.read_bytes())

    def encode(self, image_path: Path, pixels: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor) -> bytes:
        raise NotImplementedError

    def list_path(self) -> Optional[Path]:
        return None

    def close(self) -> list[str]:
        """Write the id list; returns the summary lines."""
        listing = self.list_path()
        if listing is not None:
            known = listing.read_text().split() if listing.is_file() else []
            new = [image_id for image_id in self.ids if image_id not in set(known)]
            write_atomic(listing, "".join(f"{image_id}\n" for image_id in known + new).encode())
        lines = [f"{len(self.ids)} images annotated as {self.kind} in {self.root}"]
        if self.kept:
            lines.append(f"{len(self.kept)} images already annotated in {self.root} were left as they are "
                         f"(e.g. {self.kept[0]}); pass --overwrite-labels to replace them")
        return lines


def store_image(source: Optional[Path], pixels: torch.Tensor, folder: Path, image_id: str) -> Path:
    """The image file ``folder/<image_id>.<ext>``: a copy of ``source`` when its stored pixels are
    the upright ones in a format the readers take, else the pixels as a JPEG."""
    folder.mkdir(parents=True, exist_ok=True)
    if source is not None and source.suffix.lower() in IMAGE_EXTENSIONS and _stored_upright(source, pixels):
        target = folder / f"{image_id}{source.suffix.lower()}"
        if not (target.exists() and target.samefile(source)):
            shutil.copyfile(source, target)
    else:
        target = folder / f"{image_id}.jpg"
        Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(target, quality=95)
    for other in IMAGE_EXTENSIONS:  # a stale image of the same id would shadow or confuse the new one
        stale = folder / f"{image_id}{other}"
        if stale != target and stale.exists():
            stale.unlink()
    return target


def _stored_upright(source: Path, pixels: torch.Tensor) -> bool:
    """Whether ``source`` stores ``pixels`` as shown: no rotating or flipping EXIF orientation."""
    try:
        height, width, orientation = read_image_header(source)
    except DECODE_ERRORS:
        return False
    return orientation in (None, 1) and (height, width) == tuple(pixels.shape[1:])


class VocWriter(AnnotationWriter):
    """Pascal VOC XML per image, labelImg's fields, in a ``VOC<year>``-style folder."""

    kind = "Pascal VOC XML"

    def __init__(self, root: Path, class_names: Sequence[str], split: str, overwrite: bool = False) -> None:
        super().__init__(root, class_names, split, overwrite)
        self.image_dir = self.root / "JPEGImages"
        if not (self.root / "classes.json").exists():  # our --classes-json
            names = {name: index for index, name in enumerate(self.class_names, start=1)}
            write_atomic(self.root / "classes.json", json.dumps(names, indent=2, ensure_ascii=False).encode())
        if not (self.root / "classes.txt").exists():  # labelImg's predefined classes
            write_atomic(self.root / "classes.txt", "".join(f"{name}\n" for name in self.class_names).encode())

    def label_path(self, image_id: str) -> Path:
        return self.root / "Annotations" / f"{image_id}.xml"

    def list_path(self) -> Path:
        return self.root / "ImageSets" / "Main" / f"{self.split}.txt"

    def encode(self, image_path: Path, pixels: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor) -> bytes:
        height, width = pixels.shape[1:]
        root = etree.Element("annotation")
        _child(root, "folder", image_path.parent.name)
        _child(root, "filename", image_path.name)
        _child(root, "path", str(image_path.resolve()))
        _child(_child(root, "source"), "database", "Unknown")
        size = _child(root, "size")
        for tag, value in (("width", width), ("height", height), ("depth", 3)):
            _child(size, tag, str(value))
        _child(root, "segmented", "0")
        for label, float_box in zip(labels.tolist(), boxes.tolist()):
            box = pixel_box(float_box, width, height)
            if box is None:
                continue
            obj = _child(root, "object")
            for tag, value in (("name", self.class_names[label - 1]), ("pose", "Unspecified"), ("truncated", "0"),
                               ("difficult", "0")):
                _child(obj, tag, value)
            bndbox = _child(obj, "bndbox")
            for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), box):
                _child(bndbox, tag, str(value))
        return etree.tostring(root, pretty_print=True, encoding="utf-8")


def _child(parent: etree._Element, tag: str, text: Optional[str] = None) -> etree._Element:
    element = etree.SubElement(parent, tag)
    if text is not None:
        element.text = text
    return element


class YoloWriter(AnnotationWriter):
    """YOLO txt per image (``class cx cy w h``, normalised, class ids from 0) and ``classes.txt``."""

    kind = "YOLO txt"

    def __init__(self, root: Path, class_names: Sequence[str], split: str, overwrite: bool = False) -> None:
        super().__init__(root, class_names, split, overwrite)
        self.image_dir = self.root / "images" / split
        names_file = self.root / "classes.txt"
        if names_file.is_file():
            listed = names_file.read_text(encoding="utf-8").split("\n")
            if [name.strip() for name in listed if name.strip()] != self.class_names:
                raise ValueError(f"{names_file} lists other classes than the model ({', '.join(self.class_names)}); "
                                 "the class ids would not match: choose another --save-yolo folder")
        else:
            write_atomic(names_file, "".join(f"{name}\n" for name in self.class_names).encode())

    def label_path(self, image_id: str) -> Path:
        return self.root / "labels" / self.split / f"{image_id}.txt"

    def encode(self, image_path: Path, pixels: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor) -> bytes:
        height, width = pixels.shape[1:]
        clipped = boxes.clone()
        clipped[:, 0::2] = clipped[:, 0::2].clamp(0, width)
        clipped[:, 1::2] = clipped[:, 1::2].clamp(0, height)
        lines = []
        for label, (x1, y1, x2, y2) in zip(labels.tolist(), clipped.tolist()):
            if x2 > x1 and y2 > y1:
                lines.append(f"{label - 1} {(x1 + x2) / 2 / width:.6f} {(y1 + y2) / 2 / height:.6f} "
                             f"{(x2 - x1) / width:.6f} {(y2 - y1) / height:.6f}\n")
        return "".join(lines).encode()
