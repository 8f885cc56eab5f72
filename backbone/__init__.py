"""Backbones for Faster R-CNN: ResNet-50 + FPN, MobileNetV2 and VGG, with torchvision-compatible keys."""
from .feature_pyramid_network import (
    BackboneWithFPN,
    ExtraFPNBlock,
    FeaturePyramidNetwork,
    IntermediateLayerGetter,
    LastLevelMaxPool,
)
from .mobilenetv2_model import InvertedResidual, MobileNetV2, mobilenet_v2_backbone
from .resnet50_fpn_model import Bottleneck, FrozenBatchNorm2d, ResNet, resnet50_fpn_backbone
from .vgg_model import VGG, vgg, vgg_backbone
from .weight_files import WEIGHT_FILE_NAMES, WEIGHT_URLS, load_weight_file, weight_url

__all__ = [
    "BackboneWithFPN",
    "Bottleneck",
    "ExtraFPNBlock",
    "FeaturePyramidNetwork",
    "FrozenBatchNorm2d",
    "IntermediateLayerGetter",
    "InvertedResidual",
    "LastLevelMaxPool",
    "MobileNetV2",
    "ResNet",
    "VGG",
    "WEIGHT_FILE_NAMES",
    "WEIGHT_URLS",
    "load_weight_file",
    "mobilenet_v2_backbone",
    "resnet50_fpn_backbone",
    "vgg",
    "vgg_backbone",
    "weight_url",
]
