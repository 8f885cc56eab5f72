"""Video files, cameras and network streams in, annotated videos out, with PyAV.

PyAV's wheels carry their own FFmpeg (H.264 encoder included), so nothing is needed from the
system; it reads every container FFmpeg knows, cameras through FFmpeg's device formats, and
rtsp/rtmp/http streams, and reports damaged data as exceptions we can turn into one line.

Sources: a video file; a camera index (``0`` = ``/dev/video0`` with v4l2 on Linux, AVFoundation
device 0 on macOS; on Windows ``video=<device name>`` with DirectShow); a URL (``rtsp://``,
``rtmp://``, ``http(s)://``, ``udp://``...). Frames are decoded in a background thread while the
model works. A live source (camera, rtsp/rtmp/udp/srt) does not wait for the model: when the
model falls behind, the oldest waiting frames are dropped and counted.
"""
from __future__ import annotations

import queue
import sys
import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".ts")
_LIVE_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "udp", "tcp", "srt", "rtp")
DEFAULT_FPS = Fraction(25)
_END = object()


def import_av():
    """The ``av`` module, or an ImportError that says how to install it."""
    try:
        import av
    except ImportError:
        raise ImportError("videos and streams need PyAV: pip install 'av>=12' "
                          "(it brings its own FFmpeg)") from None
    return av


def is_video_file(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_SUFFIXES


def is_live(source: str) -> bool:
    """Cameras and streaming protocols produce frames in real time; files and http(s) do not."""
    return source.isdigit() or source.startswith("video=") or source.split("://")[0].lower() in _LIVE_SCHEMES


def _open_arguments(source: str) -> tuple[str, Optional[str], dict]:
    """(url, FFmpeg input format, options) for ``av.open``."""
    if source.isdigit():
        if sys.platform.startswith("linux"):
            return f"/dev/video{source}", "v4l2", {}
        if sys.platform == "darwin":
            return source, "avfoundation", {"framerate": "30"}
        raise ValueError(f"camera {source}: on this system name the camera as 'video=<device name>' "
                         "(FFmpeg's DirectShow; 'ffmpeg -list_devices true -f dshow -i dummy' lists them)")
    if source.startswith("video="):
        return source, "dshow", {}
    if source.lower().startswith(("rtsp://", "rtsps://")):
        return source, None, {"rtsp_transport": "tcp"}
    return source, None, {}


@dataclass
class VideoInfo:
    """What is known of a source before decoding: frame size, rate, and the frame count when the
    container states it (or its duration does)."""

    width: int
    height: int
    fps: Fraction
    expected_frames: Optional[int]


class VideoReader:
    """Iterate ``(frame index, time in s, uint8 [H, W, 3] RGB array)`` over a source.

    Decoding runs in a thread; an error while decoding ends the iteration and is kept in
    :attr:`problem` (the frames before it were delivered). :attr:`decode_seconds` is the time
    spent decoding, :attr:`dropped` the live frames dropped because the model fell behind.
    """

    def __init__(self, source: Union[str, Path], max_frames: Optional[int] = None, buffer: int = 8) -> None:
        av = import_av()
        self.source = str(source)
        self.live = is_live(self.source)
        self.max_frames = max_frames
        url, form, options = _open_arguments(self.source)
        try:
            self.container = av.open(url, format=form, options=options, timeout=(15.0, 30.0))
        except (av.FFmpegError, OSError) as exc:
            name = f"camera {self.source} ({url})" if self.source.isdigit() else self.source
            raise ValueError(f"{name}: cannot open the video ({_reason(exc)})") from None
        if not self.container.streams.video:
            self.container.close()
            raise ValueError(f"{self.source}: holds no video stream")
        self.stream = self.container.streams.video[0]
        self.stream.thread_type = "AUTO"  # FFmpeg's frame/slice threads
        self.info = self._info()
        self.problem: Optional[str] = None
        self.exhausted = False  # the data (or --max-frames) ended, not a close()
        self.decoded = self.dropped = 0
        self.decode_seconds = 0.0
        self._queue: queue.Queue = queue.Queue(maxsize=max(buffer, 1))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._decode_all, name="video-decoder", daemon=True)
        self._thread.start()

    def _info(self) -> VideoInfo:
        context = self.stream.codec_context
        fps = self.stream.average_rate or self.stream.guessed_rate or DEFAULT_FPS
        expected = self.stream.frames or None
        if expected is None and self.container.duration and not self.live:
            expected = round(self.container.duration / 1_000_000 * fps)
        return VideoInfo(context.width, context.height, Fraction(fps), expected)

    def _decode_all(self) -> None:
        av = import_av()
        try:
            tick = time.perf_counter()
            for frame in self.container.decode(self.stream):
                pixels = frame.to_ndarray(format="rgb24")
                self.decode_seconds += time.perf_counter() - tick
                if not self._put((self.decoded, frame.time, pixels)):
                    return
                self.decoded += 1
                if self._stop.is_set():
                    return
                if self.max_frames is not None and self.decoded >= self.max_frames:
                    break
                tick = time.perf_counter()
            self.exhausted = True
        except (av.FFmpegError, OSError, ValueError) as exc:
            self.problem = _reason(exc)
        finally:
            self._put(_END)

    def _put(self, item) -> bool:
        """Hand ``item`` to the consumer; a live source drops the oldest waiting frame rather than
        wait for the model. False when the reader was closed (nobody reads any more)."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                if self.live and item is not _END:
                    self._drop_oldest()
        return False

    def _drop_oldest(self) -> None:
        try:
            self._queue.get_nowait()
            self.dropped += 1
        except queue.Empty:
            pass

    def __iter__(self) -> Iterator[tuple[int, Optional[float], np.ndarray]]:
        while True:
            item = self._queue.get()
            if item is _END:
                return
            yield item

    def ended_early(self) -> Optional[str]:
        """Why the source gave fewer frames than it announced, or None."""
        if self.problem is not None:
            return self.problem
        if not self.exhausted:  # closed early (Ctrl-C, an error elsewhere): nothing to say
            return None
        expected = self.info.expected_frames
        wanted = expected if self.max_frames is None or expected is None else min(expected, self.max_frames)
        if wanted is not None and self.decoded < wanted - 1:  # durations round to a frame
            return f"the file announces {wanted} frames; the data ends there (truncated?)"
        return None

    def close(self) -> None:
        """Stop decoding; the container is closed once the decoder thread has left it (a stalled
        stream's thread, still inside FFmpeg, is left to end with the process)."""
        self._stop.set()
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self.container.close()


def _reason(exc: BaseException) -> str:
    """An FFmpeg/OS error as a short phrase without the errno prefix."""
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return text.splitlines()[0]


class VideoWriter:
    """An H.264 video of RGB frames at a fixed rate (``.mp4``, ``.mkv`` or ``.mov``).

    Frames of odd width or height are encoded as YUV 4:4:4 (4:2:0 needs even sizes), so the
    output keeps the input's exact size; some players (browsers, QuickTime) cannot play 4:4:4.
    """

    def __init__(self, path: Path, width: int, height: int, fps: Fraction) -> None:
        av = import_av()
        self.container = av.open(str(path), mode="w")
        self.stream = self.container.add_stream("libx264", rate=fps)
        self.stream.width, self.stream.height = width, height
        self.stream.pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"
        self.stream.options = {"crf": "20", "preset": "veryfast"}
        self._av = av

    def write(self, pixels: np.ndarray) -> None:
        """Append one uint8 [H, W, 3] RGB frame."""
        frame = self._av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")
        for packet in self.stream.encode(frame):
            self.container.mux(packet)

    def close(self) -> None:
        """Flush the encoder and finish the file (a video stopped early is still playable)."""
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()
