"""Builds a detector from a plain config dict, so checkpoints can rebuild the exact model.

The config holds only plain types (it is stored in every checkpoint under ``"model_config"``):
``backbone``, ``num_classes`` (background included), ``min_size``, ``max_size`` and the optional
detector hyper-parameters listed in ``DETECTOR_KEYS``.
"""
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn

from backbone import (
    FrozenBatchNorm2d,
    load_weight_file,
    mobilenet_v2_backbone,
    resnet50_fpn_backbone,
    vgg_backbone,
)
from network_files import AnchorsGenerator, FasterRCNN, FastRCNNPredictor, MultiScaleRoIAlign, TwoMLPHead
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


def _resnet50_fpn(config: Dict[str, Any], weights: Optional[str]) -> Tuple[nn.Module, tuple, list]:
    backbone = resnet50_fpn_backbone(
        pretrain_path=weights or "",
        norm_layer=FrozenBatchNorm2d,
        trainable_layers=int(config.get("trainable_layers", 3)),
    )
    return backbone, FPN_ANCHORS, ["0", "1", "2", "3"]


def _mobilenet_v2(config: Dict[str, Any], weights: Optional[str]) -> Tuple[nn.Module, tuple, list]:
    backbone = mobilenet_v2_backbone(
        weights_path=weights,
        alpha=float(config.get("width_mult") or 1.0),
        output_stride=int(config.get("feature_stride") or 32),
    )
    return backbone, SINGLE_LEVEL_ANCHORS, ["0"]


def _vgg(name: str) -> Callable:
    def build(config: Dict[str, Any], weights: Optional[str]) -> Tuple[nn.Module, tuple, list]:
        return vgg_backbone(name, weights_path=weights), SINGLE_LEVEL_ANCHORS, ["0"]

    return build


BACKBONES: Dict[str, Callable] = {
    "resnet50_fpn": _resnet50_fpn,
    "mobilenet_v2": _mobilenet_v2,
    **{name: _vgg(name) for name in ("vgg11", "vgg13", "vgg16", "vgg19")},
}

# The ImageNet weight file each backbone loads (a key of backbone.WEIGHT_FILE_NAMES).
BACKBONE_WEIGHT_KIND = {"resnet50_fpn": "resnet50", "mobilenet_v2": "mobilenet_v2"}


def build_model(config: Dict[str, Any], backbone_weights: Optional[str] = None) -> FasterRCNN:
    """A FasterRCNN for ``config``; ``backbone_weights`` is an ImageNet file for the backbone."""
    name = config["backbone"]
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone '{name}' (choose from {', '.join(BACKBONES)})")
    backbone, default_sizes, featmap_names = BACKBONES[name](config, backbone_weights)

    sizes = config.get("anchor_sizes") or default_sizes
    if len(featmap_names) == 1 and sizes and not isinstance(sizes[0], (list, tuple)):
        sizes = (tuple(sizes),)  # one feature map: all sizes belong to it
    ratios = tuple(config.get("aspect_ratios") or DEFAULT_RATIOS)
    anchor_generator = AnchorsGenerator(
        tuple(tuple(s) if isinstance(s, (list, tuple)) else (s,) for s in sizes), (ratios,) * len(sizes)
    )
    # A narrower box head than the default 1024 makes small CPU models much faster.
    width = int(config.get("representation_size") or 1024)
    model = FasterRCNN(
        backbone,
        min_size=config.get("min_size", 800),
        max_size=int(config.get("max_size", 1333)),
        rpn_anchor_generator=anchor_generator,
        box_roi_pool=MultiScaleRoIAlign(featmap_names=featmap_names, output_size=7, sampling_ratio=2),
        box_head=TwoMLPHead(backbone.out_channels * 7 * 7, width),
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


def load_detector_weights(model: FasterRCNN, path: str, config: Dict[str, Any]) -> None:
    """Fine-tune from a detector checkpoint (the official COCO file, or one of ours): every
    matching tensor is loaded; a box predictor with another class count stays freshly initialised."""
    load_weight_file(path, "fasterrcnn_resnet50_fpn_coco")  # clear error (with the URL) when missing
    raw = load_checkpoint(path)
    if isinstance(raw, dict) and "model_config" in raw:
        state, eps = raw["model"], raw["model_config"].get("frozen_bn_eps")
    else:
        # torchvision evaluates its v1 COCO weights with eps 0 in the frozen BatchNorms.
        state, eps = raw, (0.0 if config["backbone"] == "resnet50_fpn" else None)
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
