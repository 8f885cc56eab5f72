"""Hooks: what the Trainer does around each epoch and step besides training and evaluating.

A hook overrides any of ``before_train``, ``before_epoch``, ``after_step``, ``after_epoch`` and
``epoch_extras``; the Trainer calls them in list order (see ``Trainer.build_hooks``) on the ranks
that hold them. ``after_epoch`` writes the epoch's records and checkpoint (quick, and always
together); ``epoch_extras`` does the slower work after them (curves, images, pruning), which a
stop request skips.
"""
import argparse
import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from train_utils.data.classes import write_classes_json
from train_utils.engine import rng
from train_utils.engine.loop import EpochState
from train_utils.engine.run_log import RunLog
from train_utils.evaluation import COCO_STAT_NAMES
from train_utils.vis.draw import draw_detections

# An epoch record's keys besides the training means: its number, the COCO numbers and which
# weights they score ("raw", or "ema" with --ema).
NOT_TRAINING_STATS = ("epoch", "coco", "weights")
TENSORBOARD_MISSING = "--tensorboard needs the tensorboard package: pip install tensorboard"


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

    def epoch_extras(self, trainer: Any, record: Dict[str, Any]) -> None:
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


def is_logged_step(trainer: Any, state: EpochState) -> bool:
    """Every --print-freq steps of an epoch, and its last step."""
    return state.iteration % max(trainer.args.print_freq, 1) == 0 or \
        state.iteration == trainer.train_batches.full_length


class RunLogHook(Hook):
    """WZ's results file, metrics.jsonl, iterations.jsonl (every --print-freq steps) and, as an
    extra, the curves (rank 0)."""

    def before_train(self, trainer: Any) -> None:
        self.log = RunLog(trainer.args.output_dir, trainer.start_epoch, trainer.scheduler.last_epoch)

    def after_step(self, trainer: Any, state: EpochState) -> None:
        if is_logged_step(trainer, state):
            self.log.add_step(state.epoch, state.iteration, trainer.scheduler.last_epoch, state.last_losses, state.lr)

    def after_epoch(self, trainer: Any, record: Dict[str, Any]) -> None:
        train_stats = {k: v for k, v in record.items() if k not in NOT_TRAINING_STATS}
        self.log.add(record["epoch"], train_stats, record["coco"], record["weights"])

    def epoch_extras(self, trainer: Any, record: Dict[str, Any]) -> None:
        self.log.plot()


class CheckpointHook(Hook):
    """``classes.json`` first; after every epoch the epoch's checkpoint files (see
    :class:`train_utils.engine.checkpointer.Checkpointer`), then the ``--keep-checkpoints``
    pruning. Every rank takes part (the random states of all ranks are gathered); rank 0 writes."""

    def before_train(self, trainer: Any) -> None:
        if trainer.is_main:
            write_classes_json(trainer.classes_path(), trainer.train_set.class_names)

    def after_epoch(self, trainer: Any, record: Dict[str, Any]) -> None:
        coco = record["coco"]
        ap50 = coco[1] if coco is not None else None
        improved = ap50 is not None and ap50 > trainer.best_ap50
        if improved:
            trainer.best_ap50 = ap50
        trainer.checkpointer.save_epoch(trainer, record["epoch"], coco, improved)
        trainer.control.mark()

    def epoch_extras(self, trainer: Any, record: Dict[str, Any]) -> None:
        trainer.checkpointer.prune()


def summary_writer_class() -> type:
    """torch's ``SummaryWriter``; a ValueError with the install line when tensorboard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError(TENSORBOARD_MISSING) from None
    return SummaryWriter


def tensorboard_dir(args: argparse.Namespace) -> Optional[str]:
    """Where ``--tensorboard`` writes: its DIR, ``<output-dir>/tensorboard`` when given bare,
    None when not given."""
    value = getattr(args, "tensorboard", None)
    if value is None:
        return None
    return value or os.path.join(args.output_dir, "tensorboard")


def spread_indices(count: int, wanted: int) -> List[int]:
    """``wanted`` indices spread evenly over ``0 .. count - 1``, first and last included (all of
    them when ``count <= wanted``)."""
    if count <= wanted:
        return list(range(count))
    return [i * (count - 1) // max(wanted - 1, 1) for i in range(wanted)]


@torch.inference_mode()
def render_predictions(model: nn.Module, image: Tensor, class_names: Sequence[str], score_thresh: float,
                       max_side: int) -> np.ndarray:
    """The detections of ``model`` (in eval mode) scoring at least ``score_thresh``, drawn on the
    image shrunk to at most ``max_side`` pixels on its longer side.

    image: float32 [3, H, W] in [0, 1] (ToTensor of an 8-bit image, on the model's device).
    Returns uint8 [h, w, 3].
    """
    output = model([image])[0]
    keep = output["scores"] >= score_thresh
    pixels = image.mul(255).round().byte().permute(1, 2, 0).cpu().numpy()  # ToTensor undone exactly
    picture = Image.fromarray(pixels)
    scale = min(1.0, max_side / max(picture.size))
    if scale < 1.0:
        picture = picture.resize((round(picture.width * scale), round(picture.height * scale)), Image.BILINEAR)
    boxes = (output["boxes"][keep] * scale).tolist()
    drawn = draw_detections(picture, boxes, output["labels"][keep].tolist(), output["scores"][keep].tolist(),
                            class_names)
    return np.asarray(drawn)


class TensorBoardHook(Hook):
    """``--tensorboard``: TensorBoard event files (rank 0). The x axis is the global step (optimiser
    updates; epoch e ends at step (e + 1) x iterations per epoch).

    - ``train/<term>``, ``train/lr``: the numbers of iterations.jsonl, at the same steps;
    - ``epoch/<term>``, ``epoch/lr``, ``epoch/epoch_time``: metrics.jsonl's epoch means, at the
      epoch's last step;
    - ``coco/<name>``: the 12 COCO numbers at each evaluation (-1, "no objects of that size", is
      left out), and, as an extra, ``predictions/<image id>``: ``num_images`` fixed validation
      images with the detections scoring at least ``score_thresh`` drawn (the longer side at most
      ``max_side``).

    A resumed run purges the events after its position (left by the interrupted run), as the run
    log drops its records. Drawing the predictions leaves every random state as it was.
    """

    def __init__(self, log_dir: str, num_images: int = 4, score_thresh: float = 0.5, max_side: int = 640) -> None:
        self.writer_class = summary_writer_class()
        self.log_dir, self.num_images, self.score_thresh, self.max_side = log_dir, num_images, score_thresh, max_side
        self.writer: Any = None
        self.indices: List[int] = []

    def before_train(self, trainer: Any) -> None:
        self.writer = self.writer_class(self.log_dir, purge_step=trainer.scheduler.last_epoch + 1)
        self.indices = spread_indices(len(trainer.val_set), self.num_images)

    def after_step(self, trainer: Any, state: EpochState) -> None:
        if is_logged_step(trainer, state):
            step = trainer.scheduler.last_epoch
            for key, value in {**state.last_losses, "lr": state.lr}.items():
                self.writer.add_scalar(f"train/{key}", value, step)
            self.writer.flush()  # as complete as iterations.jsonl if the process is killed

    def after_epoch(self, trainer: Any, record: Dict[str, Any]) -> None:
        step = trainer.scheduler.last_epoch
        for key, value in record.items():
            if key not in NOT_TRAINING_STATS:
                self.writer.add_scalar(f"epoch/{key}", value, step)
        if record["coco"] is not None:
            for name, value in zip(COCO_STAT_NAMES, record["coco"]):
                if value != -1:
                    self.writer.add_scalar(f"coco/{name}", value, step)
        self.writer.flush()

    def epoch_extras(self, trainer: Any, record: Dict[str, Any]) -> None:
        if record["coco"] is not None:
            self.add_images(trainer, trainer.scheduler.last_epoch)
            self.writer.flush()
        if record["epoch"] + 1 >= trainer.args.epochs:
            self.writer.close()

    def add_images(self, trainer: Any, step: int) -> None:
        """The fixed validation images with their predictions, one at a time as evaluation runs them."""
        model, dataset = trainer.evaluated_model(), trainer.val_set
        was_training, states = model.training, rng.capture()
        model.eval()
        try:
            for index in self.indices:
                image, target = dataset[index]
                drawn = render_predictions(model, image.to(trainer.device), dataset.class_names,
                                           self.score_thresh, self.max_side)
                name = dataset.ids[int(target["image_id"])]
                self.writer.add_image(f"predictions/{name}", drawn, step, dataformats="HWC")
        finally:
            model.train(was_training)
            rng.restore(states)  # a plugin model that draws at inference still resumes exactly
