"""Any torchvision classification network as a Faster R-CNN backbone, with or without an FPN.

The classifier comes from `torchvision.models.get_model(name, weights=None)`; its ImageNet file (if
any) loads strictly into it; its BatchNorm2d layers become FrozenBatchNorm2d (same keys minus
`num_batches_tracked`); then `create_feature_extractor` keeps the graph up to the named nodes.
The ResNet family (resnet*, resnext*, wide_resnet*) takes the ``--norm`` choice instead
(backbone.norms): trainable BatchNorm2d kept as is, or GroupNorm built in.

With an FPN the nodes feed our FeaturePyramidNetwork + LastLevelMaxPool: maps "0".."n-1" and
"pool", 256 channels each, and strides must double from one node to the next. Without an FPN the
last node alone is the single map "0". Channels and strides are measured by a dry run.

Default nodes (finest first; --no-fpn uses the last one):

| network | nodes | strides | channels |
| --- | --- | --- | --- |
| resnet18, resnet34 | layer1, layer2, layer3, layer4 | 4, 8, 16, 32 | 64, 128, 256, 512 |
| resnet50, resnet101 | layer1, layer2, layer3, layer4 | 4, 8, 16, 32 | 256, 512, 1024, 2048 |
| mobilenet_v2 | features.6, features.13, features.18 | 8, 16, 32 | 32, 96, 1280 |
| mobilenet_v3_large | features.6, features.12, features.16 | 8, 16, 32 | 40, 112, 960 |
| efficientnet_b0 | features.3, features.5, features.8 | 8, 16, 32 | 40, 112, 1280 |
| vgg16 | features.15, features.22, features.29 | 4, 8, 16 | 256, 512, 512 |

Each node is the last layer at its stride (the output of that stage).
"""
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.feature_extraction import create_feature_extractor

from .feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool
from .frozen_bn import FrozenBatchNorm2d
from .norms import norm_layer_for
from .registry import (
    SINGLE_LEVEL_ANCHORS,
    BackboneFamily,
    BackboneSpec,
    DetectorParts,
    option,
    register_backbone_family,
)
from .weight_files import WEIGHT_FILE_NAMES, load_weight_file

_RESNET_NODES = ["layer1", "layer2", "layer3", "layer4"]
DEFAULT_RETURN_NODES: dict[str, list[str]] = {
    "resnet18": _RESNET_NODES,
    "resnet34": _RESNET_NODES,
    "resnet50": _RESNET_NODES,
    "resnet101": _RESNET_NODES,
    "mobilenet_v2": ["features.6", "features.13", "features.18"],
    "mobilenet_v3_large": ["features.6", "features.12", "features.16"],
    "efficientnet_b0": ["features.3", "features.5", "features.8"],
    "vgg16": ["features.15", "features.22", "features.29"],
}

# Side of the blank image of the dry run: a multiple of every stride up to 64.
_PROBE_SIZE = 128
# Classifiers built by torchvision's ResNet class (they take norm_layer): the --norm choice applies.
_RESNET_FAMILY = ("resnet", "resnext", "wide_resnet")


def classifier_names() -> list[str]:
    """Names accepted after "tv:": torchvision's classification models."""
    return torchvision.models.list_models(module=torchvision.models)


def _official_url(name: str) -> Optional[str]:
    """Download address of the ImageNet weights torchvision lists first for `name` (None if none)."""
    return next((weights.url for weights in torchvision.models.get_model_weights(name)), None)


def freeze_batch_norms(module: nn.Module) -> None:
    """Replace every nn.BatchNorm2d below `module` by a FrozenBatchNorm2d holding its statistics."""
    for child_name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            if child.affine:
                frozen.weight.copy_(child.weight.detach())
                frozen.bias.copy_(child.bias.detach())
            if child.track_running_stats:
                frozen.running_mean.copy_(child.running_mean)
                frozen.running_var.copy_(child.running_var)
            setattr(module, child_name, frozen)
        else:
            freeze_batch_norms(child)


def takes_norm(name: str) -> bool:
    """Whether classifier ``name`` is a torchvision ResNet, whose normalisation --norm chooses."""
    return name.startswith(_RESNET_FAMILY)


def _classifier(name: str, weights_path: Optional[str], norm: Optional[str]) -> nn.Module:
    """Classifier ``name`` with its ImageNet file (if any) loaded strictly and its normalisation:
    FrozenBatchNorm2d (``norm`` None or frozen_bn), else ``norm`` (a ResNet only)."""
    if norm not in (None, "frozen_bn") and not takes_norm(name):
        raise ValueError(f"--norm {norm}: tv:{name} keeps its frozen BatchNorm; --norm applies to the ResNets")
    layer = norm_layer_for(norm, weights_path)
    classifier = torchvision.models.get_model(name, weights=None, **({"norm_layer": layer} if norm == "gn" else {}))
    if weights_path:
        classifier.load_state_dict(load_weight_file(weights_path, url=_official_url(name)), strict=True)
    if layer is FrozenBatchNorm2d:
        freeze_batch_norms(classifier)
    return classifier


def _dry_run(body: nn.Module) -> tuple[list[int], list[int]]:
    """(channels, strides) of the body's output maps, from one blank image in eval mode."""
    was_training = body.training
    body.eval()
    with torch.no_grad():
        outputs = body(torch.zeros(1, 3, _PROBE_SIZE, _PROBE_SIZE))
    body.train(was_training)
    channels = [int(v.shape[1]) for v in outputs.values()]
    strides = [2 ** round(math.log2(_PROBE_SIZE / v.shape[-2])) for v in outputs.values()]
    return channels, strides


class TorchvisionBackbone(nn.Module):
    """Named nodes of a torchvision classifier, optionally followed by an FPN.

    Attributes:
        out_channels: channels of every returned map.
        featmap_names: the maps the RoI pooler reads ("0".."n-1"; the FPN's "pool" level excluded).
        strides: stride of every returned map, in order ("pool" included).
    """

    def __init__(
        self, body: nn.Module, fpn: Optional[FeaturePyramidNetwork], out_channels: int, strides: list[int]
    ) -> None:
        super().__init__()
        self.body = body
        self.fpn = fpn
        self.out_channels = out_channels
        self.strides = strides
        self.featmap_names = [str(i) for i in range(len(strides) - (1 if fpn is not None else 0))]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """x: [N, 3, H, W] -> OrderedDict name -> [N, out_channels, H / stride, W / stride], finest first."""
        features = self.body(x)
        return features if self.fpn is None else self.fpn(features)


def torchvision_backbone(
    name: str,
    return_nodes: Optional[Sequence[str]] = None,
    fpn: bool = True,
    weights_path: Optional[str] = None,
    fpn_channels: int = 256,
    norm: Optional[str] = None,
) -> TorchvisionBackbone:
    """A detection backbone from torchvision classifier `name` (e.g. "resnet34", "mobilenet_v3_large").

    Args:
        name: a name from `classifier_names()`.
        return_nodes: graph node names, finest first (see
            `torchvision.models.feature_extraction.get_graph_node_names`); DEFAULT_RETURN_NODES when None.
        fpn: FPN + LastLevelMaxPool over all nodes; False = the last node alone.
        weights_path: the classifier's ImageNet state dict, loaded strictly; None = random init.
        fpn_channels: FPN output channels.
        norm: the ResNets' normalisation (backbone.norms.NORMS); None: frozen BatchNorm.
    """
    if name not in classifier_names():
        raise ValueError(f"tv:{name}: not a torchvision classification model (see torchvision.models.list_models())")
    if return_nodes is None:
        if name not in DEFAULT_RETURN_NODES:
            raise ValueError(
                f"tv:{name}: no default return nodes; pass --return-nodes (names from "
                "torchvision.models.feature_extraction.get_graph_node_names)"
            )
        return_nodes = DEFAULT_RETURN_NODES[name]
    nodes = list(return_nodes) if fpn else list(return_nodes)[-1:]
    if not nodes:
        raise ValueError(f"tv:{name}: return_nodes is empty")

    classifier = _classifier(name, weights_path, norm)
    try:
        body = create_feature_extractor(
            classifier,
            return_nodes={node: str(i) for i, node in enumerate(nodes)},
            tracer_kwargs={"leaf_modules": [FrozenBatchNorm2d]},
        )
    except ValueError as err:
        raise ValueError(f"tv:{name}: bad return nodes {nodes}: {str(err).splitlines()[0]}") from err
    channels, strides = _dry_run(body)

    if not fpn:
        return TorchvisionBackbone(body, None, channels[-1], strides)
    if any(b != 2 * a for a, b in zip(strides, strides[1:])):
        raise ValueError(f"tv:{name}: FPN nodes {nodes} must each halve the resolution; their strides are {strides}")
    pyramid = FeaturePyramidNetwork(channels, fpn_channels, extra_blocks=LastLevelMaxPool())
    return TorchvisionBackbone(body, pyramid, fpn_channels, strides + [2 * strides[-1]])


PREFIX = "tv:"


@dataclass(frozen=True)
class TorchvisionOptions:
    return_nodes: Optional[Tuple[str, ...]] = option(
        None, "tv: backbones: graph nodes feeding the detector, finest first, e.g. "
              "'features.6,features.12,features.16' (defaults per network in docs/training.md)")
    fpn: bool = option(True, "tv: backbones: FPN over the return nodes, or --no-fpn for the last node alone")


def _build_family_member(name: str, weights_path: Optional[str], trainable_layers: int,
                         return_nodes: Optional[Sequence[str]], fpn: bool, norm: Optional[str]) -> DetectorParts:
    """With an FPN, one anchor size per level of 8x its stride (32..512 for a ResNet)."""
    backbone = torchvision_backbone(name, return_nodes=return_nodes, fpn=fpn, weights_path=weights_path, norm=norm)
    if backbone.fpn is None:
        return DetectorParts(backbone, SINGLE_LEVEL_ANCHORS, backbone.featmap_names)
    anchors = tuple((8 * stride,) for stride in backbone.strides)
    return DetectorParts(backbone, anchors, backbone.featmap_names)


def _resolve(full_name: str) -> BackboneSpec:
    """The registry entry of ``tv:<name>`` for any torchvision classifier."""
    name = full_name[len(PREFIX):]
    if name not in classifier_names():
        raise ValueError(f"unknown backbone '{full_name}': not a torchvision classification model "
                         "(see torchvision.models.list_models(module=torchvision.models))")

    def build(weights_path: Optional[str], trainable_layers: int, return_nodes: Optional[Sequence[str]],
              fpn: bool, norm: Optional[str] = None) -> DetectorParts:
        return _build_family_member(name, weights_path, trainable_layers, return_nodes, fpn, norm)

    weights = name if name in WEIGHT_FILE_NAMES else None
    return BackboneSpec(full_name, build, weights, _official_url(name), TorchvisionOptions,
                        f"torchvision's {name}", norm=takes_norm(name))


register_backbone_family(BackboneFamily(PREFIX, _resolve, TorchvisionOptions,
                                        "any torchvision classifier (e.g. tv:resnet34, tv:mobilenet_v3_large)"))
