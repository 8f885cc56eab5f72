"""The box head (pooled features -> embedding) and predictor (embedding -> classes and boxes)."""
from typing import Tuple

import torch.nn.functional as F
from torch import Tensor, nn


class TwoMLPHead(nn.Module):
    """Flatten the pooled features and apply two fully connected layers with ReLU.

    Args:
        in_channels: ``C * P * P`` of the pooled features.
        representation_size: width of both layers.
    """

    def __init__(self, in_channels: int, representation_size: int) -> None:
        super().__init__()
        self.fc6 = nn.Linear(in_channels, representation_size)
        self.fc7 = nn.Linear(representation_size, representation_size)

    def forward(self, x: Tensor) -> Tensor:
        """``[R, C, P, P] -> [R, representation_size]``."""
        return self.after_fc6(self.fc6(x.flatten(start_dim=1)))

    def after_fc6(self, x: Tensor) -> Tensor:
        """The rest of the head from fc6's output ``[R, representation_size]`` (for callers that
        compute fc6 fused with the pooling, see ``MultiScaleRoIAlign.forward_linear``)."""
        return F.relu(self.fc7(F.relu(x)))


class FastRCNNPredictor(nn.Module):
    """Class scores ``[R, num_classes]`` and per-class box offsets ``[R, num_classes * 4]``.

    Args:
        in_channels: width of the box head's output.
        num_classes: number of classes including background.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, num_classes * 4)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        if x.dim() == 4 and list(x.shape[2:]) != [1, 1]:
            raise ValueError(f"expected box features of shape [R, C, 1, 1] or [R, C], got {list(x.shape)}")
        x = x.flatten(start_dim=1)
        return self.cls_score(x), self.bbox_pred(x)
