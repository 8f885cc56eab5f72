"""Write tiny PASCAL VOC folders for tests, including the messy cases met in real datasets.

Typical use::

    from voc_factory import VocItem, VocObject, write_voc
    voc_dir = write_voc(tmp_path, [VocItem("a", objects=[VocObject("dog", (1, 2, 30, 40))])])
    # -> tmp_path/VOCdevkit/VOC2012 with Annotations, JPEGImages, ImageSets/Main/train.txt
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image

Number = Union[int, float]


@dataclass
class VocObject:
    """One ``<object>``. Coordinates are written verbatim (``str(value)``); None omits a tag."""

    name: str
    box: tuple[Number, Number, Number, Number]  # xmin, ymin, xmax, ymax
    difficult: Optional[int] = 0
    truncated: Optional[int] = 0
    pose: Optional[str] = "Unspecified"


@dataclass
class VocItem:
    """One image id with its annotation and image file.

    image: "ok" writes a real image, "corrupt" a non-image, "truncated" half a JPEG, "missing"
    nothing. xml: "ok" or "missing". xml_size overrides the written <size> (width, height);
    write_size=False omits <size>. messy=True reverses tag order (objects keep their order but come
    first) and pads values with whitespace.
    exif_orientation stores an EXIF orientation tag (JPEG only).
    """

    id: str
    width: int = 64
    height: int = 48
    objects: list[VocObject] = field(default_factory=list)
    image_ext: str = ".jpg"
    image: str = "ok"
    xml: str = "ok"
    write_size: bool = True
    xml_size: Optional[tuple[int, int]] = None
    messy: bool = False
    filename: Optional[str] = None
    encoding_declaration: bool = False
    exif_orientation: Optional[int] = None


def image_pixels(item: VocItem) -> np.ndarray:
    """The uint8 [H, W, 3] pixels written for ``item`` (a smooth gradient, so JPEG keeps it close)."""
    ys, xs = np.mgrid[0:item.height, 0:item.width]
    seed = sum(item.id.encode()) % 97
    red = (xs * 255 // max(item.width - 1, 1) + seed) % 256
    green = ys * 255 // max(item.height - 1, 1)
    blue = np.full_like(xs, (seed * 7) % 256)
    return np.stack([red, green, blue], axis=-1).astype(np.uint8)


def _image_bytes(item: VocItem) -> bytes:
    image = Image.fromarray(image_pixels(item))
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP"}[item.image_ext.lower()]
    buffer = io.BytesIO()
    if item.exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = item.exif_orientation
        image.save(buffer, fmt, quality=95, exif=exif.tobytes())
    else:
        image.save(buffer, fmt, quality=95)
    return buffer.getvalue()


def annotation_xml(item: VocItem) -> bytes:
    """The XML bytes written for ``item``."""

    def node(tag: str, value: object, indent: str) -> str:
        text = f"  {value}\n  " if item.messy else str(value)
        return f"{indent}<{tag}>{text}</{tag}>\n"

    def block(tag: str, children: list[str], indent: str, reorder: bool = True) -> str:
        if item.messy and reorder:
            children = children[::-1]
        return f"{indent}<{tag}>\n" + "".join(children) + f"{indent}</{tag}>\n"

    parts = [node("folder", "VOC", "\t"), node("filename", item.filename or item.id + item.image_ext, "\t")]
    if item.write_size:
        width, height = item.xml_size or (item.width, item.height)
        parts.append(block("size", [node("width", width, "\t\t"), node("height", height, "\t\t"),
                                    node("depth", 3, "\t\t")], "\t"))
    objects = []
    for obj in item.objects:
        children = [node("name", obj.name, "\t\t")]
        for tag in ("pose", "truncated", "difficult"):
            if getattr(obj, tag) is not None:
                children.append(node(tag, getattr(obj, tag), "\t\t"))
        coords = [node(tag, value, "\t\t\t") for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), obj.box)]
        children.append(block("bndbox", coords, "\t\t"))
        objects.append(block("object", children, "\t"))
    # messy: objects (in order) come before the reversed header tags
    text = block("annotation", objects + parts[::-1] if item.messy else parts + objects, "", reorder=False)
    if item.encoding_declaration:
        text = '<?xml version="1.0" encoding="utf-8"?>\n' + text
    return text.encode("utf-8")


def write_voc(
    root: Union[str, Path],
    items: Sequence[VocItem],
    year: str = "2012",
    splits: Optional[dict[str, list[str]]] = None,
    crlf: bool = False,
    stray_files: bool = False,
) -> Path:
    """Write ``root/VOCdevkit/VOC<year>`` and return that folder.

    splits maps a split file name ("train" -> ImageSets/Main/train.txt) to its raw lines; the
    default puts every item id in train.txt. crlf writes Windows line endings. stray_files adds
    desktop.ini, ``._<id>.jpg`` and .DS_Store next to the images and annotations.
    """
    voc_dir = Path(root) / "VOCdevkit" / f"VOC{year}"
    annotations, images, main = voc_dir / "Annotations", voc_dir / "JPEGImages", voc_dir / "ImageSets" / "Main"
    for folder in (annotations, images, main):
        folder.mkdir(parents=True, exist_ok=True)
    for item in items:
        if item.xml == "ok":
            (annotations / f"{item.id}.xml").write_bytes(annotation_xml(item))
        image_path = images / f"{item.id}{item.image_ext}"
        if item.image == "ok":
            image_path.write_bytes(_image_bytes(item))
        elif item.image == "corrupt":
            image_path.write_bytes(b"this is not an image")
        elif item.image == "truncated":
            data = _image_bytes(item)
            image_path.write_bytes(data[: len(data) // 2])
    if stray_files:
        for folder in (annotations, images):
            (folder / "desktop.ini").write_text("[.ShellClassInfo]\n")
            (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
        for item in items:
            (images / f"._{item.id}.jpg").write_bytes(b"\x00\x05\x16\x07")
            (annotations / f"._{item.id}.xml").write_bytes(b"\x00\x05\x16\x07")
    newline = "\r\n" if crlf else "\n"
    for split, lines in (splits or {"train": [item.id for item in items]}).items():
        (main / f"{split}.txt").write_bytes(newline.join(lines).encode("utf-8") + newline.encode())
    return voc_dir


def write_classes_json(path: Union[str, Path], names: Sequence[str]) -> Path:
    """Write a WZ-style classes json with ids 1..len(names) in the given order."""
    path = Path(path)
    path.write_text(json.dumps({name: i for i, name in enumerate(names, start=1)}, indent=2))
    return path
