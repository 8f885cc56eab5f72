"""Host-device synchronisations of one training step and one inference step of our R50-FPN.

Counted on the CPU with :class:`sync_counter.SyncCounter` along the route a CUDA run takes: the
fast paths off (reference mode: no sparse-gradient convolutions, which are CPU-only) and the
pooler on torchvision's RoIAlign kernel (our sparse CPU kernel is not used on CUDA). What may grow
with the batch is NMS (one call per image and stage, its output size is data-dependent); every
other sync must be one per stage, whatever the batch size.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import pytest
import torch
from torch import Tensor

from backbone import resnet50_fpn_backbone
from network_files import FasterRCNN
from network_files.ops import fast_path
from network_files.ops import roi_align
from sync_counter import SyncCounter, count_nms

# Host tensors read on the host: not device syncs. random_min_size draws the training scale from
# torch's CPU generator (one scalar per image); infer_scale rounds a level's scale in a CPU tensor.
HOST_ONLY_SITES = ("random_min_size", "infer_scale")
# The syncs left, one per stage whatever the batch size (each in an allowed_sync):
# training: the targets' degenerate-box check, the RPN's kept-proposal counts, the candidate counts
# of the RPN's and of the box head's sampler (randperm sizes), the RoIs per pyramid level;
# inference: the kept-proposal counts, the RoIs per level, the kept-detection counts.
EXPECTED = {True: 5, False: 3}
# The tiny detector has a single feature map: no RoIs-per-level read.
EXPECTED_SINGLE_MAP = {True: 4, False: 2}
# Before this change (main at 50273b3): training 32 at batch 2, 66 at batch 4; inference 12 and 20.


def _r50_fpn() -> FasterRCNN:
    torch.manual_seed(0)
    return FasterRCNN(
        resnet50_fpn_backbone(), num_classes=5, min_size=96, max_size=128,
        rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
        rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=100,
        rpn_batch_size_per_image=64, box_batch_size_per_image=32, box_score_thresh=0.0,
    )


def _batch(size: int) -> Tuple[List[Tensor], List[Dict[str, Tensor]]]:
    """Images of 96x128 with 0..3 boxes each (the second image has none)."""
    generator = torch.Generator().manual_seed(size)
    images = [torch.rand(3, 96, 128, generator=generator) for _ in range(size)]
    targets = []
    for index in range(size):
        count = 0 if index == 1 else 1 + index % 3
        corner = torch.rand(count, 2, generator=generator) * 60
        side = 8 + torch.rand(count, 2, generator=generator) * 30
        boxes = torch.cat([corner, corner + side], dim=1)
        targets.append({"boxes": boxes, "labels": torch.randint(1, 3, (count,), generator=generator)})
    return images, targets


def count_syncs(model: FasterRCNN, batch_size: int, training: bool) -> SyncCounter:
    """Syncs of one forward (and backward, in training) pass along the CUDA route."""
    images, targets = _batch(batch_size)
    model.train(training)
    counter = SyncCounter()
    with fast_path.reference_mode(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(roi_align, "_uses_fast_path", lambda features: False)
        with count_nms(counter), counter:
            if training:
                sum(model(images, targets).values()).backward()
            else:
                with torch.no_grad():
                    model(images)
    return counter


def check_syncs(model: FasterRCNN, training: bool, expected: int) -> None:
    """Batch 2 and 4 need the same ``expected`` syncs, and one NMS per image and stage."""
    small = count_syncs(model, 2, training)
    large = count_syncs(model, 4, training)
    print(f"\nbatch 2:\n{small.report()}\nbatch 4:\n{large.report()}")
    assert small.total(HOST_ONLY_SITES) == large.total(HOST_ONLY_SITES) == expected, large.report()
    # NMS: once per image for the proposals, and once per image for the detections in inference.
    stages = 1 if training else 2
    assert (small.nms, large.nms) == (2 * stages, 4 * stages)


@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
def test_tiny_detector_syncs_do_not_grow_with_the_batch(tiny_detector, training):
    torch.manual_seed(0)
    check_syncs(tiny_detector(min_size=96, max_size=128, box_score_thresh=0.0), training, EXPECTED_SINGLE_MAP[training])


@pytest.mark.slow
@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
def test_r50_fpn_syncs_do_not_grow_with_the_batch(training):
    check_syncs(_r50_fpn(), training, EXPECTED[training])
