"""The model schema: every setting of the detector with its type, default, role and help.

This dataclass is the one list of architecture keys in the project. The training flags, the model
flags of validation.py / predict.py / tools/export_onnx.py (``train_utils.cli``), the checkpoint's
``model_config`` (``train_utils.checkpoint``) and the builder (``train_utils.model.builder``) all
derive from it. A backbone's own options (``--width-mult``, ``--fpn``, ...) are declared by its
registry entry and kept in ``backbone_options``.

Roles: ``architecture`` settings fix the shapes of the weights (the flags a bare state dict
needs); ``inference`` settings may change when a trained model is evaluated or used; ``training``
settings only matter while training. Settings with a ``weights_rule`` (pretrained value, from-scratch
value) take, in a new training run, the value that fits whether weights are loaded, as torchvision's
detection builders do (:func:`apply_weights_rule`). The detector hyper-parameters default to FasterRCNN's own
keyword defaults (torchvision's), read from its signature rather than written twice.
"""
from __future__ import annotations

import dataclasses
import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any, Collection, Dict, Optional, Tuple

from backbone import get_backbone, validate_trainable_layers
from backbone.norms import NORMS
from backbone.registry import MAX_TRAINABLE_LAYERS, all_option_fields
from network_files import FasterRCNN

ARCHITECTURE, INFERENCE, TRAINING = "architecture", "inference", "training"
ROI_OPS = ("align", "pool")
BOX_NMS = ("hard", "soft-linear", "soft-gaussian")
_DETECTOR_DEFAULTS = {name: p.default for name, p in inspect.signature(FasterRCNN.__init__).parameters.items()}


def setting(default: Any, role: str, help: str, choices: Optional[Tuple[Any, ...]] = None,
            detector: bool = False, flag: bool = True, weights_rule: Optional[Tuple[Any, Any]] = None) -> Any:
    """A ModelConfig field. ``detector``: passed to FasterRCNN under its own name; ``flag``:
    exposed on the command line; ``weights_rule``: (with pretrained weights, from scratch) values
    of a new training run of a backbone with a norm choice, unless the flag is given."""
    metadata = {"role": role, "help": help, "choices": choices, "detector": detector, "flag": flag,
                "weights_rule": weights_rule}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def detector_setting(name: str, role: str, help: str) -> Any:
    """FasterRCNN's keyword ``name`` (the field's own name), with FasterRCNN's default."""
    return setting(_DETECTOR_DEFAULTS[name], role, help, detector=True)


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a detector (weights aside); plain values only."""

    num_classes: int = field(metadata={"role": ARCHITECTURE, "flag": False, "detector": False,
                                       "help": "object classes + 1 (background); set from the data"})
    backbone: str = setting("resnet50_fpn", ARCHITECTURE, "backbone network (see the registry)")
    backbone_options: Dict[str, Any] = setting({}, ARCHITECTURE, "the backbone's own options", flag=False)
    trainable_layers: int = setting(3, TRAINING, "ResNet stages (VGG conv blocks with --box-head vgg) to train, "
                                                 "counted from the top (0-5)",
                                    weights_rule=(3, MAX_TRAINABLE_LAYERS))
    norm: Optional[str] = setting(
        None, ARCHITECTURE, "normalisation of the ResNet backbones: frozen_bn (FrozenBatchNorm2d, the ImageNet "
                            "statistics), bn (trainable BatchNorm2d), syncbn (BatchNorm2d synchronised across the "
                            "processes under DDP), gn (GroupNorm, 32 groups: trains from scratch); checkpoints "
                            "without it have frozen_bn", choices=NORMS, weights_rule=("frozen_bn", "bn"))
    representation_size: int = setting(1024, ARCHITECTURE, "width of the two-layer box head")
    roi_op: str = setting("align", ARCHITECTURE, "RoI feature pooling: RoIAlign or the original RoIPool",
                          choices=ROI_OPS)
    anchor_sizes: Optional[Tuple[int, ...]] = setting(
        None, ARCHITECTURE, "anchor sizes, one per FPN level or all on the single level, e.g. "
                            "'32,64,128,256,512' (default: the backbone's)")
    aspect_ratios: Tuple[float, ...] = setting((0.5, 1.0, 2.0), ARCHITECTURE, "anchor ratios h/w")
    min_size: Tuple[int, ...] = setting((800,), INFERENCE, "shorter image side; several values = "
                                                           "multi-scale training (evaluation uses the last)")
    max_size: int = setting(1333, INFERENCE, "upper bound on the longer image side")
    rpn_pre_nms_top_n_train: int = detector_setting("rpn_pre_nms_top_n_train", TRAINING,
                                                    "proposals per level kept before NMS, training")
    rpn_pre_nms_top_n_test: int = detector_setting("rpn_pre_nms_top_n_test", INFERENCE,
                                                   "proposals per level kept before NMS, evaluation")
    rpn_post_nms_top_n_train: int = detector_setting("rpn_post_nms_top_n_train", TRAINING,
                                                     "proposals per image kept after NMS, training")
    rpn_post_nms_top_n_test: int = detector_setting("rpn_post_nms_top_n_test", INFERENCE,
                                                    "proposals per image kept after NMS, evaluation")
    rpn_nms_thresh: float = detector_setting("rpn_nms_thresh", INFERENCE, "IoU of the proposal NMS")
    rpn_fg_iou_thresh: float = detector_setting("rpn_fg_iou_thresh", TRAINING, "IoU making an anchor positive")
    rpn_bg_iou_thresh: float = detector_setting("rpn_bg_iou_thresh", TRAINING, "IoU below which an anchor is negative")
    rpn_batch_size_per_image: int = detector_setting("rpn_batch_size_per_image", TRAINING,
                                                     "anchors sampled per image for the RPN loss")
    rpn_positive_fraction: float = detector_setting("rpn_positive_fraction", TRAINING,
                                                    "largest share of positives among those anchors")
    rpn_score_thresh: float = detector_setting("rpn_score_thresh", INFERENCE, "smallest proposal objectness")
    box_score_thresh: float = detector_setting("box_score_thresh", INFERENCE, "smallest detection score")
    box_nms_thresh: float = detector_setting("box_nms_thresh", INFERENCE, "IoU of the per-class detection NMS")
    box_detections_per_img: int = detector_setting("box_detections_per_img", INFERENCE,
                                                   "most detections per image")
    box_nms: str = setting(_DETECTOR_DEFAULTS["box_nms"], INFERENCE,
                           "NMS of the final detections: hard (torchvision's) or soft-NMS (Bodla et al. 2017) "
                           "decaying overlapping scores linearly (by 1 - IoU above --box-nms-thresh) or by a "
                           "gaussian of the IoU", choices=BOX_NMS, detector=True)
    box_soft_nms_sigma: float = detector_setting("box_soft_nms_sigma", INFERENCE,
                                                 "width of soft-gaussian: scores decay by exp(-IoU^2 / sigma)")
    box_soft_nms_min_score: float = detector_setting(
        "box_soft_nms_min_score", INFERENCE, "soft-NMS drops a box whose decayed score falls below this "
                                             "(mmcv's and Bodla et al.'s 0.001)")
    box_fg_iou_thresh: float = detector_setting("box_fg_iou_thresh", TRAINING, "IoU making a RoI foreground")
    box_bg_iou_thresh: float = detector_setting("box_bg_iou_thresh", TRAINING, "IoU below which a RoI is background")
    box_batch_size_per_image: int = detector_setting("box_batch_size_per_image", TRAINING,
                                                     "RoIs sampled per image for the box head loss")
    box_positive_fraction: float = detector_setting("box_positive_fraction", TRAINING,
                                                    "largest share of foreground among those RoIs")
    rpn_ignore_cross_boundary: bool = detector_setting(
        "rpn_ignore_cross_boundary", TRAINING, "the paper's rule: only anchors entirely inside the resized image "
                                               "are matched and sampled for the RPN loss (test proposals are "
                                               "clipped either way)")
    box_bg_iou_low_thresh: float = detector_setting(
        "box_bg_iou_low_thresh", TRAINING, "background RoIs need at least this IoU with an object "
                                           "(py-faster-rcnn's BG_THRESH_LO 0.1; 0 = torchvision's)")
    box_smooth_l1_beta: float = detector_setting(
        "box_smooth_l1_beta", TRAINING, "smooth L1 beta of the box head loss (torchvision 1/9, py-faster-rcnn 1)")
    frozen_bn_eps: Optional[float] = setting(None, ARCHITECTURE, "FrozenBatchNorm eps (0 for the official "
                                                                 "COCO weights; None keeps 1e-5)", flag=False)

    def __post_init__(self) -> None:
        # Lists (from JSON-like dicts or flags) become tuples; a bare size becomes a one-size tuple.
        for name in ("min_size", "anchor_sizes", "aspect_ratios"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value) if isinstance(value, (list, tuple)) else (value,))
        options = {k: tuple(v) if isinstance(v, list) else v for k, v in self.backbone_options.items()}
        object.__setattr__(self, "backbone_options", options)
        for rule in _RULES:
            rule(self)

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with ``changes`` applied and validated."""
        return dataclasses.replace(self, **changes)

    def detector_kwargs(self) -> Dict[str, Any]:
        """The FasterRCNN keywords this config sets."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata["detector"]}

    def to_dict(self) -> Dict[str, Any]:
        """Plain types only (lists, dicts, numbers, strings), loadable with ``weights_only=True``."""
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "ModelConfig":
        """Read a stored config, today's or the first layout (backbone options at the top level,
        None for "default", ``min_size`` as an int); an unknown key is a ValueError naming it."""
        values = dict(values)
        flat = {name: values.pop(name) for name in all_option_fields() if name in values}
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"model config: unknown settings {unknown}")
        if flat:  # the first layout stored every backbone's options, whichever the backbone
            spec = get_backbone(str(values.get("backbone", cls.__dataclass_fields__["backbone"].default)))
            values["backbone_options"] = {k: v for k, v in flat.items() if v is not None and k in spec.option_names()}
        return cls(**{k: v for k, v in values.items() if v is not None and v != []})  # None, []: the default


def plain(value: Any) -> Any:
    """``value`` with tuples as lists (also inside lists and dicts), as stored in checkpoints."""
    if isinstance(value, (tuple, list)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


# ---------------------------------------------------------------------------------- validation
def _check_num_classes(config: ModelConfig) -> None:
    if not isinstance(config.num_classes, int) or config.num_classes < 2:
        raise ValueError(f"num_classes counts the background too and must be at least 2, got {config.num_classes}")


def _check_backbone(config: ModelConfig) -> None:
    """The backbone is registered and every option given is one of its own."""
    get_backbone(config.backbone).make_options(config.backbone_options)


def _check_trainable_layers(config: ModelConfig) -> None:
    validate_trainable_layers(config.trainable_layers, "--trainable-layers")


def _check_norm(config: ModelConfig) -> None:
    """A known normalisation, on a backbone that has the choice (the ResNets)."""
    if config.norm is None:
        return
    if config.norm not in NORMS:
        raise ValueError(f"--norm: unknown normalisation '{config.norm}' (choose from {', '.join(NORMS)})")
    if not get_backbone(config.backbone).norm:
        raise ValueError(f"--norm applies to the ResNet backbones; {config.backbone} has its own normalisation")


def _check_roi_op(config: ModelConfig) -> None:
    if config.roi_op not in ROI_OPS:
        raise ValueError(f"--roi-op: unknown roi_op '{config.roi_op}' (choose from {', '.join(ROI_OPS)})")


def _check_sizes(config: ModelConfig) -> None:
    """Image sizes and anchors are positive; at least one shorter-side size."""
    checks = {"--min-size": config.min_size, "--max-size": (config.max_size,),
              "--anchor-sizes": config.anchor_sizes or (1,), "--aspect-ratios": config.aspect_ratios}
    for flag, values in checks.items():
        if not values or any(v <= 0 for v in values):
            raise ValueError(f"{flag} needs positive values, got {list(values)}")


def _check_matching(config: ModelConfig) -> None:
    """IoU thresholds in [0, 1] with background <= foreground (and the background floor below
    both); sampling fractions in (0, 1]; a positive smooth L1 beta."""
    for stage in ("rpn", "box"):
        fg, bg = getattr(config, f"{stage}_fg_iou_thresh"), getattr(config, f"{stage}_bg_iou_thresh")
        if not 0 <= bg <= fg <= 1:
            raise ValueError(f"--{stage}-bg-iou-thresh {bg} and --{stage}-fg-iou-thresh {fg}: need "
                             "0 <= background <= foreground <= 1")
        fraction = getattr(config, f"{stage}_positive_fraction")
        if not 0 < fraction <= 1:
            raise ValueError(f"--{stage}-positive-fraction must lie in (0, 1], got {fraction}")
    if not 0 <= config.box_bg_iou_low_thresh <= config.box_bg_iou_thresh:
        raise ValueError(f"--box-bg-iou-low-thresh {config.box_bg_iou_low_thresh} must lie in "
                         f"[0, --box-bg-iou-thresh {config.box_bg_iou_thresh}]")
    if not config.box_smooth_l1_beta > 0:
        raise ValueError(f"--box-smooth-l1-beta must be positive, got {config.box_smooth_l1_beta}")


def _check_box_nms(config: ModelConfig) -> None:
    """A known final NMS; a positive gaussian width and a minimum score within [0, 1)."""
    if config.box_nms not in BOX_NMS:
        raise ValueError(f"--box-nms: unknown method '{config.box_nms}' (choose from {', '.join(BOX_NMS)})")
    if not config.box_soft_nms_sigma > 0:
        raise ValueError(f"--box-soft-nms-sigma must be positive, got {config.box_soft_nms_sigma}")
    if not 0 <= config.box_soft_nms_min_score < 1:
        raise ValueError(f"--box-soft-nms-min-score must lie in [0, 1), got {config.box_soft_nms_min_score}")


_RULES = (_check_num_classes, _check_backbone, _check_trainable_layers, _check_norm, _check_roi_op,
          _check_sizes, _check_matching, _check_box_nms)


def settings(role: Optional[str] = None) -> list:
    """The command-line settings of ModelConfig (all, or those of one role), in declaration order."""
    return [f for f in dataclasses.fields(ModelConfig)
            if f.metadata.get("flag", True) and (role is None or f.metadata["role"] == role)]


def weights_rule_fields() -> list:
    """The settings whose training default depends on whether weights are loaded."""
    return [f for f in dataclasses.fields(ModelConfig) if f.metadata.get("weights_rule")]


def apply_weights_rule(config: ModelConfig, given: Collection[str], pretrained: bool) -> ModelConfig:
    """``config`` of a new training run with torchvision's rule for a backbone with a norm choice:
    the settings not ``given`` on the command line take their pretrained value (frozen BatchNorm, 3
    trainable stages) when ImageNet or detector weights are loaded, else their from-scratch value
    (trainable BatchNorm, all 5 stages). Warns when a frozen-BN backbone is built from random weights."""
    if not get_backbone(config.backbone).norm:
        return config
    index = 0 if pretrained else 1
    config = config.replace(**{f.name: f.metadata["weights_rule"][index] for f in weights_rule_fields()
                               if f.name not in given})
    if not pretrained and config.norm == "frozen_bn":
        warnings.warn(f"--norm frozen_bn from random weights: the {config.backbone} backbone normalises with fixed "
                      "identity statistics and deep ResNets then tend to diverge; --norm bn (the default from "
                      "scratch) or gn train their normalisation", stacklevel=2)
    return config
