"""The state one predict.py call shares: the model, its sinks (drawing, COCO results, annotation
writers) and the counters."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from PIL import Image

from train_utils.inference.annotations import AnnotationWriter, VocWriter, YoloWriter
from train_utils.inference.coco_results import CocoResults
from train_utils.inference.pipeline import BatchDetect, OrderedOutput, Timings
from train_utils.vis.draw import draw_detections


@dataclass
class Run:
    """Everything one predict.py call shares: the model, the sinks and the counters."""

    args: argparse.Namespace
    detect: BatchDetect
    class_names: list[str]
    device: torch.device
    batch_size: int
    results: CocoResults
    writers: list[AnnotationWriter]
    timings: Timings = field(default_factory=Timings)
    output: Optional[OrderedOutput] = None
    done: int = 0
    skipped: int = 0
    detections: int = 0

    def draw(self, pixels: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor,
             scores: torch.Tensor) -> Image.Image:
        """``pixels`` (uint8 [3, H, W]) with the detections drawn as the flags say."""
        image = Image.fromarray(pixels.permute(1, 2, 0).numpy())
        return draw_detections(image, boxes.tolist(), labels.tolist(), scores.tolist(), self.class_names,
                               self.args.line_thickness, self.args.font_size)

    def annotate(self, hint: str, source: Optional[Path], pixels: torch.Tensor, boxes: torch.Tensor,
                 labels: torch.Tensor) -> None:
        """Hand one image's detections to the ``--save-voc``/``--save-yolo`` writers."""
        for writer in self.writers:
            writer.add(hint, source, pixels, boxes, labels)


def make_writers(args: argparse.Namespace, class_names: list[str]) -> list[AnnotationWriter]:
    """The annotation writers the flags ask for."""
    writers: list[AnnotationWriter] = []
    if args.save_voc:
        writers.append(VocWriter(Path(args.save_voc), class_names, args.save_split, args.overwrite_labels))
    if args.save_yolo:
        writers.append(YoloWriter(Path(args.save_yolo), class_names, args.save_split, args.overwrite_labels))
    return writers
