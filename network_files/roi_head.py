"""The Fast R-CNN stage: pool proposal features, classify and refine them, compute losses or detections."""
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ops import boxes as box_ops
from . import det_utils
from .box_head import TwoMLPHead
from .ops.poolers import MultiScaleRoIAlign
from .ops.soft_nms import batched_soft_nms
from .ops.syncs import allowed_sync


def fastrcnn_loss(
    class_logits: Tensor, box_regression: Tensor, labels: List[Tensor], regression_targets: List[Tensor],
    beta: float = 1 / 9,
    num_positive: Optional[int] = None,
) -> Tuple[Tensor, Tensor]:
    """Cross-entropy over all sampled RoIs and smooth L1 on the positives' class-specific offsets.

    Args:
        class_logits: ``[R, num_classes]``.
        box_regression: ``[R, num_classes * 4]``.
        labels: per image ``[R_i]`` int64 (0 = background).
        regression_targets: per image ``[R_i, 4]``.
        beta: where the smooth L1 turns from quadratic to linear (torchvision's 1/9; py-faster-rcnn's 1).
        num_positive: the number of labels > 0 when known (the sampler's count): the positives are
            then found without a host sync.
    Returns:
        ``(loss_classifier, loss_box_reg)``; the box loss is normalised by the number of RoIs.
    """
    labels_all = torch.cat(labels, dim=0)
    targets_all = torch.cat(regression_targets, dim=0)
    classification_loss = F.cross_entropy(class_logits, labels_all)

    if num_positive is None:
        positive = torch.where(labels_all > 0)[0]
    else:
        positive = torch.nonzero_static(labels_all > 0, size=num_positive).flatten()
    num_rois = class_logits.shape[0]
    per_class = box_regression.reshape(num_rois, box_regression.size(-1) // 4, 4)
    box_loss = det_utils.smooth_l1_loss(
        per_class[positive, labels_all[positive]], targets_all[positive], beta=beta
    ) / labels_all.numel()
    return classification_loss, box_loss


class RoIHeads(nn.Module):
    """Second stage of Faster R-CNN.

    Args:
        box_roi_pool: pools ``[R, C, P, P]`` features for boxes (e.g. ``MultiScaleRoIAlign``).
        box_head: turns pooled features into ``[R, D]`` (e.g. ``TwoMLPHead``).
        box_predictor: ``[R, D] -> (class_logits [R, K], box_regression [R, K*4])``.
        fg_iou_thresh / bg_iou_thresh: proposals with IoU >= fg are positives, < bg background.
        batch_size_per_image / positive_fraction: RoIs sampled per image in training.
        bbox_reg_weights: BoxCoder weights, default ``(10, 10, 5, 5)``.
        score_thresh / nms_thresh / detections_per_img: post-processing in evaluation.
        bg_iou_low_thresh: background RoIs need IoU >= this with some object (py-faster-rcnn's
            BG_THRESH_LO); lower ones are not sampled. 0 (torchvision's) keeps them all. An image
            without objects keeps every RoI as background.
        smooth_l1_beta: ``beta`` of the box regression loss (see :func:`fastrcnn_loss`).
        nms_method: final per-class NMS: "hard" (torchvision's), "soft-linear" or "soft-gaussian"
            (soft-NMS, ``nms_thresh`` the linear rule's IoU); ``soft_nms_sigma`` the gaussian's
            width, ``soft_nms_min_score`` the score below which a decayed box is dropped.
    """

    def __init__(
        self,
        box_roi_pool: nn.Module,
        box_head: nn.Module,
        box_predictor: nn.Module,
        fg_iou_thresh: float,
        bg_iou_thresh: float,
        batch_size_per_image: int,
        positive_fraction: float,
        bbox_reg_weights: Optional[Tuple[float, float, float, float]],
        score_thresh: float,
        nms_thresh: float,
        detections_per_img: int,
        bg_iou_low_thresh: float = 0.0,
        smooth_l1_beta: float = 1 / 9,
        nms_method: str = "hard",
        soft_nms_sigma: float = 0.5,
        soft_nms_min_score: float = 1e-3,
    ) -> None:
        super().__init__()
        self.box_similarity = box_ops.box_iou
        self.proposal_matcher = det_utils.Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=False)
        self.fg_bg_sampler = det_utils.BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self.box_coder = det_utils.BoxCoder(bbox_reg_weights if bbox_reg_weights is not None else (10.0, 10.0, 5.0, 5.0))
        self.box_roi_pool = box_roi_pool
        self.box_head = box_head
        self.box_predictor = box_predictor
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.bg_iou_low_thresh = bg_iou_low_thresh
        self.smooth_l1_beta = smooth_l1_beta
        self.nms_method = nms_method
        self.soft_nms_sigma = soft_nms_sigma
        self.soft_nms_min_score = soft_nms_min_score

    def assign_targets_to_proposals(
        self, proposals: List[Tensor], gt_boxes: List[Tensor], gt_labels: List[Tensor]
    ) -> Tuple[List[Tensor], List[Tensor]]:
        """Per image: index of the matched gt ``[R_i]`` and the RoI label ``[R_i]`` (-1 = ignored).
        All images are matched at once, gt boxes and proposals padded to one count each."""
        counts = [p.shape[0] for p in proposals]
        gt_padded, gt_valid = det_utils.pad_boxes(gt_boxes)
        padded, valid = det_utils.pad_boxes(proposals)
        if gt_padded.shape[1] == 0:
            # No image has objects: every proposal is background.
            zeros = torch.zeros(valid.shape, dtype=torch.int64, device=valid.device)
            return self._unpad(zeros, zeros.clone(), counts)
        quality = det_utils.padded_quality(self.box_similarity, gt_padded, gt_valid, padded, valid)
        matches = self.proposal_matcher.match_padded(quality, gt_valid)
        matched = matches.clamp(min=0)
        # An image without objects matches its first padding row: label 0, index 0.
        classes = torch.nn.utils.rnn.pad_sequence(gt_labels, batch_first=True)
        labels = classes.gather(1, matched).to(dtype=torch.int64)
        labels.masked_fill_(matches == det_utils.Matcher.BELOW_LOW_THRESHOLD, 0)
        labels.masked_fill_(matches == det_utils.Matcher.BETWEEN_THRESHOLDS, -1)
        if self.bg_iou_low_thresh > 0:
            too_far = quality.max(dim=1).values < self.bg_iou_low_thresh
            labels.masked_fill_(too_far & gt_valid.any(dim=1, keepdim=True), -1)
        return self._unpad(matched, labels, counts)

    @staticmethod
    def _unpad(matched: Tensor, labels: Tensor, counts: List[int]) -> Tuple[List[Tensor], List[Tensor]]:
        """Rows ``[B, max R_i]`` back to one ``[R_i]`` tensor per image."""
        return [m[:n] for m, n in zip(matched, counts)], [l[:n] for l, n in zip(labels, counts)]

    def subsample(self, labels: List[Tensor]) -> List[Tensor]:
        """Indices of the sampled RoIs of each image (positives and negatives, in index order)."""
        return self._subsample(labels)[0]

    def _subsample(self, labels: List[Tensor]) -> Tuple[List[Tensor], int]:
        """:meth:`subsample` and the number of sampled positives of all images."""
        pos_masks, neg_masks, counts = self.fg_bg_sampler.sample(labels)
        # The sampler's counts size the index lists: no host read.
        sampled = [
            torch.nonzero_static(pos | neg, size=num_pos + num_neg).flatten()
            for pos, neg, (num_pos, num_neg) in zip(pos_masks, neg_masks, counts)
        ]
        return sampled, sum(num_pos for num_pos, _ in counts)

    def select_training_samples(
        self, proposals: List[Tensor], targets: List[Dict[str, Tensor]]
    ) -> Tuple[List[Tensor], List[Tensor], List[Tensor], List[Tensor]]:
        """Adds the gt boxes to the proposals, matches, samples; returns the sampled RoIs with their
        matched gt index, label and regression target."""
        return self._select_training_samples(proposals, targets)[:4]

    def _select_training_samples(
        self, proposals: List[Tensor], targets: List[Dict[str, Tensor]]
    ) -> Tuple[List[Tensor], List[Tensor], List[Tensor], List[Tensor], int]:
        """:meth:`select_training_samples` and the number of sampled positives."""
        dtype, device = proposals[0].dtype, proposals[0].device
        gt_boxes = [t["boxes"].to(dtype) for t in targets]
        gt_labels = [t["labels"] for t in targets]
        # Ground truth joins the proposals so every object has at least one perfect RoI.
        proposals = [torch.cat((p, g)) for p, g in zip(proposals, gt_boxes)]
        matched_idxs, labels = self.assign_targets_to_proposals(proposals, gt_boxes, gt_labels)
        sampled, num_positive = self._subsample(labels)

        matched_gt_boxes = []
        for i, keep in enumerate(sampled):
            proposals[i] = proposals[i][keep]
            labels[i] = labels[i][keep]
            matched_idxs[i] = matched_idxs[i][keep]
            boxes = gt_boxes[i]
            if boxes.numel() == 0:
                boxes = torch.zeros((1, 4), dtype=dtype, device=device)
            matched_gt_boxes.append(boxes[matched_idxs[i]])
        regression_targets = self.box_coder.encode(matched_gt_boxes, proposals)
        return proposals, matched_idxs, labels, regression_targets, num_positive

    def postprocess_detections(
        self,
        class_logits: Tensor,
        box_regression: Tensor,
        proposals: List[Tensor],
        image_shapes: List[Tuple[int, int]],
    ) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
        """Softmax, decode, clip, drop background / low scores / tiny boxes, per-class NMS, top-k."""
        device = class_logits.device
        num_classes = class_logits.shape[-1]
        counts = [p.shape[0] for p in proposals]
        decoded = self.box_coder.decode(box_regression, proposals).split(counts, 0)
        boxes = torch.cat([box_ops.clip_boxes_to_image(b, size) for b, size in zip(decoded, image_shapes)])
        scores = F.softmax(class_logits, -1)
        labels = torch.arange(num_classes, device=device).view(1, -1).expand_as(scores)
        # Column 0 is the background class: never a detection.
        boxes, scores, labels = boxes[:, 1:].reshape(-1, 4), scores[:, 1:].reshape(-1), labels[:, 1:].reshape(-1)
        keep = (scores > self.score_thresh) & box_ops.small_box_mask(boxes, min_size=1e-2)
        sizes = [n * (num_classes - 1) for n in counts]
        kept = det_utils.segment_indices(keep, sizes, "the detections kept per image size its NMS input")

        all_boxes, all_scores, all_labels = [], [], []
        for image_boxes, image_scores, image_labels, index in zip(
            boxes.split(sizes), scores.split(sizes), labels.split(sizes), kept
        ):
            image_boxes, image_scores, image_labels = image_boxes[index], image_scores[index], image_labels[index]
            keep, kept_scores = self.final_nms(image_boxes, image_scores, image_labels)
            all_boxes.append(image_boxes[keep])
            all_scores.append(kept_scores)
            all_labels.append(image_labels[keep])
        return all_boxes, all_scores, all_labels

    def final_nms(self, boxes: Tensor, scores: Tensor, labels: Tensor) -> Tuple[Tensor, Tensor]:
        """Per-class NMS of one image's ``boxes [N, 4]``, ``scores [N]``, ``labels [N]``: the indices
        of the top ``detections_per_img`` kept ``[D]`` and their scores ``[D]`` (decayed by soft-NMS)."""
        if self.nms_method == "hard":
            with allowed_sync("NMS: the number of boxes kept is data-dependent"):
                keep = box_ops.batched_nms(boxes, scores, labels, self.nms_thresh)
            keep = keep[: self.detections_per_img]
            return keep, scores[keep]
        with allowed_sync("soft-NMS is sequential: each step reads the best remaining box"):
            return batched_soft_nms(boxes, scores, labels, self.nms_method.removeprefix("soft-"), self.nms_thresh,
                                    self.soft_nms_sigma, self.soft_nms_min_score, self.detections_per_img)

    def box_features(
        self, features: Dict[str, Tensor], proposals: List[Tensor], image_shapes: List[Tuple[int, int]]
    ) -> Tensor:
        """``box_head(box_roi_pool(...))``: one embedding per proposal, ``[sum P_i, representation]``.

        In training with our RoIAlign pooler and two-layer head, pooling feeds fc6 directly (same
        values; the pooled features are not stored, the largest saving of memory in CPU training).
        """
        if self._can_fuse_pooling_and_fc6():
            fc6 = self.box_head.fc6
            hidden = self.box_roi_pool.forward_linear(features, proposals, image_shapes, fc6.weight, fc6.bias)
            return self.box_head.after_fc6(hidden)
        return self.box_head(self.box_roi_pool(features, proposals, image_shapes))

    def _can_fuse_pooling_and_fc6(self) -> bool:
        """Only when it saves memory (autograd on) and skipping the modules' own forward calls
        changes nothing: exactly our classes, a plain nn.Linear fc6 (not quantized, pruned or
        parametrized) and no hooks that would expect those calls."""
        if not (self.training and torch.is_grad_enabled()):
            return False
        pool, head = self.box_roi_pool, self.box_head
        if type(pool) is not MultiScaleRoIAlign or type(head) is not TwoMLPHead or type(head.fc6) is not nn.Linear:
            return False
        if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
            return False
        return not any(m._forward_hooks or m._forward_pre_hooks for m in (pool, head, head.fc6))

    def forward(
        self,
        features: Dict[str, Tensor],
        proposals: List[Tensor],
        image_shapes: List[Tuple[int, int]],
        targets: Optional[List[Dict[str, Tensor]]] = None,
    ) -> Tuple[List[Dict[str, Tensor]], Dict[str, Tensor]]:
        """Training: ``([], {loss_classifier, loss_box_reg})``. Evaluation: per image
        ``{"boxes" [D, 4], "labels" [D], "scores" [D]}`` in resized-image coordinates."""
        if targets is not None:
            for index, target in enumerate(targets):
                if not target["boxes"].is_floating_point():
                    raise TypeError(f"target {index}: boxes must be a float tensor, got {target['boxes'].dtype}")
                if target["labels"].dtype != torch.int64:
                    raise TypeError(f"target {index}: labels must be int64, got {target['labels'].dtype}")

        if self.training:
            if targets is None:
                raise ValueError("RoIHeads needs targets in training mode")
            proposals, _, labels, regression_targets, num_positive = self._select_training_samples(proposals, targets)

        box_features = self.box_features(features, proposals, image_shapes)
        class_logits, box_regression = self.box_predictor(box_features)

        if self.training:
            loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets,
                                                          self.smooth_l1_beta, num_positive)
            return [], {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}

        boxes, scores, labels = self.postprocess_detections(class_logits, box_regression, proposals, image_shapes)
        detections = [{"boxes": b, "labels": l, "scores": s} for b, l, s in zip(boxes, labels, scores)]
        return detections, {}
