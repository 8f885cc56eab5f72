"""Detect objects in images, folders or globs and draw the results.

    python predict.py --weights save_weights/best.pth photo.jpg holiday/ "scans/*.png"
    python predict.py --onnx model.onnx photo.jpg      # a tools/export_onnx.py export, on onnxruntime

Each readable image is written to ``--output-dir`` with its boxes drawn, under its own name
(``.jpg``/``.jpeg`` keep their extension, everything else becomes ``.png``); ``--save-json`` also
writes every detection as a COCO results file (image ids from ``--coco-gt``, or listed in
``<name>_images.json``; see train_utils/inference/coco_results.py). Unreadable and non-image files are reported and
skipped; the exit code is non-zero only when no image could be processed.

Images are read upright (EXIF orientation applied) and converted to RGB (alpha is dropped as in
training), so boxes refer to the image a viewer shows. Decoding runs in DataLoader workers while
the model works on the previous image.
"""
from __future__ import annotations

import argparse
import glob
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from train_utils.cli import model_flags_given
from train_utils.data.classes import load_class_names
from train_utils.data.images import DECODE_ERRORS, decode_image
from train_utils.inference.coco_results import CocoResults
from train_utils.inference.loading import add_model_arguments, load_detector
from train_utils.inference.onnx_export import OnnxDetector
from train_utils.flags import HelpFormatter, import_plugins
from train_utils.vis.draw import draw_detections

JPEG_SUFFIXES = (".jpg", ".jpeg")


# ------------------------------------------------------------------------------ inputs and outputs
def find_inputs(patterns: Sequence[str]) -> tuple[list[Path], list[str]]:
    """Files named by ``patterns`` (a file, a folder = its non-hidden files, or a glob), in the
    given order without repeats; plus one message per pattern that matched nothing."""
    files: list[Path] = []
    problems: list[str] = []
    for pattern in patterns:
        path = Path(pattern).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        elif path.is_file():
            found = [path]
        else:
            matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
            found = [p for p in matches if p.is_file()]
        if not found:
            problems.append(f"{pattern}: no such file, or no file in it")
        files.extend(found)
    unique, seen = [], set()
    for file in files:
        key = file.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(file)
    return unique, problems


def output_names(inputs: Sequence[Path], output_dir: Path) -> dict[Path, Path]:
    """Output path per input: same stem, ``.jpg``/``.jpeg`` kept, else ``.png``. A name already
    given to an earlier input, or the path of any input, gets a ``_1``, ``_2``... suffix."""
    taken = {p.resolve() for p in inputs}
    names: dict[Path, Path] = {}
    for file in inputs:
        suffix = file.suffix if file.suffix.lower() in JPEG_SUFFIXES else ".png"
        candidate, number = output_dir / f"{file.stem}{suffix}", 0
        while candidate.resolve() in taken:
            number += 1
            candidate = output_dir / f"{file.stem}_{number}{suffix}"
        taken.add(candidate.resolve())
        names[file] = candidate
    return names


class ImageFiles(Dataset):
    """``files[i] -> (i, uint8 [3, H, W] tensor or None, error message or None)``; never raises on a
    bad file, so one unreadable file does not stop a DataLoader."""

    def __init__(self, files: Sequence[Path]) -> None:
        self.files = list(files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[int, Optional[torch.Tensor], Optional[str]]:
        try:
            array = np.asarray(decode_image(self.files[index], exif_transpose=True))  # what a viewer shows
        except DECODE_ERRORS as exc:
            return index, None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'unreadable'}"
        return index, torch.from_numpy(array.copy()).permute(2, 0, 1), None


def _single(item):
    """DataLoader collate for batch_size=None: hand the sample over unchanged."""
    return item


# ------------------------------------------------------------------------------ script
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image file, folder or glob pattern")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights", "--weights-path", dest="weights",
                        help="checkpoint written by a training script, or a bare state dict")
    source.add_argument("--onnx", help="a model written by tools/export_onnx.py, run with onnxruntime")
    parser.add_argument("--output-dir", default="predict_results", help="where drawn images (and JSON) go")
    parser.add_argument("--score-thresh", type=float, default=0.5, help="keep detections scoring at least this")
    parser.add_argument("--line-thickness", type=int, default=None, help="box outline pixels (default: by image size)")
    parser.add_argument("--font-size", type=int, default=None, help="label font pixels (default: by image size)")
    parser.add_argument("--save-json", nargs="?", const="", default=None, metavar="PATH",
                        help="write detections as a COCO results file to PATH, which must end in .json "
                             "(default: OUTPUT_DIR/predictions.json), with the image ids in PATH_images.json")
    parser.add_argument("--coco-gt", metavar="JSON", default=None,
                        help="with --save-json: a COCO ground-truth json whose image ids (matched by file name) "
                             "and category ids (by class name) the results use")
    parser.add_argument("--no-draw", action="store_true", help="do not write drawn images")
    parser.add_argument("--workers", type=int, default=2, help="image decoding worker processes (at least 1)")
    add_model_arguments(parser, one_token=True)  # list flags must not swallow the INPUTs
    return parser


Detect = Callable[[torch.Tensor], dict[str, torch.Tensor]]


def load_predictor(args: argparse.Namespace) -> tuple[Detect, list[str], torch.device]:
    """(image [3, H, W] float in [0, 1] on the device -> detections, class names, device) of the
    PyTorch checkpoint or the ONNX file the flags name."""
    if args.weights:
        detector = load_detector(args, args.weights)
        model = detector.model
        model.roi_heads.score_thresh = min(model.roi_heads.score_thresh, args.score_thresh)
        return (lambda image: model([image])[0]), detector.class_names, next(model.parameters()).device
    fixed = model_flags_given(args)  # an ONNX file has the model and its settings baked in
    if fixed:
        raise ValueError(f"{args.onnx}: the model and its image sizes are fixed at export; "
                         f"{', '.join(fixed)} cannot change them (re-export instead)")
    runtime = OnnxDetector(args.onnx, args.device)
    if args.classes_json:
        class_names = load_class_names(args.classes_json)
    elif runtime.class_names is not None:
        class_names = runtime.class_names
    else:
        raise ValueError(f"{args.onnx} stores no class names: pass --classes-json")
    if args.score_thresh < runtime.score_thresh:
        print(f"note: {args.onnx} returns only scores >= {runtime.score_thresh} (set at export)", file=sys.stderr)
    return runtime, class_names, torch.device("cpu")


def json_output_path(args: argparse.Namespace) -> Optional[Path]:
    """Where ``--save-json`` writes, or None. A path not ending in .json is refused: it is
    usually an input image that ``--save-json`` swallowed, and must not be overwritten."""
    if args.save_json is None:
        return None
    if not args.save_json:
        return Path(args.output_dir) / "predictions.json"
    path = Path(args.save_json)
    if path.suffix.lower() != ".json":
        raise ValueError(f"--save-json {path}: the path must end in .json (to save to the default place, "
                         "put --save-json after the inputs)")
    return path


def draw_and_save(pixels: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor,
                  class_names: Sequence[str], args: argparse.Namespace, target: Path) -> str:
    """Draw the detections on the uint8 [3, H, W] image and save it to ``target``; returns the
    " -> target" note of the progress line."""
    image = Image.fromarray(pixels.permute(1, 2, 0).numpy())
    drawn = draw_detections(image, boxes.tolist(), labels.tolist(), scores.tolist(), class_names,
                            args.line_thickness, args.font_size)
    drawn.save(target, **({"quality": 95} if target.suffix.lower() in JPEG_SUFFIXES else {}))
    return f" -> {target}"


def run(args: argparse.Namespace) -> int:
    """Predict as the flags say; returns the number of images processed."""
    json_path = json_output_path(args)
    if args.coco_gt and json_path is None:
        raise ValueError("--coco-gt needs --save-json (it sets the ids of the results file)")
    files, problems = find_inputs(args.inputs)
    for problem in problems:
        print(f"skipped {problem}", file=sys.stderr)
    if not files:
        return 0
    detect, class_names, device = load_predictor(args)
    results = CocoResults(class_names, Path(args.coco_gt) if args.coco_gt else None)
    output_dir = Path(args.output_dir)
    if not args.no_draw:
        output_dir.mkdir(parents=True, exist_ok=True)
    targets = output_names(files, output_dir)

    loader = DataLoader(ImageFiles(files), batch_size=None, shuffle=False, num_workers=max(int(args.workers), 1),
                        collate_fn=_single)
    done = skipped = detections = 0
    start = time.perf_counter()
    for index, pixels, error in loader:
        file = files[index]
        if pixels is None:
            skipped += 1
            print(f"skipped {file}: not a readable image ({error})", file=sys.stderr)
            continue
        tick = time.perf_counter()
        try:
            with torch.inference_mode():
                output = detect(pixels.to(device).float().div_(255))
        except ValueError as exc:  # an image the model cannot take; the others still run
            skipped += 1
            print(f"skipped {file}: {exc}", file=sys.stderr)
            continue
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        took = time.perf_counter() - tick
        keep = output["scores"] >= args.score_thresh
        boxes, labels, scores = (output[k][keep].cpu() for k in ("boxes", "labels", "scores"))
        results.add(file, pixels.shape[1], pixels.shape[2], boxes, labels, scores)
        done += 1
        detections += len(scores)
        written = "" if args.no_draw else draw_and_save(pixels, boxes, labels, scores, class_names, args, targets[file])
        print(f"[{done + skipped}/{len(files)}] {file}: {len(scores)} detections, {took * 1000:.0f} ms{written}")
    elapsed = time.perf_counter() - start

    if json_path is not None:
        print("\n".join(results.write(json_path)))
    print(f"{done} images processed, {skipped} skipped, {detections} detections "
          f"(score >= {args.score_thresh}); {done / max(elapsed, 1e-9):.2f} images/s")
    return done


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Script entry: exit code 1 when nothing could be processed or on a setup error."""
    import_plugins(argv)
    args = build_parser().parse_args(argv)
    try:
        processed = run(args)
    except (FileNotFoundError, ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if processed == 0:
        print("error: no image could be processed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
