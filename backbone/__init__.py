"""Backbones for Faster R-CNN: ResNet-50 + FPN, ResNet C4, MobileNetV2, VGG and any torchvision
classifier, with torchvision-compatible keys.

Each backbone module registers its detector entry in :mod:`backbone.registry`; importing this
package registers them all.
"""
from .feature_pyramid_network import (
    BackboneWithFPN,
    ExtraFPNBlock,
    FeaturePyramidNetwork,
    IntermediateLayerGetter,
    LastLevelMaxPool,
)
from .frozen_bn import FrozenBatchNorm2d
from .mobilenetv2_model import InvertedResidual, MobileNetV2, mobilenet_v2_backbone
from .registry import (
    BACKBONES,
    BackboneSpec,
    DetectorParts,
    get_backbone,
    option,
    register_backbone,
    validate_trainable_layers,
)
from .resnet50_fpn_model import Bottleneck, ResNet, resnet50_fpn_backbone
from .resnet_c4_model import ResNetC4Head, freeze_resnet_stages, resnet, resnet_c4
from .torchvision_backbones import (
    DEFAULT_RETURN_NODES,
    TorchvisionBackbone,
    classifier_names,
    freeze_batch_norms,
    torchvision_backbone,
)
from .vgg_model import VGG, VGGBoxHead, VGGOptions, freeze_vgg_blocks, vgg, vgg_backbone, vgg_paper_parts
from .weight_files import (
    WEIGHT_FILE_NAMES,
    WEIGHT_URLS,
    MissingWeightFileError,
    WeightFileError,
    load_weight_file,
    read_weight_file,
    weight_url,
)

__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "BackboneWithFPN",
    "Bottleneck",
    "DEFAULT_RETURN_NODES",
    "DetectorParts",
    "ExtraFPNBlock",
    "FeaturePyramidNetwork",
    "FrozenBatchNorm2d",
    "IntermediateLayerGetter",
    "InvertedResidual",
    "LastLevelMaxPool",
    "MissingWeightFileError",
    "MobileNetV2",
    "ResNet",
    "ResNetC4Head",
    "TorchvisionBackbone",
    "VGG",
    "VGGBoxHead",
    "VGGOptions",
    "WEIGHT_FILE_NAMES",
    "WEIGHT_URLS",
    "WeightFileError",
    "classifier_names",
    "freeze_batch_norms",
    "freeze_resnet_stages",
    "freeze_vgg_blocks",
    "get_backbone",
    "load_weight_file",
    "mobilenet_v2_backbone",
    "option",
    "read_weight_file",
    "register_backbone",
    "resnet",
    "resnet50_fpn_backbone",
    "resnet_c4",
    "torchvision_backbone",
    "validate_trainable_layers",
    "vgg",
    "vgg_backbone",
    "vgg_paper_parts",
    "weight_url",
]
