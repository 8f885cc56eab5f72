"""Soft-NMS (network_files/ops/soft_nms.py) against a brute-force pure-Python reference, in the
detector's final step, and as a model setting (schema, flags, old checkpoints)."""
from __future__ import annotations

import argparse
import math
import random

import pytest
import torch
import torchvision

from network_files.ops.soft_nms import batched_soft_nms
from train_utils.cli import add_model_arguments, add_model_flags, apply_model_flags
from train_utils.model.config import ModelConfig


def py_iou(a: list[float], b: list[float]) -> float:
    """IoU of two xyxy boxes given as lists of floats."""
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def py_soft_nms(boxes: list, scores: list, labels: list, method: str, thresh: float, sigma: float,
                min_score: float) -> tuple[list[int], list[float]]:
    """Bodla et al.'s loop, written plainly: keep the highest score (lowest index on ties), decay the
    scores of the same class, drop those below ``min_score``."""
    scores = list(scores)
    alive = [s >= min_score for s in scores]
    keep = []
    while any(alive):
        best = max((i for i in range(len(scores)) if alive[i]), key=lambda i: (scores[i], -i))
        keep.append(best)
        alive[best] = False
        for j in range(len(scores)):
            if alive[j] and labels[j] == labels[best]:
                overlap = py_iou(boxes[best], boxes[j])
                if method == "linear":
                    weight = 1.0 - overlap if overlap > thresh else 1.0
                else:
                    weight = math.exp(-overlap * overlap / sigma)
                scores[j] *= weight
                alive[j] = scores[j] >= min_score
    return keep, [scores[k] for k in keep]


def random_case(seed: int, count: int, classes: int, tie_scores: bool) -> tuple[list, list, list]:
    """Boxes around a few centres (so they overlap), random classes; ``tie_scores``: one decimal
    scores, many exactly equal."""
    rng = random.Random(seed)
    centres = [(rng.uniform(20, 80), rng.uniform(20, 80)) for _ in range(3)]
    boxes, scores, labels = [], [], []
    for _ in range(count):
        cx, cy = rng.choice(centres)
        cx, cy = cx + rng.uniform(-6, 6), cy + rng.uniform(-6, 6)
        w, h = rng.uniform(8, 30), rng.uniform(8, 30)
        boxes.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
        scores.append(round(rng.uniform(0.05, 1.0), 1) if tie_scores else rng.uniform(0.0, 1.0))
        labels.append(rng.randrange(classes))
    return boxes, scores, labels


def run_op(boxes, scores, labels, method, thresh=0.3, sigma=0.5, min_score=1e-3, dtype=torch.float64, max_kept=-1):
    keep, kept_scores = batched_soft_nms(torch.tensor(boxes, dtype=dtype).reshape(-1, 4),
                                         torch.tensor(scores, dtype=dtype), torch.tensor(labels, dtype=torch.int64),
                                         method, thresh, sigma, min_score, max_kept)
    return keep.tolist(), kept_scores.tolist()


@pytest.mark.parametrize("method", ["linear", "gaussian"])
@pytest.mark.parametrize("seed, tie_scores", [(0, False), (1, False), (2, True), (3, True)])
def test_equals_python_reference_on_random_boxes(method, seed, tie_scores):
    boxes, scores, labels = random_case(seed, 60, 3, tie_scores)
    keep, kept = run_op(boxes, scores, labels, method, thresh=0.3, sigma=0.5, min_score=0.05)
    ref_keep, ref_kept = py_soft_nms(boxes, scores, labels, method, 0.3, 0.5, 0.05)
    assert keep == ref_keep
    assert kept == pytest.approx(ref_kept, abs=1e-12)
    assert 0 < len(keep) < 60  # the case exercises both keeping and dropping


@pytest.mark.parametrize("method", ["linear", "gaussian"])
def test_float32_follows_the_reference(method):
    boxes, scores, labels = random_case(7, 80, 2, tie_scores=False)
    keep, kept = run_op(boxes, scores, labels, method, dtype=torch.float32)
    ref_keep, ref_kept = py_soft_nms(boxes, scores, labels, method, 0.3, 0.5, 1e-3)
    assert keep == ref_keep
    assert kept == pytest.approx(ref_kept, abs=1e-5)


def test_identical_boxes_by_hand():
    """IoU 1: the linear rule zeroes the copy (dropped), the gaussian scales it by exp(-1/sigma)."""
    boxes = [[0.0, 0.0, 10.0, 10.0]] * 3
    scores, labels = [0.9, 0.8, 0.8], [1, 1, 1]
    assert run_op(boxes, scores, labels, "linear") == ([0], [0.9])
    keep, kept = run_op(boxes, scores, labels, "gaussian", sigma=0.5)
    assert keep == [0, 1, 2]  # the tie of the two copies goes to the lower index
    assert kept == pytest.approx([0.9, 0.8 * math.exp(-2), 0.8 * math.exp(-2) ** 2], abs=1e-12)


def test_linear_threshold_is_strict_and_decays_by_one_minus_iou():
    # IoU of [0, 0, 10, 10] and [5, 0, 15, 10] is 50 / 150 = 1/3.
    boxes, scores, labels = [[0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0]], [0.9, 0.6], [0, 0]
    assert run_op(boxes, scores, labels, "linear", thresh=0.4)[1] == pytest.approx([0.9, 0.6])
    assert run_op(boxes, scores, labels, "linear", thresh=0.3)[1] == pytest.approx([0.9, 0.6 * 2 / 3])


def test_classes_are_separate():
    """Identical boxes of different classes keep their scores; the same boxes in one class do not."""
    boxes = [[0.0, 0.0, 10.0, 10.0]] * 2
    assert run_op(boxes, [0.9, 0.7], [1, 2], "gaussian") == ([0, 1], pytest.approx([0.9, 0.7]))
    assert run_op(boxes, [0.9, 0.7], [1, 1], "gaussian")[1] == pytest.approx([0.9, 0.7 * math.exp(-2)])


def test_empty_one_box_and_below_min_score():
    assert run_op([], [], [], "linear") == ([], [])
    assert run_op([[1.0, 2.0, 3.0, 4.0]], [0.5], [3], "gaussian") == ([0], [0.5])
    assert run_op([[1.0, 2.0, 3.0, 4.0]], [0.0005], [3], "gaussian") == ([], [])


def test_max_kept_is_the_prefix_of_the_full_run():
    boxes, scores, labels = random_case(11, 50, 2, tie_scores=False)
    full = run_op(boxes, scores, labels, "gaussian")
    assert run_op(boxes, scores, labels, "gaussian", max_kept=5) == (full[0][:5], full[1][:5])
    assert all(a >= b for a, b in zip(full[1], full[1][1:]))  # non-increasing


def test_unknown_method_is_an_error():
    with pytest.raises(ValueError, match="soft-NMS method.*'box'"):
        run_op([[0.0, 0.0, 1.0, 1.0]], [0.5], [1], "box")


# ---------------------------------------------------------------------------------- in the detector
def _final_step_inputs(model, image):
    """(boxes, scores, labels) of the first image as they enter the final NMS, and the model's output."""
    seen = []
    original = model.roi_heads.final_nms

    def capture(boxes, scores, labels):
        seen.append((boxes.clone(), scores.clone(), labels.clone()))
        return original(boxes, scores, labels)

    model.roi_heads.final_nms = capture
    with torch.no_grad():
        output = model([image])[0]
    return seen[0], output


def test_hard_final_step_is_torchvision_batched_nms(tiny_detector):
    torch.manual_seed(0)
    model = tiny_detector(box_score_thresh=0.0, box_detections_per_img=20).eval()
    (boxes, scores, labels), output = _final_step_inputs(model, torch.rand(3, 80, 80))
    keep = torchvision.ops.batched_nms(boxes, scores, labels, 0.5)[:20]
    assert len(keep) > 1
    ratio = 80 / 64  # the output is mapped back from the 64-pixel square to the 80-pixel image
    torch.testing.assert_close(output["boxes"], boxes[keep] * ratio, rtol=0, atol=1e-4)
    torch.testing.assert_close(output["scores"], scores[keep], rtol=0, atol=0)


@pytest.mark.parametrize("method", ["soft-linear", "soft-gaussian"])
def test_detector_final_step_equals_reference(tiny_detector, method):
    torch.manual_seed(0)
    model = tiny_detector(box_score_thresh=0.0, box_detections_per_img=15, box_nms=method,
                          box_soft_nms_sigma=0.4, box_soft_nms_min_score=0.01).eval()
    (boxes, scores, labels), output = _final_step_inputs(model, torch.rand(3, 80, 80))
    ref_keep, ref_scores = py_soft_nms(boxes.tolist(), scores.tolist(), labels.tolist(), method[5:], 0.5, 0.4, 0.01)
    assert len(ref_keep) > 15  # the cap applies
    torch.testing.assert_close(output["labels"], labels[ref_keep[:15]])
    torch.testing.assert_close(output["scores"], torch.tensor(ref_scores[:15]), rtol=0, atol=1e-6)
    torch.testing.assert_close(output["boxes"], boxes[ref_keep[:15]] * 80 / 64, rtol=0, atol=1e-4)


def test_soft_nms_runs_inside_an_allowed_sync(tiny_detector, monkeypatch):
    """Soft-NMS reads the best remaining box at every step: the detector marks the call as an
    allowed sync (so CUDA's sync debug mode accepts it), with its reason."""
    from contextlib import contextmanager

    from network_files import roi_head

    reasons, open_reasons, calls = [], [], []

    @contextmanager
    def recording(reason):
        reasons.append(reason)
        open_reasons.append(reason)
        yield
        open_reasons.pop()

    def soft_nms_spy(*args, **kwargs):
        calls.append(list(open_reasons))
        return batched_soft_nms(*args, **kwargs)

    monkeypatch.setattr(roi_head, "allowed_sync", recording)
    monkeypatch.setattr(roi_head, "batched_soft_nms", soft_nms_spy)
    torch.manual_seed(0)
    model = tiny_detector(box_score_thresh=0.0, box_nms="soft-gaussian").eval()
    with torch.no_grad():
        model([torch.rand(3, 80, 80)])
    soft_reason = "soft-NMS is sequential: each step reads the best remaining box"
    assert calls == [[soft_reason]]
    assert soft_reason in reasons


# ---------------------------------------------------------------------------------- as a model setting
def test_old_checkpoint_config_loads_with_hard_nms():
    stored = ModelConfig(num_classes=3).to_dict()
    for key in ("box_nms", "box_soft_nms_sigma", "box_soft_nms_min_score"):
        del stored[key]
    config = ModelConfig.from_dict(stored)
    assert (config.box_nms, config.box_soft_nms_sigma, config.box_soft_nms_min_score) == ("hard", 0.5, 1e-3)


def test_inference_flags_override_the_stored_nms():
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    stored = ModelConfig(num_classes=3, box_nms="soft-linear")
    args = parser.parse_args(["--box-nms", "soft-gaussian", "--box-soft-nms-sigma", "0.3"])
    assert apply_model_flags(stored, args, "ckpt.pth") == stored.replace(box_nms="soft-gaussian",
                                                                        box_soft_nms_sigma=0.3)
    assert apply_model_flags(stored, parser.parse_args([]), "ckpt.pth").box_nms == "soft-linear"


def test_training_flags_and_errors():
    parser = argparse.ArgumentParser()
    add_model_flags(parser, training=True)
    assert parser.parse_args([]).box_nms == "hard"
    assert parser.parse_args(["--box-nms", "soft-linear"]).box_nms == "soft-linear"
    with pytest.raises(ValueError, match="--box-soft-nms-sigma must be positive, got 0"):
        ModelConfig(num_classes=3, box_soft_nms_sigma=0)
    with pytest.raises(ValueError, match="--box-soft-nms-min-score must lie in"):
        ModelConfig(num_classes=3, box_soft_nms_min_score=1.0)
    with pytest.raises(ValueError, match="--box-nms: unknown method 'soft'"):
        ModelConfig(num_classes=3, box_nms="soft")


def test_onnx_export_refuses_soft_nms(tiny_detector, tmp_path):
    from train_utils.inference.onnx_export import export_onnx

    model = tiny_detector(box_nms="soft-gaussian").eval()
    with pytest.raises(ValueError, match="--box-nms soft-gaussian cannot be exported to ONNX"):
        export_onnx(model, tmp_path / "model.onnx", {})
    assert not (tmp_path / "model.onnx").exists()
