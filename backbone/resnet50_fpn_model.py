"""ResNet-50 (torchvision's "v1.5": stride on the 3x3 conv) and its FPN backbone for Faster R-CNN.

State dict keys match `torchvision.models.resnet50()`, so the official ImageNet file loads as is.
"""
from typing import Optional

import torch
from torch import Tensor, nn

from .conv_bn import ConvBNSequential, conv_bn
from .feature_pyramid_network import BackboneWithFPN, ExtraFPNBlock, LastLevelMaxPool
from .frozen_bn import FrozenBatchNorm2d
from .norms import NormLayer, norm_layer_for
from .registry import FPN_ANCHORS, DetectorParts, register_backbone, validate_trainable_layers
from .weight_files import load_weight_file


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (carries the stride) -> 1x1 expand, plus the identity/projection shortcut.

    Args:
        in_channel: input channels.
        out_channel: bottleneck width; the block outputs out_channel * expansion channels.
        stride: spatial stride of the 3x3 conv.
        downsample: projection applied to the shortcut when shape changes.
        norm_layer: normalisation constructor, called with a channel count.
    """

    expansion = 4

    def __init__(
        self,
        in_channel: int,
        out_channel: int,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channel, out_channel, kernel_size=1, bias=False)
        self.bn1 = norm_layer(out_channel)
        self.conv2 = nn.Conv2d(out_channel, out_channel, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = norm_layer(out_channel)
        self.conv3 = nn.Conv2d(out_channel, out_channel * self.expansion, kernel_size=1, bias=False)
        self.bn3 = norm_layer(out_channel * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        """x: [N, in_channel, H, W] -> [N, out_channel * 4, H / stride, W / stride]."""
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(conv_bn(x, self.conv1, self.bn1))
        out = self.relu(conv_bn(out, self.conv2, self.bn2))
        out = conv_bn(out, self.conv3, self.bn3)
        out += shortcut  # in place, as torchvision: one large allocation fewer per block
        return self.relu(out)


class ResNet(nn.Module):
    """ResNet built from bottleneck blocks.

    Args:
        block: residual block class (Bottleneck).
        blocks_num: number of blocks in layer1..layer4, e.g. [3, 4, 6, 3] for ResNet-50.
        num_classes: size of the fc classifier.
        include_top: keep avgpool + fc; without them forward returns the layer4 map.
        norm_layer: normalisation constructor, e.g. nn.BatchNorm2d or FrozenBatchNorm2d.
    """

    def __init__(
        self,
        block: type[Bottleneck],
        blocks_num: list[int],
        num_classes: int = 1000,
        include_top: bool = True,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        self.include_top = include_top
        self._norm_layer = norm_layer
        self.in_channel = 64
        self.conv1 = nn.Conv2d(3, self.in_channel, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(self.in_channel)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, blocks_num[0], stride=1)
        self.layer2 = self._make_layer(block, 128, blocks_num[1], stride=2)
        self.layer3 = self._make_layer(block, 256, blocks_num[2], stride=2)
        self.layer4 = self._make_layer(block, 512, blocks_num[3], stride=2)
        if include_top:
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(512 * block.expansion, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _make_layer(
        self, block: type[Bottleneck], channel: int, block_num: int, stride: int
    ) -> nn.Sequential:
        """Stack block_num blocks; only the first one strides and may need a projection shortcut."""
        downsample = None
        if stride != 1 or self.in_channel != channel * block.expansion:
            downsample = ConvBNSequential(
                nn.Conv2d(self.in_channel, channel * block.expansion, 1, stride=stride, bias=False),
                self._norm_layer(channel * block.expansion),
            )
        layers = [block(self.in_channel, channel, stride, downsample, self._norm_layer)]
        self.in_channel = channel * block.expansion
        layers += [block(self.in_channel, channel, norm_layer=self._norm_layer) for _ in range(1, block_num)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """x: [N, 3, H, W] -> logits [N, num_classes], or the [N, 2048, H/32, W/32] map without top."""
        x = self.maxpool(self.relu(conv_bn(x, self.conv1, self.bn1)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        if self.include_top:
            x = self.fc(torch.flatten(self.avgpool(x), 1))
        return x


# Stages by their parameter prefixes, from the top; bn1 only has parameters with a plain BatchNorm2d.
_STAGES_FROM_TOP = ("layer4", "layer3", "layer2", "layer1", "conv1")


def freeze_resnet_stages(model: ResNet, trainable_layers: int) -> None:
    """Keep gradients only in the last `trainable_layers` stages (0..5), torchvision's rule: 3 trains
    layer2..layer4; 5 trains everything, the stem's bn1 included."""
    validate_trainable_layers(trainable_layers, "freeze_resnet_stages: trainable_layers")
    trainable = list(_STAGES_FROM_TOP[:trainable_layers])
    if trainable_layers == 5:
        trainable.append("bn1")
    for name, param in model.named_parameters():
        if not name.startswith(tuple(trainable)):
            param.requires_grad_(False)



def resnet50_fpn_backbone(
    weights_path: Optional[str] = None,
    norm_layer: NormLayer = FrozenBatchNorm2d,
    trainable_layers: int = 3,
    returned_layers: Optional[list[int]] = None,
    extra_blocks: Optional[ExtraFPNBlock] = None,
) -> BackboneWithFPN:
    """ResNet-50 + FPN with the first stages frozen, as torchvision's resnet_fpn_backbone("resnet50").

    Args:
        weights_path: resnet50-0676ba61.pth to load (strictly) before freezing; None for random init.
        norm_layer: normalisation of the ResNet; FrozenBatchNorm2d by default (see backbone.norms).
        trainable_layers: how many stages, counted from layer4 back to conv1, keep gradients (0..5).
        returned_layers: which of layer1..layer4 feed the FPN (values 1..4); all four by default.
        extra_blocks: extra FPN levels; LastLevelMaxPool() by default.

    Returns:
        module mapping [N, 3, H, W] to an OrderedDict "0", "1", ... (+ "pool") of 256-channel maps.
    """
    validate_trainable_layers(trainable_layers, "resnet50_fpn_backbone: trainable_layers")
    if returned_layers is None:
        returned_layers = [1, 2, 3, 4]
    if not returned_layers or min(returned_layers) < 1 or max(returned_layers) > 4:
        raise ValueError(f"resnet50_fpn_backbone: returned_layers must lie in 1..4, got {returned_layers}")

    resnet = ResNet(Bottleneck, [3, 4, 6, 3], include_top=True, norm_layer=norm_layer)
    if weights_path:
        resnet.load_state_dict(load_weight_file(weights_path, "resnet50"), strict=True)

    freeze_resnet_stages(resnet, trainable_layers)

    if extra_blocks is None:
        extra_blocks = LastLevelMaxPool()
    return_layers = {f"layer{k}": str(i) for i, k in enumerate(returned_layers)}
    # layer k outputs 256 * 2 ** (k - 1) channels.
    in_channels_list = [256 * 2 ** (k - 1) for k in returned_layers]
    return BackboneWithFPN(resnet, return_layers, in_channels_list, 256, extra_blocks=extra_blocks)


@register_backbone("resnet50_fpn", weights="resnet50", help="ResNet-50 + FPN, torchvision's detector", norm=True)
def build_resnet50_fpn(weights_path: Optional[str], trainable_layers: int, norm: Optional[str] = None) -> DetectorParts:
    """Four FPN levels pooled by the RoI heads, one anchor size per level."""
    backbone = resnet50_fpn_backbone(weights_path, norm_layer_for(norm, weights_path), trainable_layers)
    return DetectorParts(backbone, FPN_ANCHORS, ["0", "1", "2", "3"])
