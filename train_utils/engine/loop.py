"""One training epoch; shared by every training script."""
import math
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from network_files.ops.syncs import allowed_sync
from train_utils import distributed as dist_utils
from train_utils.data.transforms import DROPPED_KEY
from train_utils.device import autocast_context, move_to_device
from train_utils.progress import Progress


# Under float16 with a GradScaler a non-finite loss is usually an overflow the scaler handles
# (it skips the step and lowers its scale); this many in a row stop the run all the same.
MAX_CONSECUTIVE_FP16_SKIPS = 20


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
    skipped: int = 0  # float16 steps skipped for a non-finite loss (not in the sums)
    streak: int = 0  # of them, how many in a row up to the latest step
    # Boxes the augmentation removed from this epoch's samples: all ranks' up to the latest
    # sync_dropped (the same on every rank; what a checkpoint stores), and this rank's since.
    dropped_boxes: int = 0
    dropped_here: int = 0
    stepped: bool = True  # whether the latest step moved the weights (False: the GradScaler skipped it)

    def add(self, losses: Dict[str, float], lr: float) -> None:
        self.iteration += 1
        for key, value in losses.items():
            self.loss_sums[key] = self.loss_sums.get(key, 0.0) + value
        self.lr, self.last_losses, self.streak = lr, losses, 0

    def skip(self, losses: Dict[str, float], lr: float) -> None:
        """A step whose non-finite loss the GradScaler skipped: counted, not summed."""
        self.iteration += 1
        self.skipped += 1
        self.streak += 1
        self.lr, self.last_losses = lr, losses

    def sync_dropped(self, device: torch.device) -> int:
        """Add every rank's ``dropped_here`` to ``dropped_boxes`` (one all-reduce: every rank calls
        it at the same point, the epoch's end or an iteration checkpoint) and return the total."""
        here, self.dropped_here = self.dropped_here, 0
        if dist_utils.get_world_size() < 2:
            self.dropped_boxes += here
        else:
            total = dist_utils.reduce_dict({"dropped": torch.tensor(float(here), device=device)}, average=False)
            with allowed_sync("the epoch's dropped-box count, summed over the ranks"):
                self.dropped_boxes += int(total["dropped"].item())
        return self.dropped_boxes

    def means(self) -> Dict[str, float]:
        """The epoch's mean of each loss term (over the steps not skipped) and its last learning rate."""
        means = {key: value / max(self.iteration - self.skipped, 1) for key, value in self.loss_sums.items()}
        return {**means, "lr": self.lr} if self.lr is not None else means

    def to_dict(self) -> Dict[str, Any]:
        """The stored position; call :meth:`sync_dropped` first (every rank)."""
        return {"iteration": self.iteration, "loss_sums": dict(self.loss_sums), "lr": self.lr,
                "skipped": self.skipped, "streak": self.streak, "dropped_boxes": self.dropped_boxes}

    @classmethod
    def from_dict(cls, epoch: int, stored: Dict[str, Any]) -> "EpochState":
        return cls(epoch, int(stored["iteration"]), {k: float(v) for k, v in stored["loss_sums"].items()},
                   stored.get("lr"), skipped=int(stored.get("skipped", 0)), streak=int(stored.get("streak", 0)),
                   dropped_boxes=int(stored.get("dropped_boxes", 0)))


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
    ``loss``, the learning rate of the epoch's last step and ``augment_dropped_boxes``: the boxes
    the training transforms removed from the epoch's samples, summed over ranks (each target's
    count is taken out before the model sees it).
    Raises:
        NonFiniteLossError: on a NaN/inf loss, before the optimiser touches the weights; with an
            enabled GradScaler (float16) only at the ``MAX_CONSECUTIVE_FP16_SKIPS``-th in a row,
            the ones before are skipped steps (the scaler finds the non-finite gradients, skips
            ``optimizer.step`` and lowers its scale).
    """
    model.train()
    progress = Progress(data_loader, state.iteration + len(data_loader), f"Epoch {state.epoch}", print_freq,
                        dist_utils.is_main_process(), start=state.iteration)
    for images, targets in progress:
        state.dropped_here += dropped_boxes(targets)
        images, targets = move_to_device(images, targets, device)
        with autocast_context(device, amp_dtype):
            loss_dict = model(images, targets)
        loss = sum(loss_dict.values())
        backward(optimizer, loss, scaler)

        # Read after backward() has been queued, before the step: one transfer for all the terms.
        reduced_values = read_losses(dist_utils.reduce_dict(loss_dict))
        total = sum(reduced_values.values())
        finite = math.isfinite(total)
        if not finite and not skippable(scaler, state):
            optimizer.zero_grad(set_to_none=True)  # the run stops with the weights and no gradient touched
            raise non_finite_loss(state, reduced_values, describe_images([int(t["image_id"]) for t in targets]))

        lr = optimizer.param_groups[0]["lr"]  # the rate this step uses
        state.stepped = optimizer_step(model, optimizer, scaler, clip_grad_norm)
        scheduler.step()

        if finite:
            state.add({**reduced_values, "loss": total}, lr)
        else:
            state.skip({**reduced_values, "loss": total}, lr)
            report_skip(state, scaler)
        progress.update(loss=total, **reduced_values, lr=lr)
        after_step(state)

    return {"lr": optimizer.param_groups[0]["lr"], **state.means(), DROPPED_KEY: state.sync_dropped(device)}


def dropped_boxes(targets: List[Dict[str, torch.Tensor]]) -> int:
    """Take the augmentation's dropped-box counts (host tensors, from the loader) out of a
    batch's targets; their sum over the batch."""
    return sum(int(target.pop(DROPPED_KEY, 0)) for target in targets)


def skippable(scaler: Optional[torch.amp.GradScaler], state: EpochState) -> bool:
    """Whether a non-finite loss is left to the GradScaler: float16 training (an enabled scaler)
    and fewer than ``MAX_CONSECUTIVE_FP16_SKIPS - 1`` skipped in a row before it."""
    return scaler is not None and scaler.is_enabled() and state.streak + 1 < MAX_CONSECUTIVE_FP16_SKIPS


def report_skip(state: EpochState, scaler: torch.amp.GradScaler) -> None:
    """One warning line per skipped step (rank 0)."""
    if dist_utils.is_main_process():
        print(f"warning: non-finite loss at epoch {state.epoch}, iteration {state.iteration - 1} under float16: "
              f"step skipped, GradScaler scale now {scaler.get_scale():g} ({state.streak} in a row; "
              f"{MAX_CONSECUTIVE_FP16_SKIPS} stop the run)", file=sys.stderr)


def non_finite_loss(state: EpochState, losses: Dict[str, float], images: str) -> NonFiniteLossError:
    """The error for a NaN/inf loss: where, which terms, which images, what to try."""
    terms = ", ".join(f"{k}={v:.4g}" for k, v in losses.items())
    return NonFiniteLossError(f"non-finite loss at epoch {state.epoch}, iteration {state.iteration} ({terms}); "
                              f"images in the batch: {images}. Lower --lr, check these annotations, or disable --amp")


def read_losses(losses: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """The loss terms (single-element tensors) as Python floats, read with one host transfer (one
    synchronisation on CUDA) instead of one per term; the same values ``.item()`` gives each
    (``cat`` only widens mixed float dtypes, exactly)."""
    stacked = torch.cat([value.detach().reshape(1) for value in losses.values()])
    with allowed_sync("loss values for the log"):
        values = stacked.tolist()
    return dict(zip(losses, values))


def backward(optimizer: torch.optim.Optimizer, loss: torch.Tensor, scaler: Optional[torch.amp.GradScaler]) -> None:
    """Fresh gradients of ``loss`` (scaled by the GradScaler, CUDA AMP, when there is one)."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
    else:
        scaler.scale(loss).backward()


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Optional[torch.amp.GradScaler],
                   clip_grad_norm: float) -> bool:
    """One optimiser step on the gradients of :func:`backward`, through the GradScaler when there
    is one, with the gradient norm clipped when ``clip_grad_norm`` > 0. Returns whether the
    weights moved: False when the GradScaler skipped the step for non-finite gradients (it then
    lowers its scale; a finite loss can still have them)."""
    if scaler is None:
        if clip_grad_norm > 0:
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
        optimizer.step()
        return True
    with allowed_sync("the GradScaler's scale before the step"):
        scale = scaler.get_scale()
    if clip_grad_norm > 0:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    with allowed_sync("whether the GradScaler skipped the step (its scale went down)"):
        return scaler.get_scale() >= scale
