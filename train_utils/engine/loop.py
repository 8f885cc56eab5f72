"""One training epoch; shared by every training script."""
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from train_utils import distributed as dist_utils
from train_utils.device import autocast_context, move_to_device
from train_utils.progress import Progress


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; the message names the loss terms and the images."""


@dataclass
class EpochState:
    """Where an epoch is: batches trained so far and the running sums of the logged values (what
    an iteration checkpoint stores, so a resumed epoch reports the uninterrupted means)."""

    epoch: int
    iteration: int = 0
    loss_sums: Dict[str, float] = field(default_factory=dict)
    lr: Optional[float] = None  # the rate of the latest step
    last_losses: Dict[str, float] = field(default_factory=dict)  # the latest step's losses

    def add(self, losses: Dict[str, float], lr: float) -> None:
        self.iteration += 1
        for key, value in losses.items():
            self.loss_sums[key] = self.loss_sums.get(key, 0.0) + value
        self.lr, self.last_losses = lr, losses

    def means(self) -> Dict[str, float]:
        """The epoch's mean of each loss term and its last learning rate."""
        means = {key: value / max(self.iteration, 1) for key, value in self.loss_sums.items()}
        return {**means, "lr": self.lr} if self.lr is not None else means

    def to_dict(self) -> Dict[str, Any]:
        return {"iteration": self.iteration, "loss_sums": dict(self.loss_sums), "lr": self.lr}

    @classmethod
    def from_dict(cls, epoch: int, stored: Dict[str, Any]) -> "EpochState":
        return cls(epoch, int(stored["iteration"]), {k: float(v) for k, v in stored["loss_sums"].items()},
                   stored.get("lr"))


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader,
    device: torch.device,
    state: EpochState,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: Optional[torch.amp.GradScaler] = None,
    amp_dtype: Optional[torch.dtype] = None,
    clip_grad_norm: float = 0.0,
    print_freq: int = 50,
    describe_images: Callable[[List[int]], str] = lambda ids: ", ".join(map(str, ids)),
    after_step: Callable[[EpochState], None] = lambda state: None,
) -> Dict[str, float]:
    """Train over ``data_loader`` (the rest of the epoch after ``state.iteration`` batches); the
    scheduler steps once per iteration and ``after_step(state)`` runs after each (it may raise to
    stop the run after saving).

    Returns the mean of every loss term over the whole epoch (averaged over ranks), the summed
    ``loss`` and the learning rate of the epoch's last step.
    Raises:
        NonFiniteLossError: on a NaN/inf loss, before the optimiser touches the weights.
    """
    model.train()
    progress = Progress(data_loader, state.iteration + len(data_loader), f"Epoch {state.epoch}", print_freq,
                        dist_utils.is_main_process(), start=state.iteration)
    for images, targets in progress:
        images, targets = move_to_device(images, targets, device)
        with autocast_context(device, amp_dtype):
            loss_dict = model(images, targets)
        loss = sum(loss_dict.values())

        reduced_values = {k: v.detach().item() for k, v in dist_utils.reduce_dict(loss_dict).items()}
        total = sum(reduced_values.values())
        if not math.isfinite(total):
            raise non_finite_loss(state, reduced_values, describe_images([int(t["image_id"]) for t in targets]))

        lr = optimizer.param_groups[0]["lr"]  # the rate this step uses
        optimizer_step(model, optimizer, loss, scaler, clip_grad_norm)
        scheduler.step()

        state.add({**reduced_values, "loss": total}, lr)
        progress.update(loss=total, **reduced_values, lr=lr)
        after_step(state)

    return {"lr": optimizer.param_groups[0]["lr"], **state.means()}


def non_finite_loss(state: EpochState, losses: Dict[str, float], images: str) -> NonFiniteLossError:
    """The error for a NaN/inf loss: where, which terms, which images, what to try."""
    terms = ", ".join(f"{k}={v:.4g}" for k, v in losses.items())
    return NonFiniteLossError(f"non-finite loss at epoch {state.epoch}, iteration {state.iteration} ({terms}); "
                              f"images in the batch: {images}. Lower --lr, check these annotations, or disable --amp")


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor,
                   scaler: Optional[torch.amp.GradScaler], clip_grad_norm: float) -> None:
    """Backward and one optimiser step, through the GradScaler (CUDA AMP) when there is one, with
    the gradient norm clipped when ``clip_grad_norm`` > 0."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        if clip_grad_norm > 0:
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
        optimizer.step()
        return
    scaler.scale(loss).backward()
    if clip_grad_norm > 0:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
    scaler.step(optimizer)
    scaler.update()
