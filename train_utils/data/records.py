"""What format readers return and what the dataset hands out: plain records that import nothing
of this project, so class lists, readers, the dataset and the tools can all share them."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Optional

import numpy as np


class RawObject(NamedTuple):
    """One object as written: class name, xyxy box (pixels, or fractions of the image side when
    its image is ``normalised``), crowd/difficult flag and where it is in its file ("object 2")."""

    name: str
    box: tuple[float, float, float, float]
    iscrowd: int
    where: str


@dataclass
class RawImage:
    """One image with its objects as its annotation file gives them.

    declared_size: (height, width) the annotation states, or None. exif_upright: boxes refer to
    the EXIF-transposed image (see :func:`settle_size`).
    """

    id: str
    image_path: Path
    annotation_path: Path
    declared_size: Optional[tuple[int, int]]
    objects: list[RawObject]
    normalised: bool = False
    exif_upright: bool = False


@dataclass
class Annotations:
    """Everything a format reader found, problems included (the dataset raises, the checker reports).

    class_names: the format's own class list in label order (None: the format has none, as VOC).
    missing / invalid: one description per missing file / invalid annotation (naming the file).
    skipped: format-specific counts of what the reader left out (e.g. unsupported labelme shapes).
    notes: harmless oddities worth a warning in the checker (e.g. a label file without image).
    extras: format-specific facts for the format's dataset class (e.g. COCO's category ids).
    """

    images: list[RawImage]
    class_names: Optional[list[str]]
    class_source: Path
    split_file: Path
    img_root: Path
    missing: list[str] = field(default_factory=list)
    invalid: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ImageRecord:
    """One usable image with its checked target.

    boxes: float32 [N, 4] xyxy clipped to (width, height); labels, iscrowd: int64 [N].
    height/width describe the image as returned (after the optional EXIF transpose).
    """

    id: str
    image_path: Path
    annotation_path: Path
    height: int
    width: int
    exif_transpose: bool
    boxes: np.ndarray
    labels: np.ndarray
    iscrowd: np.ndarray
