"""Building blocks shared by the RPN and the box head: box encoding, matching, sampling, losses."""
import math
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

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
        positive_masks, negative_masks = [], []
        max_positives = int(self.batch_size_per_image * self.positive_fraction)
        for labels in labels_per_image:
            positive = torch.where(labels >= 1)[0]
            negative = torch.where(labels == 0)[0]
            num_pos = min(positive.numel(), max_positives)
            num_neg = min(negative.numel(), self.batch_size_per_image - num_pos)
            # Random subsets drawn from torch's generator (so runs are reproducible with a seed).
            chosen_pos = positive[torch.randperm(positive.numel(), device=positive.device)[:num_pos]]
            chosen_neg = negative[torch.randperm(negative.numel(), device=negative.device)[:num_neg]]
            pos_mask = torch.zeros_like(labels, dtype=torch.uint8)
            neg_mask = torch.zeros_like(labels, dtype=torch.uint8)
            pos_mask[chosen_pos] = 1
            neg_mask[chosen_neg] = 1
            positive_masks.append(pos_mask)
            negative_masks.append(neg_mask)
        return positive_masks, negative_masks


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

        best_quality, matches = match_quality_matrix.max(dim=0)
        best_gt_before_thresholds = matches.clone() if self.allow_low_quality_matches else None
        matches[best_quality < self.low_threshold] = self.BELOW_LOW_THRESHOLD
        between = (best_quality >= self.low_threshold) & (best_quality < self.high_threshold)
        matches[between] = self.BETWEEN_THRESHOLDS

        if best_gt_before_thresholds is not None:
            # For every gt, the predictions that reach its best quality get their best gt back.
            best_per_gt = match_quality_matrix.max(dim=1).values
            restored = torch.where(match_quality_matrix == best_per_gt[:, None])[1]
            matches[restored] = best_gt_before_thresholds[restored]
        return matches


def smooth_l1_loss(input: Tensor, target: Tensor, beta: float = 1.0 / 9, size_average: bool = False) -> Tensor:
    """Huber-style loss: quadratic below ``beta``, linear above; summed unless ``size_average``."""
    return F.smooth_l1_loss(input, target, beta=beta, reduction="mean" if size_average else "sum")

