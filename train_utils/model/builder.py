"""Builds a detector from a plain config dict, so checkpoints can rebuild the exact model.

The config holds only plain types (it is stored in every checkpoint under ``"model_config"``):
``backbone``, ``num_classes`` (background included), ``min_size``, ``max_size``, ``roi_op``
("align" or "pool"), for ``tv:<name>`` backbones ``return_nodes`` and ``fpn``, and the optional
detector hyper-parameters listed in ``DETECTOR_KEYS``.
"""
import os
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import nn

from backbone import (
    DEFAULT_RETURN_NODES,
    WEIGHT_FILE_NAMES,
    FrozenBatchNorm2d,
    classifier_names,
    mobilenet_v2_backbone,
    resnet50_fpn_backbone,
    resnet_c4,
    torchvision_backbone,
    vgg_backbone,
)
from network_files import (
    AnchorsGenerator,
    FasterRCNN,
    FastRCNNPredictor,
    MultiScaleRoIAlign,
    MultiScaleRoIPool,
    TwoMLPHead,
)
from train_utils.checkpoint import load_checkpoint

# FasterRCNN keywords that may be set from the command line and are stored in checkpoints.
DETECTOR_KEYS = (
    "rpn_pre_nms_top_n_train",
    "rpn_pre_nms_top_n_test",
    "rpn_post_nms_top_n_train",
    "rpn_post_nms_top_n_test",
    "box_batch_size_per_image",
    "box_detections_per_img",
    "box_score_thresh",
)

# Anchor sizes per feature map and the RoI pooler's feature maps, by backbone family.
SINGLE_LEVEL_ANCHORS = ((32, 64, 128, 256, 512),)
FPN_ANCHORS = ((32,), (64,), (128,), (256,), (512,))
DEFAULT_RATIOS = (0.5, 1.0, 2.0)
# "tv:<name>" names any torchvision classification model as the backbone.
TORCHVISION_PREFIX = "tv:"
ROI_OPS = ("align", "pool")


class DetectorParts(NamedTuple):
    """What a backbone builder hands to build_model.

    backbone: image -> feature map(s), with ``out_channels``; anchor_sizes: default sizes, one tuple
    per feature map; featmap_names: the maps the RoI pooler reads; box_head: [R, C, P, P] -> [R, D]
    with ``out_channels`` D, or None for a TwoMLPHead of ``representation_size``; pool_size: P.
    """

    backbone: nn.Module
    anchor_sizes: tuple
    featmap_names: List[str]
    box_head: Optional[nn.Module] = None
    pool_size: int = 7


def _resnet50_fpn(config: Dict[str, Any], weights: Optional[str]) -> DetectorParts:
    backbone = resnet50_fpn_backbone(
        pretrain_path=weights or "",
        norm_layer=FrozenBatchNorm2d,
        trainable_layers=int(config.get("trainable_layers", 3)),
    )
    return DetectorParts(backbone, FPN_ANCHORS, ["0", "1", "2", "3"])


def _resnet_c4(arch: str) -> Callable:
    def build(config: Dict[str, Any], weights: Optional[str]) -> DetectorParts:
        trunk, head = resnet_c4(arch, weights, trainable_layers=int(config.get("trainable_layers", 3)))
        return DetectorParts(trunk, SINGLE_LEVEL_ANCHORS, ["0"], box_head=head, pool_size=14)

    return build


def _mobilenet_v2(config: Dict[str, Any], weights: Optional[str]) -> DetectorParts:
    backbone = mobilenet_v2_backbone(
        weights_path=weights,
        alpha=float(config.get("width_mult") or 1.0),
        output_stride=int(config.get("feature_stride") or 32),
    )
    return DetectorParts(backbone, SINGLE_LEVEL_ANCHORS, ["0"])


def _vgg(name: str) -> Callable:
    def build(config: Dict[str, Any], weights: Optional[str]) -> DetectorParts:
        return DetectorParts(vgg_backbone(name, weights_path=weights), SINGLE_LEVEL_ANCHORS, ["0"])

    return build


def _torchvision(config: Dict[str, Any], weights: Optional[str]) -> DetectorParts:
    """``tv:<name>``: with an FPN, one anchor size per level of 8x its stride (32..512 for a ResNet)."""
    backbone = torchvision_backbone(
        config["backbone"][len(TORCHVISION_PREFIX):],
        return_nodes=config.get("return_nodes") or None,
        fpn=config.get("fpn") is not False,
        weights_path=weights,
    )
    if backbone.fpn is None:
        return DetectorParts(backbone, SINGLE_LEVEL_ANCHORS, backbone.featmap_names)
    return DetectorParts(backbone, tuple((8 * stride,) for stride in backbone.strides), backbone.featmap_names)


BACKBONES: Dict[str, Callable] = {
    "resnet50_fpn": _resnet50_fpn,
    "resnet50_c4": _resnet_c4("resnet50"),
    "resnet101_c4": _resnet_c4("resnet101"),
    "mobilenet_v2": _mobilenet_v2,
    **{name: _vgg(name) for name in ("vgg11", "vgg13", "vgg16", "vgg19")},
}

# The ImageNet weight file each backbone loads (a key of backbone.WEIGHT_FILE_NAMES).
BACKBONE_WEIGHT_KIND = {
    "resnet50_fpn": "resnet50",
    "resnet50_c4": "resnet50",
    "resnet101_c4": "resnet101",
    "mobilenet_v2": "mobilenet_v2",
    **{name: name for name in ("vgg11", "vgg13", "vgg16", "vgg19")},
    **{TORCHVISION_PREFIX + name: name for name in DEFAULT_RETURN_NODES if name in WEIGHT_FILE_NAMES},
}


def check_backbone_name(name: str) -> str:
    """``name`` if it is a key of BACKBONES or ``tv:`` + a torchvision classifier, else ValueError."""
    if name in BACKBONES:
        return name
    if name.startswith(TORCHVISION_PREFIX):
        if name[len(TORCHVISION_PREFIX):] in classifier_names():
            return name
        raise ValueError(
            f"unknown backbone '{name}': not a torchvision classification model "
            "(see torchvision.models.list_models(module=torchvision.models))"
        )
    raise ValueError(f"unknown backbone '{name}' (choose from {', '.join(BACKBONES)}, or tv:<torchvision model>)")


def _roi_pooler(roi_op: str, featmap_names: List[str], output_size: int) -> nn.Module:
    """RoIAlign (sampling ratio 2, torchvision's default) or RoIPool over ``featmap_names``."""
    if roi_op == "align":
        return MultiScaleRoIAlign(featmap_names=featmap_names, output_size=output_size, sampling_ratio=2)
    if roi_op == "pool":
        return MultiScaleRoIPool(featmap_names=featmap_names, output_size=output_size)
    raise ValueError(f"unknown roi_op '{roi_op}' (choose from {', '.join(ROI_OPS)})")


def build_model(config: Dict[str, Any], backbone_weights: Optional[str] = None) -> FasterRCNN:
    """A FasterRCNN for ``config``; ``backbone_weights`` is an ImageNet file for the backbone."""
    name = check_backbone_name(config["backbone"])
    builder = _torchvision if name.startswith(TORCHVISION_PREFIX) else BACKBONES[name]
    parts: DetectorParts = builder(config, backbone_weights)
    backbone = parts.backbone

    sizes = config.get("anchor_sizes") or parts.anchor_sizes
    if len(parts.anchor_sizes) == 1 and sizes and not isinstance(sizes[0], (list, tuple)):
        sizes = (tuple(sizes),)  # one feature map: all sizes belong to it
    if len(sizes) != len(parts.anchor_sizes):
        raise ValueError(
            f"anchor_sizes: the {name} backbone has {len(parts.anchor_sizes)} feature maps, "
            f"got {len(sizes)} sizes (give one per map)"
        )
    ratios = tuple(config.get("aspect_ratios") or DEFAULT_RATIOS)
    anchor_generator = AnchorsGenerator(
        tuple(tuple(s) if isinstance(s, (list, tuple)) else (s,) for s in sizes), (ratios,) * len(sizes)
    )
    pool = parts.pool_size
    if parts.box_head is None:
        # A narrower box head than the default 1024 makes small CPU models much faster.
        width = int(config.get("representation_size") or 1024)
        box_head = TwoMLPHead(backbone.out_channels * pool * pool, width)
    else:
        box_head, width = parts.box_head, parts.box_head.out_channels
    model = FasterRCNN(
        backbone,
        min_size=config.get("min_size", 800),
        max_size=int(config.get("max_size", 1333)),
        rpn_anchor_generator=anchor_generator,
        box_roi_pool=_roi_pooler(config.get("roi_op") or "align", parts.featmap_names, pool),
        box_head=box_head,
        box_predictor=FastRCNNPredictor(width, int(config["num_classes"])),
        **{key: config[key] for key in DETECTOR_KEYS if config.get(key) is not None},
    )
    if config.get("frozen_bn_eps") is not None:
        set_frozen_bn_eps(model, float(config["frozen_bn_eps"]))
    return model


def set_frozen_bn_eps(model: nn.Module, eps: float) -> None:
    """The official COCO detector weights were trained with eps 0 in their frozen BatchNorms."""
    for module in model.modules():
        if isinstance(module, FrozenBatchNorm2d):
            module.eps = eps


# The official COCO detector file; torchvision evaluates it with FrozenBatchNorm eps 0.
OFFICIAL_COCO_PREFIX = "fasterrcnn_resnet50_fpn_coco"


def official_frozen_bn_eps(path: str, backbone: str) -> Optional[float]:
    """0.0 for torchvision's v1 COCO file (recognised by its name) on resnet50_fpn, else None."""
    if backbone == "resnet50_fpn" and os.path.basename(path).startswith(OFFICIAL_COCO_PREFIX):
        return 0.0
    return None


def load_detector_weights(model: FasterRCNN, path: str, config: Dict[str, Any]) -> None:
    """Fine-tune from a detector checkpoint (the official COCO file, a WZ-style ``{"model": ...}``
    file or one of ours): every matching tensor is loaded; a box predictor with another class
    count stays freshly initialised."""
    raw = load_checkpoint(path)
    if not isinstance(raw, dict):
        raise ValueError(f"{path} holds a {type(raw).__name__}, not a checkpoint or a state dict")
    state = raw["model"] if isinstance(raw.get("model"), dict) else raw
    stored_config = raw.get("model_config")
    eps = stored_config.get("frozen_bn_eps") if stored_config else official_frozen_bn_eps(path, config["backbone"])
    own = model.state_dict()
    predictor_keys = [k for k in state if k.startswith("roi_heads.box_predictor.")]
    if any(k in own and own[k].shape != state[k].shape for k in predictor_keys):
        state = {k: v for k, v in state.items() if k not in predictor_keys}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("roi_heads.box_predictor.")]
    if missing or unexpected:
        raise ValueError(
            f"{path} does not fit the '{config['backbone']}' detector: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    if eps is not None:
        config["frozen_bn_eps"] = eps
        set_frozen_bn_eps(model, eps)


def count_parameters(model: nn.Module) -> Tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def model_from_checkpoint(checkpoint: Dict[str, Any], device: torch.device = torch.device("cpu")) -> FasterRCNN:
    """Rebuild and load the model a training script saved (``checkpoint["model_config"]``)."""
    if "model_config" not in checkpoint:
        raise ValueError("checkpoint has no 'model_config'; pass --backbone and --classes-json for a bare state dict")
    model = build_model(checkpoint["model_config"])
    model.load_state_dict(checkpoint["model"], strict=True)
    return model.to(device)
