"""The picture of ``tools/check_dataset.py --anchors``: box sizes and aspect ratios against the
anchors, and the share of boxes the anchors cover by box size (matplotlib, no display needed)."""
from __future__ import annotations

from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FormatStrFormatter  # noqa: E402

from train_utils.model.anchor_coverage import LOOSE_IOU, POSITIVE_IOU, AnchorLayout, BoxSet  # noqa: E402

_STYLES = (("tab:grey", (0, (4, 2))), ("tab:orange", "-"))  # configured (dashed), suggested (solid)


def _log_bins(values: np.ndarray, count: int = 40) -> np.ndarray:
    low, high = np.log2(values.min()), np.log2(values.max())
    return 2 ** np.linspace(low, max(high, low + 1e-3), count + 1)


def plot_anchor_coverage(box_set: BoxSet, layouts: Sequence[AnchorLayout], best: Sequence[np.ndarray],
                         labels: Sequence[str], title: str, path: str) -> None:
    """Three panels: histogram of box size sqrt(w * h) and of aspect ratio h / w (resized
    pixels, log axes) with the anchor sizes / ratios of each layout as vertical lines, and the
    share of boxes whose best anchor reaches IoU 0.7 (solid) and 0.5 (dashed) in 12 size bins.
    ``best[i]`` [N]: each box's best IoU under ``layouts[i]``, named ``labels[i]``."""
    widths, heights = box_set.sides()
    sizes, ratios = box_set.scales(), heights / widths
    fig, (ax_size, ax_ratio, ax_cover) = plt.subplots(1, 3, figsize=(15, 4.2))
    ax_size.hist(sizes, bins=_log_bins(sizes), color="tab:blue", alpha=0.6)
    ax_ratio.hist(ratios, bins=_log_bins(ratios), color="tab:blue", alpha=0.6)
    size_bins = _log_bins(sizes, 12)
    bin_of = np.clip(np.digitize(sizes, size_bins) - 1, 0, len(size_bins) - 2)
    centres = np.sqrt(size_bins[:-1] * size_bins[1:])
    filled = np.bincount(bin_of, minlength=len(centres)) > 0
    for layout, ious, label, (colour, line) in zip(layouts, best, labels, _STYLES):
        for i, size in enumerate(layout.sizes):
            ax_size.axvline(size, color=colour, ls=line, lw=1.5, label=f"{label} anchors" if i == 0 else None)
        for i, ratio in enumerate(layout.aspect_ratios):
            ax_ratio.axvline(ratio, color=colour, ls=line, lw=1.5, label=f"{label} ratios" if i == 0 else None)
        for threshold, style in ((POSITIVE_IOU, "-"), (LOOSE_IOU, "--")):
            share = np.bincount(bin_of, weights=ious >= threshold, minlength=len(centres))
            share = share / np.maximum(np.bincount(bin_of, minlength=len(centres)), 1)
            ax_cover.plot(centres[filled], share[filled], style, color=colour, marker="o", ms=3,
                          label=f"{label}: IoU >= {threshold}")
    for ax, name in ((ax_size, "box size sqrt(w*h), resized pixels"), (ax_ratio, "aspect ratio h/w"),
                     (ax_cover, "box size sqrt(w*h), resized pixels")):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.set_xlabel(name)
        ax.legend(fontsize=8, loc="best")
    ax_size.set_ylabel("boxes")
    ax_ratio.set_ylabel("boxes")
    ax_cover.set_ylabel("share of boxes covered")
    ax_cover.set_ylim(-0.02, 1.02)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
