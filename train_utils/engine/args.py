"""Command-line flags shared by every training script (names follow torchvision's references and WZ)."""
import argparse
import os
from typing import Any, Dict, Optional, Sequence

from train_utils.cli import AUTO_ANCHORS, add_compile_flags, add_model_flags, compile_mode, model_config_from_args
from train_utils.data.catalog import format_names, layout_help
from train_utils.data.classes import AUTO_CLASSES
from train_utils.data.transforms import AUGMENT_ELEMENTS, AUGMENT_PRESETS, augment_policy
from train_utils.device import AMP_DTYPES, TF32_CHOICES, add_tf32_flag
from train_utils.engine.control import DEFAULT_CHECKPOINT_EVERY, CheckpointEvery
from train_utils.engine.ema import DEFAULT_DECAY, DEFAULT_TAU
from train_utils.engine.hooks import summary_writer_class
from train_utils.engine.recipes import add_recipe_flag, parse_with_recipe
from train_utils.flags import HelpFormatter, ListAction, add_plugin_flag, import_plugins


def build_parser(description: str, defaults: Dict[str, Any], distributed: bool = False) -> argparse.ArgumentParser:
    """The shared parser; ``defaults`` holds each script's own defaults (backbone, lr, sizes...)."""
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    add_plugin_flag(p)
    add_recipe_flag(p)
    _add_data_flags(p)
    add_model_flags(p, training=True, auto_anchors=True)
    _add_weight_flags(p)
    _add_optimisation_flags(p, distributed)
    _add_run_flags(p, distributed)
    p.set_defaults(**defaults)
    return p


def _add_data_flags(p: argparse.ArgumentParser) -> None:
    data = p.add_argument_group("data")
    data.add_argument("--data-path", default="./", help="folder holding VOCdevkit (or VOCdevkit, or VOC20xx itself)")
    data.add_argument("--dataset-format", default="voc", choices=format_names(),
                      help=f"annotation format of --data-path. {layout_help()}")
    data.add_argument("--year", default=None, help="VOC year folder (found automatically when only one exists)")
    data.add_argument("--train-split", default="train.txt", help="id list in ImageSets/Main used for training")
    data.add_argument("--val-split", default="val.txt", help="id list in ImageSets/Main used for evaluation")
    data.add_argument("--classes-json", default=None,
                      help=f"{{class name: id 1..K}} file, or '{AUTO_CLASSES}' for the class names of the training "
                           "split in sorted order (written to OUTPUT_DIR/classes.json); default: "
                           "pascal_voc_classes.json for voc, the class names of the data for the other formats")
    data.add_argument("--num-classes", type=int, default=None,
                      help="optional check: number of object classes (background excluded) the json must hold")
    data.add_argument("--skip-unknown-classes", action="store_true",
                      help="skip objects whose class is not in the classes json instead of stopping")
    data.add_argument("--augment", default="hflip", type=augment_policy, metavar="POLICY",
                      help="training augmentation: a comma list of elements (" + ", ".join(AUGMENT_ELEMENTS) +
                           ") and presets (" + ", ".join(f"{k} = {'+'.join(v) or 'nothing'}" for k, v in
                                                         AUGMENT_PRESETS.items()) +
                           "), applied in that element order whatever the order typed; lsj and mosaic work at "
                           "the training size (the largest --min-size, at most --max-size); see docs/training.md")
    data.add_argument("--workers", "-j", type=int, default=min(4, os.cpu_count() or 1),
                      help="data loading worker processes (default: 4, at most the CPU count)")
    data.add_argument("--aspect-ratio-group-factor", type=int, default=3,
                      help="batch images of similar aspect ratio (-1 disables)")


def _add_weight_flags(p: argparse.ArgumentParser) -> None:
    weights = p.add_argument_group("weights")
    weights.add_argument("--backbone-weights", default=None,
                         help="ImageNet weights of the backbone (default: backbone/<file>.pth of its registry "
                              "entry); 'none' trains from scratch (ResNets: trainable BatchNorm, all stages; see --norm)")
    weights.add_argument("--weights", default=None, help="detector checkpoint to fine-tune (e.g. the COCO one)")
    weights.add_argument("--freeze-backbone-epochs", type=int, default=0,
                         help="train only the RPN and heads for this many first epochs (WZ's MobileNetV2 recipe)")


def _add_optimisation_flags(p: argparse.ArgumentParser, distributed: bool) -> None:
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
    opt.add_argument("--lr-steps", action=ListAction, item_type=int, default=[16, 22], metavar="EPOCH",
                     help="epochs at which multistep multiplies the lr by --lr-gamma")
    opt.add_argument("--lr-step-size", type=int, default=8, help="epochs between decays for the step scheduler")
    opt.add_argument("--lr-gamma", type=float, default=0.1)
    opt.add_argument("--warmup-iters", type=int, default=-1,
                     help="linear warmup iterations; -1 = the first epoch (at most 1000 iterations), 0 = none")
    opt.add_argument("--clip-grad-norm", type=float, default=0.0, help="clip the gradient norm (0 = off)")
    opt.add_argument("--amp", action="store_true", help="mixed precision: bf16 on the CPU and on CUDA GPUs from Ampere on, "
                     "fp16 + GradScaler on older GPUs")
    opt.add_argument("--amp-dtype", choices=sorted(AMP_DTYPES), default=None,
                     help="the --amp dtype instead of those defaults (float16 on CUDA comes with a GradScaler)")
    opt.add_argument("--ema", type=float, nargs="?", const=DEFAULT_DECAY, default=None, metavar="DECAY",
                     help=f"keep an exponential moving average of the weights, updated after every step "
                          f"(DECAY {DEFAULT_DECAY} when given bare): it is what each epoch evaluates, best.pth is "
                          "chosen on, and validation.py/predict.py load by default (see docs/training.md)")
    opt.add_argument("--ema-warmup", type=float, default=DEFAULT_TAU, metavar="TAU",
                     help="--ema's decay warm-up: DECAY x (1 - exp(-updates / TAU)), as ultralytics; 0 = none")
    opt.add_argument("--seed", type=int, default=0)
    opt.add_argument("--tf32", choices=list(TF32_CHOICES), default="torch",
                     help="TF32 convolutions and matmuls in the training steps on Ampere or later GPUs: torch "
                          "(PyTorch's setting: convolutions in TF32, matmuls in float32), on, or off (see docs/gpus.md)")
    add_tf32_flag(opt, "--eval-tf32")
    add_compile_flags(opt)
    opt.add_argument("--deterministic", action="store_true",
                     help="deterministic kernels (torch.use_deterministic_algorithms, CUBLAS_WORKSPACE_CONFIG=:4096:8, "
                          "cuDNN deterministic, no cuDNN benchmark): a GPU run repeats bit for bit, somewhat slower. "
                          "Every op of the detectors has a deterministic CUDA version except RoIPool (--roi-op pool), "
                          "which is refused; the list is in train_utils/engine/determinism.py")


def _add_run_flags(p: argparse.ArgumentParser, distributed: bool) -> None:
    run = p.add_argument_group("run")
    run.add_argument("--output-dir", default="./save_weights")
    run.add_argument("--resume", default="", help="checkpoint to continue from, or 'auto' = last one in --output-dir")
    run.add_argument("--print-freq", type=int, default=50, help="log line every N iterations when not on a terminal")
    run.add_argument("--eval-interval", type=int, default=1, help="evaluate every N epochs (and after the last)")
    run.add_argument("--checkpoint-every", default=DEFAULT_CHECKPOINT_EVERY,
                     help="also write last.pth inside an epoch: every N iterations (500) or every so long "
                          "(90s, 15m, 1h); 0 = at epoch ends only. A stop signal (SIGTERM, SIGINT, SIGUSR1) "
                          "always writes it before the run exits")
    run.add_argument("--tensorboard", nargs="?", const="", default=None, metavar="DIR",
                     help="also write TensorBoard events (rank 0) to DIR, or OUTPUT_DIR/tensorboard when given "
                          "without one: loss terms and lr every --print-freq steps, each epoch's means, and at "
                          "each evaluation the COCO numbers and 4 validation images with their predictions "
                          "(needs the tensorboard package)")
    run.add_argument("--keep-checkpoints", type=int, default=0, metavar="K",
                     help="keep only the newest K model-<epoch>.pth files (0 = all); last.pth and best.pth stay")
    if distributed:
        run.add_argument("--sync-bn", action="store_true", help="convert BatchNorm layers to SyncBatchNorm")
        run.add_argument("--dist-timeout", type=float, default=30.0,
                         help="minutes a collective may wait before a dead or hung rank fails the run")


def parse(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse (over the ``--recipe`` values, when one is named) and check the model flags at once,
    before any data is read (the class count, known only from the data, is a placeholder here)."""
    args = parse_with_recipe(parser, argv)
    if args.amp_dtype is not None and not args.amp:
        parser.error("--amp-dtype needs --amp")
    if args.ema is not None and not 0.0 < args.ema < 1.0:
        parser.error(f"--ema: the decay must lie between 0 and 1 (exclusive), got {args.ema:g}")
    if args.ema_warmup < 0:
        parser.error(f"--ema-warmup: TAU must be 0 (no warm-up) or positive, got {args.ema_warmup:g}")
    try:
        compile_mode(args)
    except ValueError as err:
        parser.error(str(err))
    if AUTO_ANCHORS in (args.anchor_sizes or []) and len(args.anchor_sizes) > 1:
        parser.error(f"--anchor-sizes: '{AUTO_ANCHORS}' stands alone, got {' '.join(map(str, args.anchor_sizes))}")
    try:
        CheckpointEvery.parse(args.checkpoint_every)
    except ValueError as err:
        parser.error(str(err))
    try:
        model_config_from_args(args, num_classes=2)
    except ValueError as err:
        parser.error(str(err))
    if args.tensorboard is not None:
        try:
            summary_writer_class()
        except ValueError as err:
            parser.exit(2, f"error: {err}\n")  # one line, before any data is read
    return args


def parse_training_args(description: str, defaults: Dict[str, Any], distributed: bool = False,
                        argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """A training script's flags: ``--plugin`` modules are imported first, so the backbones and
    formats they register are known to the parser."""
    import_plugins(argv)
    return parse(build_parser(description, defaults, distributed), argv)
