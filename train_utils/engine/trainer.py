"""The training run behind every train_*.py script, as small steps and hooks.

:class:`Trainer` builds its parts in order (``setup_device``, ``build_datasets``, ``build_model``,
``build_optimizer``, ``build_schedule``, ``resume``), then runs the epochs, calling its hooks
before and after each one. Subclass it and override a ``build_*`` step, or pass other hooks, to
change one part without touching the rest. The process group is left in a ``finally``.
"""
import argparse
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

from backbone import MissingWeightFileError, WeightFileError, get_backbone, weight_url
from train_utils.checkpoint import Checkpoint, find_last_checkpoint, read_checkpoint
from train_utils.cli import model_config_from_args
from train_utils.data.catalog import build_dataset
from train_utils.data.dataset import DetectionDataSet
from train_utils.data.classes import AUTO_CLASSES
from train_utils.data.samplers import GroupedBatchSampler, create_aspect_ratio_groups
from train_utils.data.transforms import get_transforms
from train_utils.device import amp_dtype, resolve_device
from train_utils.engine import distributed as dist_utils
from train_utils.engine.hooks import CheckpointHook, FreezeBackboneHook, Hook, RunLogHook
from train_utils.engine.loop import NonFiniteLossError, train_one_epoch
from train_utils.engine.lr_schedule import WarmupSchedule, build_scheduler
from train_utils.evaluation.coco_api import get_coco_api_from_dataset
from train_utils.evaluation.loop import evaluate
from train_utils.model.builder import build_model, count_parameters, load_detector_weights

REPO_ROOT = Path(__file__).resolve().parents[2]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_weight_files(args: argparse.Namespace) -> Optional[str]:
    """Check the weight files the flags name before any work; return the ImageNet backbone file
    to load, or None (from scratch, or the --weights detector file covers the backbone).

    Without --backbone-weights, a backbone whose registry entry names a file looks for it at WZ's
    place, ``backbone/<file>.pth`` (e.g. backbone/resnet50.pth, backbone/mobilenet_v2.pth).
    """
    if args.weights:
        if not os.path.isfile(args.weights):
            raise MissingWeightFileError(f"detector weights '{args.weights}' not found; the COCO detector is at "
                                         f"{weight_url('fasterrcnn_resnet50_fpn_coco')}")
        return None
    if (args.backbone_weights or "").lower() == "none":
        return None
    spec = get_backbone(args.backbone)
    if args.backbone_weights:
        path = args.backbone_weights
    elif spec.weights is not None:
        path = str(REPO_ROOT / "backbone" / f"{spec.weights}.pth")
    else:
        raise ValueError(f"backbone '{args.backbone}' has no default ImageNet weights file: pass "
                         "--backbone-weights PATH, or --backbone-weights none to train from scratch")
    if not os.path.isfile(path):
        hint = f"download {spec.url} and save it as {path}" if spec.url and not args.backbone_weights else "check the path"
        raise MissingWeightFileError(f"backbone weights '{path}' not found: {hint}, "
                                     "or pass --backbone-weights none to train from scratch")
    return path


def plain_args(args: argparse.Namespace) -> Dict[str, Any]:
    """argparse values as plain types (loadable with weights_only=True)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}


class Trainer:
    """Train a detector as ``args`` (the training flags) say. Rank 0 alone writes files."""

    def __init__(self, args: argparse.Namespace, distributed: bool = False,
                 extra_hooks: Optional[List[Hook]] = None) -> None:
        self.args = args
        self.distributed = distributed
        self.extra_hooks = list(extra_hooks or [])  # run after the default hooks of build_hooks
        self.hooks: List[Hook] = []
        self.start_epoch = 0
        self.best_ap50 = -1.0  # best COCO AP@0.5 so far
        self.resume_from: Optional[Checkpoint] = None
        self.backbone_weights: Optional[str] = None

    # ------------------------------------------------------------------ build steps
    def setup_device(self) -> None:
        """Device, process group (rank, world size) and seeds."""
        self.device = resolve_device(self.args.device)
        info = (dist_utils.init_distributed_mode(self.device.type, getattr(self.args, "dist_timeout", 30.0))
                if self.distributed else {"rank": 0, "world_size": 1, "local_rank": 0})
        self.rank, self.world_size = info["rank"], info["world_size"]
        if self.device.type == "cuda" and self.world_size > 1:
            self.device = torch.device("cuda", dist_utils.cuda_index(info["local_rank"]))
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)  # --device cuda:N: allocations and kernels default to GPU N
        self.is_main = self.rank == 0
        seed_everything(self.args.seed + self.rank)

    def find_resume_checkpoint(self) -> Optional[str]:
        """The file ``--resume`` names (``auto``: the last one in --output-dir), or None."""
        args = self.args
        if args.resume != "auto":
            return args.resume or None
        path = find_last_checkpoint(args.output_dir)
        if path is None and self.is_main:
            print(f"--resume auto: no checkpoint in {args.output_dir}, starting from scratch")
        return path

    def build_datasets(self) -> None:
        """The training and validation splits; with ``--classes-json auto`` the validation split
        takes the training split's classes. A resumed run must find the checkpoint's classes."""
        args = self.args
        common = dict(year=args.year, skip_unknown_classes=args.skip_unknown_classes)
        self.train_set = build_dataset(args.dataset_format, args.data_path, args.train_split,
                                       get_transforms(True, args.augment), args.classes_json, **common)
        if self.resume_from is not None and self.resume_from.class_names != self.train_set.class_names:
            raise ValueError(f"{self.resume_path} was trained on the classes {self.resume_from.class_names} but the "
                             f"data now gives {self.train_set.class_names}; resume with the same classes")
        val_classes = self.train_set.class_names if args.classes_json == AUTO_CLASSES else args.classes_json
        self.val_set = build_dataset(args.dataset_format, args.data_path, args.val_split, get_transforms(False),
                                     val_classes, expected_class_names=self.train_set.class_names, **common)
        if args.num_classes is not None and args.num_classes != self.train_set.num_classes:
            raise ValueError(f"--num-classes {args.num_classes} but {self.train_set.classes_json} lists "
                             f"{self.train_set.num_classes} classes")
        if self.is_main:
            print(f"train: {len(self.train_set)} images ({self.train_set.summary()}); "
                  f"val: {len(self.val_set)} images")

    def build_loaders(self) -> None:
        """A seeded sampler reshuffles per epoch (set_epoch), so a resumed run sees the same order.
        Evaluation takes one image per step (padding never differs between process counts)."""
        args, train_set = self.args, self.train_set
        self.train_sampler = DistributedSampler(train_set, self.world_size, self.rank, shuffle=True, seed=args.seed)
        if args.aspect_ratio_group_factor >= 0:
            group_ids = create_aspect_ratio_groups(train_set, k=args.aspect_ratio_group_factor)
            batch_sampler = GroupedBatchSampler(self.train_sampler, group_ids, args.batch_size)
        else:
            batch_sampler = BatchSampler(self.train_sampler, args.batch_size, drop_last=True)
        workers = max(int(args.workers), 0)
        common = dict(num_workers=workers, collate_fn=DetectionDataSet.collate_fn,
                      pin_memory=self.device.type == "cuda", persistent_workers=workers > 0)
        self.train_loader = DataLoader(train_set, batch_sampler=batch_sampler, **common)
        val_sampler = DistributedSampler(self.val_set, self.world_size, self.rank, shuffle=False)
        self.val_loader = DataLoader(self.val_set, batch_size=1, sampler=val_sampler, **common)
        self.coco_gt = get_coco_api_from_dataset(self.val_set)

    def build_model(self) -> None:
        """The detector of the resumed checkpoint, or of the flags (ImageNet backbone or --weights)."""
        args = self.args
        if self.resume_from is not None:
            self.config = self.resume_from.config
            self.model = build_model(self.config)
        else:
            self.config = model_config_from_args(args, self.train_set.num_classes + 1)
            self.model = build_model(self.config, self.backbone_weights)
            if args.weights:
                self.config = load_detector_weights(self.model, args.weights, self.config)
        self.model.to(self.device)
        self.backbone_trainable = [p for p in self.model.backbone.parameters() if p.requires_grad]
        self.model_without_ddp = self.model
        if self.world_size > 1:
            if getattr(args, "sync_bn", False):
                self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=args.freeze_backbone_epochs > 0)
            self.model_without_ddp = self.model.module

    def build_optimizer(self) -> None:
        args = self.args
        params = [p for p in self.model.parameters() if p.requires_grad]
        if args.opt == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
        # Mixed precision: a GradScaler only for float16 on CUDA (bfloat16 has float32's range).
        self.amp_dtype = amp_dtype(self.device, args.amp_dtype) if args.amp else None
        fp16_cuda = self.amp_dtype == torch.float16 and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if fp16_cuda else None

    def build_schedule(self) -> None:
        """Warmup, then the chosen decay; the scheduler steps once per iteration."""
        args = self.args
        iters = len(self.train_loader)
        warmup = min(1000, iters - 1) if args.warmup_iters < 0 else args.warmup_iters
        schedule = WarmupSchedule(iters, args.epochs, args.lr_scheduler, args.lr_steps, args.lr_step_size,
                                  args.lr_gamma, warmup)
        self.scheduler = build_scheduler(self.optimizer, schedule)

    def build_hooks(self) -> List[Hook]:
        """Backbone freezing on every rank; the run log and checkpoints on rank 0."""
        hooks: List[Hook] = [FreezeBackboneHook()]
        if self.is_main:
            hooks += [RunLogHook(), CheckpointHook()]
        return hooks

    def resume(self) -> None:
        """Restore weights, optimiser, schedule position, scaler and RNG from ``resume_from``."""
        ckpt = self.resume_from
        if ckpt is None:
            return
        self.model_without_ddp.load_state_dict(ckpt.model)
        self.optimizer.load_state_dict(ckpt.optimizer)
        # The schedule itself is rebuilt from the flags; only its position is restored.
        self.scheduler.load_state_dict({**ckpt.lr_scheduler, "lr_lambdas": [None] * len(self.optimizer.param_groups)})
        if self.scaler is not None and ckpt.scaler:
            self.scaler.load_state_dict(ckpt.scaler)
        if ckpt.rng_state is not None:
            torch.set_rng_state(ckpt.rng_state)
        self.start_epoch = ckpt.epoch + 1
        self.best_ap50 = ckpt.best_ap50
        if self.is_main:
            print(f"resumed from {self.resume_path} at epoch {self.start_epoch}")

    def setup(self) -> None:
        """Every build step in order; the resume file and the weight files are checked first."""
        self.setup_device()
        self.resume_path = self.find_resume_checkpoint()
        self.resume_from = self.load_resume_checkpoint(self.resume_path) if self.resume_path else None
        # Fail on a missing weight file before reading any data.
        self.backbone_weights = None if self.resume_from else resolve_weight_files(self.args)
        self.build_datasets()
        self.build_loaders()
        self.build_model()
        self.build_optimizer()
        self.build_schedule()
        self.resume()
        self.hooks = self.build_hooks() + self.extra_hooks

    @staticmethod
    def load_resume_checkpoint(path: str) -> Checkpoint:
        ckpt = read_checkpoint(path)
        if not ckpt.can_resume():
            raise WeightFileError(f"{path} is not a training checkpoint of this project (no model config, "
                                  "optimizer or epoch): use --weights to fine-tune from it instead")
        return ckpt

    # ------------------------------------------------------------------ the run
    def checkpoint(self, epoch: int, coco_stats: Optional[List[float]]) -> Checkpoint:
        """The state after ``epoch`` in the checkpoint schema."""
        return Checkpoint(
            model=self.model_without_ddp.state_dict(), config=self.config,
            class_names=list(self.train_set.class_names), epoch=epoch,
            optimizer=self.optimizer.state_dict(),
            lr_scheduler={k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"},
            scaler=self.scaler.state_dict() if self.scaler is not None else None,
            rng_state=torch.get_rng_state(), args=plain_args(self.args), data=self.data_description(),
            coco_stats=coco_stats,
            best_ap50=self.best_ap50, plugins=list(getattr(self.args, "plugin", []) or []))

    def data_description(self) -> Dict[str, Any]:
        """The checkpoint's ``data`` section: where and how the training data was read."""
        args = self.args
        classes = self.classes_path() if args.classes_json == AUTO_CLASSES else args.classes_json
        return {"format": args.dataset_format, "path": args.data_path, "year": args.year,
                "train_split": args.train_split, "val_split": args.val_split, "classes_json": classes}

    def classes_path(self) -> str:
        """``<output-dir>/classes.json``: the run's class names as a classes json."""
        return os.path.join(self.args.output_dir, "classes.json")

    def run_epoch(self, epoch: int) -> Dict[str, Any]:
        """One epoch of training, then evaluation when it is due; returns the epoch's record."""
        args = self.args
        self.train_sampler.set_epoch(epoch)
        start = time.time()
        stats = train_one_epoch(
            self.model, self.optimizer, self.train_loader, self.device, epoch, self.scheduler, self.scaler,
            self.amp_dtype, args.clip_grad_norm, args.print_freq,
            describe_images=lambda ids: ", ".join(self.train_set.ids[i] for i in ids))
        stats["epoch_time"] = time.time() - start
        coco_stats = None
        if (epoch + 1) % max(args.eval_interval, 1) == 0 or epoch + 1 == args.epochs:
            dist_utils.broadcast_buffers(self.model_without_ddp)
            evaluator = evaluate(self.model_without_ddp, self.val_loader, self.device, self.coco_gt, args.print_freq)
            coco_stats = list(evaluator.stats) if self.is_main else None  # scored on rank 0
        return {"epoch": epoch, **stats, "coco": coco_stats}

    def train(self) -> Dict[str, Any]:
        """Train as the flags say; returns the last epoch's record."""
        try:
            self.setup()
            self.report_model()
            for hook in self.hooks:
                hook.before_train(self)
            record: Dict[str, Any] = {}
            for epoch in range(self.start_epoch, self.args.epochs):
                for hook in self.hooks:
                    hook.before_epoch(self, epoch)
                record = self.run_epoch(epoch)
                for hook in self.hooks:
                    hook.after_epoch(self, record)
            if self.is_main:
                print(f"done: checkpoints, results, metrics.jsonl and curves in {self.args.output_dir}")
            return record
        finally:
            dist_utils.cleanup()

    def report_model(self) -> None:
        if self.is_main:
            trainable, total = count_parameters(self.model_without_ddp)
            print(f"model: {self.config.backbone}, {self.config.num_classes} classes incl. background, "
                  f"{trainable:,} of {total:,} parameters trainable; device {self.device}, "
                  f"world size {self.world_size}")


def run_training(args: argparse.Namespace, distributed: bool = False) -> Dict[str, Any]:
    """Train as the flags say; returns the last epoch's record."""
    return Trainer(args, distributed).train()


def main(args: argparse.Namespace, distributed: bool = False) -> None:
    """Script entry: known problems become one clear line and exit code 1, not a traceback."""
    try:
        run_training(args, distributed)
    except (FileNotFoundError, ValueError, NonFiniteLossError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted: the last completed epoch's checkpoint is last.pth (use --resume auto)", file=sys.stderr)
        sys.exit(130)
