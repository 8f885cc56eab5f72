"""Hooks: what the Trainer does around each epoch besides training and evaluating.

A hook overrides any of ``before_train``, ``before_epoch`` and ``after_epoch``; the Trainer calls
them in list order (see ``Trainer.build_hooks``).
"""
import os
from typing import Any, Dict

from train_utils.checkpoint import save_checkpoint
from train_utils.data.classes import write_classes_json
from train_utils.engine.run_log import RunLog


class Hook:
    """Does nothing; subclasses override the moments they need."""

    def before_train(self, trainer: Any) -> None:
        pass

    def before_epoch(self, trainer: Any, epoch: int) -> None:
        pass

    def after_epoch(self, trainer: Any, record: Dict[str, Any]) -> None:
        pass


class FreezeBackboneHook(Hook):
    """``--freeze-backbone-epochs N``: the backbone's trainable parameters wait N epochs."""

    def before_epoch(self, trainer: Any, epoch: int) -> None:
        frozen = epoch < trainer.args.freeze_backbone_epochs
        for param in trainer.backbone_trainable:
            param.requires_grad_(not frozen)


class RunLogHook(Hook):
    """WZ's results file, metrics.jsonl and the curves (rank 0)."""

    def before_train(self, trainer: Any) -> None:
        self.log = RunLog(trainer.args.output_dir, trainer.start_epoch)

    def after_epoch(self, trainer: Any, record: Dict[str, Any]) -> None:
        train_stats = {k: v for k, v in record.items() if k not in ("epoch", "coco")}
        self.log.add(record["epoch"], train_stats, record["coco"])


class CheckpointHook(Hook):
    """``classes.json`` first; ``model-<epoch>.pth`` and ``last.pth`` after every epoch, ``best.pth``
    when COCO AP@0.5 improves (rank 0)."""

    def before_train(self, trainer: Any) -> None:
        write_classes_json(trainer.classes_path(), trainer.train_set.class_names)

    def after_epoch(self, trainer: Any, record: Dict[str, Any]) -> None:
        epoch, coco = record["epoch"], record["coco"]
        ap50 = coco[1] if coco is not None else None
        improved = ap50 is not None and ap50 > trainer.best_ap50
        if improved:
            trainer.best_ap50 = ap50
        checkpoint = trainer.checkpoint(epoch, coco)
        out = trainer.args.output_dir
        save_checkpoint(checkpoint, os.path.join(out, f"model-{epoch}.pth"))
        save_checkpoint(checkpoint, os.path.join(out, "last.pth"))
        if improved:
            save_checkpoint(checkpoint, os.path.join(out, "best.pth"))
