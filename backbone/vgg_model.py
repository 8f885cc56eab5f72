"""VGG 11/13/16/19 (Simonyan & Zisserman, 2014) without batch norm, keys as torchvision's VGG."""
from typing import Optional, Union

import torch
from torch import Tensor, nn

from .registry import SINGLE_LEVEL_ANCHORS, DetectorParts, register_backbone
from .weight_files import load_weight_file

# Conv output channels per layer; "M" is a 2x2 max pool.
_CONFIGS: dict[str, list[Union[int, str]]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],
}


def _make_features(config: list[Union[int, str]]) -> nn.Sequential:
    """3x3 conv + ReLU per integer entry, 2x2/stride-2 max pool per "M"; input has 3 channels."""
    layers: list[nn.Module] = []
    in_channel = 3
    for entry in config:
        if entry == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_channel, int(entry), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            in_channel = int(entry)
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """Conv features -> 7x7 adaptive average pool -> three fully connected layers.

    Args:
        features: the conv stack, ending in 512 channels.
        num_classes: size of the last Linear layer.
        init_weights: apply torchvision's initialisation; skip it when weights are loaded next.
    """

    def __init__(self, features: nn.Sequential, num_classes: int = 1000, init_weights: bool = True) -> None:
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(True),
            nn.Dropout(p=0.5),
            nn.Linear(4096, 4096),
            nn.ReLU(True),
            nn.Dropout(p=0.5),
            nn.Linear(4096, num_classes),
        )
        if init_weights:
            self._init_weights()

    def _init_weights(self) -> None:
        """Kaiming-normal (fan_out) convs, N(0, 0.01) linears, zero biases."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x: [N, 3, H, W] -> logits [N, num_classes]."""
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)


def vgg(model_name: str = "vgg16", weights_path: Optional[str] = None) -> VGG:
    """Build vgg11/13/16/19 and, when weights_path is given, load the official file strictly."""
    if model_name not in _CONFIGS:
        raise ValueError(f"vgg: unknown model_name {model_name!r}; expected one of {sorted(_CONFIGS)}")
    model = VGG(_make_features(_CONFIGS[model_name]), init_weights=not weights_path)
    if weights_path:
        model.load_state_dict(load_weight_file(weights_path, model_name), strict=True)
    return model


def vgg_backbone(model_name: str = "vgg16", weights_path: Optional[str] = None) -> nn.Sequential:
    """VGG conv features without the last max pool (stride 16); `out_channels` is 512.

    x: [N, 3, H, W] -> [N, 512, H/16, W/16]. Keys are the torchvision "features.N" keys minus the prefix.
    """
    features = vgg(model_name, weights_path).features
    del features[-1]
    features.out_channels = 512
    return features


def _register_vgg(name: str) -> None:
    @register_backbone(name, weights=name, help=f"{name} conv layers, stride 16")
    def build(weights_path: Optional[str], trainable_layers: int) -> DetectorParts:
        """Every conv layer trains (``trainable_layers`` does not apply)."""
        return DetectorParts(vgg_backbone(name, weights_path), SINGLE_LEVEL_ANCHORS, ["0"])


for _name in _CONFIGS:
    _register_vgg(_name)
