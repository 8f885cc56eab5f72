"""Building blocks shared by the RPN and the box head: box encoding, matching, sampling, losses."""
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .ops.syncs import allowed_sync
from .ops.tracing import is_tracing

ConstantCache = Dict[Tuple[Tuple[float, ...], torch.dtype, torch.device], Tensor]


def device_constant(cache: ConstantCache, values: Sequence[float], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``torch.tensor(values)`` ``[len(values)]`` in ``dtype`` on ``device``, made once and kept in
    ``cache`` (keyed by the values too, so changed values are honoured): on a GPU each fresh one
    is a host-to-device copy the host waits for. Made outside inference mode, so that one cached
    by an inference serves training too; not cached while tracing (export)."""
    key = (tuple(values), dtype, device)
    tensor = cache.get(key)
    if tensor is None:
        with torch.inference_mode(False):
            tensor = torch.tensor(key[0], dtype=dtype, device=device)
        if not is_tracing():
            cache[key] = tensor
    return tensor


class BalancedPositiveNegativeSampler:
    """Samples a fixed-size mini-batch per image with a bounded fraction of positives.

    Args:
        batch_size_per_image: number of elements sampled per image.
        positive_fraction: at most this fraction of the batch is positive; negatives fill the rest.
    """

    def __init__(self, batch_size_per_image: int, positive_fraction: float) -> None:
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction

    def __call__(self, labels_per_image: List[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        """Pick positives (label >= 1) and negatives (label == 0); -1 is ignored.

        Args:
            labels_per_image: one ``[N_i]`` tensor per image.
        Returns:
            two lists of ``[N_i]`` uint8 masks: sampled positives, sampled negatives.
        """
        positive_masks, negative_masks, _ = self.sample(labels_per_image)
        return positive_masks, negative_masks

    def sample(self, labels_per_image: List[Tensor]) -> Tuple[List[Tensor], List[Tensor], List[Tuple[int, int]]]:
        """:meth:`__call__`, and the number of sampled ``(positives, negatives)`` of each image.

        The candidates of all images are counted with one host read (``randperm`` needs the
        counts); the random draws are the same calls, in the same order, as one loop per image.
        """
        positive_masks, negative_masks, sampled = [], [], []
        max_positives = int(self.batch_size_per_image * self.positive_fraction)
        for labels, (total_pos, total_neg) in zip(labels_per_image, candidate_counts(labels_per_image)):
            positive = torch.nonzero_static(labels >= 1, size=total_pos).flatten()
            negative = torch.nonzero_static(labels == 0, size=total_neg).flatten()
            num_pos = min(total_pos, max_positives)
            num_neg = min(total_neg, self.batch_size_per_image - num_pos)
            # Random subsets drawn from torch's generator (so runs are reproducible with a seed).
            chosen_pos = positive[torch.randperm(total_pos, device=positive.device)[:num_pos]]
            chosen_neg = negative[torch.randperm(total_neg, device=negative.device)[:num_neg]]
            pos_mask = torch.zeros_like(labels, dtype=torch.uint8)
            neg_mask = torch.zeros_like(labels, dtype=torch.uint8)
            pos_mask[chosen_pos] = 1
            neg_mask[chosen_neg] = 1
            positive_masks.append(pos_mask)
            negative_masks.append(neg_mask)
            sampled.append((num_pos, num_neg))
        return positive_masks, negative_masks, sampled


def candidate_counts(labels_per_image: List[Tensor]) -> List[Tuple[int, int]]:
    """``(positives, negatives)`` (labels >= 1, == 0) of each ``[N_i]`` label tensor, read with one
    host transfer for all images."""
    if not labels_per_image:
        return []
    if len({labels.shape for labels in labels_per_image}) == 1:
        stacked = torch.stack(labels_per_image)
        counts = torch.stack(((stacked >= 1).sum(dim=1), (stacked == 0).sum(dim=1)), dim=1)
    else:
        counts = torch.stack([torch.stack(((labels >= 1).sum(), (labels == 0).sum())) for labels in labels_per_image])
    with allowed_sync("the sampler's randperm sizes are the numbers of positive and negative candidates"):
        return [tuple(pair) for pair in counts.tolist()]


def row_indices(mask: Tensor, reason: str) -> List[Tensor]:
    """Indices of the True entries of each row of ``mask [B, K]``: the counts of all rows are read
    with one host transfer (``reason`` says what needs them), then found without further syncs."""
    return _true_indices(list(mask.unbind(0)), mask.sum(dim=1), reason)


def segment_indices(mask: Tensor, sizes: List[int], reason: str) -> List[Tensor]:
    """:func:`row_indices` of the segments of ``mask [sum N_i]`` (``sizes`` = N_i), counted from
    each segment's start."""
    segments = list(mask.split(sizes))
    return _true_indices(segments, torch.stack([segment.sum() for segment in segments]), reason)


def _true_indices(segments: List[Tensor], counts: Tensor, reason: str) -> List[Tensor]:
    """``nonzero`` of each 1-d mask, its size known from ``counts [len(segments)]``."""
    if is_tracing():  # an exported graph keeps the data-dependent sizes
        return [torch.where(segment)[0] for segment in segments]
    with allowed_sync(reason):
        sizes = counts.tolist()
    return [torch.nonzero_static(segment, size=size).flatten() for segment, size in zip(segments, sizes)]


def pad_boxes(boxes: List[Tensor]) -> Tuple[Tensor, Tensor]:
    """Stack ``[N_i, 4]`` boxes into ``[B, max N_i, 4]`` padded with zeros, and the mask
    ``[B, max N_i]`` of the real rows."""
    padded = torch.nn.utils.rnn.pad_sequence(boxes, batch_first=True)
    valid = torch.nn.utils.rnn.pad_sequence(
        [b.new_ones(b.shape[0], dtype=torch.bool) for b in boxes], batch_first=True
    )
    return padded, valid


def padded_quality(similarity, gt: Tensor, gt_valid: Tensor, predictions: Tensor, pred_valid: Optional[Tensor]) -> Tensor:
    """``similarity(gt [B, M, 4], predictions [B, N, 4]) -> [B, M, N]`` with -1 in the rows of
    padded gt boxes and the columns of padded (or excluded, ``pred_valid [B, N]``) predictions:
    below any IoU, so they are never a best match."""
    valid = gt_valid[:, :, None] if pred_valid is None else gt_valid[:, :, None] & pred_valid[:, None, :]
    return similarity(gt, predictions).masked_fill(~valid, -1.0)


class BoxCoder:
    """Encodes boxes as ``(dx, dy, dw, dh)`` offsets relative to reference boxes, and back.

    Args:
        weights: multipliers for ``(dx, dy, dw, dh)``.
        bbox_xform_clip: upper bound on ``dw, dh`` before ``exp`` so huge boxes cannot overflow.
    """

    def __init__(
        self, weights: Tuple[float, float, float, float], bbox_xform_clip: float = math.log(1000.0 / 16)
    ) -> None:
        self.weights = weights
        self.bbox_xform_clip = bbox_xform_clip
        self._constants: ConstantCache = {}

    def encode(self, matched_boxes: List[Tensor], anchors: List[Tensor]) -> List[Tensor]:
        """Per-image version of :meth:`encode_single`; returns one ``[N_i, 4]`` tensor per image."""
        counts = [len(b) for b in matched_boxes]
        codes = self.encode_single(torch.cat(matched_boxes, dim=0), torch.cat(anchors, dim=0))
        return list(codes.split(counts, 0))

    def encode_single(self, matched_boxes: Tensor, anchors: Tensor) -> Tensor:
        """Offsets ``[N, 4]`` that turn ``anchors [N, 4]`` into ``matched_boxes [N, 4]``."""
        wx, wy, ww, wh = device_constant(self._constants, self.weights, matched_boxes.dtype, matched_boxes.device)
        anchor_w = anchors[:, 2:3] - anchors[:, 0:1]
        anchor_h = anchors[:, 3:4] - anchors[:, 1:2]
        anchor_cx = anchors[:, 0:1] + 0.5 * anchor_w
        anchor_cy = anchors[:, 1:2] + 0.5 * anchor_h
        box_w = matched_boxes[:, 2:3] - matched_boxes[:, 0:1]
        box_h = matched_boxes[:, 3:4] - matched_boxes[:, 1:2]
        box_cx = matched_boxes[:, 0:1] + 0.5 * box_w
        box_cy = matched_boxes[:, 1:2] + 0.5 * box_h
        dx = wx * (box_cx - anchor_cx) / anchor_w
        dy = wy * (box_cy - anchor_cy) / anchor_h
        dw = ww * torch.log(box_w / anchor_w)
        dh = wh * torch.log(box_h / anchor_h)
        return torch.cat((dx, dy, dw, dh), dim=1)

    def decode(self, rel_codes: Tensor, boxes: List[Tensor]) -> Tensor:
        """Decode ``rel_codes [sum N_i, K*4]`` against the concatenated reference boxes.

        Returns ``[sum N_i, K, 4]`` (K = number of box predictions per reference box).
        """
        reference = torch.cat(boxes, dim=0)
        total = reference.shape[0]
        if total > 0:
            rel_codes = rel_codes.reshape(total, -1)
        decoded = self.decode_single(rel_codes, reference)
        return decoded.reshape(total, -1, 4) if total > 0 else decoded

    def decode_single(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
        """Apply offsets ``rel_codes [N, K*4]`` to ``boxes [N, 4]``; returns ``[N, K*4]`` in at least
        float32 (half-precision offsets from autocast are widened, not the boxes narrowed)."""
        dtype = torch.promote_types(torch.promote_types(rel_codes.dtype, boxes.dtype), torch.float32)
        rel_codes, boxes = rel_codes.to(dtype), boxes.to(dtype)
        widths = boxes[:, 2] - boxes[:, 0]
        heights = boxes[:, 3] - boxes[:, 1]
        ctr_x = boxes[:, 0] + 0.5 * widths
        ctr_y = boxes[:, 1] + 0.5 * heights

        wx, wy, ww, wh = self.weights
        dx = rel_codes[:, 0::4] / wx
        dy = rel_codes[:, 1::4] / wy
        dw = (rel_codes[:, 2::4] / ww).clamp(max=self.bbox_xform_clip)
        dh = (rel_codes[:, 3::4] / wh).clamp(max=self.bbox_xform_clip)

        pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
        pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
        half_w = 0.5 * (torch.exp(dw) * widths[:, None])
        half_h = 0.5 * (torch.exp(dh) * heights[:, None])
        corners = (pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h)
        return torch.stack(corners, dim=2).flatten(1)


class Matcher:
    """Assigns each prediction (column) to the ground-truth box (row) it overlaps most.

    Result per prediction: the matched ground-truth index, or ``BELOW_LOW_THRESHOLD`` (-1)
    when the best quality is ``< low_threshold``, or ``BETWEEN_THRESHOLDS`` (-2) when it is in
    ``[low_threshold, high_threshold)``. With ``allow_low_quality_matches`` every ground truth
    also keeps the predictions that overlap it best (ties included), even below the threshold.
    """

    BELOW_LOW_THRESHOLD = -1
    BETWEEN_THRESHOLDS = -2

    def __init__(self, high_threshold: float, low_threshold: float, allow_low_quality_matches: bool = False) -> None:
        if low_threshold > high_threshold:
            raise ValueError(f"low_threshold ({low_threshold}) must be <= high_threshold ({high_threshold})")
        self.high_threshold = high_threshold
        self.low_threshold = low_threshold
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, match_quality_matrix: Tensor) -> Tensor:
        """``match_quality_matrix [M gt, N predictions] -> matches [N]`` (int64)."""
        if match_quality_matrix.numel() == 0:
            if match_quality_matrix.shape[0] == 0:
                raise ValueError("No ground-truth boxes available for one of the images during training")
            raise ValueError("No proposal boxes available for one of the images during training")
        return self.match_padded(match_quality_matrix, None)

    def match_padded(self, quality: Tensor, gt_valid: Optional[Tensor]) -> Tensor:
        """``quality [..., M, N] -> matches [..., N]`` for a batch of images whose gt rows are
        padded (``gt_valid [..., M]``, None: all real). Padded rows and excluded columns must hold
        -1 (see :func:`padded_quality`): no prediction then matches them, and they give no
        low-quality match. Without masks, boolean indexing or ``nonzero``: no host sync."""
        best_quality, matches = quality.max(dim=-2)
        best_gt_before_thresholds = matches.clone() if self.allow_low_quality_matches else None
        matches.masked_fill_(best_quality < self.low_threshold, self.BELOW_LOW_THRESHOLD)
        between = (best_quality >= self.low_threshold) & (best_quality < self.high_threshold)
        matches.masked_fill_(between, self.BETWEEN_THRESHOLDS)

        if best_gt_before_thresholds is not None:
            # For every gt, the predictions that reach its best quality get their best gt back.
            best_per_gt = quality.max(dim=-1, keepdim=True).values
            reaches_best = quality == best_per_gt
            if gt_valid is not None:
                reaches_best &= gt_valid[..., None]
            matches = torch.where(reaches_best.any(dim=-2), best_gt_before_thresholds, matches)
        return matches


def smooth_l1_loss(input: Tensor, target: Tensor, beta: float = 1.0 / 9, size_average: bool = False) -> Tensor:
    """Huber-style loss: quadratic below ``beta``, linear above; summed unless ``size_average``."""
    return F.smooth_l1_loss(input, target, beta=beta, reduction="mean" if size_average else "sum")

