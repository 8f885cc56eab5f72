"""VGG 11/13/16/19 (Simonyan & Zisserman, 2014) without batch norm, keys as torchvision's VGG.

As a detector backbone VGG gives its conv features without the last max pool (conv5_3 for VGG16,
stride 16). The box head is either the light two-layer MLP of every backbone (``--box-head mlp``)
or the paper's (Ren et al., 2015; py-faster-rcnn): VGG's own fc6 and fc7 from the ImageNet file
on 7x7 pooled RoIs (``--box-head vgg``), with the first conv blocks frozen (``--trainable-layers``).
"""
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor, nn

from .registry import (MAX_TRAINABLE_LAYERS, SINGLE_LEVEL_ANCHORS, DetectorParts, option, register_backbone,
                       validate_trainable_layers)
from .weight_files import load_state_strictly, load_weight_file

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
        state = load_weight_file(weights_path, model_name)
        load_state_strictly(model, state, weights_path, f"torchvision {model_name}")
    return model


def vgg_backbone(model_name: str = "vgg16", weights_path: Optional[str] = None) -> nn.Sequential:
    """VGG conv features without the last max pool (stride 16); `out_channels` is 512.

    x: [N, 3, H, W] -> [N, 512, H/16, W/16]. Keys are the torchvision "features.N" keys minus the prefix.
    """
    return _conv_trunk(vgg(model_name, weights_path))


def _conv_trunk(model: VGG) -> nn.Sequential:
    """``model.features`` without its last max pool, with ``out_channels`` 512."""
    features = model.features
    del features[-1]
    features.out_channels = 512
    return features


class VGGBoxHead(nn.Module):
    """The paper's box head: VGG's fc6 and fc7, each followed by ReLU and dropout as in VGG.

    Args:
        fc6: ``Linear(512 * 7 * 7, 4096)`` (the classifier's first layer); fc7: ``Linear(4096, 4096)``.
    """

    def __init__(self, fc6: nn.Linear, fc7: nn.Linear) -> None:
        super().__init__()
        self.fc6 = fc6
        self.fc7 = fc7
        self.dropout = nn.Dropout(p=0.5)
        self.out_channels = fc7.out_features

    def forward(self, x: Tensor) -> Tensor:
        """Pooled RoIs ``[R, 512, 7, 7]`` -> ``[R, 4096]``."""
        x = self.dropout(torch.relu(self.fc6(x.flatten(start_dim=1))))
        return self.dropout(torch.relu(self.fc7(x)))


def freeze_vgg_blocks(features: nn.Sequential, trainable_layers: int) -> None:
    """Keep gradients in the last ``trainable_layers`` of VGG's five conv blocks (a block ends at
    a max pool): 5 = every conv layer, 3 = conv3_1 and up (the paper's), 0 = none."""
    validate_trainable_layers(trainable_layers, "vgg: trainable_layers")
    frozen_blocks = MAX_TRAINABLE_LAYERS - trainable_layers
    block = 0
    for layer in features:
        if block >= frozen_blocks:
            return
        if isinstance(layer, nn.MaxPool2d):
            block += 1
        else:
            layer.requires_grad_(False)


def vgg_paper_parts(model_name: str = "vgg16", weights_path: Optional[str] = None,
                    trainable_layers: int = 3) -> tuple[nn.Sequential, VGGBoxHead]:
    """The paper's VGG detector parts: conv features without the last max pool (stride 16, 512
    channels, the first ``5 - trainable_layers`` blocks frozen) and :class:`VGGBoxHead` holding the
    classifier's fc6/fc7. ``weights_path`` (the official ImageNet file) loads strictly into the
    whole VGG first, so the conv layers and fc6/fc7 come from the one file."""
    model = vgg(model_name, weights_path)
    features = _conv_trunk(model)
    freeze_vgg_blocks(features, trainable_layers)
    return features, VGGBoxHead(model.classifier[0], model.classifier[3])


BOX_HEADS = ("mlp", "vgg")


@dataclass(frozen=True)
class VGGOptions:
    """The VGG backbones' own option (``--box-head``)."""

    box_head: str = option("mlp", "vgg11/13/16/19 box head: 'mlp' = the two-layer head of --representation-size "
                                  "(every conv layer trains); 'vgg' = the paper's: VGG's own fc6/fc7 (4096 wide) "
                                  "from the ImageNet file, the first 5 - --trainable-layers conv blocks frozen "
                                  "(3: conv1-conv2 frozen, as py-faster-rcnn)", choices=BOX_HEADS)


def _register_vgg(name: str) -> None:
    @register_backbone(name, weights=name, options=VGGOptions, help=f"{name} conv layers, stride 16")
    def build(weights_path: Optional[str], trainable_layers: int, box_head: str) -> DetectorParts:
        """``mlp``: every conv layer trains (``trainable_layers`` does not apply); ``vgg``: the
        paper's head and freezing."""
        if box_head not in BOX_HEADS:
            raise ValueError(f"--box-head: unknown head '{box_head}' (choose from {', '.join(BOX_HEADS)})")
        if box_head == "mlp":
            return DetectorParts(vgg_backbone(name, weights_path), SINGLE_LEVEL_ANCHORS, ["0"])
        features, head = vgg_paper_parts(name, weights_path, trainable_layers)
        return DetectorParts(features, SINGLE_LEVEL_ANCHORS, ["0"], box_head=head)


for _name in _CONFIGS:
    _register_vgg(_name)
