"""Lint a detection dataset before training on it and print a report.

    python tools/check_dataset.py PATH [--format FORMAT] [--split S [S ...]]
                                       [--classes-json FILE] [--year YEAR] [--max-listed N]
                                       [--anchors [--backbone B] [--anchor-sizes ...] [--plot FILE]]

PATH and --split mean what --data-path and --train-split mean for the training scripts (see
``--help``). Reads the annotations with the datasets' own readers, then fully decodes every image.

Errors (exit code 1): missing or corrupt images, invalid annotations, unknown classes, image
sizes that disagree with the annotation, degenerate boxes (empty once clipped to the image).
Warnings (exit code 0): boxes reaching outside the image (they are clipped), duplicate images
(same bytes, across all checked splits), duplicate boxes, images without objects, skipped shapes
and other oddities. Exit code 2 when the dataset cannot be read at all.

``--anchors`` adds the anchor coverage of the first split (the training split), with the model
flags of training (``--backbone``, ``--anchor-sizes``, ``--aspect-ratios``, ``--min-size``,
``--max-size``, backbone options; comma-separated lists): per class and box size the share of
boxes whose best anchor has IoU >= 0.7 (an RPN positive) and >= 0.5, anchors that do better, and
a picture of box sizes and aspect ratios against the anchors (``--plot``). See
:mod:`train_utils.model.anchor_coverage`.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from train_utils.cli import add_model_flags, model_config_from_args  # noqa: E402
from train_utils.data.catalog import (build_dataset, format_names, get_format, layout_help,  # noqa: E402
                                      read_annotations)
from train_utils.data.classes import AUTO_CLASSES, choose_classes, names_in_data, write_classes_json  # noqa: E402
from train_utils.data.dataset import clip_boxes, settle_size  # noqa: E402
from train_utils.data.records import Annotations, RawImage  # noqa: E402
from train_utils.data.images import DECODE_ERRORS, decode_image, read_image_header  # noqa: E402
from train_utils.flags import ListAction, add_plugin_flag, import_plugins  # noqa: E402
from train_utils.model.anchor_coverage import (DetectorAnchors, best_anchor_iou, coverage_table,  # noqa: E402
                                               dataset_boxes, describe_layout, larger_inputs, resize_boxes,
                                               suggest_anchors)
from train_utils.vis.anchor_plot import plot_anchor_coverage  # noqa: E402


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


def read_split(fmt: str, data_path: str, split: str, wanted: Optional[str], year: Optional[str]
               ) -> tuple[Annotations, dict[str, int], Path, Optional[str]]:
    """(annotations, class dict, where the classes come from, ``wanted`` for the next splits) of
    one split; ``wanted``: classes json, None for the format's default, or auto (as in training:
    the first, training, split's names for every split)."""
    annotations = read_annotations(fmt, data_path, split, year)
    wanted = get_format(fmt).default_classes_json if wanted is None else wanted
    if wanted == AUTO_CLASSES:
        wanted = names_in_data(annotations)
    class_dict, source = choose_classes(annotations.class_names, wanted, annotations.class_source)
    return annotations, class_dict, source, wanted


def check_dataset(fmt: str, data_path: str, splits: Sequence[str], classes_json: Optional[str] = None,
                  year: Optional[str] = None) -> Report:
    """Lint every split of the dataset; raises only when it cannot be read at all."""
    report = Report()
    hashes: dict[str, list[str]] = defaultdict(list)
    unknown: dict[str, list[str]] = defaultdict(list)
    wanted = classes_json
    for split in splits:
        annotations, class_dict, source, wanted = read_split(fmt, data_path, split, wanted, year)
        report.found_names.update(obj.name for raw in annotations.images for obj in raw.objects)
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


def image_problems(fmt: str, data_path: str, split: str, classes_json: Optional[str] = None,
                   year: Optional[str] = None) -> dict[str, list[str]]:
    """What the lint reports about each image of one split: image id -> the kinds of problem
    (``"boxes outside the image (clipped)"``, ``"unknown classes"``, ...); images without any are
    left out. Every image is decoded."""
    annotations, class_dict, _, _ = read_split(fmt, data_path, split, classes_json, year)
    hashes: dict[str, list[str]] = defaultdict(list)
    problems: dict[str, list[str]] = {}
    ids = {}
    for raw in annotations.images:
        report, unknown = Report(), defaultdict(list)
        check_image(raw, class_dict, report, unknown, hashes)
        kinds = [kind for groups in (report.errors, report.warnings) for kind in groups if groups[kind]]
        problems[raw.id] = kinds + (["unknown classes"] if unknown else [])
        ids[str(raw.image_path)] = raw.id
    for paths in hashes.values():
        for path in paths if len(paths) > 1 else []:
            problems[ids[path]].append("duplicate images (same bytes)")
    return {image_id: kinds for image_id, kinds in problems.items() if kinds}


def anchor_report(args: argparse.Namespace, split: str) -> list[str]:
    """``--anchors``: the coverage table of the configured anchors on ``split``, the suggested
    anchors (sizes only, then sizes and ratios), larger inputs where they help, and the plot."""
    started = time.time()
    config = model_config_from_args(args, num_classes=2)
    dataset = build_dataset(args.format, args.path, split, None, args.classes_json, args.year,
                            skip_unknown_classes=True)
    images = dataset_boxes(dataset)
    box_set = resize_boxes(images, config.min_size, config.max_size)
    if not len(box_set):
        return [f"anchor coverage: {dataset.split_file} holds no boxes"]
    anchors = DetectorAnchors(config)
    configured = best_anchor_iou(box_set, anchors.default)
    sized = suggest_anchors(box_set, anchors, search_ratios=False)
    shaped = suggest_anchors(box_set, anchors, search_ratios=True, start=sized.layout)
    suggested = best_anchor_iou(box_set, shaped.layout)
    scales = ",".join(map(str, config.min_size))
    lines = [f"anchor coverage of {dataset.split_file}: {len(box_set)} boxes ({len(images)} images) resized with "
             f"--min-size {scales} --max-size {config.max_size}; {config.backbone} feature strides "
             f"{','.join(map(str, anchors.strides))}; sizes by box area in the resized image (COCO: small < 32^2, "
             "medium < 96^2 pixels); share of boxes whose best anchor has IoU >= 0.7 (an RPN positive) / >= 0.5",
             f"configured: {describe_layout(anchors.default)}"]
    lines += coverage_table(box_set, configured, dataset.class_names)
    lines.append("suggested (as many sizes and ratios as configured):")
    for name, scored in (("sizes", sized), ("sizes and ratios", shaped)):
        lines.append(f"  {name + ':':<18}{describe_layout(scored.layout)}  IoU>=0.7 {scored.positive:.1%}  "
                     f"IoU>=0.5 {scored.loose:.1%}")
    lines.append(f"with {describe_layout(shaped.layout)}:")
    lines += coverage_table(box_set, suggested, dataset.class_names)
    for min_sizes, max_size, scored in larger_inputs(images, config, anchors, search_ratios=True):
        if scored.positive >= shaped.positive + 0.05:
            lines.append(f"larger images cover more: --min-size {','.join(map(str, min_sizes))} --max-size "
                         f"{max_size} {describe_layout(scored.layout)}  IoU>=0.7 {scored.positive:.1%}  "
                         f"IoU>=0.5 {scored.loose:.1%} (slower: more pixels)")
    if args.plot.lower() != "none":
        title = f"{dataset.split_file.name}: {len(box_set)} boxes, {config.backbone}, --min-size {scales}"
        plot_anchor_coverage(box_set, [anchors.default, shaped.layout], [configured, suggested],
                             ["configured", "suggested"], title, args.plot)
        lines.append(f"plot: {args.plot}")
    lines.append(f"anchor coverage computed in {time.time() - started:.1f}s")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    import_plugins(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=layout_help())
    add_plugin_flag(parser)
    parser.add_argument("path", help="the dataset folder (what --data-path is for training)")
    parser.add_argument("--format", "--dataset-format", default="voc", choices=format_names())
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
    parser.add_argument("--anchors", action="store_true",
                        help="also report the anchor coverage of the first split, with the model flags below")
    parser.add_argument("--plot", default="anchor_coverage.png",
                        help="--anchors: where to write the picture of box sizes, ratios and coverage "
                             "('none': nowhere)")
    add_model_flags(parser, training=True, one_token=True,
                    names=("backbone", "anchor_sizes", "aspect_ratios", "min_size", "max_size"))
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
    code = 1 if report.num_errors else 0
    if args.anchors:
        try:
            print("\n".join(anchor_report(args, splits[0])))
        except (FileNotFoundError, ValueError) as err:
            print(f"error: --anchors: {err}", file=sys.stderr)
            return 2
    return code


def write_classes(path: Path, names: Sequence[str]) -> None:
    """``--write-classes``: a classes json of ``names``, unless there is none."""
    if not names:
        print(f"--write-classes: no object in the checked splits, {path} not written", file=sys.stderr)
        return
    write_classes_json(path, names)
    print(f"wrote {len(names)} class names to {path}")


if __name__ == "__main__":
    sys.exit(main())
