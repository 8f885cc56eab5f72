"""Host-device synchronisations the detector needs, marked as such.

A GPU runs ahead of the host until the host reads a result (``.item()``, ``.tolist()``, the size
of a ``nonzero``): then the host waits for every queued kernel. The detector keeps only the reads
it cannot avoid (an NMS output size, the counts ``randperm`` needs, one count read per stage) and
wraps each in :func:`allowed_sync`, so that a run under ``torch.cuda.set_sync_debug_mode("error")``
fails on any other, newly introduced, sync.
"""
from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def allowed_sync(reason: str) -> Iterator[None]:
    """Let the block synchronise even under CUDA's sync debug mode (restored on exit); ``reason``
    says why the sync is needed. A no-op without CUDA or with the debug mode off."""
    if not torch.cuda.is_available() or torch.cuda.get_sync_debug_mode() == 0:
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)
