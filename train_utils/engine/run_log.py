"""What a training run writes besides checkpoints: WZ's results file, metrics.jsonl and curves."""
import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from train_utils.jsonl import read_jsonl, write_jsonl
from train_utils.vis.curves import plot_loss_and_lr, plot_map


class RunLog:
    """Appends one record per epoch (``metrics.jsonl``) and one per logged step
    (``iterations.jsonl``: epoch, iteration in the epoch, global step, losses, lr); :meth:`plot`
    redraws the curves from the whole history.

    Both files survive resumes, so each epoch and step appears once: records after the resumed
    position (left by an interrupted run) are dropped first.
    """

    def __init__(self, output_dir: str, start_epoch: int = 0, start_step: int = 0) -> None:
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.dir / "metrics.jsonl"
        self.steps_path = self.dir / "iterations.jsonl"
        self.results_path = self.dir / f"results{time.strftime('%Y%m%d-%H%M%S')}.txt"
        self.history: List[Dict[str, Any]] = [r for r in read_jsonl(self.metrics_path) if r["epoch"] < start_epoch]
        write_jsonl(self.metrics_path, self.history)
        write_jsonl(self.steps_path, [r for r in read_jsonl(self.steps_path) if r["step"] <= start_step])

    def add_step(self, epoch: int, iteration: int, step: int, losses: Dict[str, float], lr: float) -> None:
        record = {"epoch": epoch, "iteration": iteration, "step": step, **losses, "lr": lr}
        with open(self.steps_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def add(self, epoch: int, train: Dict[str, float], coco_stats: Optional[Sequence[float]],
            weights: str = "raw") -> None:
        """The epoch's record; an evaluated one also holds the COCO numbers and which weights they
        score (``weights``: "raw", or "ema" with --ema). Counts stay integers (augment_dropped_boxes)."""
        record: Dict[str, Any] = {"epoch": epoch, **{k: v if isinstance(v, int) else float(v)
                                                     for k, v in train.items()}}
        if coco_stats is not None:
            record["coco"] = [float(v) for v in coco_stats]
            record["weights"] = weights
            # WZ's results line: epoch, the 12 COCO numbers, mean loss, learning rate.
            values = [f"{v:.4f}" for v in list(coco_stats) + [train["loss"]]] + [f"{train['lr']:.6f}"]
            with open(self.results_path, "a") as handle:
                handle.write(f"epoch:{epoch}  {'  '.join(values)}\n")
        self.history.append(record)
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def plot(self) -> None:
        epochs = [r["epoch"] for r in self.history]
        plot_loss_and_lr(epochs, [r["loss"] for r in self.history], [r["lr"] for r in self.history],
                         str(self.dir / "loss_and_lr.png"))
        evaluated = [r for r in self.history if "coco" in r]
        if evaluated:
            plot_map([r["epoch"] for r in evaluated], [r["coco"][1] for r in evaluated], str(self.dir / "mAP.png"))
