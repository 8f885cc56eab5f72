"""Atomic checkpoint files: written to a temporary name, then renamed over the target."""
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import torch


@contextmanager
def temporary_path(path: str) -> Iterator[Path]:
    """A temporary file next to ``path`` for the block to write; renamed over ``path`` (after an
    fsync) when the block succeeds, removed when it fails, so ``path`` is never left truncated."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp creates 0600; give the usual mode
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_atomic(obj: Any, path: str) -> None:
    """``torch.save`` to ``path`` so that a crash never leaves a truncated file behind."""
    with temporary_path(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path: str, map_location: str = "cpu") -> Dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``), with a clear error when it is unusable."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated file, not a torch file, foreign pickled objects
        raise ValueError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0]}") from None


def find_last_checkpoint(output_dir: str) -> Optional[str]:
    """``last.pth`` if present, else the ``model-<epoch>.pth`` with the highest epoch, else None."""
    last = Path(output_dir) / "last.pth"
    if last.is_file():
        return str(last)
    numbered = []
    for file in Path(output_dir).glob("model-*.pth"):
        match = re.fullmatch(r"model-(\d+)\.pth", file.name)
        if match:
            numbered.append((int(match.group(1)), file))
    return str(max(numbered)[1]) if numbered else None
