"""Bad inputs fail early with the right exception type and a message naming the culprit."""
import re

import pytest
import torch
from torch import nn

from network_files import AnchorsGenerator, FasterRCNN, FastRCNNPredictor, ImageList
from network_files.det_utils import Matcher


@pytest.fixture(scope="module")
def images():
    generator = torch.Generator().manual_seed(0)
    return [torch.rand(3, 64, 80, generator=generator), torch.rand(3, 72, 64, generator=generator)]


@pytest.fixture
def model(tiny_detector):
    torch.manual_seed(0)
    return tiny_detector().train()


def valid_targets():
    return [
        {"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[1.0, 2.0, 30.0, 20.0], [10.0, 5.0, 60.0, 70.0]]), "labels": torch.tensor([2, 1])},
    ]


def test_valid_inputs_train(model, images):
    # The reference point for every case below: the same call with good targets works.
    losses = model(images, valid_targets())
    assert all(torch.isfinite(value) for value in losses.values())


def test_training_without_targets(model, images):
    with pytest.raises(ValueError, match="targets are required in training mode"):
        model(images)


@pytest.mark.parametrize(
    "boxes, shown",
    [
        (torch.tensor([1.0, 2.0, 3.0, 4.0]), "[4]"),
        (torch.tensor([[1.0, 2.0, 30.0, 20.0, 0.5], [10.0, 5.0, 60.0, 70.0, 0.5]]), "[2, 5]"),
    ],
    ids=["1d", "five_columns"],
)
def test_boxes_of_wrong_shape(model, images, boxes, shown):
    targets = valid_targets()
    targets[1]["boxes"] = boxes
    with pytest.raises(ValueError, match=re.escape(f"target 1: 'boxes' must have shape [N, 4], got {shown}")):
        model(images, targets)


def test_boxes_given_as_a_list(model, images):
    targets = valid_targets()
    targets[0]["boxes"] = [[4.0, 6.0, 40.0, 50.0]]
    with pytest.raises(ValueError, match=re.escape("target 0: 'boxes' must be a Tensor of shape [N, 4], got list")):
        model(images, targets)


def test_missing_labels(model, images):
    targets = valid_targets()
    del targets[1]["labels"]
    with pytest.raises(ValueError, match="target 1: 'labels' is missing"):
        model(images, targets)


@pytest.mark.parametrize(
    "box, shown",
    [
        ([30.0, 2.0, 30.0, 20.0], "[30.0, 2.0, 30.0, 20.0]"),  # x2 == x1
        ([30.0, 2.0, 10.0, 20.0], "[30.0, 2.0, 10.0, 20.0]"),  # x2 < x1
        ([1.0, 20.0, 30.0, 20.0], "[1.0, 20.0, 30.0, 20.0]"),  # y2 == y1
        ([1.0, 25.0, 30.0, 5.0], "[1.0, 25.0, 30.0, 5.0]"),  # y2 < y1
    ],
    ids=["zero_width", "negative_width", "zero_height", "negative_height"],
)
def test_degenerate_box_names_image_and_box(model, images, box, shown):
    targets = valid_targets()
    targets[1]["boxes"] = torch.tensor([[10.0, 5.0, 60.0, 70.0], box])
    with pytest.raises(ValueError, match=re.escape(f"target 1: box 1 {shown} has no area")):
        model(images, targets)


def test_uint8_image(model, images):
    as_bytes = [images[0], (images[1] * 255).to(torch.uint8)]
    with pytest.raises(TypeError, match="torch.uint8"):
        model(as_bytes, valid_targets())
    with pytest.raises(TypeError, match="torch.uint8"):
        model.eval()(as_bytes)


@pytest.mark.parametrize("dtype", [torch.int32, torch.float32])
def test_labels_of_wrong_dtype(model, images, dtype):
    targets = valid_targets()
    targets[0]["labels"] = targets[0]["labels"].to(dtype)
    with pytest.raises(TypeError, match=re.escape(f"target 0: labels must be int64, got {dtype}")):
        model(images, targets)


@pytest.mark.parametrize("shape", [(1, 3, 64, 80), (64, 80)], ids=["batched_4d", "2d"])
def test_image_of_wrong_dim(model, images, shape):
    bad = [images[0], torch.rand(shape)]
    message = re.escape(f"image 1: expected a [C, H, W] tensor, got shape {shape}")
    with pytest.raises(ValueError, match=message):
        model(bad, valid_targets())
    with pytest.raises(ValueError, match=message):
        model.eval()(bad)


# --- constructor and building-block errors ------------------------------------------------------


def test_detector_constructor_errors(tiny_detector):
    with pytest.raises(ValueError, match="out_channels"):
        FasterRCNN(nn.Sequential(nn.Conv2d(3, 8, 3)), num_classes=3)
    with pytest.raises(ValueError, match="either num_classes or box_predictor"):
        tiny_detector(box_predictor=FastRCNNPredictor(1024, 3))
    with pytest.raises(ValueError, match="num_classes is required"):
        tiny_detector(num_classes=None)


def test_anchor_generator_needs_one_size_group_per_feature_map():
    with pytest.raises(ValueError, match="2 anchor size groups but 3 aspect ratio groups"):
        AnchorsGenerator(((32,), (64,)), ((1.0,), (1.0,), (1.0,)))
    generator = AnchorsGenerator(((32,), (64,)), ((1.0,), (1.0,)))
    image_list = ImageList(torch.zeros(1, 3, 32, 32), [(32, 32)])
    with pytest.raises(ValueError, match="has 2 size groups but the backbone returned 1 feature maps"):
        generator(image_list, [torch.zeros(1, 4, 2, 2)])


def test_matcher_errors():
    with pytest.raises(ValueError, match="low_threshold"):
        Matcher(0.3, 0.7)
    matcher = Matcher(0.7, 0.3)
    with pytest.raises(ValueError, match="No ground-truth boxes"):
        matcher(torch.zeros(0, 5))
    with pytest.raises(ValueError, match="No proposal boxes"):
        matcher(torch.zeros(2, 0))


def test_predictor_rejects_spatial_features():
    with pytest.raises(ValueError, match=re.escape("[R, C, 1, 1] or [R, C], got [2, 16, 7, 7]")):
        FastRCNNPredictor(16 * 49, 3)(torch.zeros(2, 16, 7, 7))
