"""predict.py on a video file, camera or stream: detect on every ``--every``-th frame, write the
annotated video and one JSON line per processed frame."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, TextIO

import numpy as np
import torch

from train_utils.inference.pipeline import above, detect_each
from train_utils.inference.session import Run
from train_utils.inference.video import VideoReader, VideoWriter
from train_utils.progress import Progress


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
            detections = detect_each(run.detect, images, run.timings, run.device)
            outputs = dict(zip((frame[0] for frame in picked), detections))
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
