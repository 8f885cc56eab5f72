"""Rebuild a detector from a weights file for evaluation or prediction.

Reads checkpoints of our training scripts (model config and class names inside), WZ-style
``{"model": ...}`` checkpoints and bare state dicts (architecture from the command line).
"""
import argparse
from dataclasses import dataclass
from typing import Any, Optional

import torch

from train_utils.data.dataset import load_class_names
from network_files import FasterRCNN

from train_utils.checkpoint import load_checkpoint
from train_utils.model.builder import build_model, official_frozen_bn_eps
from train_utils.engine.args import backbone_name, int_list
from train_utils.device import resolve_device

_PREDICTOR_KEY = "roi_heads.box_predictor.cls_score.weight"
# Model config keys a bare state dict takes from the command line (with --backbone).
ARCHITECTURE_KEYS = ("width_mult", "feature_stride", "representation_size", "anchor_sizes")
_ARCHITECTURE_FLAGS = ", ".join(["--backbone"] + [f"--{key.replace('_', '-')}" for key in ARCHITECTURE_KEYS])


def add_model_arguments(parser: argparse.ArgumentParser, with_device: bool = True) -> None:
    """Flags shared by validation.py, predict.py and the export tool for rebuilding a detector
    from a weights file (``--device`` only ``with_device``)."""
    group = parser.add_argument_group("model (architecture flags are only needed for a bare state dict)")
    group.add_argument("--classes-json", default=None,
                       help="{class name: id 1..K} file; default: the class names stored in the checkpoint")
    if with_device:
        group.add_argument("--device", default="auto", help="'auto' (cuda when available), 'cuda', 'cuda:1' or 'cpu'")
    group.add_argument("--min-size", type=int, default=None, help="shorter image side; default: the checkpoint's")
    group.add_argument("--max-size", type=int, default=None, help="longer side bound; default: the checkpoint's")
    group.add_argument("--backbone", type=backbone_name, default=None, help="backbone of a bare state dict")
    group.add_argument("--width-mult", type=float, default=None, help="MobileNetV2 width multiplier")
    group.add_argument("--feature-stride", type=int, choices=[16, 32], default=None, help="MobileNetV2 output stride")
    group.add_argument("--representation-size", type=int, default=None, help="width of the box head")
    group.add_argument("--anchor-sizes", type=int_list, default=None, help="anchor sizes, e.g. '32,64,128,256,512'")


@dataclass
class LoadedDetector:
    """A detector in eval mode on its device, its class names (label i is ``class_names[i - 1]``),
    the configuration it was built from and the training flags stored with it ({} if none)."""

    model: FasterRCNN
    class_names: list[str]
    config: dict[str, Any]
    train_args: dict[str, Any]


def _split_weights_file(raw: Any, path: str) -> tuple[dict, Optional[dict], Optional[list], dict]:
    """(state dict, model config or None, class names or None, training flags) of a loaded file."""
    if not isinstance(raw, dict):
        raise ValueError(f"{path} holds a {type(raw).__name__}, not a checkpoint or a state dict")
    if "model_config" in raw:
        return raw["model"], dict(raw["model_config"]), raw.get("class_names"), dict(raw.get("args") or {})
    if isinstance(raw.get("model"), dict):  # WZ-style checkpoint: model, optimizer, lr_scheduler, epoch
        return raw["model"], None, None, {}
    if raw and all(isinstance(value, torch.Tensor) for value in raw.values()):
        return raw, None, None, {}
    raise ValueError(f"{path} is neither a training checkpoint nor a state dict of tensors")


def _check_fit(model: torch.nn.Module, state: dict, path: str, config: dict) -> None:
    """Raise one clear line when ``state`` does not match ``model`` key for key and shape for shape."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [f"{k} {list(state[k].shape)} vs {list(own[k].shape)}"
                for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or reshaped:
        raise ValueError(
            f"{path} does not fit a '{config['backbone']}' detector built with {_describe(config)}: "
            f"{len(missing)} missing keys (e.g. {missing[:2]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:2]}), {len(reshaped)} of another shape (e.g. {reshaped[:2]}); "
            f"check {_ARCHITECTURE_FLAGS}"
        )


def _describe(config: dict) -> str:
    """The architecture settings of ``config`` that differ from the defaults, for error messages."""
    described = [f"{key}={config[key]}" for key in ARCHITECTURE_KEYS if config.get(key) is not None]
    return ", ".join(described) or "default settings"


def load_detector(args: argparse.Namespace, weights_path: str) -> LoadedDetector:
    """Rebuild the detector of ``weights_path`` as the flags of :func:`add_model_arguments` say."""
    state, config, names, train_args = _split_weights_file(load_checkpoint(weights_path), weights_path)
    if args.classes_json:
        names = load_class_names(args.classes_json)
    if config is None:
        if not args.backbone or not args.classes_json:
            raise ValueError(f"{weights_path} is a bare state dict without model configuration or class names: "
                             "pass --backbone and --classes-json")
        config = {"backbone": args.backbone, "num_classes": len(names) + 1}
        config.update({key: getattr(args, key) for key in ARCHITECTURE_KEYS if getattr(args, key) is not None})
        predictor = state.get(_PREDICTOR_KEY)
        if predictor is not None and predictor.shape[0] != len(names) + 1:
            raise ValueError(f"{weights_path} predicts {predictor.shape[0] - 1} classes but "
                             f"{args.classes_json} lists {len(names)}")
    elif names is None:
        raise ValueError(f"{weights_path} stores no class names: pass --classes-json")
    elif len(names) != int(config["num_classes"]) - 1:
        raise ValueError(f"{weights_path} predicts {int(config['num_classes']) - 1} classes but "
                         f"{args.classes_json or 'its class list'} holds {len(names)}")
    eps = official_frozen_bn_eps(weights_path, config["backbone"])
    if eps is not None:
        config["frozen_bn_eps"] = eps
    if args.min_size is not None:
        config["min_size"] = args.min_size
    if args.max_size is not None:
        config["max_size"] = args.max_size
    model = build_model(config)
    _check_fit(model, state, weights_path, config)
    model.load_state_dict(state)
    model.to(resolve_device(args.device)).eval()
    return LoadedDetector(model, list(names), config, train_args)
