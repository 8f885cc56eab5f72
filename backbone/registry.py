"""The backbone registry: one entry per backbone, the only list of backbones in the project.

An entry holds the builder, the ImageNet weight file it loads (WZ's place ``backbone/<file>.pth``
and its download address) and the backbone's own options (a dataclass: every field becomes a
command-line flag of the training, validation and prediction scripts). A backbone module
registers itself::

    @dataclass(frozen=True)
    class TinyOptions:
        width: int = option(16, "channels of the first layer")

    @register_backbone("tiny", options=TinyOptions, help="a small CNN for tests")
    def build_tiny(weights_path: Optional[str], trainable_layers: int, width: int) -> DetectorParts:
        ...

A builder takes the weight file to load (None: random init), the number of trainable stages and
its options as plain keywords (and ``norm``, one of ``backbone.norms.NORMS`` or None, when it is
registered with ``norm=True``), and returns the :class:`DetectorParts` the detector needs. A family
of backbones named by a prefix (``tv:<torchvision classifier>``) registers one resolver instead.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from torch import nn

from .weight_files import WEIGHT_FILE_NAMES, weight_url

# Default anchors: five sizes on one feature map, or one size per FPN level (torchvision's).
SINGLE_LEVEL_ANCHORS: Tuple[Tuple[int, ...], ...] = ((32, 64, 128, 256, 512),)
FPN_ANCHORS: Tuple[Tuple[int, ...], ...] = ((32,), (64,), (128,), (256,), (512,))
MAX_TRAINABLE_LAYERS = 5


@dataclass(frozen=True)
class DetectorParts:
    """What a backbone builder hands to the detector.

    backbone: image [N, 3, H, W] -> feature map(s), with an ``out_channels`` attribute.
    anchor_sizes: default anchor sizes, one tuple per feature map.
    featmap_names: the maps the RoI pooler reads.
    box_head: pooled RoIs [R, C, P, P] -> [R, D] with ``out_channels`` D, or None for the usual
        two-layer MLP head; pool_size: P.
    """

    backbone: nn.Module
    anchor_sizes: Tuple[Tuple[int, ...], ...]
    featmap_names: List[str]
    box_head: Optional[nn.Module] = None
    pool_size: int = 7


@dataclass(frozen=True)
class NoOptions:
    """A backbone without options of its own."""


def option(default: Any, help: str, choices: Optional[Tuple[Any, ...]] = None) -> Any:
    """A field of a backbone options dataclass: its default, its ``--help`` text, allowed values."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class BackboneSpec:
    """A registered backbone. ``weights``: stem of its ImageNet file (``backbone/<weights>.pth``);
    ``url``: where that file is downloaded; ``options``: dataclass of the backbone's own options;
    ``norm``: the builder takes a ``norm`` keyword (the ``--norm`` choice of the ResNets)."""

    name: str
    build: Callable[..., DetectorParts]
    weights: Optional[str] = None
    url: Optional[str] = None
    options: type = NoOptions
    help: str = ""
    norm: bool = False

    def option_names(self) -> List[str]:
        return [f.name for f in dataclasses.fields(self.options)]

    def make_options(self, values: Dict[str, Any]) -> Any:
        """The options dataclass from ``values`` (None = the option's default); an option of
        another backbone is a ValueError naming its flag."""
        foreign = sorted(set(values) - set(self.option_names()))
        if foreign:
            flags = ", ".join("--" + name.replace("_", "-") for name in foreign)
            raise ValueError(f"{flags} do(es) not apply to the {self.name} backbone")
        return self.options(**{k: v for k, v in values.items() if v is not None})


@dataclass(frozen=True)
class BackboneFamily:
    """Backbones named ``prefix + <name>``; ``resolve(full name)`` returns the entry or raises
    ValueError with the reason; every member takes ``options``."""

    prefix: str
    resolve: Callable[[str], BackboneSpec]
    options: type
    help: str


BACKBONES: Dict[str, BackboneSpec] = {}
FAMILIES: Dict[str, BackboneFamily] = {}


def register_backbone(name: str, *, weights: Optional[str] = None, url: Optional[str] = None,
                      options: type = NoOptions, help: str = "", replace: bool = False,
                      norm: bool = False) -> Callable:
    """Decorator registering ``build`` as backbone ``name`` (see the module docstring).

    ``url`` defaults to the official address of ``weights`` when it is a known ImageNet file."""
    def decorator(build: Callable[..., DetectorParts]) -> Callable[..., DetectorParts]:
        if name in BACKBONES and not replace:
            raise ValueError(f"backbone '{name}' is already registered")
        if not dataclasses.is_dataclass(options):
            raise TypeError(f"backbone '{name}': options must be a dataclass, got {options!r}")
        address = url or (weight_url(weights) if weights in WEIGHT_FILE_NAMES else None)
        BACKBONES[name] = BackboneSpec(name, build, weights, address, options, help, norm)
        return build

    return decorator


def register_backbone_family(family: BackboneFamily) -> None:
    """Register a prefix-named family of backbones (see :class:`BackboneFamily`)."""
    FAMILIES[family.prefix] = family


def get_backbone(name: str) -> BackboneSpec:
    """The entry of backbone ``name``; ValueError naming the choices when there is none."""
    if name in BACKBONES:
        return BACKBONES[name]
    for family in FAMILIES.values():
        if name.startswith(family.prefix):
            return family.resolve(name)
    families = ", ".join(f"{f.prefix}<name> ({f.help})" for f in FAMILIES.values())
    raise ValueError(f"unknown backbone '{name}' (choose from {', '.join(BACKBONES)}"
                     + (f"; or {families}" if families else "") + ")")


def backbone_help() -> str:
    """One line listing the registered backbones and families, for ``--backbone``."""
    families = [f"{f.prefix}<name> for {f.help}" for f in FAMILIES.values()]
    return ", ".join(sorted(BACKBONES)) + ("; or " + "; ".join(families) if families else "")


def all_option_fields() -> Dict[str, Tuple[dataclasses.Field, Any, List[str]]]:
    """Every registered backbone option: name -> (its field, its type, the backbones that take it)."""
    owners = [(spec.name, spec.options) for spec in BACKBONES.values()]
    owners += [(family.prefix + "<name>", family.options) for family in FAMILIES.values()]
    found: Dict[str, Tuple[dataclasses.Field, Any, List[str]]] = {}
    for owner, options in owners:
        hints = typing.get_type_hints(options)
        for f in dataclasses.fields(options):
            found.setdefault(f.name, (f, hints[f.name], []))[2].append(owner)
    return found


def validate_trainable_layers(value: int, owner: str = "trainable_layers") -> int:
    """The one rule for trainable stages: 0 (all frozen) .. 5 (all trained), counted from the top."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TRAINABLE_LAYERS:
        raise ValueError(f"{owner} must be 0..{MAX_TRAINABLE_LAYERS}, got {value}")
    return value
