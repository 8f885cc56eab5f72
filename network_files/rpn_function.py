"""Region Proposal Network: anchors, the objectness/regression head, proposal selection, losses."""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ops import boxes as box_ops
from . import det_utils
from .ops import fast_path
from .image_list import ImageList
from .ops.sparse_grad_conv import sparse_grad_conv2d
from .ops.syncs import allowed_sync
from .ops.tracing import is_tracing


class AnchorsGenerator(nn.Module):
    """Tiles a set of reference boxes over every position of every feature map.

    Args:
        sizes: one tuple of anchor sizes (sqrt of area, in input pixels) per feature map.
        aspect_ratios: one tuple of height/width ratios per feature map (or one shared tuple).

    Each location of feature map ``i`` gets ``len(sizes[i]) * len(aspect_ratios[i])`` anchors,
    ordered ratio-major: ``(r0, s0), (r0, s1), ..., (r1, s0), ...``.
    """

    def __init__(
        self,
        sizes: Sequence = ((128, 256, 512),),
        aspect_ratios: Sequence = ((0.5, 1.0, 2.0),),
    ) -> None:
        super().__init__()
        if not isinstance(sizes[0], (list, tuple)):
            sizes = tuple((s,) for s in sizes)
        if not isinstance(aspect_ratios[0], (list, tuple)):
            aspect_ratios = (aspect_ratios,) * len(sizes)
        if len(sizes) != len(aspect_ratios):
            raise ValueError(f"got {len(sizes)} anchor size groups but {len(aspect_ratios)} aspect ratio groups")
        self.sizes = tuple(tuple(s) for s in sizes)
        self.aspect_ratios = tuple(tuple(r) for r in aspect_ratios)
        self.cell_anchors = [self.generate_anchors(s, r) for s, r in zip(self.sizes, self.aspect_ratios)]
        self._cache: Dict[Tuple, List[Tensor]] = {}

    @staticmethod
    def generate_anchors(
        scales: Sequence[float],
        aspect_ratios: Sequence[float],
        dtype: torch.dtype = torch.float32,
        device: torch.device = torch.device("cpu"),
    ) -> Tensor:
        """Zero-centred anchors ``[len(ratios) * len(scales), 4]`` rounded to whole pixels."""
        scales_t = torch.as_tensor(scales, dtype=dtype, device=device)
        ratios_t = torch.as_tensor(aspect_ratios, dtype=dtype, device=device)
        h_ratios = torch.sqrt(ratios_t)
        w_ratios = 1 / h_ratios
        widths = (w_ratios[:, None] * scales_t[None, :]).reshape(-1)
        heights = (h_ratios[:, None] * scales_t[None, :]).reshape(-1)
        return (torch.stack([-widths, -heights, widths, heights], dim=1) / 2).round()

    def num_anchors_per_location(self) -> List[int]:
        return [len(s) * len(r) for s, r in zip(self.sizes, self.aspect_ratios)]

    def grid_anchors(self, grid_sizes: List[Tuple[int, int]], strides: List[Tuple[int, int]], dtype, device) -> List[Tensor]:
        """Anchors of each feature map, ``[H_i * W_i * A_i, 4]``, row-major over positions."""
        if len(grid_sizes) != len(self.cell_anchors):
            raise ValueError(
                f"the anchor generator has {len(self.cell_anchors)} size groups but the backbone returned "
                f"{len(grid_sizes)} feature maps; give one anchor size tuple per feature map"
            )
        per_level = []
        for (grid_h, grid_w), (stride_h, stride_w), base in zip(grid_sizes, strides, self.cell_anchors):
            base = base.to(dtype=dtype, device=device)
            shifts_x = torch.arange(grid_w, dtype=torch.int32, device=device) * stride_w
            shifts_y = torch.arange(grid_h, dtype=torch.int32, device=device) * stride_h
            shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
            shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
            shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1)
            per_level.append((shifts[:, None, :] + base[None, :, :]).reshape(-1, 4))
        return per_level

    def forward(self, image_list: ImageList, feature_maps: List[Tensor]) -> List[Tensor]:
        """Returns one ``[sum_i H_i * W_i * A_i, 4]`` anchor tensor per image (all equal)."""
        padded_h, padded_w = image_list.tensors.shape[-2:]
        grid_sizes = [(f.shape[-2], f.shape[-1]) for f in feature_maps]
        strides = [(padded_h // gh, padded_w // gw) for gh, gw in grid_sizes]
        # At least float32: bf16 anchors of an 800 px image are off by pixels (autocast features).
        dtype = torch.promote_types(feature_maps[0].dtype, torch.float32)
        device = feature_maps[0].device
        if is_tracing():  # sizes are symbolic: nothing to cache
            return [torch.cat(self.grid_anchors(grid_sizes, strides, dtype, device))] * len(image_list.image_sizes)
        key = (tuple(grid_sizes), tuple(strides), dtype, device)
        anchors = self._cache.get(key)
        if anchors is None:
            # The same padded size recurs constantly (batches are grouped by aspect ratio).
            anchors = [torch.cat(self.grid_anchors(grid_sizes, strides, dtype, device))]
            if len(self._cache) >= 16:
                self._cache.clear()
            self._cache[key] = anchors
        return anchors * len(image_list.image_sizes)


class RPNHead(nn.Module):
    """A 3x3 conv + ReLU shared over levels, then 1x1 convs for objectness and box offsets.

    Args:
        in_channels: channels of every feature map.
        num_anchors: anchors per location.
        conv_depth: number of 3x3 conv + ReLU blocks.
    """

    _version = 2

    def __init__(self, in_channels: int, num_anchors: int, conv_depth: int = 1) -> None:
        super().__init__()
        # Nested Sequential so the parameter names match torchvision's (conv.0.0.weight).
        self.conv = nn.Sequential(
            *[
                nn.Sequential(nn.Conv2d(in_channels, in_channels, kernel_size=3, padding=1), nn.ReLU(inplace=True))
                for _ in range(conv_depth)
            ]
        )
        self.cls_logits = nn.Conv2d(in_channels, num_anchors, kernel_size=1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, kernel_size=1)
        for layer in self.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.normal_(layer.weight, std=0.01)
                nn.init.constant_(layer.bias, 0)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # Checkpoints saved before version 2 (e.g. the official COCO weights) name the conv "conv.weight".
        if local_metadata.get("version", None) is None or local_metadata["version"] < 2:
            for name in ("weight", "bias"):
                old_key = f"{prefix}conv.{name}"
                if old_key in state_dict:
                    state_dict[f"{prefix}conv.0.0.{name}"] = state_dict.pop(old_key)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, features: List[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        """Per level: objectness ``[B, A, H, W]`` and box offsets ``[B, A*4, H, W]``."""
        logits, deltas = [], []
        for feature in features:
            hidden = self._hidden(feature)
            logits.append(self.cls_logits(hidden))
            deltas.append(self.bbox_pred(hidden))
        return logits, deltas

    def _hidden(self, x: Tensor) -> Tensor:
        """The 3x3 conv + ReLU blocks. The losses sample a few hundred anchors per image, so in
        CPU training each conv's backward pass visits only the positions with a gradient."""
        if not fast_path.sparse_backward(self, x):
            return self.conv(x)
        for conv, relu in self.conv:
            x = relu(sparse_grad_conv2d(x, conv))
        return x


def anchors_inside_image(anchors: Tensor, image_size: Tuple[int, int]) -> Tensor:
    """Mask ``[A]`` of the anchors ``[A, 4]`` lying entirely inside a ``(height, width)`` image:
    x1 >= 0, y1 >= 0, x2 <= width, y2 <= height."""
    height, width = image_size
    return (anchors[:, 0] >= 0) & (anchors[:, 1] >= 0) & (anchors[:, 2] <= width) & (anchors[:, 3] <= height)


def _stacked(anchors: List[Tensor]) -> Tensor:
    """The per-image anchors ``[A, 4]`` as ``[B, A, 4]``; a view when they are all one tensor
    (as the anchor generator returns them)."""
    if all(a is anchors[0] for a in anchors):
        return anchors[0].expand(len(anchors), -1, -1)
    return torch.stack(anchors)


def permute_and_flatten(layer: Tensor, num_images: int, channels: int, height: int, width: int) -> Tensor:
    """``[B, A*C, H, W] -> [B, H*W*A, C]`` in the same order as the anchors."""
    layer = layer.view(num_images, -1, channels, height, width)
    return layer.permute(0, 3, 4, 1, 2).reshape(num_images, -1, channels)


def concat_box_prediction_layers(box_cls: List[Tensor], box_regression: List[Tensor]) -> Tuple[Tensor, Tensor]:
    """Flatten per-level head outputs into ``[B * total_anchors, 1]`` and ``[B * total_anchors, 4]``."""
    flat_cls, flat_reg = [], []
    for cls_level, reg_level in zip(box_cls, box_regression):
        num_images, anchors_x_c, height, width = cls_level.shape
        num_anchors = reg_level.shape[1] // 4
        flat_cls.append(permute_and_flatten(cls_level, num_images, anchors_x_c // num_anchors, height, width))
        flat_reg.append(permute_and_flatten(reg_level, num_images, 4, height, width))
    return torch.cat(flat_cls, dim=1).flatten(0, -2), torch.cat(flat_reg, dim=1).reshape(-1, 4)


class RegionProposalNetwork(nn.Module):
    """Proposes object boxes: scores every anchor, decodes offsets, keeps the best after NMS.

    Args:
        anchor_generator: an :class:`AnchorsGenerator`.
        head: module returning per-level objectness and box offsets (e.g. :class:`RPNHead`).
        fg_iou_thresh / bg_iou_thresh: anchors with IoU >= fg are positives, < bg negatives.
        batch_size_per_image / positive_fraction: anchors sampled per image for the loss.
        pre_nms_top_n / post_nms_top_n: ``{"training": n, "testing": n}``; pre is per level.
        nms_thresh: IoU threshold of the per-level NMS.
        score_thresh: proposals with objectness probability below this are dropped.
        ignore_cross_boundary: the paper's training rule: only anchors lying entirely inside the
            (resized, unpadded) image are matched and sampled, the others are ignored (label -1).
            Proposals are made from every anchor either way.
    """

    def __init__(
        self,
        anchor_generator: AnchorsGenerator,
        head: nn.Module,
        fg_iou_thresh: float,
        bg_iou_thresh: float,
        batch_size_per_image: int,
        positive_fraction: float,
        pre_nms_top_n: Dict[str, int],
        post_nms_top_n: Dict[str, int],
        nms_thresh: float,
        score_thresh: float = 0.0,
        ignore_cross_boundary: bool = False,
    ) -> None:
        super().__init__()
        self.anchor_generator = anchor_generator
        self.head = head
        self.box_coder = det_utils.BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
        self.box_similarity = box_ops.box_iou
        self.proposal_matcher = det_utils.Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=True)
        self.fg_bg_sampler = det_utils.BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self._pre_nms_top_n = pre_nms_top_n
        self._post_nms_top_n = post_nms_top_n
        self.nms_thresh = nms_thresh
        self.score_thresh = score_thresh
        self.ignore_cross_boundary = ignore_cross_boundary
        self.min_size = 1e-3

    def pre_nms_top_n(self) -> int:
        return self._pre_nms_top_n["training" if self.training else "testing"]

    def post_nms_top_n(self) -> int:
        return self._post_nms_top_n["training" if self.training else "testing"]

    def assign_targets_to_anchors(
        self, anchors: List[Tensor], targets: List[Dict[str, Tensor]], inside: Optional[Tensor] = None
    ) -> Tuple[List[Tensor], List[Tensor]]:
        """Per image: anchor labels ``[A]`` (1 object, 0 background, -1 ignored) and matched boxes
        ``[A, 4]``. All images are matched at once against their gt boxes padded to one count.
        ``inside [B, A]``: match only these anchors (see :meth:`assign_targets_inside_image`)."""
        batch = _stacked(anchors)
        gt_boxes, gt_valid = det_utils.pad_boxes([t["boxes"] for t in targets])
        if gt_boxes.shape[1] == 0:
            # No image has objects: every anchor is background.
            labels = torch.zeros(batch.shape[:2], dtype=torch.float32, device=batch.device)
            matched = torch.zeros(batch.shape, dtype=torch.float32, device=batch.device)
            return list(labels.unbind(0)), list(matched.unbind(0))
        quality = det_utils.padded_quality(self.box_similarity, gt_boxes, gt_valid, batch, inside)
        matches = self.proposal_matcher.match_padded(quality, gt_valid)
        # An image without objects matches its first (zero) padding row: a zero box, label 0.
        image_index = torch.arange(len(targets), device=matches.device)[:, None]
        matched = gt_boxes[image_index, matches.clamp(min=0)]
        labels = (matches >= 0).to(dtype=torch.float32)
        labels.masked_fill_(matches == det_utils.Matcher.BELOW_LOW_THRESHOLD, 0.0)
        labels.masked_fill_(matches == det_utils.Matcher.BETWEEN_THRESHOLDS, -1.0)
        return list(labels.unbind(0)), list(matched.unbind(0))

    def assign_targets_inside_image(
        self, anchors: List[Tensor], targets: List[Dict[str, Tensor]], image_sizes: List[Tuple[int, int]]
    ) -> Tuple[List[Tensor], List[Tensor]]:
        """:meth:`assign_targets_to_anchors` over the anchors inside each ``(height, width)`` image
        only (py-faster-rcnn's anchor_target_layer with allowed_border 0): the others are labelled
        -1 and match their own box; they never count as an object's best anchor either."""
        batch = _stacked(anchors)
        inside = torch.stack([anchors_inside_image(a, size) for a, size in zip(anchors, image_sizes)])
        with allowed_sync("a clear error for an image without any anchor inside"):
            has_inside = inside.any(dim=1).tolist()
        for size, ok in zip(image_sizes, has_inside):
            if not ok:
                raise ValueError(f"rpn_ignore_cross_boundary: no anchor lies inside the {size[1]}x{size[0]} "
                                 "(width x height) training image; use smaller anchors or larger images")
        labels, matched_boxes = self.assign_targets_to_anchors(anchors, targets, inside)
        labels = [image_labels.masked_fill(~mask, -1.0) for image_labels, mask in zip(labels, inside)]
        matched_boxes = [
            torch.where(mask[:, None], boxes, own.to(boxes.dtype))
            for boxes, mask, own in zip(matched_boxes, inside, batch)
        ]
        return labels, matched_boxes

    def _top_n_per_level(self, objectness: Tensor, num_anchors_per_level: List[int]) -> Tensor:
        """Indices ``[B, K]`` of the best ``pre_nms_top_n`` anchors of every level, concatenated."""
        indices, offset = [], 0
        for level_scores in objectness.split(num_anchors_per_level, 1):
            count = level_scores.shape[1]
            # While tracing, count is a tensor and k must stay one to follow the image size.
            k = count.clamp(max=self.pre_nms_top_n()) if is_tracing() else min(self.pre_nms_top_n(), count)
            indices.append(level_scores.topk(k, dim=1).indices + offset)
            offset += count
        return torch.cat(indices, dim=1)

    def filter_proposals(
        self,
        proposals: Tensor,
        objectness: Tensor,
        image_shapes: List[Tuple[int, int]],
        num_anchors_per_level: List[int],
    ) -> Tuple[List[Tensor], List[Tensor]]:
        """``proposals [B, A, 4]``, ``objectness [B*A, 1]`` -> per image boxes ``[P, 4]`` and scores ``[P]``."""
        num_images = proposals.shape[0]
        device = proposals.device
        objectness = objectness.detach().reshape(num_images, -1)
        levels = torch.cat(
            [torch.full((n,), level, dtype=torch.int64, device=device) for level, n in enumerate(num_anchors_per_level)]
        )
        levels = levels.reshape(1, -1).expand_as(objectness)

        top_idx = self._top_n_per_level(objectness, num_anchors_per_level)
        batch_idx = torch.arange(num_images, device=device)[:, None]
        objectness = objectness[batch_idx, top_idx]
        levels = levels[batch_idx, top_idx]
        proposals = proposals[batch_idx, top_idx]
        probabilities = torch.sigmoid(objectness)

        clipped = torch.stack([box_ops.clip_boxes_to_image(b, size) for b, size in zip(proposals, image_shapes)])
        keep = box_ops.small_box_mask(clipped, self.min_size) & (probabilities >= self.score_thresh)
        kept = det_utils.row_indices(keep, "the proposals kept per image size its NMS input")
        final_boxes, final_scores = [], []
        for boxes, scores, lvl, index in zip(clipped, probabilities, levels, kept):
            boxes, scores, lvl = boxes[index], scores[index], lvl[index]
            # NMS runs independently per feature level.
            with allowed_sync("NMS: the number of boxes kept is data-dependent"):
                keep = box_ops.batched_nms(boxes, scores, lvl, self.nms_thresh)[: self.post_nms_top_n()]
            final_boxes.append(boxes[keep])
            final_scores.append(scores[keep])
        return final_boxes, final_scores

    def compute_loss(
        self, objectness: Tensor, pred_bbox_deltas: Tensor, labels: List[Tensor], regression_targets: List[Tensor]
    ) -> Tuple[Tensor, Tensor]:
        """Binary cross-entropy over sampled anchors; smooth L1 over sampled positives,
        normalised by the number of sampled anchors."""
        pos_masks, neg_masks, counts = self.fg_bg_sampler.sample(labels)
        # The sampler's counts size the index lists: no host read.
        sampled_pos = torch.nonzero_static(torch.cat(pos_masks, dim=0), size=sum(p for p, _ in counts)).flatten()
        sampled_neg = torch.nonzero_static(torch.cat(neg_masks, dim=0), size=sum(n for _, n in counts)).flatten()
        sampled = torch.cat([sampled_pos, sampled_neg], dim=0)

        objectness = objectness.flatten()
        labels_all = torch.cat(labels, dim=0)
        targets_all = torch.cat(regression_targets, dim=0)
        box_loss = det_utils.smooth_l1_loss(
            pred_bbox_deltas[sampled_pos], targets_all[sampled_pos], beta=1 / 9
        ) / sampled.numel()
        objectness_loss = F.binary_cross_entropy_with_logits(objectness[sampled], labels_all[sampled])
        return objectness_loss, box_loss

    def forward(
        self,
        images: ImageList,
        features: Dict[str, Tensor],
        targets: Optional[List[Dict[str, Tensor]]] = None,
    ) -> Tuple[List[Tensor], Dict[str, Tensor]]:
        """Returns per-image proposals ``[P_i, 4]`` (resized-image coordinates) and, in training,
        ``loss_objectness`` and ``loss_rpn_box_reg``."""
        feature_list = list(features.values())
        objectness, pred_bbox_deltas = self.head(feature_list)
        anchors = self.anchor_generator(images, feature_list)
        num_images = len(anchors)
        num_anchors_per_level = [o.shape[1] * o.shape[2] * o.shape[3] for o in objectness]
        objectness, pred_bbox_deltas = concat_box_prediction_layers(objectness, pred_bbox_deltas)

        # Proposals are not differentiated through (as in the paper's approximate joint training).
        proposals = self.box_coder.decode(pred_bbox_deltas.detach(), anchors).view(num_images, -1, 4)
        boxes, _ = self.filter_proposals(proposals, objectness, images.image_sizes, num_anchors_per_level)

        losses: Dict[str, Tensor] = {}
        if self.training:
            if targets is None:
                raise ValueError("the RPN needs targets in training mode")
            if self.ignore_cross_boundary:
                labels, matched_gt_boxes = self.assign_targets_inside_image(anchors, targets, images.image_sizes)
            else:
                labels, matched_gt_boxes = self.assign_targets_to_anchors(anchors, targets)
            regression_targets = self.box_coder.encode(matched_gt_boxes, anchors)
            loss_objectness, loss_rpn_box_reg = self.compute_loss(
                objectness, pred_bbox_deltas, labels, regression_targets
            )
            losses = {"loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_rpn_box_reg}
        return boxes, losses
