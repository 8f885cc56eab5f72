"""The checkpoint format: one versioned schema, written and read here only.

On disk (format 4) a checkpoint is a dict of tensors and plain values, loadable with
``torch.load(..., weights_only=True)``:

| key | what |
| --- | --- |
| ``format_version`` | 4 |
| ``model`` | the detector's state dict (torchvision's keys): the trained (raw) weights |
| ``ema`` | None, or with ``--ema`` the moving average of the weights: ``{"model": state dict (float32),
  "updates": optimiser steps averaged, "decay", "tau"}`` (see ``train_utils.engine.ema``); what
  :meth:`Checkpoint.weights` gives by default |
| ``model_config`` | :meth:`ModelConfig.to_dict` |
| ``class_names`` | label ``i`` is ``class_names[i - 1]`` |
| ``epoch`` | the last completed epoch (counted from 0; -1 before the first one ends) |
| ``progress`` | None at an epoch end; inside an epoch (an iteration checkpoint): ``{"iteration": batches of
  epoch ``epoch + 1`` already trained, "loss_sums": the running sums of the loss terms, "lr": the last
  step's rate, "world_size"}``, plus ``"end_pending": True`` when all its batches are trained but its
  end (evaluation, run log, epoch files) is not done: a stop came at the epoch's end |
| ``optimizer``, ``lr_scheduler``, ``scaler`` | training state (``scaler``: None without CUDA AMP) |
| ``rng_state`` | every rank's random states, a list indexed by rank (see ``train_utils.engine.rng``) |
| ``args`` | the training flags |
| ``data`` | the training data: ``format``, ``path``, ``year``, ``train_split``, ``val_split``, ``classes_json`` |
| ``metrics`` | ``{"coco_stats": the 12 COCO numbers or None, "best_ap50": float}`` |
| ``plugins`` | modules the run imported with ``--plugin`` (backbones, formats) |

:func:`read_checkpoint` also reads format 3 (no ``ema``), format 2 (no ``progress``, ``rng_state`` torch's CPU state alone),
format 1 (format 2's keys without ``format_version``, the metrics at the top level and the backbone
options inside a flat ``model_config``), WZ-style files
(``{"model", "optimizer", "lr_scheduler", "epoch"}``) and bare state dicts such as the official
torchvision files. Every problem is a :class:`WeightFileError` whose one-line message names the file.
Files are written atomically: to a temporary name, then renamed over the target; a failed write
(disk full, read-only folder) is a :class:`CheckpointWriteError` that leaves the target as it was.
:func:`copy_checkpoint` makes independent copies (no shared storage: damaging one leaves the
other readable), as reflinks where the file system offers them.
"""
import fcntl
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Dict, Iterator, List, Optional, Tuple

import torch

from backbone.weight_files import WeightFileError, read_weight_file, state_dict_of
from network_files import FasterRCNN
from train_utils.model.builder import official_frozen_bn_eps, set_frozen_bn_eps
from train_utils.model.config import ModelConfig

FORMAT_VERSION = 4
_TRAINING_KEYS = ("optimizer", "lr_scheduler", "scaler", "rng_state", "progress", "ema")
WEIGHT_VARIANTS = ("ema", "raw")  # --weights-variant: the moving average (--ema runs) or the trained weights
_NUMBERED = re.compile(r"model-(\d+)\.pth")
_PREDICTOR_PREFIX = "roi_heads.box_predictor."
END_PENDING = "end_pending"  # the progress key of an epoch trained but not yet evaluated
FICLONE = 0x40049409  # Linux's ioctl that makes a file share another's blocks copy-on-write (linux/fs.h)


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the message names the file and says what is intact."""

    def __init__(self, message: str, errno: Optional[int] = None) -> None:
        super().__init__(message)
        self.errno = errno


@dataclass
class Checkpoint:
    """A detector's weights and what travels with them (None where the file has no such part)."""

    model: Dict[str, torch.Tensor]
    config: Optional[ModelConfig] = None
    class_names: Optional[List[str]] = None
    epoch: Optional[int] = None
    optimizer: Optional[Dict[str, Any]] = None
    lr_scheduler: Optional[Dict[str, Any]] = None
    scaler: Optional[Dict[str, Any]] = None
    rng_state: Any = None  # format 3: a list of per-rank states; formats 1-2: a CPU state tensor
    progress: Optional[Dict[str, Any]] = None
    ema: Optional[Dict[str, Any]] = None  # {"model", "updates", "decay", "tau"} of an --ema run
    args: Dict[str, Any] = field(default_factory=dict)
    data: Dict[str, Any] = field(default_factory=dict)
    coco_stats: Optional[List[float]] = None
    best_ap50: float = -1.0
    plugins: List[str] = field(default_factory=list)

    def can_resume(self) -> bool:
        """Whether training can continue from this file (our training checkpoints)."""
        return None not in (self.config, self.epoch, self.optimizer, self.lr_scheduler)

    def weights(self, path: str, variant: Optional[str] = None) -> Tuple[Dict[str, torch.Tensor], str]:
        """The state dict to run and its variant: ``variant`` 'ema' or 'raw', or None for the EMA
        weights when the file holds them (an ``--ema`` run) and the raw ones otherwise."""
        if variant not in (None, *WEIGHT_VARIANTS):
            raise ValueError(f"--weights-variant {variant!r}: choose one of {', '.join(WEIGHT_VARIANTS)}")
        if variant == "ema" and self.ema is None:
            raise ValueError(f"{path} holds no EMA weights (trained without --ema): use --weights-variant raw")
        if self.ema is not None and variant != "raw":
            return self.ema["model"], "ema"
        return self.model, "raw"

    def to_dict(self) -> Dict[str, Any]:
        """The on-disk form (see the module docstring)."""
        return {
            "format_version": FORMAT_VERSION,
            "model": self.model,
            "model_config": self.config.to_dict() if self.config is not None else None,
            "class_names": self.class_names,
            "epoch": self.epoch,
            **{key: getattr(self, key) for key in _TRAINING_KEYS},
            "args": self.args,
            "data": self.data,
            "metrics": {"coco_stats": self.coco_stats, "best_ap50": self.best_ap50},
            "plugins": self.plugins,
        }


def save_checkpoint(checkpoint: Checkpoint, path: str) -> None:
    """Write ``checkpoint`` to ``path`` atomically.

    Raises:
        CheckpointWriteError: the write failed; ``path`` is as it was before the call.
    """
    try:
        save_atomic(checkpoint.to_dict(), path)
    except (OSError, RuntimeError) as exc:
        # torch.save's zip writer may report a failed write as a RuntimeError raised on top of it
        failure = exc if isinstance(exc, OSError) else exc.__context__
        if not isinstance(failure, OSError):
            raise
        raise CheckpointWriteError(f"cannot write {path}: {failure.strerror or failure}; the file there before "
                                   "(if any) is intact", failure.errno) from None


def copy_checkpoint(source: str, target: str) -> None:
    """Make ``target`` an independent copy of ``source``, atomically: a reflink where the file
    system offers one (btrfs, XFS, ...: blocks shared copy-on-write, nothing written), else a
    copy inside the kernel (``copy_file_range``), else through Python.

    Raises:
        CheckpointWriteError: the copy failed; ``target`` is as it was before the call.
    """
    try:
        with temporary_path(target) as tmp, open(source, "rb") as src, open(tmp, "wb") as dst:
            _clone_or_copy(src, dst)
    except OSError as exc:
        raise CheckpointWriteError(f"cannot write {target}: {exc.strerror or exc}; {source} is intact",
                                   exc.errno) from None


def _clone_or_copy(src: BinaryIO, dst: BinaryIO) -> None:
    """``src``'s bytes into the empty ``dst``, by the cheapest means available."""
    try:
        fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
        return
    except OSError:
        pass  # no reflinks here (ext4, tmpfs, another file system for the target)
    size, copied = os.fstat(src.fileno()).st_size, 0
    try:
        while copied < size:
            step = os.copy_file_range(src.fileno(), dst.fileno(), size - copied, copied, copied)
            if step == 0:  # the kernel gave up early: the rest by plain reads and writes
                break
            copied += step
    except (AttributeError, OSError):  # no copy_file_range (not Linux), or not between these files
        pass
    if copied < size:
        src.seek(copied)
        dst.seek(copied)
        shutil.copyfileobj(src, dst)
    dst.flush()
    if os.fstat(dst.fileno()).st_size != size:
        raise OSError(f"copied {os.fstat(dst.fileno()).st_size} of {size} bytes")


def read_checkpoint(path: str) -> Checkpoint:
    """Any file this project can use as detector weights (see the module docstring)."""
    raw = read_weight_file(path)
    if isinstance(raw, dict) and "model_config" in raw:
        return _from_training_file(raw, path)
    return Checkpoint(model=state_dict_of(raw, path), epoch=_int_or_none(raw, "epoch"),
                      optimizer=_get(raw, "optimizer"), lr_scheduler=_get(raw, "lr_scheduler"))


def _from_training_file(raw: Dict[str, Any], path: str) -> Checkpoint:
    """Format 1 to ``FORMAT_VERSION`` (4) of our training scripts (see the module docstring)."""
    version = raw.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise WeightFileError(f"{path}: checkpoint format {version} is newer than this code reads "
                              f"({FORMAT_VERSION}); update the project")
    metrics = raw.get("metrics") if version >= 2 else raw
    try:
        config = ModelConfig.from_dict(raw["model_config"]) if raw["model_config"] is not None else None
    except (ValueError, TypeError) as exc:
        plugins = " ".join(f"--plugin {name}" for name in raw.get("plugins") or [])
        hint = f" (it was trained with {plugins}: pass the same)" if plugins else ""
        raise WeightFileError(f"{path}: unusable model_config: {exc}{hint}") from None
    return Checkpoint(
        model=state_dict_of(raw, path),
        config=config,
        class_names=list(raw["class_names"]) if raw.get("class_names") is not None else None,
        epoch=_int_or_none(raw, "epoch"),
        **{key: raw.get(key) for key in _TRAINING_KEYS},
        args=dict(raw.get("args") or {}),
        data=dict(raw["data"]) if version >= 2 else _data_of_format_1(raw.get("args") or {}),
        coco_stats=(metrics or {}).get("coco_stats"),
        best_ap50=float((metrics or {}).get("best_ap50", -1.0)),
        plugins=list(raw.get("plugins") or []),
    )


def _data_of_format_1(args: Dict[str, Any]) -> Dict[str, Any]:
    """The data section of a format-1 file, from the training flags it stored."""
    names = {"format": "dataset_format", "path": "data_path", "year": "year", "train_split": "train_split",
             "val_split": "val_split", "classes_json": "classes_json"}
    return {key: args.get(flag) for key, flag in names.items() if args.get(flag) is not None}


def _get(raw: Any, key: str) -> Any:
    return raw.get(key) if isinstance(raw, dict) else None


def _int_or_none(raw: Any, key: str) -> Optional[int]:
    value = _get(raw, key)
    return int(value) if isinstance(value, (int, float)) else None


def load_detector_weights(model: FasterRCNN, path: str, config: ModelConfig) -> ModelConfig:
    """Fine-tune from a detector file (the official COCO file, a WZ-style ``{"model": ...}`` file
    or one of ours): every matching tensor is loaded; a box predictor with another class count
    stays freshly initialised; the EMA weights of an ``--ema`` run (said in one line). Returns
    ``config`` with the file's FrozenBatchNorm eps."""
    stored = read_checkpoint(path)
    state, variant = stored.weights(path)
    if variant == "ema":
        print(f"{path}: starting from its EMA weights")
    own = model.state_dict()
    predictor_keys = [k for k in state if k.startswith(_PREDICTOR_PREFIX)]
    if any(k in own and own[k].shape != state[k].shape for k in predictor_keys):
        state = {k: v for k, v in state.items() if k not in predictor_keys}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(_PREDICTOR_PREFIX)]
    if missing or unexpected:
        raise ValueError(f"{path} does not fit the '{config.backbone}' detector: {len(missing)} missing keys "
                         f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    eps = stored.config.frozen_bn_eps if stored.config else official_frozen_bn_eps(path, config.backbone)
    if eps is None:
        return config
    set_frozen_bn_eps(model, eps)
    return config.replace(frozen_bn_eps=eps)


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
    with temporary_path(path) as tmp, open(tmp, "wb") as handle:
        torch.save(obj, handle)  # through a Python file: a failed write raises the OSError (errno kept)


def checkpoint_candidates(output_dir: str) -> List[str]:
    """The checkpoints ``--resume auto`` may continue from, newest first: ``last.pth``, then the
    ``model-<epoch>.pth`` files by falling epoch."""
    folder = Path(output_dir)
    numbered = sorted(((int(m.group(1)), file) for file in folder.glob("model-*.pth")
                       if (m := _NUMBERED.fullmatch(file.name))), reverse=True)
    last = folder / "last.pth"
    return ([str(last)] if last.is_file() else []) + [str(file) for _, file in numbered]


def prune_checkpoints(output_dir: str, keep: int) -> List[str]:
    """Delete all but the newest ``keep`` ``model-<epoch>.pth`` files (``keep`` <= 0: keep all);
    ``last.pth`` and ``best.pth`` are separate names and always stay. Returns the deleted paths."""
    numbered = checkpoint_candidates(output_dir)
    numbered = [path for path in numbered if _NUMBERED.fullmatch(Path(path).name)]
    doomed = numbered[keep:] if keep > 0 else []
    for path in doomed:
        os.remove(path)
    return doomed
