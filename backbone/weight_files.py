"""Official pretrained weight files: where to download them and how to read them.

No weights ship with the project; users download the files below by hand and pass their path.
"""
import os
from collections.abc import Mapping
from typing import Any, Dict, Optional

import torch
from torch import nn

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


class WeightFileError(ValueError):
    """A weights or checkpoint file that cannot be used; the message is one line naming the file."""


class MissingWeightFileError(WeightFileError, FileNotFoundError):
    """The file does not exist; the message says where to download it when that is known."""


def read_weight_file(path: str, url: Optional[str] = None) -> Any:
    """What ``path`` holds, loaded onto the CPU with ``weights_only=True`` (tensors and plain
    containers only). The one place that reads weight and checkpoint files."""
    if not os.path.isfile(path):
        hint = f"; download it from {url}" if url else ""
        raise MissingWeightFileError(f"weight file '{path}' not found{hint}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated file, not a torch file, pickled foreign objects
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise WeightFileError(f"cannot read weight file '{path}': {first_line}") from None


def state_dict_of(raw: Any, path: str) -> Dict[str, torch.Tensor]:
    """The state dict in a loaded file: the file itself, or its ``"model"`` entry (WZ's and our
    training checkpoints)."""
    if isinstance(raw, Mapping) and isinstance(raw.get("model"), Mapping):
        raw = raw["model"]
    if not isinstance(raw, Mapping) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise WeightFileError(f"weight file '{path}' holds a {type(raw).__name__}, not a state dict of tensors")
    return dict(raw)


def load_weight_file(path: str, kind: Optional[str] = None, url: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """The state dict in ``path`` (a ``{"model": state_dict}`` checkpoint is unwrapped).

    Args:
        path: the .pth file.
        kind: model key from WEIGHT_FILE_NAMES; a missing file's message then names its official URL.
        url: the download address to name instead, for other files.
    """
    return state_dict_of(read_weight_file(path, url or (weight_url(kind) if kind else None)), path)


def load_state_strictly(module: nn.Module, state: Mapping[str, torch.Tensor], path: str, what: str) -> None:
    """``module.load_state_dict(state, strict=True)``, but a missing or unexpected key or a tensor
    of another shape is one ``WeightFileError`` line naming ``path`` and ``what`` it should hold."""
    own = module.state_dict()
    problems = []
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    resized = [f"{k} {list(state[k].shape)} (needs {list(v.shape)})" for k, v in own.items()
               if k in state and state[k].shape != v.shape]
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", resized)):
        if keys:
            problems.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
    if problems:
        raise WeightFileError(f"weight file '{path}' is not a {what} state dict: {'; '.join(problems)}")
    module.load_state_dict(state, strict=True)
