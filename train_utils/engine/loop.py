"""One training epoch; shared by every training script."""
import math
from collections import defaultdict
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from train_utils.engine import distributed as dist_utils
from train_utils.device import autocast_context, move_to_device
from train_utils.progress import Progress


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; the message names the loss terms and the images."""


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader,
    device: torch.device,
    epoch: int,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: Optional[torch.amp.GradScaler] = None,
    amp_dtype: Optional[torch.dtype] = None,
    clip_grad_norm: float = 0.0,
    print_freq: int = 50,
    describe_images: Callable[[List[int]], str] = lambda ids: ", ".join(map(str, ids)),
) -> Dict[str, float]:
    """Train for one pass over ``data_loader``; the scheduler steps once per iteration.

    Returns the mean of every loss term (averaged over ranks), the summed ``loss`` and the
    learning rate of the epoch's last step.
    Raises:
        NonFiniteLossError: on a NaN/inf loss, before the optimiser touches the weights.
    """
    model.train()
    sums: Dict[str, float] = defaultdict(float)
    count = 0
    progress = Progress(data_loader, len(data_loader), f"Epoch {epoch}", print_freq, dist_utils.is_main_process())
    for images, targets in progress:
        images, targets = move_to_device(images, targets, device)
        with autocast_context(device, amp_dtype):
            loss_dict = model(images, targets)
        loss = sum(loss_dict.values())

        reduced_values = {k: v.detach().item() for k, v in dist_utils.reduce_dict(loss_dict).items()}
        total = sum(reduced_values.values())
        if not math.isfinite(total):
            ids = [int(t["image_id"]) for t in targets]
            terms = ", ".join(f"{k}={v:.4g}" for k, v in reduced_values.items())
            raise NonFiniteLossError(
                f"non-finite loss at epoch {epoch}, iteration {count} ({terms}); images in the batch: "
                f"{describe_images(ids)}. Lower --lr, check these annotations, or disable --amp"
            )

        lr = optimizer.param_groups[0]["lr"]  # the rate this step uses
        optimizer_step(model, optimizer, loss, scaler, clip_grad_norm)
        scheduler.step()

        count += 1
        for k, v in reduced_values.items():
            sums[k] += v
        sums["loss"] += total
        progress.update(loss=total, **reduced_values, lr=lr)

    means = {k: v / max(count, 1) for k, v in sums.items()}
    means["lr"] = lr if count else optimizer.param_groups[0]["lr"]
    return means


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
