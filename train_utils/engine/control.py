"""When a run saves inside an epoch and when it stops early: ``--checkpoint-every`` and signals.

The first SIGTERM, SIGINT or SIGUSR1 (SLURM's usual warning before a preemption) asks the run to
stop: the current iteration finishes, an iteration checkpoint is written and the process exits
with 128 + the signal number. At an epoch's end nothing else runs after the request: an
evaluation in progress is dropped (:class:`PolledLoader` asks before each image) and the
checkpoint of the trained epoch, marked as not yet evaluated, is written; curves, images and
pruning are skipped. A second signal stops at once (:class:`ImmediateStop`). Under
torch.distributed every rank acts at the same point: :meth:`RunControl.poll` and
:meth:`RunControl.stop_requested` agree through one small collective.
"""
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass
from types import FrameType
from typing import Dict, Iterable, Iterator, Optional

from train_utils import distributed as dist_utils

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name))
DEFAULT_CHECKPOINT_EVERY = "15m"


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: workers leave the stop signals to the main process (which
    shuts them down), so a SIGINT or a SIGTERM sent to the whole process group cannot kill a
    worker in the middle of the last iteration."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


class StopRequested(Exception):
    """A stop was requested (on some rank) while the epoch's end was running: drop that work."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class TrainingStopped(Exception):
    """The run stopped on a signal after writing its iteration checkpoint."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum


class ImmediateStop(KeyboardInterrupt):
    """A second stop signal: leave now (atomic writes in progress are discarded, not truncated)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@dataclass(frozen=True)
class CheckpointEvery:
    """``--checkpoint-every``: a number of iterations, or a time (``90s``, ``15m``, ``1h``); 0 = never."""

    iterations: int = 0
    seconds: float = 0.0

    @classmethod
    def parse(cls, text: str) -> "CheckpointEvery":
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(text).lower())
        if str(text).lower() in ("off", "none") or (match and float(match.group(1)) == 0):
            return cls()
        if not match or (not match.group(2) and "." in match.group(1)):
            raise ValueError(f"--checkpoint-every {text!r}: give iterations (500), a time (90s, 15m, 1h) or 0")
        value, unit = float(match.group(1)), match.group(2)
        if not unit:
            return cls(iterations=int(value))
        return cls(seconds=value * {"s": 1, "m": 60, "h": 3600}[unit])

    def due(self, iterations_since: int, seconds_since: float) -> bool:
        return bool((self.iterations and iterations_since >= self.iterations)
                    or (self.seconds and seconds_since >= self.seconds))


class StopSignals:
    """Installs the stop handlers (main thread only) and remembers the first signal."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: Dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, _frame: Optional[FrameType]) -> None:
        if self.signum is not None:
            raise ImmediateStop(signum)
        self.signum = signum
        if dist_utils.is_main_process():  # os.write: print could re-enter a write in progress
            _write_now(f"\n{signal.Signals(signum).name} received: finishing this iteration (an evaluation "
                       "is dropped) and writing a checkpoint (send it again to stop at once)\n")


def _write_now(text: str) -> None:
    """Write ``text`` to standard output's file descriptor (fd 1 where sys.stdout has none, as
    in a notebook); never raises, it runs inside a signal handler."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        fd = 1
    try:
        os.write(fd, text.encode())
    except OSError:
        pass


class RunControl:
    """Per iteration: is an iteration checkpoint due, has a stop been asked for (by any rank)?"""

    def __init__(self, every: CheckpointEvery, signals: StopSignals) -> None:
        self.every = every
        self.signals = signals
        self.mark()

    def mark(self) -> None:
        """A checkpoint was just written: restart the counters."""
        self.since_iterations, self.since_time = 0, time.monotonic()

    def poll(self) -> Dict[str, int]:
        """Count one iteration and decide, the same on every rank: ``{"save": 0/1, "stop": signum or 0}``."""
        self.since_iterations += 1
        save = self.every.due(self.since_iterations, time.monotonic() - self.since_time)
        save, stop = dist_utils.agree_max([int(save), self.signals.signum or 0])
        return {"save": int(save or stop), "stop": int(stop)}

    def stop_requested(self) -> int:
        """A signal number when any rank was asked to stop (outside the training loop)."""
        return int(dist_utils.agree_max([self.signals.signum or 0])[0])

    def polled(self, loader: Iterable) -> "PolledLoader":
        """``loader`` asking, before each batch, whether a stop was requested on any rank."""
        return PolledLoader(loader, self)


class PolledLoader:
    """Iterates a loader, asking :meth:`RunControl.stop_requested` before each batch and before
    ending (every rank as often: the shards have equal lengths); raises :class:`StopRequested`."""

    def __init__(self, loader: Iterable, control: RunControl) -> None:
        self.loader, self.control = loader, control

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        batches = iter(self.loader)
        while True:
            signum = self.control.stop_requested()
            if signum:
                raise StopRequested(signum)
            try:
                batch = next(batches)
            except StopIteration:
                return
            yield batch
