"""Writing a generated VOC2012-style dataset, shared by the synthetic generators
(``make_demo_voc.py``, ``make_scenes_voc.py``).

Layout: ``<out>/VOCdevkit/VOC2012/{Annotations,JPEGImages,ImageSets/Main/{train,val}.txt}`` and
``<out>/classes.json`` (class name -> label, from 1). The train/val split is a permutation drawn
from ``(seed, number of images)``, so it is fixed by the generator's arguments.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
from PIL import Image


class VocObject(Protocol):
    """What an annotation needs of an object: class name, (xmin, ymin, xmax, ymax) and VOC flags."""

    name: str
    box: tuple[int, int, int, int]
    truncated: int
    difficult: int


def check_pair(flag: str, pair: Sequence[float], rule: str, holds: Callable[[float, float], bool]) -> None:
    """A generator option ``flag LOW HIGH``: a ValueError naming the flag and ``rule`` unless it holds."""
    low, high = pair
    if not holds(low, high):
        raise ValueError(f"{flag} LOW HIGH must satisfy {rule}, got {low:g} {high:g}")


def annotation_xml(image_id: str, width: int, height: int, objects: Sequence[VocObject],
                   database: str = "Synthetic shapes") -> str:
    """VOC XML text for one image."""
    parts = [
        "<annotation>",
        "\t<folder>VOC2012</folder>",
        f"\t<filename>{image_id}.jpg</filename>",
        f"\t<source><database>{database}</database></source>",
        f"\t<size><width>{width}</width><height>{height}</height><depth>3</depth></size>",
        "\t<segmented>0</segmented>",
    ]
    for obj in objects:
        xmin, ymin, xmax, ymax = obj.box
        parts += [
            "\t<object>",
            f"\t\t<name>{obj.name}</name>",
            "\t\t<pose>Unspecified</pose>",
            f"\t\t<truncated>{obj.truncated}</truncated>",
            f"\t\t<difficult>{obj.difficult}</difficult>",
            f"\t\t<bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox>",
            "\t</object>",
        ]
    return "\n".join(parts + ["</annotation>", ""])


class VocWriter:
    """Writes images and annotations one by one, then the split lists and classes.json."""

    def __init__(self, out: Path, classes: Sequence[str], database: str = "Synthetic shapes") -> None:
        self.out = Path(out)
        self.voc = self.out / "VOCdevkit" / "VOC2012"
        self.classes = tuple(classes)
        self.database = database
        self.ids: list[str] = []
        for name in ("Annotations", "JPEGImages", "ImageSets/Main"):
            (self.voc / name).mkdir(parents=True, exist_ok=True)

    def add(self, image_id: str, image: Image.Image, objects: Sequence[VocObject], quality: int) -> None:
        """Write ``JPEGImages/<image_id>.jpg`` (JPEG ``quality``) and ``Annotations/<image_id>.xml``."""
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=quality)
        (self.voc / "JPEGImages" / f"{image_id}.jpg").write_bytes(buffer.getvalue())
        xml = annotation_xml(image_id, image.width, image.height, objects, self.database)
        (self.voc / "Annotations" / f"{image_id}.xml").write_text(xml)
        self.ids.append(image_id)

    def finish(self, seed: int, val_fraction: float) -> None:
        """Write ``train.txt`` and ``val.txt`` (at least one validation image) and classes.json."""
        count = len(self.ids)
        order = np.random.default_rng([seed, count]).permutation(count)
        num_val = max(1, round(val_fraction * count))
        splits = {"val": sorted(order[:num_val]), "train": sorted(order[num_val:])}
        for split, indices in splits.items():
            text = "".join(f"{self.ids[i]}\n" for i in indices)
            (self.voc / "ImageSets" / "Main" / f"{split}.txt").write_text(text)
        labels = {name: i for i, name in enumerate(self.classes, start=1)}
        (self.out / "classes.json").write_text(json.dumps(labels, indent=4) + "\n")
