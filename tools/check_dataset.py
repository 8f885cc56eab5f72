"""Lint a detection dataset before training on it and print a report.

    python tools/check_dataset.py PATH [--format FORMAT] [--split S [S ...]]
                                       [--classes-json FILE] [--year YEAR] [--max-listed N]

PATH and --split mean what --data-path and --train-split mean for the training scripts (see
``--help``). Reads the annotations with the datasets' own readers, then fully decodes every image.

Errors (exit code 1): missing or corrupt images, invalid annotations, unknown classes, image
sizes that disagree with the annotation, degenerate boxes (empty once clipped to the image).
Warnings (exit code 0): boxes reaching outside the image (they are clipped), duplicate images
(same bytes, across all checked splits), duplicate boxes, images without objects, skipped shapes
and other oddities. Exit code 2 when the dataset cannot be read at all.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from train_utils.data.catalog import format_names, get_format, layout_help, read_annotations  # noqa: E402
from train_utils.data.classes import AUTO_CLASSES, choose_classes, names_in_data, write_classes_json  # noqa: E402
from train_utils.data.dataset import RawImage, clip_boxes, settle_size  # noqa: E402
from train_utils.data.images import DECODE_ERRORS, decode_image, read_image_header  # noqa: E402
from train_utils.flags import ListAction, add_plugin_flag, import_plugins  # noqa: E402


@dataclass
class Report:
    """Problems found, grouped by kind, plus the counts printed at the end."""

    errors: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    warnings: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    histogram: Counter = field(default_factory=Counter)
    class_names: list[str] = field(default_factory=list)
    found_names: set[str] = field(default_factory=set)  # every class name the objects use
    splits: list[str] = field(default_factory=list)
    num_images: int = 0
    num_objects: int = 0

    @property
    def num_errors(self) -> int:
        return sum(len(entries) for entries in self.errors.values())

    @property
    def num_warnings(self) -> int:
        return sum(len(entries) for entries in self.warnings.values())

    def render(self, max_listed: int) -> str:
        lines = [f"checked {', '.join(self.splits)}: {self.num_images} images, {self.num_objects} objects, "
                 f"{len(self.class_names)} classes"]
        for title, groups in (("ERRORS", self.errors), ("WARNINGS", self.warnings)):
            if not groups:
                continue
            lines.append(title)
            for kind, entries in groups.items():
                lines.append(f"  {kind} ({len(entries)}):")
                lines += [f"    {entry}" for entry in entries[:max_listed]]
                if len(entries) > max_listed:
                    lines.append(f"    ... and {len(entries) - max_listed} more")
        width = max([len(name) for name in self.class_names] + [5])
        lines.append("class histogram (objects per class):")
        lines += [f"  {name:<{width}}  {self.histogram[name]:>6}" for name in self.class_names]
        verdict = "FAILED" if self.num_errors else "OK"
        lines.append(f"{verdict}: {self.num_errors} errors, {self.num_warnings} warnings")
        return "\n".join(lines)


def _box_text(box: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in box) + ")"


def check_image(raw: RawImage, class_dict: dict[str, int], report: Report, unknown: dict[str, list[str]],
                hashes: dict[str, list[str]]) -> None:
    """Decode ``raw``'s image and check it and its objects; problems go into ``report``."""
    if not raw.image_path.is_file():
        return  # listed among the missing files
    source = raw.annotation_path.name
    report.num_images += 1
    if not raw.objects:
        report.warnings["images without objects"].append(f"{raw.id} ({raw.image_path.name})")
    for obj in raw.objects:
        if obj.name in class_dict:
            report.histogram[obj.name] += 1
            report.num_objects += 1
        else:
            unknown[obj.name].append(f"{source} {obj.where}")
    seen: dict[tuple, str] = {}
    for obj in raw.objects:
        key = (obj.name, obj.box)
        if key in seen:
            report.warnings["duplicate boxes"].append(
                f"{source} {seen[key]} and {obj.where}: {obj.name!r} {_box_text(obj.box)}")
        seen.setdefault(key, obj.where)

    hashes[hashlib.sha1(raw.image_path.read_bytes()).hexdigest()].append(str(raw.image_path))
    try:
        stored_h, stored_w, orientation = read_image_header(raw.image_path)
        size, transpose = settle_size((stored_h, stored_w), orientation, raw.declared_size, raw.exif_upright)
        decode_image(raw.image_path, transpose)
    except DECODE_ERRORS as err:
        report.errors["corrupt images"].append(f"{raw.image_path}: {err}")
        return
    if size is None:
        declared_h, declared_w = raw.declared_size
        report.errors["size mismatch between annotation and image"].append(
            f"{source} says {declared_w}x{declared_h}, {raw.image_path.name} is {stored_w}x{stored_h}")
        return
    height, width = size
    scale = np.array([width, height, width, height], dtype=np.float64) if raw.normalised else np.ones(4)
    for obj in raw.objects:
        box = np.asarray(obj.box, dtype=np.float64) * scale
        clipped, keep = clip_boxes(box, height, width)
        where = f"{source} {obj.where} {obj.name!r} {_box_text(box)} in a {width}x{height} image"
        if not keep[0]:
            report.errors["degenerate boxes (empty once clipped to the image)"].append(where)
        elif not np.array_equal(clipped[0], box):
            report.warnings["boxes outside the image (clipped)"].append(where)


def check_dataset(fmt: str, data_path: str, splits: Sequence[str], classes_json: Optional[str] = None,
                  year: Optional[str] = None) -> Report:
    """Lint every split of the dataset; raises only when it cannot be read at all."""
    report = Report()
    hashes: dict[str, list[str]] = defaultdict(list)
    unknown: dict[str, list[str]] = defaultdict(list)
    wanted = classes_json or get_format(fmt).default_classes_json
    for split in splits:
        annotations = read_annotations(fmt, data_path, split, year)
        report.found_names.update(obj.name for raw in annotations.images for obj in raw.objects)
        if wanted == AUTO_CLASSES:  # as in training: the first (training) split's names for every split
            wanted = names_in_data(annotations)
        class_dict, source = choose_classes(annotations.class_names, wanted, annotations.class_source)
        report.splits.append(f"{annotations.split_file} (classes from {source})")
        report.class_names += [name for name in class_dict if name not in report.class_names]
        report.errors["missing files"] += annotations.missing
        report.errors["invalid annotations"] += annotations.invalid
        report.warnings["reader notes"] += annotations.notes
        for raw in annotations.images:
            check_image(raw, class_dict, report, unknown, hashes)
    for name, places in sorted(unknown.items()):
        report.errors["unknown classes"].append(f"{name!r}: {len(places)} objects, e.g. {places[0]}")
    for paths in hashes.values():
        if len(paths) > 1:
            report.warnings["duplicate images (same bytes)"].append(" = ".join(paths))
    for groups in (report.errors, report.warnings):
        for kind in [kind for kind, entries in groups.items() if not entries]:
            del groups[kind]
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    import_plugins(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=layout_help())
    add_plugin_flag(parser)
    parser.add_argument("path", help="the dataset folder (what --data-path is for training)")
    parser.add_argument("--format", default="voc", choices=format_names())
    train_splits = ", ".join(f"{get_format(name).default_splits[0]!r} for {name}" for name in format_names())
    parser.add_argument("--split", action=ListAction, default=None,
                        help=f"splits to check, after the path, e.g. 'train.txt,val.txt' (default: the format's "
                             f"training split: {train_splits}); with --classes-json {AUTO_CLASSES} the first "
                             "one is the training split")
    parser.add_argument("--classes-json", default=None,
                        help=f"{{class name: id}} file, or '{AUTO_CLASSES}' for the names in the data (default: as for "
                             "training, see below)")
    parser.add_argument("--write-classes", metavar="FILE", default=None,
                        help="write the class names that the objects of all checked splits use, sorted, as a "
                             "classes json for --classes-json")
    parser.add_argument("--year", default=None, help="VOC year folder")
    parser.add_argument("--max-listed", type=int, default=20, help="entries shown per kind of problem")
    args = parser.parse_args(argv)
    splits = args.split if args.split is not None else [get_format(args.format).default_splits[0]]
    try:
        report = check_dataset(args.format, args.path, splits, args.classes_json, args.year)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.render(max(args.max_listed, 1)))
    if args.write_classes:
        write_classes(Path(args.write_classes), sorted(report.found_names))
    return 1 if report.num_errors else 0


def write_classes(path: Path, names: Sequence[str]) -> None:
    """``--write-classes``: a classes json of ``names``, unless there is none."""
    if not names:
        print(f"--write-classes: no object in the checked splits, {path} not written", file=sys.stderr)
        return
    write_classes_json(path, names)
    print(f"wrote {len(names)} class names to {path}")


if __name__ == "__main__":
    sys.exit(main())
