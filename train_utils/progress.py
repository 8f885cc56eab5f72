"""Progress reporting: a tqdm bar on a terminal, plain log lines (with ETA) otherwise."""
import sys
import time
from datetime import timedelta
from typing import Dict, Iterable, Iterator, Optional

from tqdm import tqdm


def _format(values: Dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4g}" for k, v in values.items())


class Progress:
    """Wraps an iterable; call :meth:`update` with the latest numbers after each item.

    Args:
        iterable: what to iterate.
        total: number of items (for the ETA); None when unknown (a live stream).
        desc: prefix of every line, e.g. ``"Epoch 3"``.
        print_freq: a plain line every this many items when not on a terminal.
        enabled: False on non-zero ranks: iterate silently.
        start: items already done before this pass (a resumed epoch counts on from there).
    """

    def __init__(self, iterable: Iterable, total: Optional[int], desc: str, print_freq: int = 50, enabled: bool = True,
                 start: int = 0) -> None:
        self.iterable = iterable
        self.start = start
        self.total = total
        self.desc = desc
        self.print_freq = max(int(print_freq), 1)
        self.enabled = enabled
        self.use_bar = enabled and sys.stderr.isatty()
        self.values: Dict[str, float] = {}
        self._bar: Optional[tqdm] = None

    def __iter__(self) -> Iterator:
        start = time.time()
        if self.use_bar:
            self._bar = tqdm(self.iterable, total=self.total, initial=self.start, desc=self.desc, dynamic_ncols=True,
                             leave=True)
            yield from self._bar
            return
        count = self.start
        for item in self.iterable:
            yield item
            count += 1
            if self.enabled and (count % self.print_freq == 0 or count == self.total):
                print(f"{self.desc} {self._position(count, time.time() - start)} {_format(self.values)}".rstrip(),
                      flush=True)

    def _position(self, count: int, elapsed: float) -> str:
        """``[count/total] eta ... elapsed ...``, or ``[count] elapsed ...`` without a total."""
        if self.total is None:
            return f"[{count}] elapsed {timedelta(seconds=int(elapsed))}"
        eta = elapsed / (count - self.start) * max(self.total - count, 0)
        return f"[{count}/{self.total}] eta {timedelta(seconds=int(eta))} elapsed {timedelta(seconds=int(elapsed))}"

    def update(self, **values: float) -> None:
        self.values = values
        if self._bar is not None:
            self._bar.set_postfix_str(_format(values), refresh=False)
