"""Official pretrained weight files: where to download them and how to read them.

No weights ship with the project; users download the files below by hand and pass their path.
"""
import os
import pickle
from collections.abc import Mapping

import torch

_DOWNLOAD_ROOT = "https://download.pytorch.org/models/"

# Short model key -> official file name on download.pytorch.org.
WEIGHT_FILE_NAMES: dict[str, str] = {
    "resnet18": "resnet18-f37072fd.pth",
    "resnet34": "resnet34-b627a593.pth",
    "resnet50": "resnet50-0676ba61.pth",
    "resnet101": "resnet101-63fe2227.pth",
    "mobilenet_v2": "mobilenet_v2-b0353104.pth",
    "mobilenet_v3_large": "mobilenet_v3_large-8738ca79.pth",
    "efficientnet_b0": "efficientnet_b0_rwightman-7f5810bc.pth",
    "vgg11": "vgg11-8a719046.pth",
    "vgg13": "vgg13-19584684.pth",
    "vgg16": "vgg16-397923af.pth",
    "vgg19": "vgg19-dcbb9e9d.pth",
    "fasterrcnn_resnet50_fpn_coco": "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth",
}

# Official file name -> download URL.
WEIGHT_URLS: dict[str, str] = {name: _DOWNLOAD_ROOT + name for name in WEIGHT_FILE_NAMES.values()}


def weight_url(kind: str) -> str:
    """Download URL of the official weight file for a model key such as "resnet50"."""
    if kind not in WEIGHT_FILE_NAMES:
        raise ValueError(f"unknown weight kind {kind!r}; expected one of {sorted(WEIGHT_FILE_NAMES)}")
    return WEIGHT_URLS[WEIGHT_FILE_NAMES[kind]]


def load_weight_file(path: str, kind: str) -> dict[str, torch.Tensor]:
    """Read a state dict (or a {"model": state_dict} training checkpoint) onto the CPU.

    Args:
        path: the .pth file.
        kind: model key from WEIGHT_FILE_NAMES, used to point at the download URL when the
            file is missing.
    """
    url = weight_url(kind)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weight file '{path}' not found; download the {kind} weights from {url}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first_line = str(err).strip().splitlines()[0]
        raise RuntimeError(f"weight file '{path}' is not a plain tensor checkpoint: {first_line}") from err
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("model"), Mapping):
        checkpoint = checkpoint["model"]
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"weight file '{path}' holds a {type(checkpoint).__name__}, not a state dict")
    return checkpoint
