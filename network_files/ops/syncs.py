"""Host-device synchronisations that are known and needed, marked so that a CUDA run under
``torch.cuda.set_sync_debug_mode("error")`` fails on any other (a new, needless sync)."""
from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def allowed_sync(reason: str) -> Iterator[None]:
    """Allow host-device synchronisations inside the block (``reason`` says why one is needed):
    on CUDA, with a sync debug mode set, the mode is "default" (0) inside and restored on exit;
    a no-op otherwise."""
    if not torch.cuda.is_available() or torch.cuda.get_sync_debug_mode() == 0:
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)
