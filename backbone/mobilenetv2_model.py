"""MobileNetV2 (Sandler et al., 2018) with torchvision's state dict layout, and its detection backbone."""
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .conv_bn import ConvBNSequential
from .registry import SINGLE_LEVEL_ANCHORS, DetectorParts, option, register_backbone
from .weight_files import load_weight_file

NormLayer = Callable[[int], nn.Module]

# Inverted residual stages: (expansion t, output channels c, repeats n, first stride s).
_STAGES = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


def _make_divisible(value: float, divisor: int) -> int:
    """Round value to the nearest multiple of divisor, never going below 90% of value."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class ConvBNReLU(ConvBNSequential):
    """Conv (no bias, "same" padding) -> norm -> ReLU6; children are named 0, 1, 2."""

    def __init__(
        self, in_channel: int, out_channel: int, kernel_size: int = 3, stride: int = 1, groups: int = 1,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_channel, out_channel, kernel_size, stride, padding, groups=groups, bias=False),
            norm_layer(out_channel),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """1x1 expansion -> 3x3 depthwise (carries the stride) -> linear 1x1 projection.

    The input is added back when the block keeps both resolution and channel count.
    """

    def __init__(
        self, in_channel: int, out_channel: int, stride: int, expand_ratio: int,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        hidden_channel = int(round(in_channel * expand_ratio))
        self.use_shortcut = stride == 1 and in_channel == out_channel
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU(in_channel, hidden_channel, kernel_size=1, norm_layer=norm_layer))
        layers += [
            ConvBNReLU(hidden_channel, hidden_channel, stride=stride, groups=hidden_channel,
                       norm_layer=norm_layer),
            nn.Conv2d(hidden_channel, out_channel, kernel_size=1, bias=False),
            norm_layer(out_channel),
        ]
        self.conv = ConvBNSequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """x: [N, in_channel, H, W] -> [N, out_channel, H / stride, W / stride]."""
        out = self.conv(x)
        return x + out if self.use_shortcut else out


class MobileNetV2(nn.Module):
    """MobileNetV2 classifier; keys match `torchvision.models.mobilenet_v2()`.

    Args:
        num_classes: size of the final Linear layer.
        alpha: width multiplier applied to every stage.
        round_nearest: channel counts are rounded to a multiple of this.
        weights_path: mobilenet_v2-b0353104.pth to load strictly after initialisation.
        norm_layer: normalisation constructor; nn.BatchNorm2d when None.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        alpha: float = 1.0,
        round_nearest: int = 8,
        weights_path: Optional[str] = None,
        norm_layer: Optional[NormLayer] = None,
    ) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        in_channel = _make_divisible(32 * alpha, round_nearest)
        self.last_channel = _make_divisible(1280 * max(1.0, alpha), round_nearest)

        features: list[nn.Module] = [ConvBNReLU(3, in_channel, stride=2, norm_layer=norm_layer)]
        for t, c, n, s in _STAGES:
            out_channel = _make_divisible(c * alpha, round_nearest)
            for i in range(n):
                features.append(InvertedResidual(in_channel, out_channel, s if i == 0 else 1, t, norm_layer))
                in_channel = out_channel
        features.append(ConvBNReLU(in_channel, self.last_channel, kernel_size=1, norm_layer=norm_layer))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=0.2), nn.Linear(self.last_channel, num_classes))

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)

        if weights_path:
            self.load_state_dict(load_weight_file(weights_path, "mobilenet_v2"), strict=True)

    def forward(self, x: Tensor) -> Tensor:
        """x: [N, 3, H, W] -> logits [N, num_classes]."""
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2_backbone(
    weights_path: Optional[str] = None,
    norm_layer: Optional[NormLayer] = None,
    width_mult: float = 1.0,
    feature_stride: int = 32,
) -> nn.Module:
    """MobileNetV2 conv features for a single-level detector, with an ``out_channels`` attribute.

    ``width_mult`` scales every layer's channels (MobileNetV2's alpha).
    ``feature_stride=32`` (default) keeps every layer: x [N, 3, H, W] -> [N, 1280, H/32, W/32].
    ``feature_stride=16`` stops after the last stride-16 stage (the 96-channel blocks, scaled by
    ``width_mult``): a lighter trunk with a finer feature map, useful for small images and CPUs.
    """
    if feature_stride not in (16, 32):
        raise ValueError(f"mobilenet_v2_backbone: feature_stride must be 16 or 32, got {feature_stride}")
    model = MobileNetV2(alpha=width_mult, weights_path=weights_path, norm_layer=norm_layer)
    features = model.features
    if feature_stride == 16:
        # Stem + the blocks of the first five stages (16, 24, 32, 64, 96 channels).
        stride16_blocks = 1 + sum(n for _, _, n, _ in _STAGES[:5])
        features = features[:stride16_blocks]
        features.out_channels = _make_divisible(_STAGES[4][1] * width_mult, 8)
    else:
        features.out_channels = model.last_channel
    return features


@dataclass(frozen=True)
class MobileNetV2Options:
    width_mult: float = option(1.0, "MobileNetV2 width multiplier (alpha)")
    feature_stride: int = option(32, "MobileNetV2: 16 stops the trunk after the stride-16 stages "
                                     "(lighter, finer map)", choices=(16, 32))


@register_backbone("mobilenet_v2", weights="mobilenet_v2", options=MobileNetV2Options,
                   help="MobileNetV2 conv features, one map (WZ's light detector)")
def build_mobilenet_v2(weights_path: Optional[str], trainable_layers: int, width_mult: float,
                       feature_stride: int) -> DetectorParts:
    """The whole trunk trains (``trainable_layers`` does not apply), BatchNorm included."""
    backbone = mobilenet_v2_backbone(weights_path, width_mult=width_mult, feature_stride=feature_stride)
    return DetectorParts(backbone, SINGLE_LEVEL_ANCHORS, ["0"])
