"""Hooks: what the Trainer does around each epoch and step besides training and evaluating.

A hook overrides any of ``before_train``, ``before_epoch``, ``after_step`` and ``after_epoch``;
the Trainer calls them in list order (see ``Trainer.build_hooks``) on the ranks that hold them.
"""
import os
from typing import Any, Dict

from train_utils.checkpoint import link_checkpoint, prune_checkpoints, save_checkpoint
from train_utils.data.classes import write_classes_json
from train_utils.engine.loop import EpochState
from train_utils.engine.run_log import RunLog


class Hook:
    """Does nothing; subclasses override the moments they need."""

    def before_train(self, trainer: Any) -> None:
        pass

    def before_epoch(self, trainer: Any, epoch: int) -> None:
        pass

    def after_step(self, trainer: Any, state: EpochState) -> None:
        pass

    def after_epoch(self, trainer: Any, record: Dict[str, Any]) -> None:
        pass


class FreezeBackboneHook(Hook):
    """``--freeze-backbone-epochs N``: the backbone's trainable parameters wait N epochs (every
    rank; DDP is wrapped again over the parameters that train when this changes)."""

    def before_epoch(self, trainer: Any, epoch: int) -> None:
        frozen = epoch < trainer.args.freeze_backbone_epochs
        params = trainer.backbone_trainable
        if not params or params[0].requires_grad != frozen:
            return
        for param in params:
            param.requires_grad_(not frozen)
        trainer.wrap_model()


class RunLogHook(Hook):
    """WZ's results file, metrics.jsonl, iterations.jsonl (every --print-freq steps) and the
    curves (rank 0)."""

    def before_train(self, trainer: Any) -> None:
        self.log = RunLog(trainer.args.output_dir, trainer.start_epoch, trainer.scheduler.last_epoch)

    def after_step(self, trainer: Any, state: EpochState) -> None:
        if state.iteration % max(trainer.args.print_freq, 1) == 0 or \
                state.iteration == trainer.train_batches.full_length:
            self.log.add_step(state.epoch, state.iteration, trainer.scheduler.last_epoch, state.last_losses, state.lr)

    def after_epoch(self, trainer: Any, record: Dict[str, Any]) -> None:
        train_stats = {k: v for k, v in record.items() if k not in ("epoch", "coco")}
        self.log.add(record["epoch"], train_stats, record["coco"])


class CheckpointHook(Hook):
    """``classes.json`` first; after every epoch ``model-<epoch>.pth`` (written once) with
    ``last.pth`` and, when COCO AP@0.5 improves, ``best.pth`` as links to it; then only the newest
    ``--keep-checkpoints`` numbered files stay. Every rank takes part (the random states of all
    ranks are gathered); rank 0 writes."""

    def before_train(self, trainer: Any) -> None:
        if trainer.is_main:
            write_classes_json(trainer.classes_path(), trainer.train_set.class_names)

    def after_epoch(self, trainer: Any, record: Dict[str, Any]) -> None:
        epoch, coco = record["epoch"], record["coco"]
        ap50 = coco[1] if coco is not None else None
        improved = ap50 is not None and ap50 > trainer.best_ap50
        if improved:
            trainer.best_ap50 = ap50
        checkpoint = trainer.checkpoint(epoch, coco)
        trainer.control.mark()
        if not trainer.is_main:
            return
        out = trainer.args.output_dir
        numbered = os.path.join(out, f"model-{epoch}.pth")
        save_checkpoint(checkpoint, numbered)
        link_checkpoint(numbered, os.path.join(out, "last.pth"))
        if improved:
            link_checkpoint(numbered, os.path.join(out, "best.pth"))
        prune_checkpoints(out, trainer.args.keep_checkpoints)
