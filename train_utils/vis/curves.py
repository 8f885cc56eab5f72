"""Training curves as PNG files (matplotlib, no display needed)."""
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_loss_and_lr(epochs: Sequence[int], losses: Sequence[float], lrs: Sequence[float], path: str) -> None:
    """Mean training loss (left axis) and learning rate (right axis) per epoch."""
    fig, ax_loss = plt.subplots(figsize=(7, 4.5))
    ax_loss.plot(epochs, losses, "o-", color="tab:red", label="loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("mean training loss")
    ax_lr = ax_loss.twinx()
    ax_lr.plot(epochs, lrs, "s--", color="tab:blue", label="lr")
    ax_lr.set_ylabel("learning rate")
    handles = ax_loss.get_legend_handles_labels()[0] + ax_lr.get_legend_handles_labels()[0]
    ax_loss.legend(handles, ["loss", "lr"], loc="upper right")
    ax_loss.set_title("Train loss and learning rate")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_map(epochs: Sequence[int], ap50: Sequence[float], path: str) -> None:
    """COCO AP at IoU 0.5 per evaluated epoch."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(epochs, ap50, "o-", label="AP@0.5")
    ax.set_xlabel("epoch")
    ax.set_ylabel("COCO AP@0.5")
    ax.set_ylim(0, max(1.0, max(ap50, default=0)))
    ax.set_title("Evaluation mAP")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
