"""A padded batch of images together with the size of each image before padding."""
from typing import List, Tuple

import torch
from torch import Tensor


class ImageList:
    """Holds a batch tensor ``[B, C, H_pad, W_pad]`` and each image's real size ``(h, w)``.

    Images of different sizes are padded to one tensor; ``image_sizes`` remembers the valid
    region of each so that anchors and boxes can be clipped to it.
    """

    def __init__(self, tensors: Tensor, image_sizes: List[Tuple[int, int]]) -> None:
        self.tensors = tensors
        self.image_sizes = image_sizes

    def to(self, device: torch.device) -> "ImageList":
        return ImageList(self.tensors.to(device), self.image_sizes)
