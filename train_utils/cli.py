"""The model flags of every entry point, derived from the model schema (:class:`ModelConfig`) and
the backbone registry, and the mapping of parsed flags back onto a ModelConfig.

Training scripts get every model flag with its default; validation.py, predict.py and the export
tool get the architecture and inference flags with no default ("the checkpoint's").
"""
from __future__ import annotations

import argparse
import typing
from typing import Any, Dict, List, Optional, Sequence, Union

from backbone import get_backbone
from backbone.registry import all_option_fields, backbone_help
from train_utils.flags import ListAction, add_plugin_flag
from train_utils.model.compile import COMPILE_MODES
from train_utils.model.config import (ARCHITECTURE, INFERENCE, ModelConfig, apply_weights_rule, plain, settings,
                                      weights_rule_fields)


AUTO_ANCHORS = "auto"  # training's --anchor-sizes auto: sizes fitted to the training boxes


def flag_name(setting: str) -> str:
    return "--" + setting.replace("_", "-")


def _int_or_auto(text: str) -> Union[int, str]:
    """Item type of training's --anchor-sizes: an int, or the word 'auto'."""
    return AUTO_ANCHORS if text == AUTO_ANCHORS else int(text)


_int_or_auto.__name__ = "int"  # as ListAction names it in errors: "expected int values"


def anchor_sizes_auto(args: argparse.Namespace) -> bool:
    """Whether the flags say ``--anchor-sizes auto``."""
    return getattr(args, "anchor_sizes", None) == [AUTO_ANCHORS]


def _add_setting(group, name: str, hint: Any, default: Any, help: str, choices: Optional[tuple],
                 one_token: bool, item_type: Optional[Any] = None) -> None:
    """One flag for a schema field of type ``hint`` (int, float, str, bool, tuples of those);
    ``item_type`` replaces a list's item type."""
    base = _unwrap_optional(hint)
    if base is bool:
        group.add_argument(flag_name(name), action=argparse.BooleanOptionalAction, default=default, help=help)
    elif typing.get_origin(base) in (tuple, list):
        group.add_argument(flag_name(name), action=ListAction, item_type=item_type or typing.get_args(base)[0],
                           one_token=one_token, default=list(default) if default is not None else None,
                           metavar="V", help=help)
    else:
        group.add_argument(flag_name(name), type=base, default=default, help=help,
                           choices=list(choices) if choices else None)


def _unwrap_optional(hint: Any) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) is typing.Union and len(args) == 1 else hint


def backbone_name(text: str) -> str:
    """argparse type: a registered backbone name."""
    try:
        return get_backbone(text).name
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def add_model_flags(parser: argparse.ArgumentParser, training: bool, one_token: bool = False,
                    auto_anchors: bool = False, names: Optional[Sequence[str]] = None) -> None:
    """The model flags (see the module docstring); ``one_token``: list flags take comma-separated
    values only (for parsers with positional arguments); ``auto_anchors``: ``--anchor-sizes``
    also takes 'auto' (the training scripts); ``names``: only these settings (and the backbone
    options)."""
    title = "model" if training else "model (the checkpoint's unless given; architecture flags are for bare state dicts)"
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(ModelConfig)
    for f in settings() if training else settings(ARCHITECTURE) + settings(INFERENCE):
        rule = f.metadata["weights_rule"] if training else None
        default = f.default if training and not rule else None  # a rule's value is chosen by the trainer
        if names is not None and f.name not in names:
            continue
        if f.name == "backbone":
            group.add_argument("--backbone", type=backbone_name, default=default, help=backbone_help())
            continue
        auto = auto_anchors and f.name == "anchor_sizes"
        help = f.metadata["help"] + ("; 'auto': the sizes covering the training boxes best, chosen before training "
                                     "(see tools/check_dataset.py --anchors)" if auto else "")
        if rule:
            help += (f"; default for the ResNet backbones: {rule[0]} with ImageNet weights or --weights, {rule[1]} "
                     f"from scratch (--backbone-weights none), as torchvision's detectors"
                     + (f"; others: {f.default}" if f.default is not None else ""))
        _add_setting(group, f.name, hints[f.name], default, help, f.metadata["choices"], one_token,
                     _int_or_auto if auto else None)
    for name, (f, hint, owners) in all_option_fields().items():
        default = "" if f.default is None else f"; default {f.default!r}"
        help = f"{f.metadata['help']} [{', '.join(owners)}{default}]"
        _add_setting(group, name, hint, None, help, f.metadata["choices"], one_token)


def add_model_arguments(parser: argparse.ArgumentParser, with_device: bool = True, one_token: bool = False) -> None:
    """Flags shared by validation.py, predict.py and the export tool for rebuilding a detector
    from a weights file (``--device`` only ``with_device``; ``one_token``: see ``add_model_flags``)."""
    add_plugin_flag(parser)
    parser.add_argument("--classes-json", default=None,
                        help="{class name: id 1..K} file; default: the class names stored in the checkpoint")
    if with_device:
        parser.add_argument("--device", default="auto", help="'auto' (cuda when available), 'cuda', 'cuda:1' or 'cpu'")
        add_compile_flags(parser)
    add_model_flags(parser, training=False, one_token=one_token)


def add_compile_flags(parser: argparse.ArgumentParser) -> None:
    """``--compile`` and ``--compile-mode`` (training, validation.py, predict.py)."""
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the backbone + FPN, the RPN head and the box head (the rest stays eager); "
                             "the first batches of each image size take longer (see docs/benchmarks.md#gpu-levers)")
    parser.add_argument("--compile-mode", choices=COMPILE_MODES, default=None,
                        help="the torch.compile mode of --compile (unset: torch's own mode)")


def compile_mode(args: argparse.Namespace) -> Optional[str]:
    """The torch.compile mode the flags ask for, None without ``--compile``; ``--compile-mode``
    alone is a ValueError."""
    mode = getattr(args, "compile_mode", None)
    if not getattr(args, "compile", False):
        if mode is not None:
            raise ValueError("--compile-mode needs --compile")
        return None
    return mode or "default"


def _given_settings(args: argparse.Namespace) -> Dict[str, Any]:
    """Model settings present on ``args`` with a value (backbone options under ``backbone_options``);
    ``--anchor-sizes auto`` counts as not given until the trainer puts the chosen sizes there."""
    values = {f.name: getattr(args, f.name) for f in settings()
              if getattr(args, f.name, None) not in (None, [AUTO_ANCHORS])}
    options = {name: getattr(args, name) for name in all_option_fields() if getattr(args, name, None) is not None}
    if options:
        values["backbone_options"] = options
    return values


def model_config_from_args(args: argparse.Namespace, num_classes: int) -> ModelConfig:
    """The training flags as a ModelConfig (ValueError naming the flag when a value is invalid)."""
    return ModelConfig.from_dict({**_given_settings(args), "num_classes": num_classes})


def training_model_config(args: argparse.Namespace, num_classes: int, pretrained: bool) -> ModelConfig:
    """The ModelConfig of a new training run: the flags, and for the settings left to their
    default the value that fits ``pretrained`` (ImageNet or detector weights loaded) or not."""
    given = [f.name for f in weights_rule_fields() if getattr(args, f.name, None) is not None]
    return apply_weights_rule(model_config_from_args(args, num_classes), given, pretrained)


ARCHITECTURE_HINT = "architecture flags apply to bare state dicts only"


def apply_model_flags(config: ModelConfig, args: argparse.Namespace, source: str,
                      hint: str = ARCHITECTURE_HINT) -> ModelConfig:
    """``config`` (stored in ``source``) with the inference and training flags given on the
    command line; an architecture flag that disagrees with the stored model is a ValueError
    ending with ``hint``."""
    given = _given_settings(args)
    stored = config.to_dict()
    _check_agrees(_stored_options(config), given.pop("backbone_options", {}), source, hint)
    architecture = {k: v for k, v in given.items() if ModelConfig.__dataclass_fields__[k].metadata["role"] == ARCHITECTURE}
    _check_agrees(stored, architecture, source, hint)
    return ModelConfig.from_dict({**stored, **given})


def _stored_options(config: ModelConfig) -> Dict[str, Any]:
    """Every option of the config's backbone with its value (stored or default)."""
    spec = get_backbone(config.backbone)
    return {name: plain(getattr(spec.make_options(config.backbone_options), name)) for name in spec.option_names()}


def _check_agrees(stored: Dict[str, Any], given: Dict[str, Any], source: str, hint: str) -> None:
    """An architecture flag must say what the checkpoint says (it cannot change the weights)."""
    for name, value in given.items():
        if name not in stored:
            raise ValueError(f"{flag_name(name)} does not apply to the model in {source}")
        if plain(value) != plain(stored[name]):
            trained = "the backbone's default" if stored[name] is None else stored[name]
            raise ValueError(f"{flag_name(name)}: {source} was trained with {name}={trained}; {hint}")


def model_flags_given(args: argparse.Namespace) -> List[str]:
    """The model flags given on the command line (for tools that cannot use them)."""
    given = _given_settings(args)
    options = list(given.pop("backbone_options", {}))
    return [flag_name(name) for name in list(given) + options]
