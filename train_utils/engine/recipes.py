"""Training recipes: ``--recipe NAME`` sets every flag of a published setup in one go.

A recipe is a set of flag values (argparse destinations). The flags typed on the command line
still win: the command line is parsed once more on top of the recipe's values, so argparse itself
decides what was typed. The recipe's name and the flags that overrode it are kept in ``args``
(``recipe``, ``recipe_overridden``), which the checkpoint stores with every other flag; the model
settings also land in its ``model_config``.
"""
import argparse
import copy
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence


@dataclass(frozen=True)
class Recipe:
    """``values``: flag destination -> value, typed as the parser gives it (lists for list flags)."""

    help: str
    values: Dict[str, Any]


# Faster R-CNN with VGG16 on PASCAL VOC 2007 trainval, as py-faster-rcnn's approximate joint
# ("end2end") training: experiments/scripts/faster_rcnn_end2end.sh (70k iterations),
# models/pascal_voc/VGG16/faster_rcnn_end2end/{train,solver}.prototxt, lib/fast_rcnn/config.py
# (experiments/cfgs/faster_rcnn_end2end.yml changes none of the values below), and Ren et al.,
# NIPS 2015, section 3. The sources of every value: the table in docs/paper-recipe.md.
PAPER_VGG16 = Recipe(
    help="Faster R-CNN VGG16 on VOC07 trainval as in the paper / py-faster-rcnn end2end (epochs for 5011 images)",
    values={
        # network: conv5_3 (stride 16), RoI max pooling 7x7, VGG's fc6/fc7, conv1-conv2 frozen
        "backbone": "vgg16", "box_head": "vgg", "roi_op": "pool", "trainable_layers": 3,
        # images: shorter side 600, longer side at most 1000; horizontal flips
        "min_size": [600], "max_size": 1000, "augment": "hflip",
        # anchors: 3 scales x 3 ratios on the one map
        "anchor_sizes": [128, 256, 512], "aspect_ratios": [0.5, 1.0, 2.0],
        # RPN training: 256 anchors per image, up to half positive; IoU >= 0.7 / < 0.3
        "rpn_batch_size_per_image": 256, "rpn_positive_fraction": 0.5,
        "rpn_fg_iou_thresh": 0.7, "rpn_bg_iou_thresh": 0.3, "rpn_ignore_cross_boundary": True,
        # proposals: NMS 0.7; 12000 -> 2000 in training, 6000 -> 300 at test
        "rpn_nms_thresh": 0.7, "rpn_pre_nms_top_n_train": 12000, "rpn_post_nms_top_n_train": 2000,
        "rpn_pre_nms_top_n_test": 6000, "rpn_post_nms_top_n_test": 300,
        # Fast R-CNN training: 128 RoIs, 25% foreground (IoU >= 0.5), background IoU in [0.1, 0.5)
        "box_batch_size_per_image": 128, "box_positive_fraction": 0.25, "box_fg_iou_thresh": 0.5,
        "box_bg_iou_thresh": 0.5, "box_bg_iou_low_thresh": 0.1, "box_smooth_l1_beta": 1.0,
        # test: per-class NMS 0.3, score > 0.05, 100 detections per image
        "box_nms_thresh": 0.3, "box_score_thresh": 0.05, "box_detections_per_img": 100,
        # SGD: 2 images per update (1 image x iter_size 2), lr 1e-3 then 1e-4 after 50k of 70k
        # updates = 20 and 28 epochs of 5011 images (2505.5 updates each); no warmup
        "opt": "sgd", "lr": 0.001, "momentum": 0.9, "weight_decay": 0.0005, "batch_size": 2,
        "epochs": 28, "lr_scheduler": "multistep", "lr_steps": [20], "lr_gamma": 0.1, "warmup_iters": 0,
    },
)

# The levers that helped on average in the study of docs/levers.md (two generated sets, 3 seeds
# each, MobileNetV2 from scratch, 8 epochs): soft-NMS; test-time augmentation helped most but is an
# evaluation flag (validation.py/predict.py --tta). Every heavier augmentation policy and weight EMA
# lowered AP there, so the recipe keeps hflip and no EMA.
SMALL_DATA = Recipe(
    help="for a few hundred to a few thousand images: what helped in docs/levers.md's measured study "
         "(hflip only, soft-NMS); evaluate and predict with --tta as well",
    values={
        "augment": "hflip",
        "box_nms": "soft-gaussian",  # a model setting: validation.py and predict.py use it too
    },
)

RECIPES: Dict[str, Recipe] = {"paper-vgg16": PAPER_VGG16, "small-data": SMALL_DATA}


def add_recipe_flag(parser: argparse.ArgumentParser) -> None:
    lines = "; ".join(f"{name}: {recipe.help}" for name, recipe in RECIPES.items())
    parser.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                        help=f"set every flag of a published setup ({lines}); flags given on the command line "
                             "override it")


def parse_with_recipe(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """``parser.parse_args(argv)``; with ``--recipe``, the command line parsed again over the
    recipe's values (argparse keeps a value already in the namespace unless the flag is typed)."""
    args = parser.parse_args(argv)
    if args.recipe is None:
        return args
    values = RECIPES[args.recipe].values
    unknown = sorted(set(values) - set(vars(args)))
    if unknown:
        parser.error(f"--recipe {args.recipe}: this script has no flags for {unknown}")
    args = parser.parse_args(argv, namespace=argparse.Namespace(**copy.deepcopy(values)))
    args.recipe_overridden = overridden_flags(args)
    return args


def overridden_flags(args: argparse.Namespace) -> List[str]:
    """The recipe's flags whose value on ``args`` differs from the recipe's (typed by the user)."""
    values = RECIPES[args.recipe].values
    return ["--" + key.replace("_", "-") for key, value in values.items() if getattr(args, key) != value]


def describe_recipe(args: argparse.Namespace) -> str:
    """One line: the recipe, how many flags it set and which ones the command line overrode."""
    values = RECIPES[args.recipe].values
    overridden = getattr(args, "recipe_overridden", [])
    tail = f"; overridden on the command line: {', '.join(overridden)}" if overridden else ""
    return f"recipe {args.recipe}: {len(values) - len(overridden)} of its {len(values)} flag values in use{tail}"
