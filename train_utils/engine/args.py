"""Command-line flags shared by every training script (names follow torchvision's references and WZ)."""
import argparse
import os
from typing import Any, Dict, Optional, Sequence

from train_utils.data.catalog import FORMATS, LAYOUT_HELP
from train_utils.model.builder import BACKBONES, DETECTOR_KEYS, ROI_OPS, TORCHVISION_PREFIX, check_backbone_name


def int_list(text: str) -> list:
    """'32,64,128' or '32 64 128' -> [32, 64, 128]."""
    return [int(v) for v in text.replace(",", " ").split()]


def _float_list(text: str) -> list:
    return [float(v) for v in text.replace(",", " ").split()]


def _str_list(text: str) -> list:
    return text.replace(",", " ").split()


def backbone_name(text: str) -> str:
    """argparse type: a known backbone name (see model_builder.check_backbone_name)."""
    try:
        return check_backbone_name(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def build_parser(description: str, defaults: Dict[str, Any], distributed: bool = False) -> argparse.ArgumentParser:
    """The shared parser; ``defaults`` holds each script's own defaults (backbone, lr, sizes...)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    data = p.add_argument_group("data")
    data.add_argument("--data-path", default="./", help="folder holding VOCdevkit (or VOCdevkit, or VOC20xx itself)")
    data.add_argument("--dataset-format", default="voc", choices=FORMATS,
                      help=f"annotation format of --data-path. {LAYOUT_HELP}")
    data.add_argument("--year", default=None, help="VOC year folder (found automatically when only one exists)")
    data.add_argument("--train-split", default="train.txt", help="id list in ImageSets/Main used for training")
    data.add_argument("--val-split", default="val.txt", help="id list in ImageSets/Main used for evaluation")
    data.add_argument("--classes-json", default=None,
                      help="{class name: id 1..K} file; default: pascal_voc_classes.json for voc, "
                           "the class names of the data for the other formats")
    data.add_argument("--num-classes", type=int, default=None,
                      help="optional check: number of object classes (background excluded) the json must hold")
    data.add_argument("--skip-unknown-classes", action="store_true",
                      help="skip objects whose class is not in the classes json instead of stopping")
    data.add_argument("--augment", default="hflip", choices=["none", "hflip", "photometric", "full"],
                      help="training augmentation policy")
    data.add_argument("--workers", "-j", type=int, default=min(4, os.cpu_count() or 1),
                      help="data loading worker processes (default: 4, at most the CPU count)")
    data.add_argument("--aspect-ratio-group-factor", type=int, default=3,
                      help="batch images of similar aspect ratio (-1 disables)")

    model = p.add_argument_group("model")
    model.add_argument("--backbone", default="resnet50_fpn", type=backbone_name,
                       help=f"{', '.join(sorted(BACKBONES))}, or {TORCHVISION_PREFIX}<name> for any torchvision "
                            "classifier (e.g. tv:resnet34, tv:mobilenet_v3_large, tv:efficientnet_b0)")
    model.add_argument("--return-nodes", type=_str_list, default=None,
                       help="tv: backbones: graph nodes feeding the detector, finest first, "
                            "e.g. 'features.6,features.12,features.16' (defaults per network in the README)")
    model.add_argument("--fpn", action=argparse.BooleanOptionalAction, default=None,
                       help="tv: backbones: FPN over the return nodes (default), or --no-fpn for the last node alone")
    model.add_argument("--roi-op", default="align", choices=list(ROI_OPS),
                       help="RoI feature pooling: RoIAlign or the original RoIPool")
    model.add_argument("--backbone-weights", default=None,
                       help="ImageNet weights of the backbone; 'none' trains from scratch")
    model.add_argument("--weights", default=None, help="detector checkpoint to fine-tune (e.g. the COCO one)")
    model.add_argument("--trainable-layers", type=int, default=3, help="ResNet stages to train (0-5)")
    model.add_argument("--freeze-backbone-epochs", type=int, default=0,
                       help="train only the RPN and heads for this many first epochs (WZ's MobileNetV2 recipe)")
    model.add_argument("--width-mult", type=float, default=1.0, help="MobileNetV2 width multiplier (alpha)")
    model.add_argument("--feature-stride", type=int, default=32, choices=[16, 32],
                       help="MobileNetV2: 16 stops the trunk after the stride-16 stages (lighter, finer map)")
    model.add_argument("--representation-size", type=int, default=1024, help="width of the two-layer box head")
    model.add_argument("--min-size", type=int, nargs="+", default=[800],
                       help="shorter image side; several values = multi-scale training")
    model.add_argument("--max-size", type=int, default=1333, help="upper bound on the longer image side")
    model.add_argument("--anchor-sizes", type=int_list, default=None,
                       help="anchor sizes, one per FPN level or all on the single level, e.g. '32,64,128,256,512'")
    model.add_argument("--aspect-ratios", type=_float_list, default=None, help="anchor ratios h/w, e.g. '0.5,1,2'")
    model.add_argument("--rpn-pre-nms-top-n-train", type=int, default=None)
    model.add_argument("--rpn-pre-nms-top-n-test", type=int, default=None)
    model.add_argument("--rpn-post-nms-top-n-train", type=int, default=None)
    model.add_argument("--rpn-post-nms-top-n-test", type=int, default=None)
    model.add_argument("--box-batch-size-per-image", type=int, default=None, help="RoIs sampled per image")
    model.add_argument("--box-detections-per-img", type=int, default=None)
    model.add_argument("--box-score-thresh", type=float, default=None)

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--device", default="auto", help="'auto' (cuda when available), 'cuda', 'cuda:1' or 'cpu'")
    opt.add_argument("--epochs", type=int, default=20)
    opt.add_argument("-b", "--batch-size", "--batch_size", dest="batch_size", type=int,
                     default=4,
                     help="images per process" + (" (global batch = this x world size)" if distributed else ""))
    opt.add_argument("--opt", default="sgd", choices=["sgd", "adamw"])
    opt.add_argument("--lr", type=float, default=0.01,
                     help=("learning rate for the GLOBAL batch (batch size x world size); linear scaling rule: "
                           "0.02 for 16 images, so multiply by global_batch / 16" if distributed else "learning rate"))
    opt.add_argument("--momentum", type=float, default=0.9)
    opt.add_argument("--wd", "--weight-decay", dest="weight_decay", type=float, default=1e-4)
    opt.add_argument("--lr-scheduler", default="multistep", choices=["step", "multistep", "cosine"])
    opt.add_argument("--lr-steps", type=int, nargs="+", default=[16, 22],
                     help="epochs at which multistep multiplies the lr by --lr-gamma")
    opt.add_argument("--lr-step-size", type=int, default=8, help="epochs between decays for the step scheduler")
    opt.add_argument("--lr-gamma", type=float, default=0.1)
    opt.add_argument("--warmup-iters", type=int, default=-1,
                     help="linear warmup iterations; -1 = the first epoch (at most 1000 iterations), 0 = none")
    opt.add_argument("--clip-grad-norm", type=float, default=0.0, help="clip the gradient norm (0 = off)")
    opt.add_argument("--amp", action="store_true", help="mixed precision: fp16 + GradScaler on CUDA, bf16 on CPU")
    opt.add_argument("--seed", type=int, default=0)

    run = p.add_argument_group("run")
    run.add_argument("--output-dir", default="./save_weights")
    run.add_argument("--resume", default="", help="checkpoint to continue from, or 'auto' = last one in --output-dir")
    run.add_argument("--print-freq", type=int, default=50, help="log line every N iterations when not on a terminal")
    run.add_argument("--eval-interval", type=int, default=1, help="evaluate every N epochs (and after the last)")
    if distributed:
        run.add_argument("--sync-bn", action="store_true", help="convert BatchNorm layers to SyncBatchNorm")
        run.add_argument("--dist-timeout", type=float, default=30.0,
                         help="minutes a collective may wait before a dead or hung rank fails the run")
    p.set_defaults(**defaults)
    return p


def model_config_from_args(args: argparse.Namespace, num_classes: int) -> Dict[str, Any]:
    """The plain-typed model description stored in checkpoints."""
    config: Dict[str, Any] = {
        "backbone": args.backbone,
        "num_classes": num_classes,
        "min_size": list(args.min_size) if len(args.min_size) > 1 else args.min_size[0],
        "max_size": args.max_size,
        "trainable_layers": args.trainable_layers,
        "width_mult": args.width_mult,
        "feature_stride": args.feature_stride,
        "representation_size": args.representation_size,
        "anchor_sizes": args.anchor_sizes,
        "aspect_ratios": args.aspect_ratios,
        "roi_op": args.roi_op,
        "return_nodes": args.return_nodes,
        "fpn": args.fpn,
    }
    config.update({key: getattr(args, key) for key in DETECTOR_KEYS})
    return config


def parse(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if args.trainable_layers not in range(6):
        parser.error(f"--trainable-layers must be 0..5, got {args.trainable_layers}")
    if not args.backbone.startswith(TORCHVISION_PREFIX) and (args.return_nodes or args.fpn is not None):
        parser.error(f"--return-nodes and --fpn/--no-fpn apply to {TORCHVISION_PREFIX}<name> backbones, "
                     f"not {args.backbone}")
    return args
