"""Rebuild a detector from a weights file for evaluation, prediction or export.

Reads every file :func:`train_utils.checkpoint.read_checkpoint` reads: our training checkpoints
(model config and class names inside), WZ-style ``{"model": ...}`` files and bare state dicts
(architecture from the command line's model flags, class names from --classes-json). A file
of an ``--ema`` run gives its EMA weights unless ``--weights-variant raw`` asks for the trained ones.
"""
import argparse
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

from train_utils.checkpoint import WEIGHT_VARIANTS, Checkpoint, read_checkpoint
from train_utils.cli import apply_model_flags, compile_mode, model_config_from_args
from train_utils.data.classes import load_class_names
from train_utils.device import resolve_device
from train_utils.model.builder import build_model, official_frozen_bn_eps
from train_utils.model.compile import compile_static_parts
from train_utils.model.config import ModelConfig
from network_files import FasterRCNN

_PREDICTOR_KEY = "roi_heads.box_predictor.cls_score.weight"


@dataclass
class LoadedDetector:
    """A detector in eval mode on its device, its class names (label i is ``class_names[i - 1]``),
    the configuration it was built from, the checkpoint's ``data`` section ({} if none) and the
    plugins it was trained with."""

    model: FasterRCNN
    class_names: List[str]
    config: ModelConfig
    data: Dict[str, Any]
    plugins: List[str]


def add_weights_variant_flag(parser: argparse.ArgumentParser) -> None:
    """``--weights-variant``, beside the model flags of validation.py, predict.py and the export tool."""
    parser.add_argument("--weights-variant", choices=WEIGHT_VARIANTS, default=None,
                        help="which weights of a checkpoint trained with --ema: its moving average (ema, the "
                             "default when it holds one) or the trained weights (raw)")


def _check_fit(model: torch.nn.Module, state: dict, path: str, config: ModelConfig) -> None:
    """Raise one clear line when ``state`` does not match ``model`` key for key and shape for shape."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [f"{k} {list(state[k].shape)} vs {list(own[k].shape)}"
                for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or reshaped:
        raise ValueError(
            f"{path} does not fit a '{config.backbone}' detector built with {_describe(config)}: "
            f"{len(missing)} missing keys (e.g. {missing[:2]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:2]}), {len(reshaped)} of another shape (e.g. {reshaped[:2]}); "
            "check --backbone and the architecture flags (see --help)"
        )


def _describe(config: ModelConfig) -> str:
    """The architecture settings of ``config`` that differ from the defaults, for error messages."""
    default = ModelConfig(num_classes=config.num_classes, backbone=config.backbone).to_dict()
    current = config.to_dict()
    changed = [f"{key}={value}" for key, value in current.items() if value != default[key] and key != "frozen_bn_eps"]
    return ", ".join(changed) or "default settings"


def _bare_config(args: argparse.Namespace, ckpt: Checkpoint, names: List[str], path: str) -> ModelConfig:
    """The architecture of a file without a model config: the model flags and the class list."""
    if not args.backbone or not args.classes_json:
        raise ValueError(f"{path} is a bare state dict without model configuration or class names: "
                         "pass --backbone and --classes-json")
    predictor = ckpt.model.get(_PREDICTOR_KEY)
    if predictor is not None and predictor.shape[0] != len(names) + 1:
        raise ValueError(f"{path} predicts {predictor.shape[0] - 1} classes but {args.classes_json} lists {len(names)}")
    config = model_config_from_args(args, len(names) + 1)
    eps = official_frozen_bn_eps(path, config.backbone)
    return config if eps is None else config.replace(frozen_bn_eps=eps)


def detector_from_checkpoint(ckpt: Checkpoint, path: str, args: argparse.Namespace,
                             score_thresh: Optional[float] = None) -> LoadedDetector:
    """Rebuild the detector of ``ckpt`` (read from ``path``) as the model flags on ``args`` say;
    ``score_thresh``: the detector keeps detections down to this score at least (its config's
    ``box_score_thresh`` is lowered to it when higher)."""
    names: Optional[List[str]] = load_class_names(args.classes_json) if args.classes_json else ckpt.class_names
    if ckpt.config is None:
        config = _bare_config(args, ckpt, names or [], path)
    elif names is None:
        raise ValueError(f"{path} stores no class names: pass --classes-json")
    elif len(names) != ckpt.config.num_classes - 1:
        raise ValueError(f"{path} predicts {ckpt.config.num_classes - 1} classes but "
                         f"{args.classes_json or 'its class list'} holds {len(names)}")
    else:
        config = apply_model_flags(ckpt.config, args, path)
    if score_thresh is not None and score_thresh < config.box_score_thresh:
        config = config.replace(box_score_thresh=score_thresh)
    model = build_model(config)
    state, variant = ckpt.weights(path, getattr(args, "weights_variant", None))
    _check_fit(model, state, path, config)
    model.load_state_dict(state)
    if ckpt.ema is not None:
        print(f"{path}: using its EMA weights (--weights-variant raw for the trained ones)" if variant == "ema" else
              f"{path}: using its trained (raw) weights, not its EMA ones", file=sys.stderr)
    model.to(resolve_device(args.device)).eval()
    mode = compile_mode(args)
    if mode is not None:
        compile_static_parts(model, mode)
    return LoadedDetector(model, list(names), config, ckpt.data, ckpt.plugins)


def load_detector(args: argparse.Namespace, weights_path: str, score_thresh: Optional[float] = None) -> LoadedDetector:
    """Rebuild the detector of ``weights_path`` as the flags of
    :func:`train_utils.cli.add_model_arguments` say (``score_thresh``: see :func:`detector_from_checkpoint`)."""
    return detector_from_checkpoint(read_checkpoint(weights_path), weights_path, args, score_thresh)


def load_model(path: str, device: str = "cpu", variant: Optional[str] = None) -> FasterRCNN:
    """The detector a training checkpoint holds, in eval mode on ``device``; ``variant``: the
    weights (see :meth:`Checkpoint.weights`: the EMA ones of an ``--ema`` run by default)."""
    ckpt = read_checkpoint(path)
    if ckpt.config is None:
        raise ValueError(f"{path} holds no model config; load a bare state dict with load_detector and --backbone")
    model = build_model(ckpt.config)
    model.load_state_dict(ckpt.weights(path, variant)[0], strict=True)
    return model.to(device).eval()
