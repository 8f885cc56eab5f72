"""ResNet "C4" Faster R-CNN parts, the ResNet detector of the original paper (He et al., 2016).

conv1..layer3 form the shared trunk (one stride-16 map of 1024 channels); layer4 runs on every
pooled RoI (14x14 -> 7x7, its first block strides by 2) and a global average pool gives [R, 2048].
The ImageNet file loads strictly into the whole ResNet before it is split, so the trunk keeps the
torchvision keys (`backbone.layer3.*`) and the box head reads `roi_heads.box_head.layer4.*`.
"""
from collections import OrderedDict
from typing import Optional

from torch import Tensor, nn

from .frozen_bn import FrozenBatchNorm2d
from .norms import NormLayer, norm_layer_for
from .registry import SINGLE_LEVEL_ANCHORS, DetectorParts, register_backbone
from .resnet50_fpn_model import Bottleneck, ResNet, freeze_resnet_stages
from .weight_files import load_weight_file

# Bottleneck blocks in layer1..layer4.
RESNET_BLOCKS: dict[str, list[int]] = {"resnet50": [3, 4, 6, 3], "resnet101": [3, 4, 23, 3]}


def resnet(arch: str, norm_layer: NormLayer = nn.BatchNorm2d, weights_path: Optional[str] = None) -> ResNet:
    """ResNet-50 or ResNet-101 classifier with torchvision's keys; weights_path loads strictly."""
    if arch not in RESNET_BLOCKS:
        raise ValueError(f"resnet: unknown arch {arch!r}; expected one of {sorted(RESNET_BLOCKS)}")
    model = ResNet(Bottleneck, RESNET_BLOCKS[arch], include_top=True, norm_layer=norm_layer)
    if weights_path:
        model.load_state_dict(load_weight_file(weights_path, arch), strict=True)
    return model


class ResNetC4Head(nn.Module):
    """The RoI box head: layer4 on each pooled RoI, then a global average pool.

    Args:
        layer4: the ResNet's last stage (first block strides by 2).
        out_channels: channels layer4 produces (2048 for ResNet-50/101).
    """

    def __init__(self, layer4: nn.Sequential, out_channels: int) -> None:
        super().__init__()
        self.layer4 = layer4
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> Tensor:
        """x: [R, 1024, P, P] pooled RoIs -> [R, out_channels]."""
        return self.layer4(x).mean(dim=(2, 3))


def resnet_c4(
    arch: str = "resnet50",
    weights_path: Optional[str] = None,
    trainable_layers: int = 3,
    norm_layer: NormLayer = FrozenBatchNorm2d,
) -> tuple[nn.Sequential, ResNetC4Head]:
    """Split a ResNet into the C4 trunk and box head.

    Args:
        arch: "resnet50" or "resnet101".
        weights_path: resnet50-0676ba61.pth / resnet101-63fe2227.pth, loaded strictly; None = random.
        trainable_layers: stages keeping gradients, counted from layer4 (in the head) back to conv1.
        norm_layer: FrozenBatchNorm2d by default, as torchvision's detection ResNets.

    Returns:
        (trunk, head): trunk maps [N, 3, H, W] -> [N, 1024, H/16, W/16] and has `out_channels`
        1024; head maps pooled [R, 1024, P, P] -> [R, 2048].
    """
    model = resnet(arch, norm_layer, weights_path)
    freeze_resnet_stages(model, trainable_layers)
    trunk_names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3")
    trunk = nn.Sequential(OrderedDict((name, getattr(model, name)) for name in trunk_names))
    trunk.out_channels = 256 * Bottleneck.expansion
    head = ResNetC4Head(model.layer4, 512 * Bottleneck.expansion)
    return trunk, head


def _register_c4(arch: str) -> None:
    @register_backbone(f"{arch}_c4", weights=arch, help=f"{arch} C4 trunk with layer4 as the box head (the paper's)",
                       norm=True)
    def build(weights_path: Optional[str], trainable_layers: int, norm: Optional[str] = None) -> DetectorParts:
        """One stride-16 map; RoIs pooled to 14x14 for layer4."""
        trunk, head = resnet_c4(arch, weights_path, trainable_layers, norm_layer_for(norm, weights_path))
        return DetectorParts(trunk, SINGLE_LEVEL_ANCHORS, ["0"], box_head=head, pool_size=14)


for _arch in RESNET_BLOCKS:
    _register_c4(_arch)
