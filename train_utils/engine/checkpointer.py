"""A run's checkpoint policy in one object: which file a run continues from, what it restores,
and which files it writes when (as detectron2's Checkpointer and PeriodicCheckpointer together).

Files in ``--output-dir`` (rank 0 writes, every rank takes part in gathering the random states):

- ``model-<epoch>.pth`` after each epoch's end (its evaluation done), written once;
- ``last.pth``: a copy of the newest ``model-<epoch>.pth``, or an iteration checkpoint written
  inside an epoch (``--checkpoint-every``, a stop signal) whose ``progress`` says where;
- ``best.pth``: a copy of the epoch file with the best COCO AP@0.5 so far;
- ``--keep-checkpoints K``: only the newest K numbered files stay.

The three names are independent files (a reflink where the file system offers one, else a
copy): damaging one leaves the others readable.

``--resume auto`` takes the newest readable checkpoint: ``last.pth``, else the numbered files
by falling epoch (a damaged one is reported and passed over). Under torch.distributed every rank
looks in its own folder and the newest file of any rank wins.
"""
import argparse
import os
import sys
import time
from typing import Any, Dict, Optional, Tuple

from tqdm import tqdm

from backbone import WeightFileError
from train_utils.checkpoint import (END_PENDING, Checkpoint, checkpoint_candidates, copy_checkpoint,
                                    prune_checkpoints, read_checkpoint, save_checkpoint)
from train_utils.cli import apply_model_flags
from train_utils import distributed as dist_utils
from train_utils.engine import rng
from train_utils.engine.loop import EpochState

RESUME_HINT = "resume with the model flags it was trained with, or train into another --output-dir"


def resume_position(checkpoint: Checkpoint) -> Tuple[int, int]:
    """How far a checkpoint got: (optimiser steps, completed epoch); larger is newer."""
    return int((checkpoint.lr_scheduler or {}).get("last_epoch", 0)), int(checkpoint.epoch)


def plain_args(args: argparse.Namespace) -> Dict[str, Any]:
    """argparse values as plain types (loadable with weights_only=True)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}


class Checkpointer:
    """Finds, restores and writes the checkpoints of the run ``args`` describe. The trainer
    passed to :meth:`restore` and :meth:`capture` holds the parts (model, optimizer, scheduler,
    scaler, loaders) its build steps made."""

    def __init__(self, args: argparse.Namespace, rank: int, world_size: int) -> None:
        self.args = args
        self.out = args.output_dir
        self.rank, self.world_size, self.is_main = rank, world_size, rank == 0

    def path(self, name: str) -> str:
        return os.path.join(self.out, name)

    # ------------------------------------------------------------------ which file
    def find(self) -> Tuple[Optional[str], Optional[Checkpoint]]:
        """The checkpoint to continue from, the same on every rank (sent to the ranks that do
        not see it: nodes need not share the output folder). A bad file stops every rank with
        its line."""
        args = self.args
        choice, error = None, None
        try:
            choice = self.choose()
        except (ValueError, FileNotFoundError) as exc:
            error = str(exc)
        path, checkpoint = dist_utils.share_newest(choice, resume_position, error)
        if args.resume and checkpoint is None and args.resume != "auto":
            raise FileNotFoundError(f"--resume {args.resume}: no such file on any rank")
        if args.resume == "auto" and checkpoint is None and self.is_main:
            print(f"--resume auto: no usable checkpoint in {self.out}, starting from scratch")
        return path, checkpoint

    def choose(self) -> Optional[Tuple[str, Checkpoint]]:
        """This rank's candidate: the file ``--resume`` names (None where this rank does not see
        it), or under ``auto`` the newest readable checkpoint of --output-dir."""
        args = self.args
        if args.resume != "auto":
            exists = args.resume and (os.path.isfile(args.resume) or self.world_size == 1)
            return (args.resume, self.load(args.resume)) if exists else None
        for path in checkpoint_candidates(self.out):
            try:
                return path, self.load(path)
            except WeightFileError as exc:
                print(f"warning: skipping a damaged checkpoint: {exc}", file=sys.stderr)
        return None

    def load(self, path: str) -> Checkpoint:
        """A training checkpoint of this project for the model the flags describe; the inference
        and training flags given on the command line override its stored values."""
        ckpt = read_checkpoint(path)
        if not ckpt.can_resume():
            raise WeightFileError(f"{path} is not a training checkpoint of this project (no model config, "
                                  "optimizer or epoch): use --weights to fine-tune from it instead")
        try:
            ckpt.config = apply_model_flags(ckpt.config, self.args, path, hint=RESUME_HINT)
        except ValueError as exc:
            raise ValueError(f"{path} was written for another model: {exc}") from None
        return ckpt

    # ------------------------------------------------------------------ restore
    def restore(self, trainer: Any, ckpt: Checkpoint, path: str) -> None:
        """Put ``ckpt`` into the trainer's parts: weights, optimiser, schedule position, scaler,
        this rank's random states, the epoch to start, the best AP@0.5 and, for an iteration
        checkpoint, the position inside the epoch (``trainer.start_state``)."""
        trainer.model_without_ddp.load_state_dict(ckpt.model)
        trainer.optimizer.load_state_dict(ckpt.optimizer)
        # The schedule itself is rebuilt from the flags; only its position is restored.
        groups = len(trainer.optimizer.param_groups)
        trainer.scheduler.load_state_dict({**ckpt.lr_scheduler, "lr_lambdas": [None] * groups})
        if trainer.scaler is not None and ckpt.scaler:
            trainer.scaler.load_state_dict(ckpt.scaler)
        elif ckpt.scaler:
            self.drop_scaler(path)
        trainer.start_epoch = ckpt.epoch + 1
        trainer.best_ap50 = ckpt.best_ap50
        self.restore_random_states(ckpt, trainer.start_epoch)
        full = trainer.train_batches.full_length
        trainer.start_state = self.epoch_state(trainer.start_epoch, ckpt.progress, full) if ckpt.progress else None
        done = trainer.start_state.iteration if trainer.start_state else 0
        align_schedule(trainer.scheduler, trainer.start_epoch * full + done, full, self.is_main)
        if self.is_main:
            state = trainer.start_state
            where = f", iteration {state.iteration}" if state else ""
            complete = state is not None and state.iteration == full
            pending = " (all trained: its evaluation and epoch end come first)" if complete else ""
            print(f"resumed from {path} at epoch {trainer.start_epoch}{where}{pending}")

    def restore_ema(self, trainer: Any, ckpt: Checkpoint, path: str) -> None:
        """The resumed checkpoint's weight average into ``trainer.ema`` (built from the resumed
        weights); one line when the flags and the file disagree: an average started now (the file
        has none), one dropped (no --ema), or another decay or warm-up (the flags' apply)."""
        stored, ema = ckpt.ema, trainer.ema
        if ema is not None and stored is not None:
            ema.load_state_dict(stored)
        if not self.is_main:
            return
        if ema is None and stored is not None:
            print(f"warning: {path} holds EMA weights but --ema is not given: they are dropped", file=sys.stderr)
        elif ema is not None and stored is None:
            print(f"warning: {path} holds no EMA weights: the average starts from its weights now, and best.pth "
                  f"is chosen by comparing the EMA's AP@0.5 with the raw weights' best so far "
                  f"({trainer.best_ap50:.4f})", file=sys.stderr)
        elif ema is not None and (stored["decay"], stored["tau"]) != (ema.decay, ema.tau):
            print(f"warning: {path}'s EMA had decay {stored['decay']:g} and warm-up {stored['tau']:g}; it goes on "
                  f"with --ema {ema.decay:g} --ema-warmup {ema.tau:g}", file=sys.stderr)

    def drop_scaler(self, path: str) -> None:
        """A float16 run's GradScaler state, resumed without float16: an error unless --amp-dtype
        chose that on purpose (``--amp`` alone means bfloat16 on recent GPUs since this version)."""
        if getattr(self.args, "amp_dtype", None) is None:
            raise ValueError(f"{path} was trained with float16 autocast and a GradScaler; resume it with "
                             "--amp --amp-dtype float16 (--amp alone now means bfloat16 on this device)")
        if self.is_main:
            print(f"warning: {path} holds a float16 GradScaler state; --amp-dtype {self.args.amp_dtype} drops it",
                  file=sys.stderr)

    def restore_random_states(self, ckpt: Checkpoint, start_epoch: int) -> None:
        """This rank's stored random states, or new seeds (one agreed warning) where the file has
        none for it."""
        restored = rng.restore_rank(rng.from_stored(ckpt.rng_state), self.rank)
        if not restored:
            rng.seed_everything(self.args.seed + self.rank + 1009 * start_epoch)
        if dist_utils.agree_max([int(not restored)])[0] and self.is_main:
            print("warning: the checkpoint holds no random state for some ranks (another world size, or an older "
                  "format): they go on with new seeds (not bit-exact)", file=sys.stderr)

    def epoch_state(self, epoch: int, progress: Dict[str, Any], full_length: int) -> EpochState:
        """The position inside the resumed epoch. An epoch whose batches were all trained (its end
        pending) stays complete; after a change of world size the count of images already seen
        is kept (the order then differs from the interrupted run's)."""
        state = EpochState.from_dict(epoch, progress)
        stored_world = progress.get("world_size", self.world_size)
        if progress.get(END_PENDING):
            iteration = full_length
        elif stored_world != self.world_size:
            iteration = state.iteration * stored_world // self.world_size
            if self.is_main:
                print(f"warning: the checkpoint was written by {stored_world} processes, this run has "
                      f"{self.world_size}: epoch {epoch} goes on after the same number of images, "
                      "in another order", file=sys.stderr)
        else:
            return state
        if state.iteration:
            state.loss_sums = {k: v * iteration / state.iteration for k, v in state.loss_sums.items()}
        state.iteration = iteration
        return state

    # ------------------------------------------------------------------ write
    def capture(self, trainer: Any, epoch: int, coco_stats: Optional[list] = None,
                progress: Optional[Dict[str, Any]] = None) -> Checkpoint:
        """The state after ``epoch`` (and ``progress`` into the next one) in the checkpoint schema.
        Every rank calls it: the random states of all ranks are gathered on rank 0."""
        args, scheduler = self.args, trainer.scheduler
        return Checkpoint(
            model=trainer.model_without_ddp.state_dict(), config=trainer.config,
            class_names=list(trainer.train_set.class_names), epoch=epoch,
            optimizer=trainer.optimizer.state_dict(),
            lr_scheduler={k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"},
            scaler=trainer.scaler.state_dict() if trainer.scaler is not None else None,
            rng_state=dist_utils.gather_to_rank0(rng.capture()), progress=progress,
            ema=trainer.ema.state_dict() if trainer.ema is not None else None,
            args=plain_args(args), data=trainer.data_description(), coco_stats=coco_stats,
            best_ap50=trainer.best_ap50, plugins=list(getattr(args, "plugin", []) or []))

    def save_iteration(self, trainer: Any, state: EpochState) -> None:
        """``last.pth`` with the position inside epoch ``state.epoch``; once all its batches are
        trained, marked as the epoch's end not yet evaluated. Every rank waits for the file."""
        started = time.time()
        state.sync_dropped(trainer.device)
        progress = {**state.to_dict(), "world_size": self.world_size}
        if state.iteration >= trainer.train_batches.full_length:
            progress[END_PENDING] = True
        checkpoint = self.capture(trainer, state.epoch - 1, None, progress)
        if self.is_main:
            save_checkpoint(checkpoint, self.path("last.pth"))
            what = (f"end of epoch {state.epoch}, not yet evaluated" if END_PENDING in progress else
                    f"epoch {state.epoch}, iteration {state.iteration}")
            tqdm.write(f"iteration checkpoint last.pth ({what}) written in "
                       f"{time.time() - started:.1f}s")  # above a progress bar, if one is drawn
        dist_utils.agree_max([0])  # no rank leaves (a stop) before the file is written

    def save_epoch(self, trainer: Any, epoch: int, coco_stats: Optional[list], improved: bool) -> None:
        """``model-<epoch>.pth``, then ``last.pth`` and, when AP@0.5 improved, ``best.pth`` as
        independent copies of it."""
        checkpoint = self.capture(trainer, epoch, coco_stats)
        if not self.is_main:
            return
        numbered = self.path(f"model-{epoch}.pth")
        save_checkpoint(checkpoint, numbered)
        copy_checkpoint(numbered, self.path("last.pth"))
        if improved:
            copy_checkpoint(numbered, self.path("best.pth"))

    def prune(self) -> None:
        """``--keep-checkpoints``: delete all but the newest K numbered files (rank 0)."""
        if self.is_main:
            prune_checkpoints(self.out, self.args.keep_checkpoints)


def align_schedule(scheduler: Any, step: int, batches_per_epoch: int, is_main: bool) -> None:
    """Put the schedule at ``step``, where the resumed position is in this run's epochs. It is the
    stored step unless the batches per epoch changed (another world size, batch size or data),
    where the stored step would move milestones and warmup."""
    if step == scheduler.last_epoch:
        return
    if is_main:
        print(f"warning: the checkpoint's schedule was at step {scheduler.last_epoch}; with "
              f"{batches_per_epoch} batches per epoch this run goes on at step {step}", file=sys.stderr)
    scheduler.last_epoch = step - 1
    scheduler.step()  # sets every group's rate (and get_last_lr) from the lambdas at ``step``
