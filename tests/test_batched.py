"""The batched, sync-free paths of the RPN and the box head equal a plain per-image computation.

Each reference below is the straightforward per-image algorithm (``torch.where``, boolean
indexing, one image at a time), written here independently of the model code; results must be
``torch.equal`` in float32 on random inputs with the edge cases: images without objects, one box,
duplicated boxes (tied IoUs), degenerate (zero-area) boxes, all-negative images.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import pytest
import torch
from torch import Tensor
from torchvision.ops import batched_nms, box_iou

from network_files import det_utils
from network_files.ops import roi_align
from network_files.ops.boxes import clip_boxes_to_image
from network_files.roi_head import RoIHeads, fastrcnn_loss
from network_files.rpn_function import AnchorsGenerator, RegionProposalNetwork
from network_files.transform import resize_boxes


def random_boxes(generator: torch.Generator, count: int, extent: float = 100.0) -> Tensor:
    """``[count, 4]`` boxes inside ``extent``; about one in eight has zero width (degenerate)."""
    corner = torch.rand(count, 2, generator=generator) * extent
    side = torch.rand(count, 2, generator=generator) * extent / 2
    side[torch.rand(count, generator=generator) < 0.125, 0] = 0.0
    return torch.cat([corner, corner + side], dim=1)


def gt_sets(generator: torch.Generator) -> List[Tensor]:
    """Five images: no objects, one box, many boxes with a duplicate, a far-away (all-negative) box, many."""
    many = random_boxes(generator, 6)
    many[3] = many[1]  # tied IoUs
    far = torch.tensor([[1000.0, 1000.0, 1010.0, 1012.0]])
    return [torch.zeros(0, 4), random_boxes(generator, 1), many, far, random_boxes(generator, 9)]


def reference_match(quality: Tensor, high: float, low: float, allow_low: bool) -> Tensor:
    """Matcher on one image ``[M, N]``, the original torchvision algorithm."""
    best, matches = quality.max(dim=0)
    before = matches.clone()
    matches[best < low] = -1
    matches[(best >= low) & (best < high)] = -2
    if allow_low:
        best_per_gt = quality.max(dim=1).values
        restored = torch.where(quality == best_per_gt[:, None])[1]
        matches[restored] = before[restored]
    return matches


@pytest.mark.parametrize("allow_low", [True, False])
def test_padded_matcher_equals_per_image(allow_low):
    generator = torch.Generator().manual_seed(1)
    gts = gt_sets(generator)[1:]  # the matcher itself needs objects; see the RPN test for none
    predictions = [random_boxes(generator, n) for n in (40, 7, 1, 25)]
    # A prediction equal to a gt box, and one touching nothing.
    predictions[0][5] = gts[0][0]
    matcher = det_utils.Matcher(0.7, 0.3, allow_low_quality_matches=allow_low)
    gt, gt_valid = det_utils.pad_boxes(gts)
    padded, valid = det_utils.pad_boxes(predictions)
    quality = det_utils.padded_quality(box_iou, gt, gt_valid, padded, valid)
    batched = matcher.match_padded(quality, gt_valid)
    for index, (g, p) in enumerate(zip(gts, predictions)):
        expected = reference_match(box_iou(g, p), 0.7, 0.3, allow_low)
        assert torch.equal(batched[index, : len(p)], expected)
        assert torch.equal(matcher(box_iou(g, p)), expected)


def reference_rpn_targets(anchors: Tensor, gt: Tensor, inside: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """Labels ``[A]`` and matched boxes ``[A, 4]`` of one image, matching only ``inside`` anchors."""
    inside = torch.ones(len(anchors), dtype=torch.bool) if inside is None else inside
    labels = torch.full((len(anchors),), -1.0)
    matched = anchors.clone()
    if gt.numel() == 0:
        labels[inside] = 0.0
        matched[inside] = 0.0
        return labels, matched
    matches = reference_match(box_iou(gt, anchors[inside]), 0.7, 0.3, True)
    image_labels = (matches >= 0).float()
    image_labels[matches == -1] = 0.0
    image_labels[matches == -2] = -1.0
    labels[inside] = image_labels
    matched[inside] = gt[matches.clamp(min=0)]
    return labels, matched


def small_rpn(**options) -> RegionProposalNetwork:
    settings = dict(pre_nms_top_n=dict(training=30, testing=20), post_nms_top_n=dict(training=15, testing=10),
                    nms_thresh=0.7, score_thresh=0.0)
    settings.update(options)
    return RegionProposalNetwork(AnchorsGenerator(((16, 40),), ((0.5, 1.0, 2.0),)), torch.nn.Identity(),
                                 0.7, 0.3, 16, 0.5, **settings)


@pytest.mark.parametrize("inside", [False, True], ids=["all", "inside"])
@pytest.mark.parametrize("with_objects", [True, False], ids=["objects", "no-objects"])
def test_rpn_targets_equal_per_image(inside, with_objects):
    generator = torch.Generator().manual_seed(2)
    anchors = [torch.cat([random_boxes(generator, 300, 120.0), torch.tensor([[-10.0, -10.0, 20.0, 20.0]])])] * 5
    gts = gt_sets(generator) if with_objects else [torch.zeros(0, 4)] * 5
    targets = [{"boxes": g} for g in gts]
    sizes = [(100, 110), (90, 120), (120, 120), (64, 80), (100, 100)]
    rpn = small_rpn(ignore_cross_boundary=inside)
    if inside:
        labels, matched = rpn.assign_targets_inside_image(anchors, targets, sizes)
    else:
        labels, matched = rpn.assign_targets_to_anchors(anchors, targets)
    for a, g, size, image_labels, image_matched in zip(anchors, gts, sizes, labels, matched):
        mask = ((a[:, :2] >= 0).all(1) & (a[:, 2] <= size[1]) & (a[:, 3] <= size[0])) if inside else None
        expected_labels, expected_matched = reference_rpn_targets(a, g, mask)
        assert torch.equal(image_labels, expected_labels)
        assert torch.equal(image_matched, expected_matched)


def reference_roi_targets(proposals: Tensor, gt: Tensor, classes: Tensor, low: float) -> Tuple[Tensor, Tensor]:
    """Matched gt index and label ``[R]`` of one image (labels -1 ignored, 0 background)."""
    if gt.numel() == 0:
        return torch.zeros(len(proposals), dtype=torch.int64), torch.zeros(len(proposals), dtype=torch.int64)
    quality = box_iou(gt, proposals)
    matches = reference_match(quality, 0.5, 0.5, False)
    labels = classes[matches.clamp(min=0)].clone()
    labels[matches == -1] = 0
    labels[matches == -2] = -1
    if low > 0:
        labels[quality.max(dim=0).values < low] = -1
    return matches.clamp(min=0), labels


def roi_heads(bg_low: float = 0.0) -> RoIHeads:
    return RoIHeads(None, None, None, 0.5, 0.5, 16, 0.25, None, 0.05, 0.5, 10, bg_iou_low_thresh=bg_low)


@pytest.mark.parametrize("bg_low", [0.0, 0.1])
def test_roi_targets_equal_per_image(bg_low):
    generator = torch.Generator().manual_seed(3)
    gts = gt_sets(generator)
    classes = [torch.randint(1, 4, (len(g),), generator=generator) for g in gts]
    proposals = [torch.cat([random_boxes(generator, n), g]) for n, g in zip((12, 0, 30, 5, 1), gts)]
    matched, labels = roi_heads(bg_low).assign_targets_to_proposals(proposals, gts, classes)
    for p, g, c, image_matched, image_labels in zip(proposals, gts, classes, matched, labels):
        expected_matched, expected_labels = reference_roi_targets(p, g, c, bg_low)
        assert torch.equal(image_matched, expected_matched)
        assert torch.equal(image_labels, expected_labels)


def reference_sample(labels: List[Tensor], size: int, fraction: float) -> Tuple[List[Tensor], List[Tensor]]:
    """torchvision's sampler: per image, the randperm draws in the same order."""
    pos_masks, neg_masks = [], []
    for image_labels in labels:
        positive = torch.where(image_labels >= 1)[0]
        negative = torch.where(image_labels == 0)[0]
        num_pos = min(positive.numel(), int(size * fraction))
        num_neg = min(negative.numel(), size - num_pos)
        pos = positive[torch.randperm(positive.numel())[:num_pos]]
        neg = negative[torch.randperm(negative.numel())[:num_neg]]
        pos_mask, neg_mask = torch.zeros_like(image_labels, dtype=torch.uint8), torch.zeros_like(image_labels, dtype=torch.uint8)
        pos_mask[pos], neg_mask[neg] = 1, 1
        pos_masks.append(pos_mask)
        neg_masks.append(neg_mask)
    return pos_masks, neg_masks


@pytest.mark.parametrize("equal_sizes", [True, False])
def test_sampler_equals_per_image_and_keeps_the_random_stream(equal_sizes):
    generator = torch.Generator().manual_seed(4)
    sizes = [50] * 4 if equal_sizes else [50, 0, 3, 80]
    labels = [torch.randint(-1, 3, (n,), generator=generator) for n in sizes]
    labels[0].fill_(0)  # all negative
    torch.manual_seed(7)
    expected = reference_sample(labels, 16, 0.25)
    expected_next = torch.rand(3)
    torch.manual_seed(7)
    pos, neg, counts = det_utils.BalancedPositiveNegativeSampler(16, 0.25).sample(labels)
    assert torch.equal(torch.rand(3), expected_next)
    assert all(torch.equal(a, b) for a, b in zip(pos + neg, expected[0] + expected[1]))
    assert counts == [(int(p.sum()), int(n.sum())) for p, n in zip(pos, neg)]


def test_true_indices_and_level_members_equal_where():
    generator = torch.Generator().manual_seed(5)
    mask = torch.rand(4, 37, generator=generator) < 0.3
    mask[1] = False
    for got, row in zip(det_utils.row_indices(mask, "test"), mask):
        assert torch.equal(got, torch.where(row)[0])
    sizes = [10, 0, 27, 111]
    flat = mask.flatten()[: sum(sizes)]
    for got, segment in zip(det_utils.segment_indices(flat, sizes, "test"), flat.split(sizes)):
        assert torch.equal(got, torch.where(segment)[0])
    levels = torch.randint(0, 4, (200,), generator=generator)
    levels[levels == 2] = 1  # an empty level
    for level, members in enumerate(roi_align.level_members(levels, 4)):
        assert torch.equal(members, torch.nonzero(levels == level).flatten())


def reference_filter(rpn, proposals, objectness, shapes, per_level):
    """filter_proposals after the top-n selection, one image at a time (the original code)."""
    num_images = proposals.shape[0]
    objectness = objectness.reshape(num_images, -1)
    levels = torch.cat([torch.full((n,), i) for i, n in enumerate(per_level)]).expand_as(objectness)
    top = rpn._top_n_per_level(objectness, per_level)
    rows = torch.arange(num_images)[:, None]
    boxes_all, scores_all, levels_all = proposals[rows, top], torch.sigmoid(objectness[rows, top]), levels[rows, top]
    result = []
    for boxes, scores, lvl, shape in zip(boxes_all, scores_all, levels_all, shapes):
        boxes = clip_boxes_to_image(boxes, shape)
        keep = torch.where(((boxes[:, 2] - boxes[:, 0]) >= rpn.min_size) & ((boxes[:, 3] - boxes[:, 1]) >= rpn.min_size))[0]
        boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
        keep = torch.where(scores >= rpn.score_thresh)[0]
        boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
        keep = batched_nms(boxes, scores, lvl, rpn.nms_thresh)[: rpn.post_nms_top_n()]
        result.append((boxes[keep], scores[keep]))
    return result


@pytest.mark.parametrize("score_thresh", [0.0, 0.6])
def test_filter_proposals_equals_per_image(score_thresh):
    generator = torch.Generator().manual_seed(6)
    per_level = [40, 12]
    proposals = torch.stack([random_boxes(generator, sum(per_level), 130.0) - 10 for _ in range(3)])
    proposals[1, :5, 2] = proposals[1, :5, 0]  # degenerate boxes
    objectness = torch.randn(3 * sum(per_level), 1, generator=generator)
    shapes = [(100, 120), (64, 64), (120, 90)]
    rpn = small_rpn(score_thresh=score_thresh).eval()
    boxes, scores = rpn.filter_proposals(proposals, objectness, shapes, per_level)
    for got_boxes, got_scores, (expected_boxes, expected_scores) in zip(
        boxes, scores, reference_filter(rpn, proposals, objectness, shapes, per_level)
    ):
        assert torch.equal(got_boxes, expected_boxes) and torch.equal(got_scores, expected_scores)


def test_postprocess_detections_equals_per_image():
    generator = torch.Generator().manual_seed(7)
    heads = roi_heads()
    proposals = [random_boxes(generator, n, 90.0) for n in (20, 0, 33)]
    shapes = [(80, 100), (64, 64), (100, 70)]
    logits = torch.randn(53, 4, generator=generator) * 3
    regression = torch.randn(53, 16, generator=generator) * 0.5
    boxes, scores, labels = heads.postprocess_detections(logits, regression, proposals, shapes)
    decoded = heads.box_coder.decode(regression, proposals).split([20, 0, 33])
    for i, (image_boxes, image_scores) in enumerate(zip(decoded, torch.softmax(logits, -1).split([20, 0, 33]))):
        image_boxes = clip_boxes_to_image(image_boxes, shapes[i])[:, 1:].reshape(-1, 4)
        image_labels = torch.arange(4).view(1, -1).expand_as(image_scores)[:, 1:].reshape(-1)
        image_scores = image_scores[:, 1:].reshape(-1)
        keep = torch.where(image_scores > 0.05)[0]
        image_boxes, image_scores, image_labels = image_boxes[keep], image_scores[keep], image_labels[keep]
        wh = image_boxes[:, 2:] - image_boxes[:, :2]
        keep = torch.where((wh >= 1e-2).all(dim=1))[0]
        image_boxes, image_scores, image_labels = image_boxes[keep], image_scores[keep], image_labels[keep]
        keep = batched_nms(image_boxes, image_scores, image_labels, 0.5)[:10]
        assert torch.equal(boxes[i], image_boxes[keep]) and torch.equal(scores[i], image_scores[keep])
        assert torch.equal(labels[i], image_labels[keep])


def test_fastrcnn_loss_with_known_positive_count_is_the_same():
    generator = torch.Generator().manual_seed(8)
    labels = [torch.randint(0, 4, (n,), generator=generator) for n in (9, 14)]
    targets = [torch.randn(n, 4, generator=generator) for n in (9, 14)]
    logits, regression = torch.randn(23, 4, generator=generator), torch.randn(23, 16, generator=generator)
    positives = int(sum((l > 0).sum() for l in labels))
    plain = fastrcnn_loss(logits, regression, labels, targets)
    counted = fastrcnn_loss(logits, regression, labels, targets, num_positive=positives)
    assert all(torch.equal(a, b) for a, b in zip(plain, counted))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_resize_boxes_ratios_equal_float32_tensor_ratios(dtype):
    generator = torch.Generator().manual_seed(9)
    boxes = (torch.rand(50, 4, generator=generator) * 1000).to(dtype)
    for old, new in [((375, 500), (800, 1066)), ((333, 1001), (799, 1333)), ((7, 3), (1000, 429)), ((481, 640), (481, 640))]:
        ratio_h, ratio_w = (torch.tensor(n, dtype=torch.float32) / torch.tensor(o, dtype=torch.float32) for n, o in zip(new, old))
        x1, y1, x2, y2 = boxes.unbind(1)
        expected = torch.stack((x1 * ratio_w, y1 * ratio_h, x2 * ratio_w, y2 * ratio_h), dim=1)
        assert torch.equal(resize_boxes(boxes, old, new), expected)
