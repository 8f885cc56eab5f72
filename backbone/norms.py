"""Normalisation layers of the ResNet backbones (the ``--norm`` choice).

``frozen_bn``: FrozenBatchNorm2d, the ImageNet statistics kept fixed (torchvision's detectors with
ImageNet weights). ``bn``: trainable BatchNorm2d (torchvision's detectors from scratch).
``syncbn``: BatchNorm2d here, converted to SyncBatchNorm by the trainer when it runs under DDP.
``gn``: GroupNorm with 32 groups, detectron2's choice for training from scratch.
"""
from functools import partial
from typing import Callable, Optional

from torch import nn

from .frozen_bn import FrozenBatchNorm2d

NormLayer = Callable[[int], nn.Module]
NORMS = ("frozen_bn", "bn", "syncbn", "gn")
GROUP_NORM_GROUPS = 32


def norm_layer_for(norm: Optional[str], weights_path: Optional[str] = None) -> NormLayer:
    """The constructor (called with a channel count) for ``norm``; None is the ResNets' own,
    FrozenBatchNorm2d. ``weights_path``: the ImageNet file about to be loaded, which only the
    BatchNorm variants can take (it holds BatchNorm statistics)."""
    if norm not in (None, *NORMS):
        raise ValueError(f"--norm: unknown normalisation '{norm}' (choose from {', '.join(NORMS)})")
    if norm == "gn":
        if weights_path:
            raise ValueError(f"--norm gn: GroupNorm cannot take the BatchNorm statistics of {weights_path}; "
                             "train it from scratch (--backbone-weights none)")
        return partial(nn.GroupNorm, GROUP_NORM_GROUPS)
    return nn.BatchNorm2d if norm in ("bn", "syncbn") else FrozenBatchNorm2d
