"""Export a trained detector to ONNX (any image size), checked against PyTorch with onnxruntime.

    python tools/export_onnx.py --weights save_weights/best.pth --output model.onnx
    python predict.py --onnx model.onnx photo.jpg

The ONNX model takes one ``[3, H, W]`` float32 image in [0, 1] and returns ``boxes``, ``labels``
and ``scores`` in input pixels; normalisation, resizing and NMS are inside the graph. Class names
and the export settings are stored in its metadata. Needs ``pip install onnx`` (and onnxruntime
for the check, which runs both models on two synthetic images of other sizes).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from train_utils.cli import add_model_arguments  # noqa: E402
from train_utils.loading import add_weights_variant_flag, load_detector  # noqa: E402
from train_utils.flags import HelpFormatter, import_plugins  # noqa: E402
from train_utils.inference.onnx_export import (  # noqa: E402
    BOX_RTOL, OPSET, OnnxDetector, export_metadata, export_onnx, match_detections,
)

# Score difference the check accepts: far below any threshold a user sets.
SCORE_ATOL = 1e-4


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--weights", required=True, help="checkpoint of a training script, or a bare state dict")
    parser.add_argument("--output", default=None, help="ONNX file to write (default: WEIGHTS with .onnx)")
    # Earlier names of --box-score-thresh and --box-detections-per-img.
    parser.add_argument("--score-thresh", dest="box_score_thresh", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--detections-per-img", dest="box_detections_per_img", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--opset", type=int, default=OPSET, help="ONNX opset version")
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")
    add_model_arguments(parser, with_device=False)
    add_weights_variant_flag(parser)
    return parser


def smooth_image(height: int, width: int, seed: int) -> torch.Tensor:
    """A reproducible image of smooth colour gradients (noise would exaggerate resize rounding)."""
    coarse = torch.rand((1, 3, 6, 8), generator=torch.Generator().manual_seed(seed))
    return F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)[0]


def check_export(model: torch.nn.Module, onnx_path: Path) -> bool:
    """Run PyTorch and onnxruntime on two images of sizes unlike the traced one; print and
    return whether they agree (same labels, boxes within BOX_RTOL, scores within SCORE_ATOL)."""
    runtime = OnnxDetector(onnx_path)
    agree = True
    for seed, (height, width) in enumerate([(375, 500), (600, 413)]):
        image = smooth_image(height, width, seed)
        with torch.no_grad():
            expected = model([image])[0]
        try:
            box_error, score_error = match_detections(expected, runtime(image))
            ok = box_error <= BOX_RTOL and score_error <= SCORE_ATOL
            detail = f"box rel. diff {box_error:.1e}, score diff {score_error:.1e}"
        except AssertionError as exc:
            ok, detail = False, str(exc)
        agree &= ok
        print(f"check {height}x{width}: {len(expected['scores'])} detections, {detail}: {'ok' if ok else 'MISMATCH'}")
    return agree


def main(argv: Optional[Sequence[str]] = None) -> int:
    import_plugins(argv)
    args = build_parser().parse_args(argv)
    args.device = "cpu"  # tracing runs on the CPU; the file runs anywhere
    output = Path(args.output) if args.output else Path(args.weights).with_suffix(".onnx")
    try:
        detector = load_detector(args, args.weights)
        model = detector.model
        metadata = export_metadata(model, detector.class_names, detector.config.backbone)
        export_onnx(model, output, metadata, opset=args.opset)
    except (OSError, ValueError, ImportError) as exc:  # OSError: also an unwritable --output
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {output} ({output.stat().st_size / 2**20:.1f} MB, {len(detector.class_names)} classes)")
    if args.no_check:
        return 0
    try:
        return 0 if check_export(model, output) else 1
    except ImportError as exc:
        print(f"check skipped: {exc}")
        return 0


if __name__ == "__main__":
    sys.exit(main())
