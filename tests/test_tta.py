"""Test-time augmentation (train_utils/inference/tta.py): passes mapped back to the image exactly,
a symmetric image gives the plain detections, the merges against hand and torchvision results, the
wrapper in validation.py and predict.py."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torchvision
from torch import Tensor, nn

from network_files.transform import GeneralizedRCNNTransform
from train_utils.inference.predict import predict, predict_parser
from train_utils.inference.tta import TTADetector, weighted_box_fusion

ROOT = Path(__file__).resolve().parents[1]


class ControlledDetector(nn.Module):
    """A detector whose outputs are known: the real resize and post-processing of FasterRCNN around
    ``find(resized_image) -> (boxes, labels, scores)`` in resized pixels. Records the transform's
    sizes of every call."""

    def __init__(self, find, min_size: int = 96, max_size: int = 200) -> None:
        super().__init__()
        self.transform = GeneralizedRCNNTransform(min_size, max_size, [0.0, 0.0, 0.0], [1.0, 1.0, 1.0])
        self.roi_heads = SimpleNamespace(nms_thresh=0.5, detections_per_img=100)
        self.find = find
        self.calls: list[tuple] = []

    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        self.calls.append((self.transform.min_size, self.transform.max_size))
        originals = [tuple(image.shape[-2:]) for image in images]
        batch, _ = self.transform(images)
        detections = []
        for tensor, (height, width) in zip(batch.tensors, batch.image_sizes):
            boxes, labels, scores = self.find(tensor[:, :height, :width])
            detections.append({"boxes": boxes, "labels": labels, "scores": scores})
        return self.transform.postprocess(detections, batch.image_sizes, originals)


def bright_blobs(image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Boxes (pixel edges) of the runs of columns holding pixels brighter than 0.5 in channel 0;
    label 2 where channel 1 is bright too, else 1; score: the bright share of the box."""
    mask = image[0] > 0.5
    columns = mask.any(0).tolist() + [False]
    boxes, labels, scores = [], [], []
    start = None
    for x, on in enumerate(columns):
        if on and start is None:
            start = x
        elif not on and start is not None:
            rows = torch.where(mask[:, start:x].any(1))[0]
            y0, y1 = int(rows[0]), int(rows[-1]) + 1
            boxes.append([start, y0, x, y1])
            labels.append(2 if float(image[1, y0:y1, start:x].mean()) > 0.5 else 1)
            scores.append(float(mask[y0:y1, start:x].float().mean()))
            start = None
    return (torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(labels, dtype=torch.int64),
            torch.tensor(scores))


def symmetric_image() -> Tensor:
    """120 x 160, left-right symmetric: two mirrored rectangles and a centred one (label 2)."""
    image = torch.zeros(3, 120, 160)
    image[0, 30:70, 20:50] = 1.0
    image[0, 30:70, 110:140] = 1.0
    image[:2, 80:100, 70:90] = 1.0
    assert torch.equal(image, image.flip(-1))
    return image


def match(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    """Largest box coordinate difference between detections of equal labels, paired by order of x1."""
    order_a, order_b = a["boxes"][:, 0].argsort(), b["boxes"][:, 0].argsort()
    assert a["labels"][order_a].tolist() == b["labels"][order_b].tolist()
    return float((a["boxes"][order_a] - b["boxes"][order_b]).abs().max())


@pytest.mark.parametrize("merge", ["nms", "wbf"])
def test_symmetric_image_gives_the_plain_detections_within_a_pixel(merge):
    model = ControlledDetector(bright_blobs).eval()
    image = symmetric_image()
    plain = model([image])[0]
    assert plain["labels"].tolist() == [1, 2, 1]
    tta = TTADetector(model, (0.8, 1.0, 1.2), True, merge, 0.55, 100)
    merged = tta([image])[0]
    assert len(merged["boxes"]) == 3
    assert match(merged, plain) <= 1.0
    # Every scale ran mirrored and not, with the scaled sizes; the model's own sizes are back.
    assert model.calls[1:] == [((77,), 160)] * 2 + [((96,), 200)] * 2 + [((115,), 240)] * 2
    assert (model.transform.min_size, model.transform.max_size) == ((96,), 200)


def test_every_pass_maps_back_to_the_image_exactly():
    """A box at fixed fractions of the resized image comes back at the same fractions of the
    original in every pass; the mirrored passes' boxes are mirrored back."""

    def fixed_box(image: Tensor):
        height, width = image.shape[-2:]
        box = torch.tensor([[0.1 * width, 0.2 * height, 0.5 * width, 0.6 * height]])
        return box, torch.tensor([1]), torch.tensor([0.9])

    model = ControlledDetector(fixed_box).eval()
    # IoU above 1 never happens: every pass's box stays its own cluster.
    out = TTADetector(model, (0.7, 1.0, 1.3), True, "wbf", 1.0, 100)([torch.zeros(3, 90, 150)])[0]
    direct = torch.tensor([0.1 * 150, 0.2 * 90, 0.5 * 150, 0.6 * 90])
    mirrored = torch.tensor([150 - 0.5 * 150, 0.2 * 90, 150 - 0.1 * 150, 0.6 * 90])
    # Passes in order: scale 0.7 plain, mirrored, 1.0 plain, mirrored, 1.3 ...; equal scores keep that order.
    torch.testing.assert_close(out["boxes"], torch.stack([direct, mirrored] * 3), rtol=0, atol=1e-4)
    torch.testing.assert_close(out["scores"], torch.full((6,), 0.9 / 6))


def test_wbf_hand_computed():
    boxes = torch.tensor([[0, 0, 10, 10], [100, 100, 110, 110], [0, 0, 10, 10],  # pass 1
                          [1, 1, 11, 11], [0, 0, 10, 10]], dtype=torch.float64)  # pass 2
    scores = torch.tensor([0.9, 0.5, 0.6, 0.6, 0.3], dtype=torch.float64)
    labels = torch.tensor([1, 1, 2, 1, 1])
    fused = weighted_box_fusion(boxes, scores, labels, 0.55, num_passes=2)
    # By score: 0.9 starts A; 0.6 (label 2) starts B; 0.6 [1,1,11,11] joins A (IoU 81/119 = 0.68);
    # 0.5 starts C; 0.3 joins A (IoU with A's fused box [0.4, 0.4, 10.4, 10.4]: 92.16/107.84).
    a = (0.9 * torch.tensor([0, 0, 10, 10.]) + 0.6 * torch.tensor([1, 1, 11, 11.]) + 0.3 * torch.tensor([0, 0, 10, 10.])) / 1.8
    torch.testing.assert_close(fused["boxes"], torch.stack([a.double(), boxes[2], boxes[1]]))
    assert fused["labels"].tolist() == [1, 2, 1]
    # A: mean 0.6 of 3 members, min(3, 2) / 2 = 1; B and C: one member of 2 passes.
    assert fused["scores"].tolist() == pytest.approx([0.6, 0.3, 0.25])


def test_wbf_threshold_is_strict():
    # IoU of the two boxes is exactly 0.5.
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 5.0]])
    labels = torch.tensor([1, 1])
    assert len(weighted_box_fusion(boxes, torch.tensor([0.8, 0.4]), labels, 0.5, 2)["boxes"]) == 2
    assert len(weighted_box_fusion(boxes, torch.tensor([0.8, 0.4]), labels, 0.49, 2)["boxes"]) == 1


def test_nms_merge_equals_torchvision_batched_nms_on_all_passes():
    generator = torch.Generator().manual_seed(0)
    raw: list[dict] = []

    def random_boxes(image: Tensor):
        height, width = image.shape[-2:]
        corner = torch.rand(30, 2, generator=generator) * torch.tensor([width * 0.7, height * 0.7])
        size = torch.rand(30, 2, generator=generator) * 20 + 5
        boxes = torch.cat([corner, corner + size], 1)
        labels, scores = torch.randint(1, 4, (30,), generator=generator), torch.rand(30, generator=generator)
        raw.append({"size": (height, width), "boxes": boxes, "labels": labels, "scores": scores})
        return boxes, labels, scores

    model = ControlledDetector(random_boxes, min_size=60, max_size=100).eval()
    image = torch.zeros(3, 60, 80)
    out = TTADetector(model, (1.0, 1.25), True, "nms", 0.5, 40)([image])[0]
    # Independently: each pass's boxes scaled back by the resize ratios, mirrored ones mirrored back.
    passes = []
    for index, found in enumerate(raw):
        height, width = found["size"]
        boxes = found["boxes"] * torch.tensor([80 / width, 60 / height] * 2)
        if index % 2:
            boxes = torch.stack([80 - boxes[:, 2], boxes[:, 1], 80 - boxes[:, 0], boxes[:, 3]], 1)
        passes.append(boxes)
    boxes, scores, labels = torch.cat(passes), torch.cat([f["scores"] for f in raw]), torch.cat([f["labels"] for f in raw])
    keep = torchvision.ops.batched_nms(boxes, scores, labels, 0.5)[:40]
    assert len(keep) == 40
    torch.testing.assert_close(out["boxes"], boxes[keep], rtol=0, atol=1e-4)
    assert torch.equal(out["scores"], scores[keep]) and torch.equal(out["labels"], labels[keep])


@pytest.mark.parametrize("merge", ["nms", "wbf"])
def test_one_plain_pass_is_the_detector(tiny_detector, merge):
    """Scale 1 without the mirror: the detector's own detections (its NMS left no pair to merge)."""
    torch.manual_seed(0)
    model = tiny_detector(box_score_thresh=0.0).eval()
    images = [torch.rand(3, 80, 80), torch.rand(3, 70, 90)]
    with torch.no_grad():
        plain = model(images)
        merged = TTADetector(model, (1.0,), False, merge, 0.5 if merge == "nms" else 0.55, 100)(images)
    for a, b in zip(plain, merged):
        assert len(a["boxes"]) > 5
        torch.testing.assert_close(b["boxes"], a["boxes"], rtol=0, atol=1e-4)
        torch.testing.assert_close(b["scores"], a["scores"])
        assert torch.equal(b["labels"], a["labels"])


def test_a_batch_gives_each_image_alone(tiny_detector):
    torch.manual_seed(0)
    tta = TTADetector(tiny_detector(box_score_thresh=0.0).eval(), (0.9, 1.1), True, "wbf", 0.55, 50)
    images = [torch.rand(3, 80, 80), torch.rand(3, 80, 80)]
    with torch.no_grad():
        together = tta(images)
        alone = [tta([image])[0] for image in images]
    for a, b in zip(together, alone):
        torch.testing.assert_close(a["boxes"], b["boxes"], rtol=0, atol=1e-3)
        torch.testing.assert_close(a["scores"], b["scores"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("argv, message", [
    (["--tta", "--tta-scales", "0,1"], "--tta-scales needs positive factors"),
    (["--tta", "--tta-iou-thresh", "1.5"], r"--tta-iou-thresh must lie in \[0, 1\]"),
    (["--tta", "--onnx", "model.onnx"], "--tta needs --weights: model.onnx"),
])
def test_predict_rejects_bad_tta_flags(argv, message, tmp_path):
    argv = argv if "--onnx" in argv else [*argv, "--weights", "w.pth"]
    args = predict_parser("test").parse_args([str(tmp_path), *argv])
    with pytest.raises(ValueError, match=message):
        predict(args)


def test_validation_and_predict_with_tta(trained_run, demo_voc, tmp_path):
    """validation.py --tta records what ran; predict.py --tta writes its detections."""
    weights = str(trained_run / "best.pth")
    record = tmp_path / "record.txt"
    subprocess.run([sys.executable, str(ROOT / "validation.py"), "--weights", weights, "--output", str(record),
                    "--workers", "0", "--batch-size", "2", "--tta", "--tta-scales", "0.9,1.1", "--tta-merge", "nms",
                    "--box-nms", "soft-gaussian"], cwd=ROOT, check=True, capture_output=True)
    result = json.loads(record.with_suffix(".json").read_text())
    assert result["tta"] == {"scales": [0.9, 1.1], "flip": True, "merge": "nms", "iou_thresh": 0.5, "passes": 4}
    assert result["box_nms"] == "soft-gaussian" and math.isfinite(result["coco_map50"])
    image = sorted((demo_voc / "VOCdevkit" / "VOC2012" / "JPEGImages").iterdir())[0]
    out = tmp_path / "pred"
    subprocess.run([sys.executable, str(ROOT / "predict.py"), "--weights", weights, str(image), "--tta",
                    "--output-dir", str(out), "--save-json", "--score-thresh", "0"], cwd=ROOT, check=True,
                   capture_output=True)
    assert json.loads((out / "predictions.json").read_text())
