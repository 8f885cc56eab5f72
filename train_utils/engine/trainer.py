"""The training run behind every train_*.py script, as small steps and hooks.

:class:`Trainer` builds its parts in order (``setup_device``, ``build_datasets``, ``build_model``,
``build_optimizer``, ``build_schedule``, ``resume``), then runs the epochs, calling its hooks
before and after each one. Subclass it and override a ``build_*`` step, or pass other hooks, to
change one part without touching the rest. The process group is left in a ``finally``.
"""
import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

from backbone import MissingWeightFileError, get_backbone, weight_url
from train_utils.checkpoint import Checkpoint, CheckpointWriteError, load_detector_weights
from train_utils.cli import anchor_sizes_auto, compile_mode, model_config_from_args, training_model_config
from train_utils.data.catalog import build_dataset
from train_utils.data.dataset import DetectionDataSet
from train_utils.data.classes import AUTO_CLASSES
from train_utils.data.samplers import (GroupedBatchSampler, ResumableBatches, SeededSamples,
                                       create_aspect_ratio_groups)
from train_utils.data.mosaic import policy_dataset
from train_utils.data.transforms import get_transforms, training_size
from train_utils.device import TF32_CHOICES, amp_dtype, cudnn_benchmark_wanted, resolve_device, tf32_mode
from train_utils import distributed as dist_utils
from train_utils.jsonl import read_jsonl
from train_utils.engine import determinism
from train_utils.engine.checkpointer import Checkpointer
from train_utils.engine.ema import ModelEMA
from train_utils.engine.control import (CheckpointEvery, ImmediateStop, RunControl, StopRequested, StopSignals,
                                        TrainingStopped, ignore_stop_signals)
from train_utils.engine.hooks import (CheckpointHook, FreezeBackboneHook, Hook, RunLogHook, TensorBoardHook,
                                      tensorboard_dir)
from train_utils.engine.loop import EpochState, NonFiniteLossError, train_one_epoch
from train_utils.engine.rng import seed_everything
from train_utils.engine.lr_schedule import WarmupSchedule, build_scheduler
from train_utils.engine.recipes import describe_recipe
from train_utils.evaluation.coco_api import get_coco_api_from_dataset
from train_utils.evaluation.loop import evaluate
from train_utils.model.anchor_coverage import auto_anchor_sizes, describe_auto_anchors
from train_utils.model.builder import build_model, count_parameters
from train_utils.model.compile import compile_static_parts, static_parts

REPO_ROOT = Path(__file__).resolve().parents[2]
# A stop at the last epoch's end: everything is saved and evaluated, its extras were skipped.
LAST_EPOCH_SKIPPED = " (the last; its curves, images and checkpoint pruning were skipped: --resume auto draws them)"


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


def stop_loader_workers(*loaders: Optional[DataLoader]) -> None:
    """Stop the persistent workers of ``loaders`` now. They ignore stop signals, so the terminate
    at interpreter exit would not end them if a traceback still held a loader.

    torch has no public call for this: a loader keeps its persistent workers in ``_iterator``
    until it is garbage collected, and ``_shutdown_workers`` is what that collection runs.
    tests/test_long_runs.py::test_torch_still_has_the_loader_internals_the_trainer_uses fails if
    torch renames either.
    """
    for loader in loaders:
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None:
            iterator._shutdown_workers()


class Trainer:
    """Train a detector as ``args`` (the training flags) say. Rank 0 alone writes files."""

    def __init__(self, args: argparse.Namespace, distributed: bool = False,
                 extra_hooks: Optional[List[Hook]] = None) -> None:
        self.args = args
        self.distributed = distributed
        self.extra_hooks = list(extra_hooks or [])  # run after the default hooks of build_hooks
        self.hooks: List[Hook] = []
        self.rank, self.world_size, self.is_main = 0, 1, True  # until setup_device joins the process group
        self.start_epoch = 0
        self.best_ap50 = -1.0  # best COCO AP@0.5 so far
        self.resume_from: Optional[Checkpoint] = None
        self.resume_path: Optional[str] = None
        self.start_state: Optional[EpochState] = None  # a resumed epoch's position
        self.backbone_weights: Optional[str] = None
        self.ema: Optional[ModelEMA] = None  # --ema
        self.signals = StopSignals()

    # ------------------------------------------------------------------ build steps
    def setup_device(self) -> None:
        """Deterministic kernels (--deterministic, before CUDA starts), device, process group
        (rank, world size) and seeds."""
        if getattr(self.args, "deterministic", False):
            determinism.make_deterministic()
        self.device = resolve_device(self.args.device)
        info = (dist_utils.init_distributed_mode(self.device.type, getattr(self.args, "dist_timeout", 30.0))
                if self.distributed else {"rank": 0, "world_size": 1, "local_rank": 0})
        self.rank, self.world_size = info["rank"], info["world_size"]
        if self.device.type == "cuda" and self.world_size > 1:
            self.device = torch.device("cuda", dist_utils.cuda_index(info["local_rank"]))
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)  # --device cuda:N: allocations and kernels default to GPU N
        self.is_main = self.rank == 0
        if cudnn_benchmark_wanted(self.device, self.args.min_size or [], getattr(self.args, "deterministic", False)):
            torch.backends.cudnn.benchmark = True
        seed_everything(self.args.seed + self.rank)
        self.signals.install()
        self.control = RunControl(CheckpointEvery.parse(self.args.checkpoint_every), self.signals)
        self.checkpointer = Checkpointer(self.args, self.rank, self.world_size)

    def find_resume_checkpoint(self) -> None:
        """The checkpoint to continue from (see :meth:`Checkpointer.find`), the same on every rank."""
        self.resume_path, self.resume_from = self.checkpointer.find()

    def build_datasets(self) -> None:
        """The training and validation splits, read once on rank 0 (every image header is opened
        to check its size) and sent to the other ranks; a data error stops every rank with its line."""
        built = None
        if self.is_main:
            try:
                built = self.read_datasets(), None
            except (ValueError, FileNotFoundError) as exc:
                built = None, exc
        datasets, error = dist_utils.broadcast_object(built)
        if error is not None:
            raise error
        self.train_set, self.val_set = datasets
        if self.is_main:
            print(f"train: {len(self.train_set)} images ({self.train_set.summary()}); "
                  f"val: {len(self.val_set)} images")

    def read_datasets(self) -> Tuple[DetectionDataSet, DetectionDataSet]:
        """Both splits; with ``--classes-json auto`` the validation split takes the training
        split's classes. A resumed run must find the checkpoint's classes."""
        args = self.args
        common = dict(year=args.year, skip_unknown_classes=args.skip_unknown_classes)
        train_set = build_dataset(args.dataset_format, args.data_path, args.train_split,
                                  get_transforms(True, args.augment, self.augment_size()), args.classes_json, **common)
        if self.resume_from is not None and self.resume_from.class_names != train_set.class_names:
            raise ValueError(f"{self.resume_path} was trained on the classes {self.resume_from.class_names} but the "
                             f"data now gives {train_set.class_names}; resume with the same classes")
        val_classes = train_set.class_names if args.classes_json == AUTO_CLASSES else args.classes_json
        val_set = build_dataset(args.dataset_format, args.data_path, args.val_split, get_transforms(False),
                                val_classes, expected_class_names=train_set.class_names, **common)
        if args.num_classes is not None and args.num_classes != train_set.num_classes:
            raise ValueError(f"--num-classes {args.num_classes} but {train_set.classes_json} lists "
                             f"{train_set.num_classes} classes")
        return train_set, val_set

    def augment_size(self) -> int:
        """The training size of ``lsj`` and ``mosaic``: from the resumed checkpoint's model, or the flags'."""
        config = self.resume_from.config if self.resume_from is not None else model_config_from_args(self.args, 2)
        return training_size(config.min_size, config.max_size)

    def choose_anchor_sizes(self) -> None:
        """``--anchor-sizes auto``: the sizes whose anchors cover the training boxes best (with the
        --aspect-ratios given), found on rank 0 and put into the flags, so the model config and the
        checkpoint hold them; a resumed run keeps its checkpoint's."""
        args = self.args
        if not anchor_sizes_auto(args):
            return
        if self.resume_from is not None:
            args.anchor_sizes = list(self.resume_from.config.anchor_sizes or []) or None
            return
        found = None
        if self.is_main:
            try:
                fit = auto_anchor_sizes(self.train_set, model_config_from_args(args, 2))
                found = list(fit.chosen.layout.sizes), None
                print(describe_auto_anchors(fit))
            except ValueError as exc:
                found = None, exc
        sizes, error = dist_utils.broadcast_object(found)
        if error is not None:
            raise error
        args.anchor_sizes = sizes

    def build_loaders(self) -> None:
        """A seeded sampler reshuffles per epoch (set_epoch) and augmentation is seeded per image,
        so a resumed run, at any iteration, sees the same batches. Evaluation takes one image per
        step (padding never differs between process counts)."""
        args, train_set = self.args, self.train_set
        self.train_sampler = DistributedSampler(train_set, self.world_size, self.rank, shuffle=True, seed=args.seed)
        if args.aspect_ratio_group_factor >= 0:
            group_ids = create_aspect_ratio_groups(train_set, k=args.aspect_ratio_group_factor)
            batch_sampler = GroupedBatchSampler(self.train_sampler, group_ids, args.batch_size)
        else:
            batch_sampler = BatchSampler(self.train_sampler, args.batch_size, drop_last=True)
        workers = max(int(args.workers), 0)
        # Workers ignore stop signals (the main process stops them); the loaders' own generators
        # keep their seed draws out of the training random state.
        common = dict(num_workers=workers, collate_fn=DetectionDataSet.collate_fn,
                      pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
                      worker_init_fn=ignore_stop_signals, generator=torch.Generator().manual_seed(args.seed))
        self.train_batches = ResumableBatches(batch_sampler, self.train_sampler)
        samples = SeededSamples(policy_dataset(train_set, args.augment, self.augment_size()), args.seed)
        self.train_loader = DataLoader(samples, batch_sampler=self.train_batches, **common)
        val_sampler = DistributedSampler(self.val_set, self.world_size, self.rank, shuffle=False)
        self.val_loader = DataLoader(self.val_set, batch_size=1, sampler=val_sampler, **common)
        self.coco_gt = get_coco_api_from_dataset(self.val_set)

    def build_model(self) -> None:
        """The detector of the resumed checkpoint, or of the flags (ImageNet backbone or --weights)."""
        args = self.args
        if self.resume_from is not None:
            self.config = self.resume_from.config
            model = build_model(self.config)
        else:
            pretrained = self.backbone_weights is not None or bool(args.weights)
            self.config = training_model_config(args, self.train_set.num_classes + 1, pretrained)
            model = build_model(self.config, self.backbone_weights)
            if args.weights:
                self.config = load_detector_weights(model, args.weights, self.config)
        if getattr(args, "deterministic", False):
            determinism.check_model(self.config, self.device)
        if self.world_size > 1 and (getattr(args, "sync_bn", False) or self.config.norm == "syncbn"):
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model_without_ddp = model.to(self.device)
        mode = compile_mode(args)
        if mode is not None:
            compile_static_parts(model, mode)
        self.backbone_trainable = [p for p in model.backbone.parameters() if p.requires_grad]
        self.wrap_model()

    def wrap_model(self) -> None:
        """``self.model``: the detector, under DDP when there are several ranks. DDP covers the
        parameters that train now, so it is wrapped again when backbone freezing ends (no
        ``find_unused_parameters`` search on every step)."""
        self.model = self.model_without_ddp
        if self.world_size > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.model_without_ddp, device_ids=[self.device.index] if self.device.type == "cuda" else None)

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
        iters = self.train_batches.full_length
        warmup = min(1000, iters - 1) if args.warmup_iters < 0 else args.warmup_iters
        schedule = WarmupSchedule(iters, args.epochs, args.lr_scheduler, args.lr_steps, args.lr_step_size,
                                  args.lr_gamma, warmup)
        self.scheduler = build_scheduler(self.optimizer, schedule)

    def build_hooks(self) -> List[Hook]:
        """Backbone freezing and checkpoints on every rank (rank 0 writes); the run log and, with
        --tensorboard, the TensorBoard events on rank 0, both written before the epoch's checkpoint."""
        hooks: List[Hook] = [FreezeBackboneHook()]
        if self.is_main:
            hooks.append(RunLogHook())
            log_dir = tensorboard_dir(self.args)
            if log_dir is not None:
                hooks.append(TensorBoardHook(log_dir))
        return hooks + [CheckpointHook()]

    def resume(self) -> None:
        """Restore the resumed checkpoint into the parts just built (see :meth:`Checkpointer.restore`)."""
        if self.resume_from is not None:
            self.checkpointer.restore(self, self.resume_from, self.resume_path)

    def build_ema(self) -> None:
        """``--ema``: the moving average of the weights just built or resumed, continuing the
        resumed checkpoint's average (see :meth:`Checkpointer.restore_ema`); under --compile its
        parts are compiled as the model's (the evaluation of each epoch runs them)."""
        if self.args.ema is not None:
            self.ema = ModelEMA(self.model_without_ddp, self.args.ema, self.args.ema_warmup)
            mode = compile_mode(self.args)
            if mode is not None:
                compile_static_parts(self.ema.module, mode)
        if self.resume_from is not None:
            self.checkpointer.restore_ema(self, self.resume_from, self.resume_path)

    def evaluated_model(self) -> torch.nn.Module:
        """The weights each epoch evaluates (and best.pth is chosen on): the EMA's with --ema."""
        return self.ema.module if self.ema is not None else self.model_without_ddp

    def setup(self) -> None:
        """Every build step in order; the resume file and the weight files are checked first."""
        self.setup_device()
        self.find_resume_checkpoint()
        # Fail on a missing weight file before reading any data.
        self.backbone_weights = None if self.resume_from else resolve_weight_files(self.args)
        self.build_datasets()
        self.choose_anchor_sizes()
        self.build_loaders()
        self.build_model()
        self.build_optimizer()
        self.build_schedule()
        self.resume()
        self.build_ema()
        self.hooks = self.build_hooks() + self.extra_hooks

    # ------------------------------------------------------------------ the run
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
        """One epoch of training (the rest of it when resumed inside), then evaluation when it is
        due; returns the epoch's record. A stop request from the last iteration on drops the
        evaluation and stops with the epoch's checkpoint (see :meth:`stop_at_epoch_end`)."""
        args = self.args
        state = self.start_state if self.start_state and self.start_state.epoch == epoch else EpochState(epoch)
        self.train_batches.set_epoch(epoch, skip=state.iteration)
        start = time.time()
        with tf32_mode(TF32_CHOICES[args.tf32]):
            stats = train_one_epoch(
                self.model, self.optimizer, self.train_loader, self.device, state, self.scheduler, self.scaler,
                self.amp_dtype, args.clip_grad_norm, args.print_freq,
                describe_images=lambda ids: ", ".join(self.train_set.ids[i] for i in ids),
                after_step=self.after_step)
        stats["epoch_time"] = time.time() - start
        coco_stats = None
        try:
            if (epoch + 1) % max(args.eval_interval, 1) == 0 or epoch + 1 == args.epochs:
                model = self.evaluated_model()
                dist_utils.broadcast_buffers(model)
                evaluator = evaluate(model, self.control.polled(self.val_loader), self.device,
                                     self.coco_gt, args.print_freq, tf32=args.eval_tf32)
                coco_stats = list(evaluator.stats) if self.is_main else None  # scored on rank 0
            signum = self.control.stop_requested()  # also one that came during the scoring
            if signum:
                raise StopRequested(signum)
        except StopRequested as request:
            self.stop_at_epoch_end(state, request.signum)
        return {"epoch": epoch, **stats, "coco": coco_stats, "weights": "raw" if self.ema is None else "ema"}

    def stop_at_epoch_end(self, state: EpochState, signum: int) -> None:
        """A stop between an epoch's training and its records: the trained epoch's checkpoint,
        marked as not yet evaluated (``--resume auto`` evaluates it first), then the stop."""
        self.checkpointer.save_iteration(self, state)
        self.stop(signum, self.position(state))

    def position(self, state: EpochState) -> str:
        """Where ``state`` is, for the stop line."""
        full = self.train_batches.full_length
        if state.iteration >= full:
            return f"the end of epoch {state.epoch} (trained, not yet evaluated)"
        return f"epoch {state.epoch}, iteration {state.iteration}/{full}"

    def after_step(self, state: EpochState) -> None:
        """After each iteration: the hooks, then an iteration checkpoint when one is due or a stop
        signal came (every rank decides the same), and the stop itself. The EMA is updated first
        (not after a float16 step the GradScaler skipped, for a non-finite loss or non-finite
        gradients: the weights did not move)."""
        if self.ema is not None and state.stepped:
            self.ema.update(self.model_without_ddp)
        for hook in self.hooks:
            hook.after_step(self, state)
        decision = self.control.poll()
        if decision["save"]:
            self.checkpointer.save_iteration(self, state)
            self.control.mark()
        if decision["stop"]:
            self.stop(decision["stop"], self.position(state))

    def epoch_extras(self, record: Dict[str, Any]) -> None:
        """The hooks' slower epoch-end work (curves, images, pruning), none of it after a stop
        request (rank 0 checks its own signal before each; the others' come with the next poll)."""
        if self.control.stop_requested():
            return
        for hook in self.hooks:
            if self.signals.signum is not None:
                return
            hook.epoch_extras(self, record)

    def finish_extras(self) -> None:
        """A resumed run whose every epoch is trained and evaluated: the last epoch's extras
        again (curves, images, pruning), which a stop request at its end skipped."""
        history = read_jsonl(Path(self.args.output_dir) / "metrics.jsonl")
        epoch = self.args.epochs - 1
        coco = next((r.get("coco") for r in reversed(history) if r.get("epoch") == epoch), None)
        self.epoch_extras({"epoch": epoch, "coco": coco})

    def stop(self, signum: int, where: str) -> None:
        """Leave after a stop signal, saying how to go on (rank 0)."""
        name = signal.Signals(signum).name
        last = os.path.join(self.args.output_dir, "last.pth")
        message = (f"stopped by {name} at {where}; the run continues from {last} when started again with "
                   "--resume auto" if self.is_main else "")
        raise TrainingStopped(signum, message)

    def train(self) -> Dict[str, Any]:
        """Train as the flags say; returns the last epoch's record."""
        failed = False
        try:
            self.setup()
            self.report_model()
            for hook in self.hooks:
                hook.before_train(self)
            record: Dict[str, Any] = {}
            if self.start_epoch >= self.args.epochs > 0:
                self.finish_extras()
            for epoch in range(self.start_epoch, self.args.epochs):
                for hook in self.hooks:
                    hook.before_epoch(self, epoch)
                record = self.run_epoch(epoch)
                for hook in self.hooks:
                    hook.after_epoch(self, record)  # the epoch's records and checkpoint files
                self.epoch_extras(record)
                signum = self.control.stop_requested()  # a signal since the epoch's records
                if signum:
                    last = epoch + 1 == self.args.epochs
                    self.stop(signum, f"the end of epoch {epoch}" + (LAST_EPOCH_SKIPPED if last else ""))
            if self.is_main:
                print(f"done: checkpoints, results, metrics.jsonl and curves in {self.args.output_dir}")
            return record
        except RuntimeError as exc:
            if self.world_size > 1 and dist_utils.is_peer_failure(exc):
                failed = True
                raise dist_utils.PeerFailure(dist_utils.describe_peer_failure(exc)) from None
            raise
        finally:
            self.signals.uninstall()
            self.shut_down_loaders()
            dist_utils.cleanup(failed)

    def shut_down_loaders(self) -> None:
        """Stop the loaders' persistent workers now (see :func:`stop_loader_workers`)."""
        stop_loader_workers(getattr(self, "train_loader", None), getattr(self, "val_loader", None))

    def report_model(self) -> None:
        if self.is_main:
            if getattr(self.args, "recipe", None):
                print(describe_recipe(self.args))
            trainable, total = count_parameters(self.model_without_ddp)
            print(f"model: {self.config.backbone}, {self.config.num_classes} classes incl. background, "
                  f"{trainable:,} of {total:,} parameters trainable; device {self.device}, "
                  f"world size {self.world_size}")
            mode = compile_mode(self.args)
            if mode is not None:
                print(f"torch.compile (mode {mode}): {', '.join(static_parts(self.model_without_ddp))}")


def run_training(args: argparse.Namespace, distributed: bool = False) -> Dict[str, Any]:
    """Train as the flags say; returns the last epoch's record."""
    return Trainer(args, distributed).train()


def main(args: argparse.Namespace, distributed: bool = False) -> None:
    """Script entry: known problems become one clear line and a non-zero exit code, not a
    traceback; a stop signal exits with 128 + its number after the checkpoint is written."""
    try:
        run_training(args, distributed)
    except TrainingStopped as exc:
        if str(exc):
            print(exc, file=sys.stderr)
        sys.exit(128 + exc.signum)
    except ImmediateStop as exc:
        print(f"stopped at once by a second {signal.Signals(exc.signum).name}: {args.output_dir}/last.pth holds the "
              "last checkpoint written (use --resume auto)", file=sys.stderr)
        sys.exit(128 + exc.signum)
    except (FileNotFoundError, ValueError, NonFiniteLossError, CheckpointWriteError, dist_utils.PeerFailure) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"interrupted: {args.output_dir}/last.pth holds the last checkpoint written (use --resume auto)",
              file=sys.stderr)
        sys.exit(130)
