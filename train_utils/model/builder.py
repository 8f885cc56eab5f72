"""The one place that maps a :class:`ModelConfig` onto the network constructors.

The backbone comes from its registry entry (``backbone.registry``); anchors, the RoI pooler, the
box head and predictor and every FasterRCNN keyword come from the config.
"""
import dataclasses
import os
from typing import Any, Mapping, Optional, Tuple, Union

from torch import nn

from backbone import FrozenBatchNorm2d, get_backbone
from backbone.registry import DetectorParts
from network_files import (
    AnchorsGenerator,
    FasterRCNN,
    FastRCNNPredictor,
    MultiScaleRoIAlign,
    MultiScaleRoIPool,
    TwoMLPHead,
)

from .config import ModelConfig

# The official COCO detector file; torchvision evaluates it with FrozenBatchNorm eps 0.
OFFICIAL_COCO_PREFIX = "fasterrcnn_resnet50_fpn_coco"


def build_backbone(config: ModelConfig, weights_path: Optional[str] = None) -> DetectorParts:
    """The registered backbone of ``config`` with its options (and its normalisation, for the
    backbones that have the choice); ``weights_path``: ImageNet file."""
    spec = get_backbone(config.backbone)
    options = dataclasses.asdict(spec.make_options(config.backbone_options))
    if spec.norm:
        options["norm"] = config.norm
    return spec.build(weights_path, config.trainable_layers, **options)


def anchor_generator(config: ModelConfig, parts: DetectorParts) -> AnchorsGenerator:
    """Anchors of ``config`` (default: the backbone's), one size tuple per feature map."""
    maps = len(parts.anchor_sizes)
    sizes: Tuple = config.anchor_sizes or parts.anchor_sizes
    if config.anchor_sizes:
        # A flat list: all sizes on a single map, or one size per map.
        sizes = (tuple(sizes),) if maps == 1 else tuple((s,) for s in sizes)
    if len(sizes) != maps:
        raise ValueError(f"--anchor-sizes: the {config.backbone} backbone has {maps} feature maps, "
                         f"got {len(sizes)} sizes (give one per map)")
    return AnchorsGenerator(tuple(sizes), (tuple(config.aspect_ratios),) * maps)


def roi_pooler(roi_op: str, featmap_names, output_size: int) -> nn.Module:
    """RoIAlign (sampling ratio 2, torchvision's default) or RoIPool over ``featmap_names``."""
    if roi_op == "align":
        return MultiScaleRoIAlign(featmap_names=featmap_names, output_size=output_size, sampling_ratio=2)
    return MultiScaleRoIPool(featmap_names=featmap_names, output_size=output_size)


def build_model(config: Union[ModelConfig, Mapping[str, Any]], backbone_weights: Optional[str] = None) -> FasterRCNN:
    """A FasterRCNN for ``config`` (a ModelConfig, or its dict form); ``backbone_weights`` is an
    ImageNet file for the backbone."""
    if not isinstance(config, ModelConfig):
        config = ModelConfig.from_dict(dict(config))
    parts = build_backbone(config, backbone_weights)
    pool = parts.pool_size
    if parts.box_head is None:
        box_head = TwoMLPHead(parts.backbone.out_channels * pool * pool, config.representation_size)
        width = config.representation_size
    else:
        box_head, width = parts.box_head, parts.box_head.out_channels
    model = FasterRCNN(
        parts.backbone,
        min_size=tuple(config.min_size),
        max_size=config.max_size,
        rpn_anchor_generator=anchor_generator(config, parts),
        box_roi_pool=roi_pooler(config.roi_op, parts.featmap_names, pool),
        box_head=box_head,
        box_predictor=FastRCNNPredictor(width, config.num_classes),
        **config.detector_kwargs(),
    )
    if config.frozen_bn_eps is not None:
        set_frozen_bn_eps(model, config.frozen_bn_eps)
    return model


def set_frozen_bn_eps(model: nn.Module, eps: float) -> None:
    """The official COCO detector weights were trained with eps 0 in their frozen BatchNorms."""
    for module in model.modules():
        if isinstance(module, FrozenBatchNorm2d):
            module.eps = eps


def official_frozen_bn_eps(path: str, backbone: str) -> Optional[float]:
    """0.0 for torchvision's v1 COCO file (recognised by its name) on resnet50_fpn, else None."""
    if backbone == "resnet50_fpn" and os.path.basename(path).startswith(OFFICIAL_COCO_PREFIX):
        return 0.0
    return None


def count_parameters(model: nn.Module) -> Tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
