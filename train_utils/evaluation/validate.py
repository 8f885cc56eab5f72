"""validation.py's library: its flags, the dataset a checkpoint is scored on, and one evaluation
that prints and writes ``record_mAP.txt`` and ``record_mAP.json``."""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from pycocotools.cocoeval import COCOeval
from torch.utils.data import DataLoader

from train_utils.cli import add_model_arguments
from train_utils.data.catalog import build_dataset, format_names, get_format, layout_help
from train_utils.data.classes import load_class_dict
from train_utils.data.dataset import DetectionDataSet
from train_utils.data.transforms import get_transforms
from train_utils.device import add_tf32_flag
from train_utils.evaluation import COCO_STAT_NAMES
from train_utils.evaluation.coco_api import get_coco_api_from_dataset
from train_utils.evaluation.coco_eval import CocoEvaluator
from train_utils.evaluation.loop import evaluate
from train_utils.evaluation.per_class import ClassResult, format_table, per_class_results, write_record
from train_utils.evaluation.voc_eval import RULES, mean_ap, voc_ap_per_class
from train_utils.flags import HelpFormatter
from train_utils.loading import LoadedDetector, add_weights_variant_flag


def validation_parser(description: str) -> argparse.ArgumentParser:
    """validation.py's flags."""
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
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
    add_tf32_flag(parser)
    add_model_arguments(parser)
    add_weights_variant_flag(parser)
    return parser


def check_report_flags(args: argparse.Namespace) -> None:
    """Reject report flags out of range before any work."""
    if args.report_images < 0:
        raise ValueError(f"--report-images must be >= 0, got {args.report_images}")
    if args.report_score_thresh is not None and not 0 <= args.report_score_thresh <= 1:
        raise ValueError(f"--report-score-thresh must be within 0..1, got {args.report_score_thresh}")
    if args.report and Path(args.report).exists() and not Path(args.report).is_dir():
        raise ValueError(f"--report {args.report} is a file, not a folder")


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


def evaluation_dataset(args: argparse.Namespace, detector: LoadedDetector) -> tuple[DetectionDataSet, str, str]:
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


def coco_summary_lines(coco_eval: COCOeval) -> list[str]:
    """pycocotools' own 12 summary lines, captured from ``summarize()``."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        coco_eval.summarize()
    return [line for line in buffer.getvalue().splitlines() if line.strip()]


@dataclass
class Validation:
    """One evaluation: the JSON record written, the dataset scored and the evaluator (its COCOeval
    and detections feed the error report)."""

    record: dict[str, Any]
    dataset: DetectionDataSet
    evaluator: CocoEvaluator


def validate(args: argparse.Namespace, detector: LoadedDetector) -> Validation:
    """Evaluate ``detector`` as validation.py's flags say; prints the results and writes ``--output``
    and the JSON record beside it."""
    dataset, data_path, split = evaluation_dataset(args, detector)
    device = next(detector.model.parameters()).device
    loader = DataLoader(dataset, batch_size=max(int(args.batch_size), 1), shuffle=False,
                        num_workers=max(int(args.workers), 0), collate_fn=DetectionDataSet.collate_fn,
                        pin_memory=device.type == "cuda")
    coco_gt = get_coco_api_from_dataset(dataset)
    tta = detector.model.tta_settings() if hasattr(detector.model, "tta_settings") else None
    print(f"evaluating {args.weights_path} on {dataset.split_file} ({len(dataset)} images, "
          f"{len(detector.class_names)} classes) on {device}" + (f" with test-time augmentation {tta}" if tta else ""))
    start = time.perf_counter()
    evaluator = evaluate(detector.model, loader, device, coco_gt, tf32=args.tf32)
    elapsed = time.perf_counter() - start
    voc_ap = None if args.voc_metric == "none" else \
        voc_ap_per_class(evaluator.coco_gt, evaluator.detections, args.voc_metric)
    rows = per_class_results(evaluator.coco_eval["bbox"], evaluator.coco_gt, detector.class_names, voc_ap)
    voc_map = mean_ap(voc_ap) if voc_ap is not None else None
    print_results(args.voc_metric, rows, voc_ap, voc_map)
    images_per_second = len(dataset) / max(elapsed, 1e-9)
    print(f"{len(dataset)} images in {elapsed:.1f}s: {images_per_second:.2f} images/s")
    stats = evaluator.stats
    record = {
        "weights": str(args.weights_path), "data_path": data_path, "split": split, "num_images": len(dataset),
        "coco_stats": stats, "coco_stat_names": list(COCO_STAT_NAMES), "coco_map": stats[0], "coco_map50": stats[1],
        "voc_metric": args.voc_metric, "voc_map": voc_map, "per_class": [asdict(row) for row in rows],
        "images_per_second": images_per_second, "box_nms": detector.config.box_nms, "tta": tta,
    }
    write_results(Path(args.output), coco_summary_lines(evaluator.coco_eval["bbox"]), rows, record)
    return Validation(record, dataset, evaluator)


def print_results(voc_metric: str, rows: Sequence[ClassResult], voc_ap: Optional[dict[int, Optional[float]]],
                  voc_map: Optional[float]) -> None:
    """The per-class table and the VOC mean AP."""
    print("\nper-class AP (COCOeval: area all, 100 detections; objects: non-difficult ground truth):")
    print(format_table(rows, voc_metric))
    if voc_map is not None:
        print(f"VOC{voc_metric} mAP@0.5 over {sum(v is not None for v in voc_ap.values())} classes "
              f"with ground truth: {voc_map:.4f}")


def write_results(output: Path, summary: Sequence[str], rows: Sequence[ClassResult], record: dict[str, Any]) -> None:
    """``output`` (WZ's record_mAP.txt) and the JSON record beside it."""
    json_path = output.with_suffix(".json") if output.suffix != ".json" else output.with_name(output.name + ".json")
    write_record(output, summary, rows)
    json_path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {output} and {json_path}")
