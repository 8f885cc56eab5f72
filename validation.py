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
``--tta`` evaluates under test-time augmentation (train_utils/inference/tta.py).
The work is done by train_utils/evaluation/validate.py.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Optional, Sequence

from train_utils.evaluation.validate import check_report_flags, validate, validation_parser
from train_utils.flags import import_plugins
from train_utils.inference.tta import add_tta_flags, check_tta_flags, tta_from_args
from train_utils.loading import load_detector


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Script entry; known problems are one ``error: ...`` line and exit code 1."""
    import_plugins(argv)
    parser = validation_parser(__doc__.split("\n")[0])
    add_tta_flags(parser)
    args = parser.parse_args(argv)
    try:
        check_report_flags(args)
        check_tta_flags(args)
        detector = load_detector(args, args.weights_path)
        detector = dataclasses.replace(detector, model=tta_from_args(detector.model, args))
        result = validate(args, detector)
        if args.report:
            from train_utils.vis.report import write_validation_report  # matplotlib only when asked for

            write_validation_report(args.report, result, detector.class_names, args.weights_path,
                                    args.report_score_thresh, args.report_images)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
