"""``--ema``: an exponential moving average of the detector's weights, as ultralytics' ModelEMA
and timm's ModelEmaV2 keep it.

After every optimiser step ``ema = d_t * ema + (1 - d_t) * w`` for every floating-point
parameter and buffer (BatchNorm statistics included); integer buffers (``num_batches_tracked``)
are copied. The decay warms up as in ultralytics, ``d_t = decay * (1 - exp(-t / tau))`` after
``t`` updates, so the early average follows the fast-moving weights instead of the random start;
``tau`` = 0 keeps ``d_t = decay``. The average lives in a float32 copy of the unwrapped module
(DDP: every rank holds the same weights and updates its own copy; rank 0 saves it). The copy
runs eager (``--compile``'s per-part overrides are dropped: they belong to the live model); the
trainer compiles it on its own under ``--compile``.
"""
import copy
import math
from typing import Any, Dict

import torch
from torch import nn

from train_utils.model.compile import drop_compiled

DEFAULT_DECAY = 0.9998  # timm's --model-ema-decay; ultralytics uses 0.9999 with the same warm-up
DEFAULT_TAU = 2000.0  # ultralytics' warm-up: d_t reaches 63% of the decay after 2000 updates


class ModelEMA:
    """The moving average of ``model``'s weights (``module``: a float32 copy in eval mode),
    starting from its weights now."""

    def __init__(self, model: nn.Module, decay: float = DEFAULT_DECAY, tau: float = DEFAULT_TAU) -> None:
        self.module = drop_compiled(copy.deepcopy(model)).float().eval()
        for param in self.module.parameters():
            param.requires_grad_(False)
        self.decay, self.tau = float(decay), float(tau)
        self.updates = 0

    def decay_at(self, updates: int) -> float:
        """``d_t`` after ``updates`` updates (the warm-up of ultralytics)."""
        if self.tau <= 0:
            return self.decay
        return self.decay * (1.0 - math.exp(-updates / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One more update from ``model``'s weights (the module EMA was made from, unwrapped)."""
        self.updates += 1
        d = self.decay_at(self.updates)
        own = self.module.state_dict()
        for key, value in model.state_dict().items():
            average = own[key]
            if not average.is_floating_point():
                average.copy_(value)
                continue
            weight = value.detach().to(average.dtype)
            # w + d * (ema - w) == d * ema + (1 - d) * w, and exact for a weight that does not move
            average.sub_(weight).mul_(d).add_(weight)

    def state_dict(self) -> Dict[str, Any]:
        """The checkpoint's ``ema`` section: ``model`` (the averaged state dict), ``updates``,
        ``decay`` and ``tau``."""
        return {"model": self.module.state_dict(), "updates": self.updates, "decay": self.decay, "tau": self.tau}

    def load_state_dict(self, stored: Dict[str, Any]) -> None:
        """Continue from a checkpoint's ``ema`` section (its weights and update count; the decay
        and warm-up stay this object's)."""
        self.module.load_state_dict(stored["model"])
        self.updates = int(stored["updates"])
