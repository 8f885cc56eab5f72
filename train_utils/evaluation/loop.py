"""One evaluation pass: the model over a loader, scored with pycocotools."""
import time

import torch
from torch import nn

from train_utils.device import move_to_device, tf32_mode
from train_utils import distributed as dist_utils
from train_utils.evaluation.coco_eval import CocoEvaluator
from train_utils.progress import Progress


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    data_loader,
    device: torch.device,
    coco_gt,
    print_freq: int = 50,
    tf32: bool = False,
) -> CocoEvaluator:
    """Run the model over ``data_loader`` in float32 (also during ``--amp`` training, so the logged
    AP is the one validation.py gives the saved weights) and score it with pycocotools (every
    rank's shard is gathered; each image counts once; the matching is shared among the ranks). Returns
    the evaluator, accumulated and summarised on rank 0.

    ``tf32``: allow TF32 convolutions and matmuls on the GPU; by default they are off during the
    pass (and restored after), so a GPU evaluation is repeatable and equals the CPU's."""
    model.eval()
    evaluator = CocoEvaluator(coco_gt, ("bbox",))
    start, images_seen = time.time(), 0
    progress = Progress(data_loader, len(data_loader), "Test", print_freq, dist_utils.is_main_process())
    with tf32_mode(tf32):
        for images, targets in progress:
            images, _ = move_to_device(images, [], device)
            outputs = [{k: v.cpu() for k, v in o.items()} for o in model(images)]
            evaluator.update({int(t["image_id"]): o for t, o in zip(targets, outputs)})
            images_seen += len(images)
    evaluator.synchronize_between_processes()
    evaluator.accumulate()  # shared among the ranks; the scores are on rank 0
    if dist_utils.is_main_process():
        evaluator.summarize()
        elapsed = time.time() - start
        print(f"evaluated {images_seen} images in {elapsed:.1f}s ({images_seen / max(elapsed, 1e-9):.2f} img/s per process)")
    return evaluator
