"""predict.py's library: its flags, the predictor (PyTorch checkpoint or ONNX file), and one run
over images, videos, cameras and streams (see predict.py for what it writes)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import DataLoader

from train_utils.cli import add_model_arguments, model_flags_given
from train_utils.data.classes import load_class_names
from train_utils.flags import HelpFormatter
from train_utils.device import add_tf32_flag, tf32_mode
from train_utils.inference.coco_results import CocoResults
from train_utils.inference.files import (JPEG_SUFFIXES, ImageFiles, find_inputs, json_output_path, output_names,
                                         single_item, stream_targets)
from train_utils.inference.onnx_export import OnnxDetector
from train_utils.inference.pipeline import (BatchDetect, OrderedOutput, above, batches_by_size, default_batch_size,
                                            detect_each, one_by_one, torch_batch_detect)
from train_utils.inference.session import Run, make_writers
from train_utils.inference.tta import add_tta_flags, check_tta_flags, tta_from_args
from train_utils.inference.video import import_av, is_video_file
from train_utils.inference.video_jobs import run_video
from train_utils.loading import add_weights_variant_flag, load_detector


def predict_parser(description: str) -> argparse.ArgumentParser:
    """predict.py's flags."""
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    parser.add_argument("inputs", nargs="*", metavar="INPUT", help="image or video file, folder or glob pattern")
    parser.add_argument("--source", action="append", default=[], metavar="SRC",
                        help="a camera (0, 1...; on Windows video=NAME) or a stream URL (rtsp://, rtmp://, "
                             "http://...); may be repeated")
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--weights", "--weights-path", dest="weights",
                       help="checkpoint written by a training script, or a bare state dict")
    model.add_argument("--onnx", help="a model written by tools/export_onnx.py, run with onnxruntime")
    parser.add_argument("--output-dir", default="predict_results", help="where drawn images, videos (and JSON) go")
    parser.add_argument("--score-thresh", type=float, default=0.5, help="keep detections scoring at least this")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="images (of one size) per model call; default 4 on a GPU, 1 on the CPU")
    parser.add_argument("--line-thickness", type=int, default=None, help="box outline pixels (default: by image size)")
    parser.add_argument("--font-size", type=int, default=None, help="label font pixels (default: by image size)")
    parser.add_argument("--save-json", nargs="?", const="", default=None, metavar="PATH",
                        help="write detections as a COCO results file to PATH, which must end in .json "
                             "(default: OUTPUT_DIR/predictions.json), with the image ids in PATH_images.json")
    parser.add_argument("--coco-gt", metavar="JSON", default=None,
                        help="with --save-json: a COCO ground-truth json whose image ids (matched by file name) "
                             "and category ids (by class name) the results use")
    labels = parser.add_argument_group("predictions as annotations (pre-labelling)")
    labels.add_argument("--save-voc", metavar="DIR", default=None,
                        help="write Pascal VOC XML (labelImg) + JPEGImages + ImageSets/Main/SPLIT.txt to DIR")
    labels.add_argument("--save-yolo", metavar="DIR", default=None,
                        help="write YOLO txt labels + images + classes.txt to DIR")
    labels.add_argument("--save-split", default="predicted", metavar="NAME",
                        help="split name of --save-voc/--save-yolo (ImageSets/Main/NAME.txt, images/NAME/)")
    labels.add_argument("--overwrite-labels", action="store_true",
                        help="replace annotations already in the --save-voc/--save-yolo folder (default: keep them)")
    video = parser.add_argument_group("videos and streams")
    video.add_argument("--every", type=int, default=1, metavar="N",
                       help="run the model on every N-th frame (one frame per call when N > 1); the frames "
                            "between show its latest detections")
    video.add_argument("--max-frames", type=int, default=None, metavar="N",
                       help="stop a video or stream after N frames")
    parser.add_argument("--no-draw", action="store_true", help="do not write drawn images or annotated videos")
    parser.add_argument("--workers", type=int, default=2, help="image decoding worker processes (at least 1)")
    add_tf32_flag(parser)
    add_model_arguments(parser, one_token=True)  # list flags must not swallow the INPUTs
    add_weights_variant_flag(parser)
    add_tta_flags(parser, one_token=True)
    return parser


def check_args(args: argparse.Namespace) -> None:
    """One line per flag combination that cannot work."""
    if not args.inputs and not args.source:
        raise ValueError("nothing to predict on: name images, videos or folders, or a --source")
    if args.coco_gt and args.save_json is None:
        raise ValueError("--coco-gt needs --save-json (it sets the ids of the results file)")
    for name in ("batch_size", "every", "max_frames", "workers"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    check_tta_flags(args)
    if args.tta and args.onnx:
        raise ValueError(f"--tta needs --weights: {args.onnx} runs the one pass fixed at export")
    if args.compile and args.onnx:
        raise ValueError(f"{args.onnx}: --compile applies to PyTorch weights (--weights), not to an ONNX model")


def load_predictor(args: argparse.Namespace) -> tuple[BatchDetect, list[str], torch.device]:
    """(batch function, class names, device) of the PyTorch checkpoint or ONNX file the flags name."""
    if args.weights:
        detector = load_detector(args, args.weights, score_thresh=args.score_thresh)
        device = next(detector.model.parameters()).device
        return torch_batch_detect(tta_from_args(detector.model, args), device), detector.class_names, device
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
    return one_by_one(runtime), class_names, torch.device("cpu")


def image_job(run: Run, file: Path, number: int, total: int, pixels: torch.Tensor, output, target: Path,
              model_ms: float) -> None:
    """Record, draw and write one image's detections (runs in the output thread)."""
    boxes, labels, scores = above(output, run.args.score_thresh)
    run.results.add(file, pixels.shape[1], pixels.shape[2], boxes, labels, scores)
    run.annotate(file.stem, file, pixels, boxes, labels)
    written = ""
    if not run.args.no_draw:
        drawn = run.draw(pixels, boxes, labels, scores)
        drawn.save(target, **({"quality": 95} if target.suffix.lower() in JPEG_SUFFIXES else {}))
        written = f" -> {target}"
    run.done += 1
    run.detections += len(scores)
    print(f"[{number}/{total}] {file}: {len(scores)} detections, {model_ms:.0f} ms{written}", flush=True)


def run_images(run: Run, files: list[Path], targets: dict[Path, Path]) -> None:
    """Decode in workers, detect in same-size batches, hand the results to the output thread."""
    loader = DataLoader(ImageFiles(files), batch_size=None, shuffle=False, collate_fn=single_item,
                        num_workers=max(int(run.args.workers), 1), pin_memory=run.device.type == "cuda")
    counter = iter(range(1, len(files) + 1))
    readable = _readable(run, loader, files, counter)
    for batch in batches_by_size(readable, lambda item: tuple(item[1].shape), run.batch_size):
        started = run.timings.model
        outputs = detect_each(run.detect, [pixels for _, pixels in batch], run.timings, run.device)
        model_ms = (run.timings.model - started) * 1000 / len(batch)
        for (index, pixels), output in zip(batch, outputs):
            file, number = files[index], next(counter)
            if isinstance(output, ValueError):  # an image the model cannot take; the others still run
                run.skipped += 1
                print(f"skipped {file}: {output}", file=sys.stderr)
                continue
            run.output.submit(lambda f=file, n=number, p=pixels, o=output, ms=model_ms: image_job(
                run, f, n, len(files), p, o, targets[f], ms))


def _readable(run: Run, loader: DataLoader, files: list[Path], counter):
    """(index, pixels) of each decodable image; the others are reported and counted."""
    for index, pixels, error, seconds in loader:
        run.timings.decode += seconds
        if pixels is None:
            run.skipped += 1
            print(f"skipped {files[index]}: not a readable image ({error})", file=sys.stderr)
            next(counter)
            continue
        yield index, pixels


def predict(args: argparse.Namespace) -> int:
    """Predict as the flags say; returns the number of images and frames processed."""
    check_args(args)
    json_path = json_output_path(args)
    files, problems = find_inputs(args.inputs)
    for problem in problems:
        print(f"skipped {problem}", file=sys.stderr)
    images = [file for file in files if not is_video_file(file)]
    videos = [file for file in files if is_video_file(file)]
    if not files and not args.source:
        return 0
    if videos or args.source:
        import_av()  # a missing PyAV is one line before any work, not after the images
    detect, class_names, device = load_predictor(args)
    run = Run(args, detect, class_names, device, args.batch_size or default_batch_size(device),
              CocoResults(class_names, Path(args.coco_gt) if args.coco_gt else None), make_writers(args, class_names))
    output_dir = Path(args.output_dir)
    if not args.no_draw or videos or args.source:
        output_dir.mkdir(parents=True, exist_ok=True)
    targets = output_names(files, output_dir)
    streams = stream_targets(args.source, output_dir, files, targets)
    start = time.perf_counter()
    run.output = OrderedOutput(run.timings, backlog=4 * run.batch_size)
    try:
        with tf32_mode(args.tf32):  # exact float32 scores, as validation.py's (docs/gpus.md)
            if images:
                run_images(run, images, targets)
            for file in videos:
                run_video(run, str(file), targets[file])
            for source, target in zip(args.source, streams):
                run_video(run, source, target)
    finally:
        finish(run, json_path, start)
    return run.done


def finish(run: Run, json_path: Optional[Path], start: float) -> None:
    """Let the output thread drain, then write the lists and results files and the summary; these
    are written even when a job of the output thread failed (its error is raised afterwards)."""
    try:
        run.output.finish()
    finally:
        for writer in run.writers:
            print("\n".join(writer.close()))
        if json_path is not None:
            print("\n".join(run.results.write(json_path)))
        print(f"{run.done} images processed, {run.skipped} skipped, {run.detections} detections "
              f"(score >= {run.args.score_thresh})")
        print(run.timings.summary(run.done, time.perf_counter() - start))
