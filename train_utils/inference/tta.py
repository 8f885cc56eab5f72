"""Test-time augmentation (``--tta`` of validation.py and predict.py), as detectron2's
``GeneralizedRCNNWithTTA`` and mmdetection's TTA: the full detector runs on each image at several
scales and mirrored, the boxes go back to the original image, and the passes are merged per class.

A scale ``s`` runs the detector with its shorter side ``round(s * min_size)`` and longer side at
most ``round(s * max_size)``; the detector's own post-processing maps the boxes back to the
caller's image. A mirrored pass's boxes are mirrored back: ``x1, x2 = W - x2, W - x1``.

Merges: ``nms`` is class-wise hard NMS over all passes; ``wbf`` is weighted box fusion
(Solovyev et al. 2019): boxes in descending score order join the cluster of the same class whose
fused box overlaps them most when that IoU is above the threshold, else start one; a cluster's box
is the score-weighted mean of its members and its score the members' mean times
``min(members, passes) / passes`` (a box found by few passes counts less).
"""
from __future__ import annotations

import argparse
import contextlib
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from network_files.ops.boxes import batched_nms
from train_utils.flags import ListAction

Detections = dict[str, Tensor]
TTA_MERGES = ("nms", "wbf")
WBF_IOU_THRESH = 0.55  # Solovyev et al.'s (and the ensemble-boxes package's) default


def add_tta_flags(parser: argparse.ArgumentParser, one_token: bool = False) -> None:
    """``--tta`` and its settings (``one_token``: list flags take comma-separated values only)."""
    group = parser.add_argument_group("test-time augmentation (docs/evaluation.md)")
    group.add_argument("--tta", action="store_true",
                       help="run the detector on each image mirrored and at every --tta-scales, merge the passes")
    group.add_argument("--tta-scales", action=ListAction, item_type=float, one_token=one_token, default=[1.0],
                       metavar="S", help="image sizes as factors of the model's min/max size, e.g. 0.8,1.0,1.2")
    group.add_argument("--tta-flip", action=argparse.BooleanOptionalAction, default=True,
                       help="also run each scale on the mirrored image")
    group.add_argument("--tta-merge", choices=TTA_MERGES, default="wbf",
                       help="merge per class by hard NMS or by weighted box fusion (Solovyev et al. 2019)")
    group.add_argument("--tta-iou-thresh", type=float, default=None,
                       help=f"IoU of the merge (default: the model's --box-nms-thresh for nms, {WBF_IOU_THRESH} "
                            "for wbf)")


def check_tta_flags(args: argparse.Namespace) -> None:
    """One line per TTA flag out of range (checked whether or not --tta is on)."""
    if not args.tta_scales or any(s <= 0 for s in args.tta_scales):
        raise ValueError(f"--tta-scales needs positive factors, got {args.tta_scales}")
    if args.tta_iou_thresh is not None and not 0 <= args.tta_iou_thresh <= 1:
        raise ValueError(f"--tta-iou-thresh must lie in [0, 1], got {args.tta_iou_thresh}")


def tta_from_args(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    """``model`` wrapped as the TTA flags say (``model`` itself without ``--tta``)."""
    check_tta_flags(args)
    if not args.tta:
        return model
    heads = model.roi_heads
    default_iou = heads.nms_thresh if args.tta_merge == "nms" else WBF_IOU_THRESH
    iou = default_iou if args.tta_iou_thresh is None else args.tta_iou_thresh
    return TTADetector(model, args.tta_scales, args.tta_flip, args.tta_merge, iou, heads.detections_per_img)


class TTADetector(nn.Module):
    """The detector ``model`` (eval mode) under test-time augmentation, with its call signature:
    a list of float images ``[3, H, W]`` in, per image ``{"boxes" [D, 4], "labels" [D], "scores"
    [D]}`` out, in the input images' pixels, at most ``detections_per_img`` best first."""

    def __init__(self, model: nn.Module, scales: Sequence[float], flip: bool, merge: str, iou_thresh: float,
                 detections_per_img: int) -> None:
        super().__init__()
        if merge not in TTA_MERGES:
            raise ValueError(f"--tta-merge must be one of {TTA_MERGES}, got {merge!r}")
        self.model = model
        self.scales = tuple(scales)
        self.flips = (False, True) if flip else (False,)
        self.merge = merge
        self.iou_thresh = iou_thresh
        self.detections_per_img = detections_per_img

    @property
    def num_passes(self) -> int:
        return len(self.scales) * len(self.flips)

    def tta_settings(self) -> dict:
        """What runs, for records and logs."""
        return {"scales": list(self.scales), "flip": len(self.flips) == 2, "merge": self.merge,
                "iou_thresh": self.iou_thresh, "passes": self.num_passes}

    def forward(self, images: list[Tensor]) -> list[Detections]:
        passes: list[list[Detections]] = [[] for _ in images]
        for scale in self.scales:
            with scaled_sizes(self.model.transform, scale):
                for flipped in self.flips:
                    outputs = self.model([image.flip(-1) for image in images] if flipped else images)
                    for found, image, output in zip(passes, images, outputs):
                        found.append(unflip(output, image.shape[-1]) if flipped else output)
        return [self.merge_passes(found) for found in passes]

    def merge_passes(self, passes: list[Detections]) -> Detections:
        """One image's passes merged per class, the best ``detections_per_img`` first."""
        boxes = torch.cat([p["boxes"] for p in passes])
        scores = torch.cat([p["scores"] for p in passes])
        labels = torch.cat([p["labels"] for p in passes])
        if self.merge == "nms":
            keep = batched_nms(boxes, scores, labels, self.iou_thresh)[: self.detections_per_img]
            return {"boxes": boxes[keep], "labels": labels[keep], "scores": scores[keep]}
        fused = weighted_box_fusion(boxes, scores, labels, self.iou_thresh, self.num_passes)
        top = fused["scores"].argsort(descending=True, stable=True)[: self.detections_per_img]
        return {key: value[top] for key, value in fused.items()}


@contextlib.contextmanager
def scaled_sizes(transform: nn.Module, scale: float) -> Iterator[None]:
    """``transform``'s ``min_size`` and ``max_size`` times ``scale`` (rounded) while in the block."""
    min_size, max_size = transform.min_size, transform.max_size
    transform.min_size = tuple(round(size * scale) for size in min_size)
    transform.max_size = round(max_size * scale)
    try:
        yield
    finally:
        transform.min_size, transform.max_size = min_size, max_size


def unflip(output: Detections, width: int) -> Detections:
    """Detections of the mirrored image ``width`` pixels wide, mirrored back: ``boxes [D, 4]``."""
    boxes = output["boxes"]
    return {**output, "boxes": torch.stack((width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]), 1)}


class _Cluster:
    """One WBF cluster: the score-weighted sum of its members' boxes, their score sum and count."""

    def __init__(self) -> None:
        self.weighted = [0.0, 0.0, 0.0, 0.0]
        self.weight = 0.0
        self.members = 0
        self.box = [0.0, 0.0, 0.0, 0.0]

    def add(self, box: list[float], score: float) -> None:
        self.weighted = [total + score * value for total, value in zip(self.weighted, box)]
        self.weight += score
        self.members += 1
        self.box = [total / self.weight for total in self.weighted]


def _iou(a: list[float], b: list[float]) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def weighted_box_fusion(boxes: Tensor, scores: Tensor, labels: Tensor, iou_thresh: float,
                        num_passes: int) -> Detections:
    """Weighted box fusion (see the module docstring) of ``boxes [N, 4]``, ``scores [N]``,
    ``labels [N]`` from ``num_passes`` passes: ``{"boxes" [C, 4], "labels" [C], "scores" [C]}``,
    one row per cluster in the order the clusters were started.

    Sequential by nature (a box is matched against the fused boxes as they are so far); plain
    Python floats, as the few hundred boxes of an image make tensor calls per box the larger cost."""
    box_list, score_list, label_list = boxes.tolist(), scores.tolist(), labels.tolist()
    clusters: list[tuple[int, _Cluster]] = []
    by_label: dict[int, list[_Cluster]] = {}
    for index in scores.argsort(descending=True, stable=True).tolist():
        box, label = box_list[index], label_list[index]
        best, best_iou = None, iou_thresh
        for cluster in by_label.setdefault(label, []):
            overlap = _iou(cluster.box, box)
            if overlap > best_iou:  # strictly above the threshold; the first of equal overlaps
                best, best_iou = cluster, overlap
        if best is None:
            best = _Cluster()
            by_label[label].append(best)
            clusters.append((label, best))
        best.add(box, score_list[index])
    fused = torch.tensor([c.box for _, c in clusters], dtype=boxes.dtype, device=boxes.device).reshape(-1, 4)
    mean = torch.tensor([c.weight / c.members for _, c in clusters], dtype=scores.dtype, device=scores.device)
    found = torch.tensor([min(c.members, num_passes) / num_passes for _, c in clusters], dtype=scores.dtype,
                         device=scores.device)
    return {"boxes": fused, "labels": torch.tensor([label for label, _ in clusters], dtype=labels.dtype,
                                                   device=labels.device), "scores": mean * found}
