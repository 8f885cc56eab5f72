"""The moving parts of prediction at scale: batching, the model call, ordered background output.

Shape shorthand: B images in a batch, each uint8 ``[3, H, W]`` as decoded; the model takes them as
float ``[3, H, W]`` in [0, 1] and returns per image ``boxes [N, 4]`` (xyxy pixels), ``labels
[N]`` and ``scores [N]``.

Batches only hold images of one size. Images of different sizes would be padded to a common
size, and the padding changes the features near the image border (a frozen BatchNorm maps the
zero padding to non-zero values), so a mixed batch would not give one-image inference's
detections. With images grouped by size a batch gives the same detections to float rounding.
"""
from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence, TypeVar

import torch

Detections = dict[str, torch.Tensor]
BatchDetect = Callable[[list[torch.Tensor]], list[Detections]]
Item = TypeVar("Item")


def default_batch_size(device: torch.device) -> int:
    """Images per model call when ``--batch-size`` is not given: 4 on a GPU; 1 on a CPU, where
    batching measured no faster (the convolutions already use every core) and costs memory."""
    return 4 if device.type == "cuda" else 1


@dataclass
class Timings:
    """Seconds spent per stage, summed over the run (stages overlap: decoding in workers or a
    thread, drawing/writing in a thread, the model in the main thread)."""

    decode: float = 0.0
    model: float = 0.0
    output: float = 0.0

    def summary(self, images: int, elapsed: float) -> str:
        rate = images / max(elapsed, 1e-9)
        return (f"throughput: {images} images in {elapsed:.1f} s = {rate:.2f} images/s; time per stage: "
                f"decode {self.decode:.1f} s (in parallel), model {self.model:.1f} s, "
                f"drawing/writing {self.output:.1f} s (in parallel)")


def batches_by_size(items: Iterable[Item], shape: Callable[[Item], tuple], batch_size: int,
                    max_waiting: Optional[int] = None) -> Iterator[list[Item]]:
    """Group ``items`` into lists of at most ``batch_size`` items of equal ``shape(item)``.

    A group is handed on when full; when more than ``max_waiting`` items (default 4 batches)
    wait in partly filled groups, the fullest group goes, so memory stays bounded on folders of
    many sizes. The rest go at the end, in the order their first item came.
    """
    max_waiting = max_waiting or 4 * batch_size
    groups: dict[tuple, list[Item]] = {}
    waiting = 0
    for item in items:
        group = groups.setdefault(shape(item), [])
        group.append(item)
        waiting += 1
        if len(group) >= batch_size or waiting > max_waiting:
            key = shape(item) if len(group) >= batch_size else max(groups, key=lambda k: len(groups[k]))
            full = groups.pop(key)
            waiting -= len(full)
            yield full
    yield from groups.values()


def torch_batch_detect(model: torch.nn.Module, device: torch.device) -> BatchDetect:
    """The detector as a batch function: uint8 images in, detections on the CPU out."""

    def detect(images: list[torch.Tensor]) -> list[Detections]:
        inputs = [image.to(device, non_blocking=True).float().div_(255) for image in images]
        with torch.inference_mode():
            outputs = model(inputs)
        return [{key: value.cpu() for key, value in output.items()} for output in outputs]

    return detect


def one_by_one(detect: Callable[[torch.Tensor], Detections]) -> BatchDetect:
    """A one-image runtime (an ONNX graph takes one image per call) as a batch function."""

    def detect_batch(images: list[torch.Tensor]) -> list[Detections]:
        with torch.inference_mode():
            return [detect(image.float().div_(255)) for image in images]

    return detect_batch


def detect_each(detect: BatchDetect, images: Sequence[torch.Tensor], timings: Timings,
                device: torch.device) -> list[Detections | ValueError]:
    """Detections per image; when the batch fails with a ValueError (an image the model cannot
    take), the images run one at a time and each failing one gets its error instead."""
    tick = time.perf_counter()
    try:
        results: list = list(detect(list(images)))
    except ValueError:
        results = []
        for image in images:
            try:
                results.append(detect([image])[0])
            except ValueError as exc:
                results.append(exc)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    timings.model += time.perf_counter() - tick
    return results


def above(output: Detections, score_thresh: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(boxes, labels, scores) of the detections scoring at least ``score_thresh``."""
    keep = output["scores"] >= score_thresh
    return output["boxes"][keep], output["labels"][keep], output["scores"][keep]


class OrderedOutput:
    """Runs output jobs (drawing, encoding, file writes) one after another in a thread, in the
    order given, while the model goes on; at most ``backlog`` jobs wait. A job's exception is
    raised in the caller at the first :meth:`submit` after the job ended, or at :meth:`finish`."""

    def __init__(self, timings: Timings, backlog: int = 8) -> None:
        self.timings = timings
        self.backlog = max(backlog, 1)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="predict-output")
        self._pending: deque[Future] = deque()

    def submit(self, job: Callable[[], None]) -> None:
        while self._pending and (self._pending[0].done() or len(self._pending) >= self.backlog):
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(self._timed, job))

    def _timed(self, job: Callable[[], None]) -> None:
        tick = time.perf_counter()
        try:
            job()
        finally:
            self.timings.output += time.perf_counter() - tick

    def finish(self) -> None:
        """Wait for every job; the first failure is raised after all have run."""
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True)
