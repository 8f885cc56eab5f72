"""Faster R-CNN: backbone -> RPN -> RoI heads, wrapped by the resize/normalise transform."""
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .ops import fast_path
from .box_head import FastRCNNPredictor, TwoMLPHead
from .ops.poolers import MultiScaleRoIAlign
from .ops.syncs import allowed_sync
from .roi_head import RoIHeads
from .rpn_function import AnchorsGenerator, RegionProposalNetwork, RPNHead
from .ops.tracing import Size
from .transform import GeneralizedRCNNTransform

Targets = List[Dict[str, Tensor]]


class FasterRCNNBase(nn.Module):
    """Runs the four stages and checks the inputs on the way in.

    Args:
        backbone: image ``[B, 3, H, W]`` -> one feature map or an ordered dict of them.
        rpn: proposes boxes from the features.
        roi_heads: classifies and refines the proposals.
        transform: normalises, resizes and batches the images; maps detections back.
    """

    def __init__(self, backbone: nn.Module, rpn: nn.Module, roi_heads: nn.Module, transform: nn.Module) -> None:
        super().__init__()
        self.transform = transform
        self.backbone = backbone
        self.rpn = rpn
        self.roi_heads = roi_heads

    def forward(
        self, images: List[Tensor], targets: Optional[Targets] = None
    ) -> Union[Dict[str, Tensor], List[Dict[str, Tensor]]]:
        """
        Args:
            images: list of ``[3, H_i, W_i]`` float images in [0, 1] (sizes may differ).
            targets: in training, one dict per image with ``boxes`` ``[N, 4]`` float
                ``(x1, y1, x2, y2)`` pixels and ``labels`` ``[N]`` int64 (1..num_classes-1).
        Returns:
            training: ``{"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}``;
            evaluation: one ``{"boxes" [D, 4], "labels" [D], "scores" [D]}`` per image, boxes in
            the coordinates of the input images.
        """
        if self.training:
            self._check_targets(targets)
        original_sizes: List[Tuple[Size, Size]] = []
        for index, image in enumerate(images):
            if image.dim() != 3:
                raise ValueError(f"image {index}: expected a [C, H, W] tensor, got shape {tuple(image.shape)}")
            original_sizes.append((image.shape[-2], image.shape[-1]))

        image_list, targets = self.transform(images, targets)
        batch = image_list.tensors
        if fast_path.use_channels_last(batch):
            batch = batch.contiguous(memory_format=torch.channels_last)
        features = self.backbone(batch)
        if isinstance(features, Tensor):
            features = OrderedDict([("0", features)])
        proposals, proposal_losses = self.rpn(image_list, features, targets)
        detections, detector_losses = self.roi_heads(features, proposals, image_list.image_sizes, targets)

        if self.training:
            return {**detector_losses, **proposal_losses}
        return self.transform.postprocess(detections, image_list.image_sizes, original_sizes)

    @staticmethod
    def _check_targets(targets: Optional[Targets]) -> None:
        if targets is None:
            raise ValueError("targets are required in training mode (call model.eval() for inference)")
        degenerate = []
        for index, target in enumerate(targets):
            boxes = target.get("boxes")
            if not isinstance(boxes, Tensor):
                raise ValueError(f"target {index}: 'boxes' must be a Tensor of shape [N, 4], got {type(boxes).__name__}")
            if boxes.dim() != 2 or boxes.shape[-1] != 4:
                raise ValueError(f"target {index}: 'boxes' must have shape [N, 4], got {list(boxes.shape)}")
            if "labels" not in target:
                raise ValueError(f"target {index}: 'labels' is missing")
            degenerate.append((boxes[:, 2:] <= boxes[:, :2]).any(dim=1))
        with allowed_sync("one check of every image's boxes for a clear error"):
            found = bool(torch.cat(degenerate).any()) if degenerate else False
        if found:
            _raise_degenerate(targets, degenerate)


def _raise_degenerate(targets: Targets, degenerate: List[Tensor]) -> None:
    """The error for the first box without area (``degenerate``: one ``[N_i]`` mask per image)."""
    for index, (target, mask) in enumerate(zip(targets, degenerate)):
        if mask.any():
            box_index = int(torch.where(mask)[0][0])
            raise ValueError(
                f"target {index}: box {box_index} {target['boxes'][box_index].tolist()} has no area "
                "(boxes must satisfy x2 > x1 and y2 > y1)"
            )


class FasterRCNN(FasterRCNNBase):
    """Faster R-CNN with torchvision's keywords, defaults and behaviour.

    ``backbone`` must have an ``out_channels`` attribute. ``num_classes`` counts the background.
    The defaults build the FPN configuration: anchors ``(32, 64, 128, 256, 512)`` x
    ``(0.5, 1, 2)``, RoIAlign 7x7 over feature maps ``"0".."3"``, a 1024-wide two-layer head.
    Three keywords beyond torchvision's select the paper's training rules (see
    ``RegionProposalNetwork`` and ``RoIHeads``), three more soft-NMS for the final detections
    (``box_nms`` "soft-linear" or "soft-gaussian"); their defaults keep torchvision's behaviour.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: Optional[int] = None,
        # transform
        min_size: Union[int, Sequence[int]] = 800,
        max_size: int = 1333,
        image_mean: Optional[Sequence[float]] = None,
        image_std: Optional[Sequence[float]] = None,
        # RPN
        rpn_anchor_generator: Optional[AnchorsGenerator] = None,
        rpn_head: Optional[nn.Module] = None,
        rpn_pre_nms_top_n_train: int = 2000,
        rpn_pre_nms_top_n_test: int = 1000,
        rpn_post_nms_top_n_train: int = 2000,
        rpn_post_nms_top_n_test: int = 1000,
        rpn_nms_thresh: float = 0.7,
        rpn_fg_iou_thresh: float = 0.7,
        rpn_bg_iou_thresh: float = 0.3,
        rpn_batch_size_per_image: int = 256,
        rpn_positive_fraction: float = 0.5,
        rpn_score_thresh: float = 0.0,
        # box head
        box_roi_pool: Optional[nn.Module] = None,
        box_head: Optional[nn.Module] = None,
        box_predictor: Optional[nn.Module] = None,
        box_score_thresh: float = 0.05,
        box_nms_thresh: float = 0.5,
        box_detections_per_img: int = 100,
        box_fg_iou_thresh: float = 0.5,
        box_bg_iou_thresh: float = 0.5,
        box_batch_size_per_image: int = 512,
        box_positive_fraction: float = 0.25,
        bbox_reg_weights: Optional[Tuple[float, float, float, float]] = None,
        # the paper's (py-faster-rcnn's) training rules; the defaults are torchvision's behaviour
        rpn_ignore_cross_boundary: bool = False,
        box_bg_iou_low_thresh: float = 0.0,
        box_smooth_l1_beta: float = 1 / 9,
        # final detections: hard NMS (torchvision's) or soft-NMS (network_files/ops/soft_nms.py)
        box_nms: str = "hard",
        box_soft_nms_sigma: float = 0.5,
        box_soft_nms_min_score: float = 1e-3,
        **transform_kwargs,
    ) -> None:
        _check_arguments(backbone, num_classes, box_predictor)
        out_channels = backbone.out_channels
        if rpn_anchor_generator is None:
            rpn_anchor_generator = AnchorsGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)
        if rpn_head is None:
            rpn_head = RPNHead(out_channels, rpn_anchor_generator.num_anchors_per_location()[0])
        rpn = RegionProposalNetwork(
            rpn_anchor_generator, rpn_head, rpn_fg_iou_thresh, rpn_bg_iou_thresh, rpn_batch_size_per_image,
            rpn_positive_fraction, dict(training=rpn_pre_nms_top_n_train, testing=rpn_pre_nms_top_n_test),
            dict(training=rpn_post_nms_top_n_train, testing=rpn_post_nms_top_n_test), rpn_nms_thresh,
            score_thresh=rpn_score_thresh, ignore_cross_boundary=rpn_ignore_cross_boundary)

        box_roi_pool, box_head, box_predictor = _default_box_parts(box_roi_pool, box_head, box_predictor,
                                                                   out_channels, num_classes)
        roi_heads = RoIHeads(
            box_roi_pool, box_head, box_predictor, box_fg_iou_thresh, box_bg_iou_thresh, box_batch_size_per_image,
            box_positive_fraction, bbox_reg_weights, box_score_thresh, box_nms_thresh, box_detections_per_img,
            bg_iou_low_thresh=box_bg_iou_low_thresh, smooth_l1_beta=box_smooth_l1_beta, nms_method=box_nms,
            soft_nms_sigma=box_soft_nms_sigma, soft_nms_min_score=box_soft_nms_min_score)

        mean = image_mean if image_mean is not None else [0.485, 0.456, 0.406]
        std = image_std if image_std is not None else [0.229, 0.224, 0.225]
        transform = GeneralizedRCNNTransform(min_size, max_size, mean, std, **transform_kwargs)
        super().__init__(backbone, rpn, roi_heads, transform)


def _check_arguments(backbone: nn.Module, num_classes: Optional[int], box_predictor: Optional[nn.Module]) -> None:
    if not hasattr(backbone, "out_channels"):
        raise ValueError("the backbone needs an 'out_channels' attribute (channels of its feature maps)")
    if num_classes is not None and box_predictor is not None:
        raise ValueError("give either num_classes or box_predictor, not both")
    if num_classes is None and box_predictor is None:
        raise ValueError("num_classes is required when box_predictor is not given")


def _default_box_parts(box_roi_pool: Optional[nn.Module], box_head: Optional[nn.Module],
                       box_predictor: Optional[nn.Module], out_channels: int,
                       num_classes: Optional[int]) -> Tuple[nn.Module, nn.Module, nn.Module]:
    """torchvision's defaults for the parts not given: RoIAlign 7x7 over "0".."3", a 1024-wide
    two-layer head and its predictor."""
    if box_roi_pool is None:
        box_roi_pool = MultiScaleRoIAlign(featmap_names=["0", "1", "2", "3"], output_size=7, sampling_ratio=2)
    if box_head is None:
        resolution = box_roi_pool.output_size[0]
        box_head = TwoMLPHead(out_channels * resolution**2, 1024)
    if box_predictor is None:
        box_predictor = FastRCNNPredictor(1024, num_classes)
    return box_roi_pool, box_head, box_predictor
