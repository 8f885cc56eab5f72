"""One training epoch and one COCO evaluation pass; shared by every training script."""
import math
import time
from collections import defaultdict
from contextlib import nullcontext
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from . import distributed_utils as dist_utils
from .coco_eval import CocoEvaluator
from .progress import Progress


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; the message names the loss terms and the images."""


def autocast_context(device: torch.device, enabled: bool):
    """fp16 autocast on CUDA, bf16 on CPU; a no-op when disabled."""
    if not enabled:
        return nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def move_to_device(images: Sequence[torch.Tensor], targets: Sequence[Dict], device: torch.device):
    non_blocking = device.type == "cuda"
    images = [img.to(device, non_blocking=non_blocking) for img in images]
    targets = [{k: v.to(device, non_blocking=non_blocking) for k, v in t.items()} for t in targets]
    return images, targets


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader,
    device: torch.device,
    epoch: int,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: Optional[torch.amp.GradScaler] = None,
    amp: bool = False,
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
        with autocast_context(device, amp):
            loss_dict = model(images, targets)
        loss = sum(loss_dict.values())

        reduced = dist_utils.reduce_dict(loss_dict)
        reduced_values = {k: v.detach().item() for k, v in reduced.items()}
        total = sum(reduced_values.values())
        if not math.isfinite(total):
            ids = [int(t["image_id"]) for t in targets]
            terms = ", ".join(f"{k}={v:.4g}" for k, v in reduced_values.items())
            raise NonFiniteLossError(
                f"non-finite loss at epoch {epoch}, iteration {count} ({terms}); images in the batch: "
                f"{describe_images(ids)}. Lower --lr, check these annotations, or disable --amp"
            )

        lr = optimizer.param_groups[0]["lr"]  # the rate this step uses
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            if clip_grad_norm > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if clip_grad_norm > 0:
                nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
            optimizer.step()
        scheduler.step()

        count += 1
        for k, v in reduced_values.items():
            sums[k] += v
        sums["loss"] += total
        progress.update(loss=total, **reduced_values, lr=lr)

    means = {k: v / max(count, 1) for k, v in sums.items()}
    means["lr"] = lr if count else optimizer.param_groups[0]["lr"]
    return means


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    data_loader,
    device: torch.device,
    coco_gt,
    amp: bool = False,
    print_freq: int = 50,
) -> CocoEvaluator:
    """Run the model over ``data_loader`` and score it with pycocotools (every rank's shard is
    gathered; each image counts once). Returns the accumulated, summarised evaluator."""
    model.eval()
    evaluator = CocoEvaluator(coco_gt, ("bbox",))
    start, images_seen = time.time(), 0
    progress = Progress(data_loader, len(data_loader), "Test", print_freq, dist_utils.is_main_process())
    for images, targets in progress:
        images, _ = move_to_device(images, [], device)
        with autocast_context(device, amp):
            outputs = model(images)
        outputs = [{k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in o.items()} for o in outputs]
        evaluator.update({int(t["image_id"]): o for t, o in zip(targets, outputs)})
        images_seen += len(images)
    evaluator.synchronize_between_processes()
    if dist_utils.is_main_process():
        evaluator.accumulate()
        evaluator.summarize()
        elapsed = time.time() - start
        print(f"evaluated {images_seen} images in {elapsed:.1f}s ({images_seen / max(elapsed, 1e-9):.2f} img/s per process)")
    return evaluator
