"""Backbones for Faster R-CNN: ResNet-50 + FPN, ResNet C4, MobileNetV2, VGG and any torchvision classifier,
with torchvision-compatible keys."""
from .feature_pyramid_network import (
    BackboneWithFPN,
    ExtraFPNBlock,
    FeaturePyramidNetwork,
    IntermediateLayerGetter,
    LastLevelMaxPool,
)
from .mobilenetv2_model import InvertedResidual, MobileNetV2, mobilenet_v2_backbone
from .frozen_bn import FrozenBatchNorm2d
from .resnet50_fpn_model import Bottleneck, ResNet, resnet50_fpn_backbone
from .resnet_c4_model import ResNetC4Head, freeze_resnet_stages, resnet, resnet_c4
from .torchvision_backbones import (
    DEFAULT_RETURN_NODES,
    TorchvisionBackbone,
    classifier_names,
    freeze_batch_norms,
    torchvision_backbone,
)
from .vgg_model import VGG, vgg, vgg_backbone
from .weight_files import WEIGHT_FILE_NAMES, WEIGHT_URLS, load_weight_file, weight_url

__all__ = [
    "BackboneWithFPN",
    "Bottleneck",
    "DEFAULT_RETURN_NODES",
    "ExtraFPNBlock",
    "FeaturePyramidNetwork",
    "FrozenBatchNorm2d",
    "IntermediateLayerGetter",
    "InvertedResidual",
    "LastLevelMaxPool",
    "MobileNetV2",
    "ResNet",
    "ResNetC4Head",
    "TorchvisionBackbone",
    "VGG",
    "WEIGHT_FILE_NAMES",
    "WEIGHT_URLS",
    "classifier_names",
    "freeze_batch_norms",
    "freeze_resnet_stages",
    "load_weight_file",
    "mobilenet_v2_backbone",
    "resnet",
    "resnet50_fpn_backbone",
    "resnet_c4",
    "torchvision_backbone",
    "vgg",
    "vgg_backbone",
    "weight_url",
]
