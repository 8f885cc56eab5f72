"""Counts, on the CPU, the operations that would make the host wait for a GPU.

``torch.cuda.set_sync_debug_mode`` only works on CUDA. :class:`SyncCounter` is a
``TorchDispatchMode`` (plus a ``TorchFunctionMode`` for ``Tensor.tolist``) that records every
operation whose result the host must read before it can go on: ``.item()`` / ``bool()`` /
``int()`` (``aten::_local_scalar_dense``), ``nonzero``, ``masked_select``, ``unique``, boolean-mask
indexing and assignment (their output size depends on the data), ``repeat_interleave`` without an
output size, ``bincount`` and ``tolist``. ``nonzero_static`` has a known size and is not counted.
Each record names the project source line that asked for it, so a report says where syncs are.

NMS is special: its output size is data-dependent by nature. :func:`count_nms` wraps
``network_files.ops.boxes.batched_nms`` so that each call counts once under ``"nms"`` and the
operations inside it (on the CPU torchvision's per-class loop, on CUDA one kernel) are not counted.
"""
from __future__ import annotations

import collections
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
aten = torch.ops.aten

# Operations whose output size, or value on the host, depends on tensor data.
_ALWAYS = {
    aten._local_scalar_dense.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.repeat_interleave.Tensor,
    aten.bincount.default,
}
# Indexing is data-dependent only with a boolean (or uint8) mask among the indices.
_MASK_INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


def _has_mask_index(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


def _project_site() -> str:
    """``file:line function`` of the innermost project frame (tests and the venv excluded)."""
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename)
        if ROOT in path.parents and not {"tests", ".venv"} & set(path.relative_to(ROOT).parts):
            return f"{path.relative_to(ROOT)}:{frame.lineno} {frame.name}"
    return "<outside the project>"


class _Dispatch(TorchDispatchMode):
    def __init__(self, counter: "SyncCounter") -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _ALWAYS or (func in _MASK_INDEXING and _has_mask_index(args)):
            self.counter.record(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


class _Function(TorchFunctionMode):
    def __init__(self, counter: "SyncCounter") -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.tolist:
            self.counter.record("tolist")
        return func(*args, **(kwargs or {}))


class SyncCounter:
    """``with SyncCounter() as c: ...`` then ``c.total()``, ``c.by_site``, ``c.nms``."""

    def __init__(self) -> None:
        self.by_site: collections.Counter = collections.Counter()
        self.nms = 0
        self._paused = 0
        self._modes = (_Function(self), _Dispatch(self))

    def record(self, op: str) -> None:
        if not self._paused:
            self.by_site[f"{_project_site()} [{op}]"] += 1

    def total(self, exclude: tuple[str, ...] = ()) -> int:
        """Counted syncs, NMS calls not included; sites containing any of ``exclude`` skipped."""
        return sum(n for site, n in self.by_site.items() if not any(e in site for e in exclude))

    @contextmanager
    def paused(self) -> Iterator[None]:
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def __enter__(self) -> "SyncCounter":
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

    def report(self) -> str:
        lines = [f"{n:4d}  {site}" for site, n in sorted(self.by_site.items())]
        return "\n".join(lines + [f"{self.nms:4d}  nms calls", f"{self.total():4d}  syncs besides NMS"])


@contextmanager
def count_nms(counter: SyncCounter) -> Iterator[None]:
    """Count each ``batched_nms`` call of the detector once, and nothing inside it."""
    from network_files.ops import boxes as box_ops

    original: Callable = box_ops.batched_nms

    def counted(*args, **kwargs):
        if not counter._paused:
            counter.nms += 1
        with counter.paused():
            return original(*args, **kwargs)

    box_ops.batched_nms = counted
    try:
        yield
    finally:
        box_ops.batched_nms = original

