"""Learning-rate schedule as one pure function of the global iteration.

Warmup (linear) is multiplied with the main schedule (``step``, ``multistep`` or ``cosine``).
Because the learning rate depends only on the iteration counter, resuming from a checkpoint
reproduces exactly the rates an uninterrupted run would have used.
"""
import math
from typing import Sequence

import torch


class WarmupSchedule:
    """Callable ``iteration -> LR multiplier`` (picklable, so LambdaLR can save it).

    Args:
        iters_per_epoch: optimiser steps in one epoch.
        epochs: total epochs of the run.
        kind: ``"step"`` (x gamma every ``step_size`` epochs), ``"multistep"`` (x gamma at each
            epoch of ``milestones``) or ``"cosine"`` (to zero at the end of the run).
        warmup_iters: linear warmup length in iterations (0 disables it).
        warmup_factor: multiplier at iteration 0.
    """

    def __init__(
        self,
        iters_per_epoch: int,
        epochs: int,
        kind: str = "multistep",
        milestones: Sequence[int] = (),
        step_size: int = 1,
        gamma: float = 0.1,
        warmup_iters: int = 0,
        warmup_factor: float = 1e-3,
    ) -> None:
        if kind not in ("step", "multistep", "cosine"):
            raise ValueError(f"unknown lr scheduler '{kind}' (choose step, multistep or cosine)")
        self.iters_per_epoch = max(int(iters_per_epoch), 1)
        self.epochs = int(epochs)
        self.kind = kind
        self.milestones = sorted(int(m) for m in milestones)
        self.step_size = max(int(step_size), 1)
        self.gamma = float(gamma)
        self.warmup_iters = int(warmup_iters)
        self.warmup_factor = float(warmup_factor)

    def __call__(self, iteration: int) -> float:
        epoch = iteration // self.iters_per_epoch
        if self.kind == "step":
            factor = self.gamma ** (epoch // self.step_size)
        elif self.kind == "multistep":
            factor = self.gamma ** sum(1 for m in self.milestones if epoch >= m)
        else:
            total = self.epochs * self.iters_per_epoch
            factor = 0.5 * (1.0 + math.cos(math.pi * min(iteration, total) / total))
        if iteration < self.warmup_iters:
            alpha = iteration / self.warmup_iters
            factor *= self.warmup_factor * (1 - alpha) + alpha
        return factor


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: WarmupSchedule) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepped once per iteration."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
