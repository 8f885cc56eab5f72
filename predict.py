"""Detect objects in images, folders, globs, videos, cameras and streams; draw and write the results.

    python predict.py --weights save_weights/best.pth photo.jpg holiday/ "scans/*.png"
    python predict.py --weights save_weights/best.pth clip.mp4 --every 2      # annotated clip.mp4 + clip.jsonl
    python predict.py --weights save_weights/best.pth --source 0             # camera 0; rtsp://... for a stream
    python predict.py --weights save_weights/best.pth new_photos/ --save-voc prelabels/   # labelImg-ready
    python predict.py --onnx model.onnx photo.jpg      # a tools/export_onnx.py export, on onnxruntime

Each readable image is written to ``--output-dir`` with its boxes drawn, under its own name
(``.jpg``/``.jpeg`` keep their extension, everything else becomes ``.png``); ``--save-json`` also
writes every image detection as a COCO results file (image ids from ``--coco-gt``, or listed in
``<name>_images.json``; see train_utils/inference/coco_results.py). A video or stream becomes an
annotated ``<name>.mp4`` (same size and frame rate, H.264) and ``<name>.jsonl``, one line per
processed frame. ``--save-voc``/``--save-yolo`` write the detections as annotations to correct in
labelImg and train on (train_utils/inference/annotations.py). Unreadable files are reported and
skipped; the exit code is non-zero only when nothing could be processed.

Images are read upright (EXIF orientation applied) and converted to RGB (alpha is dropped as in
training), so boxes refer to the image a viewer shows. Decoding runs in DataLoader workers (a
thread for videos), images of one size go through the model ``--batch-size`` at a time, and
drawing and writing run in a thread while the model works on the next batch.
"""
from __future__ import annotations

import argparse
import glob
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, TextIO

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from train_utils.cli import model_flags_given
from train_utils.data.classes import load_class_names
from train_utils.data.images import DECODE_ERRORS, decode_image
from train_utils.flags import HelpFormatter, import_plugins
from train_utils.inference.annotations import AnnotationWriter, VocWriter, YoloWriter
from train_utils.inference.coco_results import CocoResults
from train_utils.cli import add_model_arguments
from train_utils.loading import load_detector
from train_utils.inference.onnx_export import OnnxDetector
from train_utils.inference.pipeline import (BatchDetect, OrderedOutput, Timings, above, batches_by_size,
                                            default_batch_size, detect_each, one_by_one, torch_batch_detect)
from train_utils.inference.video import VideoReader, VideoWriter, import_av, is_video_file
from train_utils.progress import Progress
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
    """Output path per input: same stem; ``.jpg``/``.jpeg`` kept, a video becomes ``.mp4``, else
    ``.png``. A name already given to an earlier input, or the path of any input, gets a ``_1``,
    ``_2``... suffix."""
    taken = {p.resolve() for p in inputs}
    names: dict[Path, Path] = {}
    for file in inputs:
        video = is_video_file(file)
        suffix = file.suffix if file.suffix.lower() in JPEG_SUFFIXES else ".mp4" if video else ".png"
        candidate, number = output_dir / f"{file.stem}{suffix}", 0
        while _outputs(candidate, video) & taken:
            number += 1
            candidate = output_dir / f"{file.stem}_{number}{suffix}"
        taken |= _outputs(candidate, video)
        names[file] = candidate
    return names


def _outputs(target: Path, video: bool) -> set[Path]:
    """The files an output name stands for: a video's JSON lines go beside it."""
    return {target.resolve(), target.with_suffix(".jsonl").resolve()} if video else {target.resolve()}


def stream_name(source: str, number: int) -> str:
    """Output stem of a camera or stream: ``camera0``, else ``stream1``, ``stream2``..."""
    return f"camera{source}" if source.isdigit() else f"stream{number}"


class ImageFiles(Dataset):
    """``files[i] -> (i, uint8 [3, H, W] tensor or None, error message or None, decode seconds)``;
    never raises on a bad file, so one unreadable file does not stop a DataLoader."""

    def __init__(self, files: Sequence[Path]) -> None:
        self.files = list(files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[int, Optional[torch.Tensor], Optional[str], float]:
        tick = time.perf_counter()
        try:
            array = np.asarray(decode_image(self.files[index], exif_transpose=True))  # what a viewer shows
        except DECODE_ERRORS as exc:
            return index, None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'unreadable'}", 0.0
        pixels = torch.from_numpy(array.copy()).permute(2, 0, 1)
        return index, pixels, None, time.perf_counter() - tick


def _single(item):
    """DataLoader collate for batch_size=None: hand the sample over unchanged."""
    return item


# ------------------------------------------------------------------------------ flags and model
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
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
    video.add_argument("--max-frames", type=int, default=None, metavar="N", help="stop a video or stream after N frames")
    parser.add_argument("--no-draw", action="store_true", help="do not write drawn images or annotated videos")
    parser.add_argument("--workers", type=int, default=2, help="image decoding worker processes (at least 1)")
    add_model_arguments(parser, one_token=True)  # list flags must not swallow the INPUTs
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


def load_predictor(args: argparse.Namespace) -> tuple[BatchDetect, list[str], torch.device]:
    """(batch function, class names, device) of the PyTorch checkpoint or ONNX file the flags name."""
    if args.weights:
        detector = load_detector(args, args.weights, score_thresh=args.score_thresh)
        device = next(detector.model.parameters()).device
        return torch_batch_detect(detector.model, device), detector.class_names, device
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


# ------------------------------------------------------------------------------ one run
@dataclass
class Run:
    """Everything one predict.py call shares: the model, the sinks and the counters."""

    args: argparse.Namespace
    detect: BatchDetect
    class_names: list[str]
    device: torch.device
    batch_size: int
    results: CocoResults
    writers: list[AnnotationWriter]
    timings: Timings = field(default_factory=Timings)
    output: Optional[OrderedOutput] = None
    done: int = 0
    skipped: int = 0
    detections: int = 0

    def draw(self, pixels: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor,
             scores: torch.Tensor) -> Image.Image:
        image = Image.fromarray(pixels.permute(1, 2, 0).numpy())
        return draw_detections(image, boxes.tolist(), labels.tolist(), scores.tolist(), self.class_names,
                               self.args.line_thickness, self.args.font_size)

    def annotate(self, hint: str, source: Optional[Path], pixels: torch.Tensor, boxes: torch.Tensor,
                 labels: torch.Tensor) -> None:
        for writer in self.writers:
            writer.add(hint, source, pixels, boxes, labels)


def make_writers(args: argparse.Namespace, class_names: list[str]) -> list[AnnotationWriter]:
    writers: list[AnnotationWriter] = []
    if args.save_voc:
        writers.append(VocWriter(Path(args.save_voc), class_names, args.save_split, args.overwrite_labels))
    if args.save_yolo:
        writers.append(YoloWriter(Path(args.save_yolo), class_names, args.save_split, args.overwrite_labels))
    return writers


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
    loader = DataLoader(ImageFiles(files), batch_size=None, shuffle=False, collate_fn=_single,
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


# ------------------------------------------------------------------------------ videos and streams
def frame_record(source: str, index: int, seconds: Optional[float], boxes: torch.Tensor, labels: torch.Tensor,
                 scores: torch.Tensor, class_names: Sequence[str]) -> str:
    """One JSON line: the frame's number and time and its detections (xyxy pixel boxes)."""
    detections = [{"box": [round(v, 3) for v in box], "label": class_names[label - 1], "class_id": label,
                   "score": round(score, 5)}
                  for box, label, score in zip(boxes.tolist(), labels.tolist(), scores.tolist())]
    time_s = None if seconds is None else round(float(seconds), 4)
    return json.dumps({"source": source, "frame": index, "time": time_s, "detections": detections}) + "\n"


@dataclass
class VideoSink:
    """The outputs of one video: the annotated video (unless --no-draw) and the JSON lines."""

    source: str
    stem: str
    lines: TextIO
    writer: Optional[VideoWriter]
    last: tuple = (torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), torch.zeros(0))

    def close(self) -> None:
        self.lines.close()
        if self.writer is not None:
            self.writer.close()


def frame_job(run: Run, sink: VideoSink, frame: tuple, output) -> None:
    """Write one frame: its JSON line and annotations when the model saw it, and the video frame
    with the latest detections drawn (runs in the output thread, in frame order)."""
    index, seconds, array = frame
    pixels = torch.from_numpy(array).permute(2, 0, 1)
    if output is not None:
        sink.last = above(output, run.args.score_thresh)
        sink.lines.write(frame_record(sink.source, index, seconds, *sink.last, run.class_names))
        run.annotate(f"{sink.stem}_{index:06d}", None, pixels, *sink.last[:2])
        run.done += 1
        run.detections += len(sink.last[2])
    if sink.writer is not None:
        sink.writer.write(np.asarray(run.draw(pixels, *sink.last)) if len(sink.last[2]) else array)


def frame_chunks(frames, every: int, batch_size: int):
    """Consecutive frames cut so that each piece holds ``batch_size`` frames for the model (every
    ``every``-th frame), plus the frames between them."""
    chunk, picked = [], 0
    for frame in frames:
        chunk.append(frame)
        picked += frame[0] % every == 0
        if picked == batch_size:
            yield chunk
            chunk, picked = [], 0
    if chunk:
        yield chunk


def run_video(run: Run, source: str, target: Path) -> None:
    """Detect on a video file, camera or stream: annotated video + JSON lines at ``target``. With
    ``--every`` above 1 the model takes one frame per call, so at most ``--every`` frames wait."""
    args = run.args
    batch = run.batch_size if args.every == 1 else 1
    try:
        reader = VideoReader(source, args.max_frames, buffer=2 * batch)
    except ValueError as exc:
        run.skipped += 1
        print(f"skipped {exc}", file=sys.stderr)
        return
    sink = None
    try:
        sink = open_sink(run, reader, target)
        for chunk in frame_chunks(Progress(reader, expected_total(reader), target.stem, print_freq=100),
                                  args.every, batch):
            picked = [frame for frame in chunk if frame[0] % args.every == 0]
            images = [torch.from_numpy(frame[2]).permute(2, 0, 1) for frame in picked]
            outputs = dict(zip((frame[0] for frame in picked), detect_each(run.detect, images, run.timings, run.device)))
            failed = next((output for output in outputs.values() if isinstance(output, ValueError)), None)
            if failed is not None:  # every frame has the same size: the rest would fail alike
                run.skipped += 1
                print(f"skipped the rest of {source}: {failed}", file=sys.stderr)
                break
            for frame in chunk:
                run.output.submit(lambda f=frame, o=outputs.get(frame[0]): frame_job(run, sink, f, o))
    finally:
        reader.close()
        run.timings.decode += reader.decode_seconds
        if sink is not None:
            run.output.submit(sink.close)
            report_video_end(reader, target if sink.writer is not None else Path(sink.lines.name))


def expected_total(reader: VideoReader) -> Optional[int]:
    """Frames the progress bar expects: the announced count, at most --max-frames (None: unknown)."""
    expected, limit = reader.info.expected_frames, reader.max_frames
    return expected if limit is None or expected is None else min(expected, limit)


def open_sink(run: Run, reader: VideoReader, target: Path) -> VideoSink:
    """The annotated video (unless --no-draw) and the JSON lines of ``reader``'s frames."""
    info = reader.info
    writer = None if run.args.no_draw else VideoWriter(target, info.width, info.height, info.fps)
    lines = target.with_suffix(".jsonl").open("w", buffering=1)
    total = expected_total(reader)
    print(f"{reader.source}: {info.width}x{info.height} at {float(info.fps):.3g} fps, "
          f"{total if total is not None else 'unknown number of'} frames -> {target if writer else lines.name}")
    return VideoSink(reader.source, target.stem, lines, writer)


def report_video_end(reader: VideoReader, kept: Path) -> None:
    """One line when the video ended before its announced end, or live frames were dropped."""
    reason = reader.ended_early()
    if reason is not None and reader.decoded == 0:
        print(f"warning: {reader.source}: no frame could be decoded ({reason})", file=sys.stderr)
    elif reason is not None:
        print(f"warning: {reader.source}: the video ends early after {reader.decoded} frames ({reason}); "
              f"the frames read are kept in {kept}", file=sys.stderr)
    if reader.dropped:
        print(f"note: {reader.source}: {reader.dropped} frames were dropped while the model was busy "
              "(use --every N to run it on fewer frames)", file=sys.stderr)


# ------------------------------------------------------------------------------ script
def run(args: argparse.Namespace) -> int:
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
        if images:
            run_images(run, images, targets)
        for file in videos:
            run_video(run, str(file), targets[file])
        for source, target in zip(args.source, streams):
            run_video(run, source, target)
    finally:
        finish(run, json_path, start)
    return run.done


def stream_targets(sources: Sequence[str], output_dir: Path, files: Sequence[Path],
                   targets: dict[Path, Path]) -> list[Path]:
    """Output video per camera or stream (``camera0.mp4``, ``stream2.mp4``...), never the name of
    an input or of another output."""
    taken = {file.resolve() for file in files}
    for file, target in targets.items():
        taken |= _outputs(target, is_video_file(file))
    result = []
    for number, source in enumerate(sources, start=1):
        stem, suffix = stream_name(source, number), 0
        candidate = output_dir / f"{stem}.mp4"
        while _outputs(candidate, True) & taken:
            suffix += 1
            candidate = output_dir / f"{stem}_{suffix}.mp4"
        taken |= _outputs(candidate, True)
        result.append(candidate)
    return result


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


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Script entry: exit code 1 when nothing could be processed or on a setup error; 130 after Ctrl-C
    (what was processed so far is written)."""
    import_plugins(argv)
    args = build_parser().parse_args(argv)
    try:
        processed = run(args)
    except (OSError, ValueError, ImportError) as exc:  # OSError: an output folder or disk that fails
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: the results so far are written", file=sys.stderr)
        return 130
    if processed == 0:
        print("error: no image could be processed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
