"""Evaluate a trained detector on a VOC split: COCO metrics, per-class AP and VOC AP.

    python validation.py --weights-path save_weights/best.pth
    python validation.py --weights-path fasterrcnn.pth --backbone resnet50_fpn \\
        --classes-json pascal_voc_classes.json --data-path /data/VOCdevkit

A checkpoint written by the training scripts carries everything needed (model configuration,
class names, the data folder it was trained on). A bare state dict (or a checkpoint holding only
``model``) needs ``--backbone`` and ``--classes-json`` plus the architecture flags it was built with.

Prints pycocotools' summary and a per-class table, then writes ``record_mAP.txt`` (WZ's layout)
and the same numbers as JSON beside it (``record_mAP.json``). ``--report DIR`` also writes an error
analysis (``DIR/report.html``: precision-recall curves, best-F1 score thresholds, a confusion
matrix, the TIDE breakdown, the worst and best images; see train_utils/vis/report.py).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch.utils.data import DataLoader

from train_utils.data.catalog import build_dataset, format_names, get_format, layout_help
from train_utils.data.dataset import DetectionDataSet
from train_utils.data.classes import load_class_dict
from train_utils.data.transforms import get_transforms
from train_utils.evaluation import COCO_STAT_NAMES
from train_utils.evaluation.coco_api import get_coco_api_from_dataset
from train_utils.evaluation.loop import evaluate
from train_utils.evaluation.voc_eval import RULES, mean_ap, voc_ap_per_class
from train_utils.cli import add_model_arguments
from train_utils.loading import load_detector
from train_utils.flags import HelpFormatter, import_plugins



# ------------------------------------------------------------------------------ per-class metrics
@dataclass
class ClassResult:
    """Metrics of one class; an AP is None when the class has no (non-difficult) ground truth."""

    category_id: int
    name: str
    num_objects: int  # non-difficult ground-truth objects in the evaluated images
    num_difficult: int
    coco_ap50: Optional[float]
    coco_ap: Optional[float]
    voc_ap: Optional[float]


def coco_ap_per_class(coco_eval: COCOeval) -> dict[int, tuple[Optional[float], Optional[float]]]:
    """category id -> (AP@0.5, AP@[.5:.95]) from an accumulated COCOeval (area 'all', most detections).

    Categories are located through ``params.catIds`` (the K axis of ``eval["precision"]``
    [T, R, K, A, M]), so a category missing from the ground truth never takes another's row.
    A category whose precision is all -1 (no non-crowd ground truth) gets None.
    """
    params = coco_eval.params
    precision = coco_eval.eval["precision"]
    area = list(params.areaRngLbl).index("all")
    max_dets = int(np.argmax(params.maxDets))
    iou50 = int(np.flatnonzero(np.isclose(params.iouThrs, 0.5))[0])

    def mean_valid(values: np.ndarray) -> Optional[float]:
        valid = values[values > -1]
        return float(np.mean(valid)) if valid.size else None

    return {
        int(category_id): (mean_valid(precision[iou50, :, k, area, max_dets]),
                           mean_valid(precision[:, :, k, area, max_dets]))
        for k, category_id in enumerate(params.catIds)
    }


def count_objects(coco_gt: COCO, image_ids: Sequence[int]) -> dict[int, tuple[int, int]]:
    """category id -> (non-difficult objects, difficult objects) in ``image_ids``."""
    counts = {int(c): [0, 0] for c in coco_gt.getCatIds()}
    for image_id in image_ids:
        for ann in coco_gt.imgToAnns.get(image_id, []):
            counts.setdefault(int(ann["category_id"]), [0, 0])[1 if ann.get("iscrowd", 0) else 0] += 1
    return {c: (n[0], n[1]) for c, n in counts.items()}


def per_class_results(coco_eval: COCOeval, coco_gt: COCO, class_names: Sequence[str],
                      voc_ap: Optional[dict[int, Optional[float]]]) -> list[ClassResult]:
    """One row per class in label order (label i is ``class_names[i - 1]``)."""
    coco = coco_ap_per_class(coco_eval)
    counts = count_objects(coco_gt, list(coco_eval.params.imgIds))
    return [
        ClassResult(label, name, *counts.get(label, (0, 0)), *coco.get(label, (None, None)),
                    (voc_ap or {}).get(label))
        for label, name in enumerate(class_names, start=1)
    ]


def format_table(rows: Sequence[ClassResult], voc_metric: str) -> str:
    """The per-class table printed after pycocotools' summary."""
    width = max([len("class")] + [len(r.name) for r in rows])
    voc_title = f"VOC{voc_metric} AP50" if voc_metric != "none" else ""
    lines = [f"{'class':<{width}}  {'AP50':>8}  {'AP[.5:.95]':>10}  {voc_title:>11}  {'objects':>7}  {'difficult':>9}"]

    def number(value: Optional[float], size: int) -> str:
        return f"{value:>{size}.4f}" if value is not None else f"{'-':>{size}}"

    for row in rows:
        if row.num_objects == 0:
            body = f"{'no ground truth':<35}"
        else:
            voc = number(row.voc_ap, 11) if voc_metric != "none" else " " * 11
            body = f"{number(row.coco_ap50, 8)}  {number(row.coco_ap, 10)}  {voc}"
        lines.append(f"{row.name:<{width}}  {body}  {row.num_objects:>7}  {row.num_difficult:>9}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ script
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--weights-path", "--weights", dest="weights_path", required=True,
                        help="checkpoint written by a training script, or a bare state dict")
    parser.add_argument("--data-path", default=None,
                        help="folder holding VOCdevkit; default: the data folder the checkpoint was trained on")
    parser.add_argument("--year", default=None, help="VOC year folder (found automatically when only one exists)")
    parser.add_argument("--split", default=None,
                        help="split to evaluate (voc: a file in ImageSets/Main); default: the checkpoint's "
                             "--val-split, else the format's validation split")
    parser.add_argument("--dataset-format", choices=format_names(), default=None,
                        help=f"annotation format of --data-path (default: the checkpoint's, else voc). {layout_help()}")
    parser.add_argument("--batch-size", type=int, default=1, help="images per forward pass")
    parser.add_argument("--workers", "-j", type=int, default=2, help="data loading worker processes")
    parser.add_argument("--output", default="record_mAP.txt", help="summary file; the JSON goes beside it")
    parser.add_argument("--voc-metric", choices=[*RULES, "none"], default="12",
                        help="VOC AP@0.5 rule: 07 = 11-point, 12 = area (VOC2010+), none = skip")
    parser.add_argument("--report", default=None, metavar="DIR",
                        help="also write an error analysis into DIR (report.html, report.json, figures, CSVs)")
    parser.add_argument("--report-score-thresh", type=float, default=None,
                        help="score threshold of the report's confusion matrix and images "
                             "(default: the threshold of best F1 over all classes pooled)")
    parser.add_argument("--report-images", type=int, default=8, help="worst and best images shown in the report")
    add_model_arguments(parser)
    return parser


def classes_for(names: Sequence[str], suggested: Optional[str]) -> Union[str, list[str]]:
    """The classes to read the data with: ``suggested`` (a classes json) if it lists exactly
    ``names`` (so messages name the file), else the names themselves (ids 1..K)."""
    if suggested:
        try:
            stored = load_class_dict(suggested)
        except (FileNotFoundError, ValueError):
            stored = None
        if stored is not None and sorted(stored, key=stored.__getitem__) == list(names):
            return suggested
    return list(names)


def coco_summary_lines(coco_eval: COCOeval) -> list[str]:
    """pycocotools' own 12 summary lines, captured from ``summarize()``."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        coco_eval.summarize()
    return [line for line in buffer.getvalue().splitlines() if line.strip()]


def write_record(path: Path, summary: Sequence[str], rows: Sequence[ClassResult]) -> None:
    """WZ's record_mAP.txt: the COCO summary, a blank line, then AP@0.5 per category."""
    lines = list(summary) + ["", "mAP(IoU=0.5) for each category:"]
    for row in rows:
        lines.append(f" {row.name}: {row.coco_ap50:.6f}" if row.coco_ap50 is not None
                     else f" {row.name}: no ground truth")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def evaluation_dataset(args: argparse.Namespace, detector) -> tuple[DetectionDataSet, str, str]:
    """(the dataset to score, its data folder, its split): each of folder, year, format and split is the flag's,
    else the one the checkpoint was trained with (its validation split), else the format's default."""
    trained_on = detector.data
    data_path, year = args.data_path, args.year
    if data_path is None:
        data_path, year = trained_on.get("path"), year or trained_on.get("year")
        if data_path is None:
            raise ValueError(f"{args.weights_path} records no data folder: pass --data-path")
    fmt = args.dataset_format or trained_on.get("format", "voc")
    if fmt not in format_names() and detector.plugins:
        raise ValueError(f"unknown dataset format {fmt!r}: {args.weights_path} was trained with "
                         f"{' '.join('--plugin ' + name for name in detector.plugins)}; pass the same")
    split = args.split or trained_on.get("val_split") or get_format(fmt).default_splits[1]
    suggested = args.classes_json or trained_on.get("classes_json")
    dataset = build_dataset(fmt, data_path, split, get_transforms(train=False),
                            classes_for(detector.class_names, suggested), year)
    return dataset, str(data_path), split


def write_evaluation_report(args: argparse.Namespace, dataset: DetectionDataSet, evaluator, class_names: Sequence[str],
                            record: dict[str, Any]) -> None:
    """``--report DIR``: the error analysis of this evaluation (image ids are dataset indices)."""
    from train_utils.vis.report import ReportInputs, write_report

    def load_image(image_id: int) -> Image.Image:
        pixels = dataset[image_id][0].permute(1, 2, 0).numpy()  # float [H, W, 3] in 0..1 (ToTensor)
        return Image.fromarray(np.round(pixels * 255).astype(np.uint8))

    inputs = ReportInputs(record, evaluator.coco_eval["bbox"], evaluator.detections, class_names, load_image,
                          dict(enumerate(dataset.ids)), Path(args.weights_path).parent, args.report_score_thresh,
                          args.report_images)
    write_report(Path(args.report), inputs)
    print(f"wrote the report {Path(args.report) / 'report.html'}")


def check_report_flags(args: argparse.Namespace) -> None:
    """Reject report flags out of range before any work."""
    if args.report_images < 0:
        raise ValueError(f"--report-images must be >= 0, got {args.report_images}")
    if args.report_score_thresh is not None and not 0 <= args.report_score_thresh <= 1:
        raise ValueError(f"--report-score-thresh must be within 0..1, got {args.report_score_thresh}")
    if args.report and Path(args.report).exists() and not Path(args.report).is_dir():
        raise ValueError(f"--report {args.report} is a file, not a folder")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate as the flags say, print and write the results; returns the JSON record."""
    check_report_flags(args)
    detector = load_detector(args, args.weights_path)
    dataset, data_path, split = evaluation_dataset(args, detector)
    device = next(detector.model.parameters()).device
    workers = max(int(args.workers), 0)
    loader = DataLoader(dataset, batch_size=max(int(args.batch_size), 1), shuffle=False, num_workers=workers,
                        collate_fn=DetectionDataSet.collate_fn, pin_memory=device.type == "cuda")
    coco_gt = get_coco_api_from_dataset(dataset)
    print(f"evaluating {args.weights_path} on {dataset.split_file} ({len(dataset)} images, "
          f"{len(detector.class_names)} classes) on {device}")

    start = time.perf_counter()
    evaluator = evaluate(detector.model, loader, device, coco_gt)
    elapsed = time.perf_counter() - start
    coco_eval = evaluator.coco_eval["bbox"]
    voc_ap = None if args.voc_metric == "none" else \
        voc_ap_per_class(evaluator.coco_gt, evaluator.detections, args.voc_metric)
    rows = per_class_results(coco_eval, evaluator.coco_gt, detector.class_names, voc_ap)
    images_per_second = len(dataset) / max(elapsed, 1e-9)

    print("\nper-class AP (COCOeval: area all, 100 detections; objects: non-difficult ground truth):")
    print(format_table(rows, args.voc_metric))
    voc_map = mean_ap(voc_ap) if voc_ap is not None else None
    if voc_map is not None:
        print(f"VOC{args.voc_metric} mAP@0.5 over {sum(v is not None for v in voc_ap.values())} classes "
              f"with ground truth: {voc_map:.4f}")
    print(f"{len(dataset)} images in {elapsed:.1f}s: {images_per_second:.2f} images/s")

    stats = evaluator.stats
    record = {
        "weights": str(args.weights_path),
        "data_path": data_path,
        "split": split,
        "num_images": len(dataset),
        "coco_stats": stats,
        "coco_stat_names": list(COCO_STAT_NAMES),
        "coco_map": stats[0],
        "coco_map50": stats[1],
        "voc_metric": args.voc_metric,
        "voc_map": voc_map,
        "per_class": [asdict(row) for row in rows],
        "images_per_second": images_per_second,
    }
    output = Path(args.output)
    json_path = output.with_suffix(".json") if output.suffix != ".json" else output.with_name(output.name + ".json")
    write_record(output, coco_summary_lines(coco_eval), rows)
    json_path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {output} and {json_path}")
    if args.report:
        write_evaluation_report(args, dataset, evaluator, detector.class_names, record)
    return record


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Script entry; known problems are one ``error: ...`` line and exit code 1."""
    import_plugins(argv)
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
