"""The training run behind every train_*.py script: data, model, optimiser, resume, epochs."""
import argparse
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

from backbone import weight_url
from train_utils.data.dataset import DetectionDataSet

from train_utils.engine import distributed as dist_utils
from train_utils.checkpoint import find_last_checkpoint, load_checkpoint, save_atomic
from train_utils.evaluation.coco_api import get_coco_api_from_dataset
from train_utils.data.catalog import build_dataset
from train_utils.data.samplers import GroupedBatchSampler, create_aspect_ratio_groups
from train_utils.engine.lr_schedule import WarmupSchedule, build_scheduler
from train_utils.model.builder import BACKBONE_WEIGHT_KIND, build_model, count_parameters, load_detector_weights
from train_utils.engine.run_log import RunLog
from train_utils.engine.args import model_config_from_args
from train_utils.device import resolve_device
from train_utils.engine.loop import NonFiniteLossError, train_one_epoch
from train_utils.evaluation.loop import evaluate
from train_utils.data.transforms import get_transforms


REPO_ROOT = Path(__file__).resolve().parents[1]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_weight_files(args: argparse.Namespace) -> Optional[str]:
    """Check the weight files the flags name before any work; return the ImageNet backbone file
    to load, or None (from scratch, or the --weights detector file covers the backbone).

    Without --backbone-weights, backbones with an official file look for it at WZ's place,
    ``backbone/<model>.pth`` (e.g. backbone/resnet50.pth, backbone/mobilenet_v2.pth).
    """
    if args.weights:
        if not os.path.isfile(args.weights):
            raise FileNotFoundError(f"detector weights '{args.weights}' not found; the COCO detector is at "
                                    f"{weight_url('fasterrcnn_resnet50_fpn_coco')}")
        return None
    if (args.backbone_weights or "").lower() == "none":
        return None
    kind = BACKBONE_WEIGHT_KIND.get(args.backbone)
    if args.backbone_weights:
        path = args.backbone_weights
    elif kind is not None:
        path = str(REPO_ROOT / "backbone" / f"{kind}.pth")
    else:
        raise ValueError(f"backbone '{args.backbone}' has no default ImageNet weights file: pass "
                         "--backbone-weights PATH, or --backbone-weights none to train from scratch")
    if not os.path.isfile(path):
        hint = f"download {weight_url(kind)} and save it as {path}" if kind else "check the path"
        raise FileNotFoundError(f"backbone weights '{path}' not found: {hint}, "
                                "or pass --backbone-weights none to train from scratch")
    return path


def build_loaders(args, train_set, val_set, world_size: int, rank: int, pin_memory: bool):
    # A seeded sampler reshuffles per epoch (set_epoch), so a resumed run sees the same order.
    train_sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed)
    if args.aspect_ratio_group_factor >= 0:
        group_ids = create_aspect_ratio_groups(train_set, k=args.aspect_ratio_group_factor)
        batch_sampler = GroupedBatchSampler(train_sampler, group_ids, args.batch_size)
    else:
        batch_sampler = BatchSampler(train_sampler, args.batch_size, drop_last=True)
    workers = max(int(args.workers), 0)
    common = dict(num_workers=workers, collate_fn=DetectionDataSet.collate_fn, pin_memory=pin_memory,
                  persistent_workers=workers > 0)
    train_loader = DataLoader(train_set, batch_sampler=batch_sampler, **common)
    # Evaluation: one image per step (padding never differs between single- and multi-process runs).
    val_sampler = DistributedSampler(val_set, num_replicas=world_size, rank=rank, shuffle=False)
    val_loader = DataLoader(val_set, batch_size=1, sampler=val_sampler, **common)
    return train_sampler, train_loader, val_loader


def set_backbone_frozen(trainable: list, frozen: bool) -> None:
    """Freeze/unfreeze the backbone parameters that are normally trained."""
    for param in trainable:
        param.requires_grad_(not frozen)


def plain_args(args: argparse.Namespace) -> Dict[str, Any]:
    """argparse values as plain types (loadable with weights_only=True)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}


def run_training(args: argparse.Namespace, distributed: bool = False) -> Dict[str, Any]:
    """Train as the flags say; returns the last epoch's record. Rank 0 alone writes files."""
    device = resolve_device(args.device)
    info = dist_utils.init_distributed_mode(device.type, getattr(args, "dist_timeout", 30.0)) if distributed \
        else {"rank": 0, "world_size": 1, "local_rank": 0}
    rank, world_size = info["rank"], info["world_size"]
    if device.type == "cuda" and world_size > 1:
        device = torch.device("cuda", info["local_rank"])
    is_main = rank == 0
    seed_everything(args.seed + rank)

    resume_path = find_last_checkpoint(args.output_dir) if args.resume == "auto" else args.resume
    if args.resume == "auto" and resume_path is None and is_main:
        print(f"--resume auto: no checkpoint in {args.output_dir}, starting from scratch")
    checkpoint = load_checkpoint(resume_path) if resume_path else None
    backbone_weights = None if checkpoint is not None else resolve_weight_files(args)  # fail fast

    train_set = build_dataset(args.dataset_format, args.data_path, args.train_split,
                              get_transforms(True, args.augment), args.classes_json, args.year,
                              args.skip_unknown_classes)
    val_set = build_dataset(args.dataset_format, args.data_path, args.val_split, get_transforms(False),
                            args.classes_json, args.year, args.skip_unknown_classes,
                            expected_class_names=train_set.class_names)
    if args.num_classes is not None and args.num_classes != train_set.num_classes:
        raise ValueError(f"--num-classes {args.num_classes} but {train_set.classes_json} lists "
                         f"{train_set.num_classes} classes")
    if is_main:
        print(f"train: {len(train_set)} images ({train_set.summary()}); val: {len(val_set)} images")
    train_sampler, train_loader, val_loader = build_loaders(
        args, train_set, val_set, world_size, rank, pin_memory=device.type == "cuda")
    coco_gt = get_coco_api_from_dataset(val_set)

    if checkpoint is not None:
        config = checkpoint["model_config"]
        model = build_model(config)
    else:
        config = model_config_from_args(args, train_set.num_classes + 1)
        model = build_model(config, backbone_weights)
        if args.weights:
            load_detector_weights(model, args.weights, config)
    model.to(device)
    backbone_trainable = [p for p in model.backbone.parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    model_without_ddp = model
    if world_size > 1:
        if getattr(args, "sync_bn", False):
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=args.freeze_backbone_epochs > 0)
        model_without_ddp = model.module

    if args.opt == "sgd":
        optimizer = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    iters_per_epoch = len(train_loader)
    warmup = min(1000, iters_per_epoch - 1) if args.warmup_iters < 0 else args.warmup_iters
    schedule = WarmupSchedule(iters_per_epoch, args.epochs, args.lr_scheduler, args.lr_steps,
                              args.lr_step_size, args.lr_gamma, warmup)
    scheduler = build_scheduler(optimizer, schedule)
    scaler = torch.amp.GradScaler("cuda") if args.amp and device.type == "cuda" else None

    start_epoch, best_ap50 = 0, -1.0
    if checkpoint is not None:
        model_without_ddp.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        # The schedule itself is rebuilt from the flags; only its position is restored.
        scheduler.load_state_dict({**checkpoint["lr_scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)})
        if scaler is not None and checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        if "rng_state" in checkpoint:
            torch.set_rng_state(checkpoint["rng_state"])
        start_epoch = int(checkpoint["epoch"]) + 1
        best_ap50 = float(checkpoint.get("best_ap50", -1.0))
        if is_main:
            print(f"resumed from {resume_path} at epoch {start_epoch}")

    if is_main:
        trainable, total = count_parameters(model_without_ddp)
        print(f"model: {config['backbone']}, {config['num_classes']} classes incl. background, "
              f"{trainable:,} of {total:,} parameters trainable; device {device}, world size {world_size}")
    log = RunLog(args.output_dir, start_epoch) if is_main else None
    record: Dict[str, Any] = {}
    for epoch in range(start_epoch, args.epochs):
        train_sampler.set_epoch(epoch)
        set_backbone_frozen(backbone_trainable, epoch < args.freeze_backbone_epochs)
        start = time.time()
        train_stats = train_one_epoch(
            model, optimizer, train_loader, device, epoch, scheduler, scaler, args.amp, args.clip_grad_norm,
            args.print_freq, describe_images=lambda ids: ", ".join(train_set.ids[i] for i in ids))
        train_stats["epoch_time"] = time.time() - start
        coco_stats = None
        if (epoch + 1) % max(args.eval_interval, 1) == 0 or epoch + 1 == args.epochs:
            dist_utils.broadcast_buffers(model_without_ddp)
            evaluator = evaluate(model_without_ddp, val_loader, device, coco_gt, args.amp, args.print_freq)
            coco_stats = evaluator.stats if is_main else None  # gathered and scored on rank 0
        if is_main:
            log.add(epoch, train_stats, coco_stats)
            ap50 = coco_stats[1] if coco_stats is not None else None
            state = {
                "model": model_without_ddp.state_dict(),
                "optimizer": optimizer.state_dict(),
                "lr_scheduler": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"},
                "scaler": scaler.state_dict() if scaler is not None else None,
                "epoch": epoch,
                "args": plain_args(args),
                "model_config": config,
                "class_names": list(train_set.class_names),
                "coco_stats": coco_stats,
                "best_ap50": max(best_ap50, ap50 if ap50 is not None else -1.0),
                "rng_state": torch.get_rng_state(),
            }
            save_atomic(state, os.path.join(args.output_dir, f"model-{epoch}.pth"))
            save_atomic(state, os.path.join(args.output_dir, "last.pth"))
            if ap50 is not None and ap50 > best_ap50:
                best_ap50 = ap50
                save_atomic(state, os.path.join(args.output_dir, "best.pth"))
            record = {"epoch": epoch, **train_stats, "coco": coco_stats}
    if is_main:
        print(f"done: checkpoints, results, metrics.jsonl and curves in {args.output_dir}")
    dist_utils.cleanup()
    return record


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
