"""predict.py's inputs and outputs: the files that patterns name, an output name per input, camera
and stream, the ``--save-json`` path, and a dataset that decodes images without raising."""
from __future__ import annotations

import argparse
import glob
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from train_utils.data.images import DECODE_ERRORS, decode_image
from train_utils.inference.video import is_video_file

JPEG_SUFFIXES = (".jpg", ".jpeg")


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


def single_item(item):
    """DataLoader collate for batch_size=None: hand the sample over unchanged."""
    return item
