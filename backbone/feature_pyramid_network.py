"""Feature Pyramid Network (Lin et al., 2017) on top of a classification backbone.

State dict keys and numerics follow torchvision 0.29 (`torchvision.ops.FeaturePyramidNetwork`).
"""
from collections import OrderedDict
from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from network_files.ops import fast_path
from network_files.ops.sparse_grad_conv import sparse_grad_conv2d


class IntermediateLayerGetter(nn.ModuleDict):
    """Runs the direct children of `model` in registration order and returns chosen outputs.

    Children after the last requested one are dropped, so e.g. a ResNet loses avgpool and fc.
    The model's forward must call its children once each, in the order they were registered.

    Args:
        model: the network whose direct children are kept.
        return_layers: child name -> name of its output in the returned dict.
    """

    def __init__(self, model: nn.Module, return_layers: dict[str, str]) -> None:
        child_names = [name for name, _ in model.named_children()]
        unknown = [name for name in return_layers if name not in child_names]
        if unknown:
            raise ValueError(f"return_layers {unknown} are not children of {type(model).__name__}")
        pending = set(return_layers)
        kept = OrderedDict()
        for name, module in model.named_children():
            kept[name] = module
            pending.discard(name)
            if not pending:
                break
        super().__init__(kept)
        self.return_layers = {str(k): str(v) for k, v in return_layers.items()}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """x: [N, C, H, W] -> OrderedDict of the requested feature maps, in network order."""
        out: dict[str, Tensor] = OrderedDict()
        for name, module in self.items():
            x = module(x)
            if name in self.return_layers:
                out[self.return_layers[name]] = x
        return out


class ExtraFPNBlock(nn.Module):
    """Interface of a block that appends extra levels after the FPN top-down pass.

    forward(results, inputs, names) receives the FPN outputs (finest first), the backbone
    feature maps they came from and their names; it returns the extended outputs and names.
    """

    def forward(
        self, results: list[Tensor], inputs: list[Tensor], names: list[str]
    ) -> tuple[list[Tensor], list[str]]:
        raise NotImplementedError


class LastLevelMaxPool(ExtraFPNBlock):
    """Adds a level "pool": the coarsest FPN output subsampled by a 1x1 max pool with stride 2."""

    def forward(
        self, results: list[Tensor], inputs: list[Tensor], names: list[str]
    ) -> tuple[list[Tensor], list[str]]:
        pooled = F.max_pool2d(results[-1], kernel_size=1, stride=2, padding=0)
        return results + [pooled], names + ["pool"]


class FeaturePyramidNetwork(nn.Module):
    """Top-down pathway with lateral 1x1 convs and 3x3 output convs.

    Each conv sits alone in an nn.Sequential so the keys read `inner_blocks.{i}.0.weight` and
    `layer_blocks.{i}.0.weight`, as in torchvision >= 0.13. Files written before that (such as
    fasterrcnn_resnet50_fpn_coco-258fb6c6.pth) use `inner_blocks.{i}.weight`; they are renamed on load.

    Args:
        in_channels_list: channels of each input level, finest level first.
        out_channels: channels of every output level.
        extra_blocks: optional block appending further levels (e.g. LastLevelMaxPool).
    """

    # Version 2 = convs wrapped in a Sequential; recorded in state-dict metadata like torchvision.
    _version = 2

    def __init__(
        self, in_channels_list: list[int], out_channels: int, extra_blocks: Optional[ExtraFPNBlock] = None
    ) -> None:
        super().__init__()
        if any(c <= 0 for c in in_channels_list):
            raise ValueError(f"FeaturePyramidNetwork: input channels must be positive, got {in_channels_list}")
        self.inner_blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, out_channels, kernel_size=1, padding=0)) for c in in_channels_list
        )
        self.layer_blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1))
            for _ in in_channels_list
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_uniform_(module.weight, a=1)
                nn.init.zeros_(module.bias)
        self.extra_blocks = extra_blocks

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # Old layout `{block}.{i}.{weight|bias}` -> current `{block}.{i}.0.{weight|bias}`.
        # The old key can never be valid in the current layout, so renaming it is always safe.
        for block in ("inner_blocks", "layer_blocks"):
            for i in range(len(self.inner_blocks)):
                for param in ("weight", "bias"):
                    old_key = f"{prefix}{block}.{i}.{param}"
                    if old_key in state_dict:
                        state_dict[f"{prefix}{block}.{i}.0.{param}"] = state_dict.pop(old_key)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, x: dict[str, Tensor]) -> dict[str, Tensor]:
        """x: OrderedDict of [N, C_i, H_i, W_i] maps, finest first.

        Returns an OrderedDict of [N, out_channels, H_i, W_i] maps with the same names, finest
        first, followed by whatever the extra block appends.
        """
        names = list(x.keys())
        features = list(x.values())
        top_down = self.inner_blocks[-1](features[-1])
        results = [self._output(-1, top_down)]
        for idx in range(len(features) - 2, -1, -1):
            lateral = self.inner_blocks[idx](features[idx])
            upsampled = F.interpolate(top_down, size=lateral.shape[-2:], mode="nearest")
            top_down = lateral + upsampled
            results.insert(0, self._output(idx, top_down))
        if self.extra_blocks is not None:
            results, names = self.extra_blocks(results, features, names)
        return OrderedDict(zip(names, results))

    def _output(self, idx: int, x: Tensor) -> Tensor:
        """Level ``idx``'s 3x3 output conv. The detector's losses reach the outputs only around the
        sampled anchors and RoIs, so in CPU training the backward pass visits those positions alone
        (the whole map when its gradient turns out dense)."""
        if fast_path.sparse_backward(self, x):
            return sparse_grad_conv2d(x, self.layer_blocks[idx][0])
        return self.layer_blocks[idx](x)


class BackboneWithFPN(nn.Module):
    """A backbone's intermediate feature maps followed by an FPN.

    Args:
        backbone: network whose direct children produce the levels.
        return_layers: child name -> output name, e.g. {"layer1": "0", ..., "layer4": "3"}.
        in_channels_list: channels of the returned levels, in network order.
        out_channels: FPN channels; exposed as `self.out_channels` for the detection heads.
        extra_blocks: extra FPN levels; LastLevelMaxPool() when None.
    """

    def __init__(
        self,
        backbone: nn.Module,
        return_layers: dict[str, str],
        in_channels_list: list[int],
        out_channels: int,
        extra_blocks: Optional[ExtraFPNBlock] = None,
    ) -> None:
        super().__init__()
        if extra_blocks is None:
            extra_blocks = LastLevelMaxPool()
        self.body = IntermediateLayerGetter(backbone, return_layers=return_layers)
        self.fpn = FeaturePyramidNetwork(in_channels_list, out_channels, extra_blocks=extra_blocks)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """x: [N, 3, H, W] -> OrderedDict name -> [N, out_channels, h, w], finest level first."""
        return self.fpn(self.body(x))
