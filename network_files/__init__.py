"""Faster R-CNN network: transform, RPN, RoI heads and the model that ties them together.

The low-level ops live in ``network_files/ops/``; ``network_files.fast_path`` and the poolers stay
importable from here, their public path.
"""
from .faster_rcnn_framework import FasterRCNN, FasterRCNNBase, FastRCNNPredictor, TwoMLPHead
from .ops import fast_path
from .image_list import ImageList
from .ops.poolers import MultiScaleRoIAlign, MultiScaleRoIPool
from .roi_head import RoIHeads, fastrcnn_loss
from .rpn_function import AnchorsGenerator, RegionProposalNetwork, RPNHead
from .transform import GeneralizedRCNNTransform

__all__ = [
    "AnchorsGenerator",
    "FasterRCNN",
    "FasterRCNNBase",
    "FastRCNNPredictor",
    "GeneralizedRCNNTransform",
    "ImageList",
    "MultiScaleRoIAlign",
    "MultiScaleRoIPool",
    "RegionProposalNetwork",
    "RoIHeads",
    "RPNHead",
    "TwoMLPHead",
    "fastrcnn_loss",
]
