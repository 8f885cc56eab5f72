"""Building blocks of the detector checked against values worked out by hand."""
import copy
import math

import pytest
import torch
from torch import Tensor

from network_files import AnchorsGenerator, GeneralizedRCNNTransform, ImageList, fastrcnn_loss
from network_files.ops import boxes as box_ops
from network_files.det_utils import BalancedPositiveNegativeSampler, BoxCoder, Matcher

MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


# --- anchors -------------------------------------------------------------------------------------


def test_cell_anchors_are_ratio_major_and_rounded():
    # ratio = h / w at area size**2: w = size / sqrt(r), h = size * sqrt(r); half sides rounded.
    # r=0.5: (w, h) = (22.63, 11.31) for 16 and (45.25, 22.63) for 32; r=2 swaps w and h.
    generator = AnchorsGenerator(((16, 32),), ((0.5, 2.0),))
    expected = torch.tensor(
        [
            [-11.0, -6.0, 11.0, 6.0],
            [-23.0, -11.0, 23.0, 11.0],
            [-6.0, -11.0, 6.0, 11.0],
            [-11.0, -23.0, 11.0, 23.0],
        ]
    )
    assert generator.num_anchors_per_location() == [4]
    assert torch.equal(generator.cell_anchors[0], expected)


def _two_level_inputs(dtype: torch.dtype = torch.float32):
    """A padded 32x32 batch of two images; level 0 is a 2x2 map (stride 16), level 1 a 1x2 map
    (stride 32 down, 16 across)."""
    image_list = ImageList(torch.zeros(2, 3, 32, 32, dtype=dtype), [(32, 30), (25, 32)])
    features = [torch.zeros(2, 4, 2, 2, dtype=dtype), torch.zeros(2, 4, 1, 2, dtype=dtype)]
    return image_list, features


# Level 0: size 32, ratios (0.5, 1, 2) -> cell boxes (-23, -11, 23, 11), (-16, -16, 16, 16),
# (-11, -23, 11, 23), shifted over positions (x, y) = (0, 0), (16, 0), (0, 16), (16, 16).
# Level 1: size 64, ratio 1 -> (-32, -32, 32, 32) at (x, y) = (0, 0), (16, 0).
EXPECTED_ANCHORS = torch.tensor(
    [
        [-23.0, -11.0, 23.0, 11.0],
        [-16.0, -16.0, 16.0, 16.0],
        [-11.0, -23.0, 11.0, 23.0],
        [-7.0, -11.0, 39.0, 11.0],
        [0.0, -16.0, 32.0, 16.0],
        [5.0, -23.0, 27.0, 23.0],
        [-23.0, 5.0, 23.0, 27.0],
        [-16.0, 0.0, 16.0, 32.0],
        [-11.0, -7.0, 11.0, 39.0],
        [-7.0, 5.0, 39.0, 27.0],
        [0.0, 0.0, 32.0, 32.0],
        [5.0, -7.0, 27.0, 39.0],
        [-32.0, -32.0, 32.0, 32.0],
        [-16.0, -32.0, 48.0, 32.0],
    ]
)


def test_anchor_grid_by_hand():
    generator = AnchorsGenerator(((32,), (64,)), ((0.5, 1.0, 2.0), (1.0,)))
    image_list, features = _two_level_inputs()
    anchors = generator(image_list, features)
    assert len(anchors) == 2
    for per_image in anchors:
        assert per_image.dtype == torch.float32
        assert torch.equal(per_image, EXPECTED_ANCHORS)


def test_anchor_cache_returns_equal_anchors():
    generator = AnchorsGenerator(((32,), (64,)), ((0.5, 1.0, 2.0), (1.0,)))
    image_list, features = _two_level_inputs()
    first = generator(image_list, features)
    again = generator(image_list, features)
    assert all(torch.equal(a, EXPECTED_ANCHORS) for a in again)

    # Another padded size gives other anchors, and the first size still gives the first ones.
    bigger = ImageList(torch.zeros(1, 3, 64, 64), [(64, 64)])
    other = generator(bigger, [torch.zeros(1, 4, 4, 4), torch.zeros(1, 4, 2, 4)])
    assert other[0].shape == (4 * 4 * 3 + 2 * 4, 4)
    back = generator(image_list, features)
    assert len(back) == 2 and all(torch.equal(a, EXPECTED_ANCHORS) for a in back)
    assert all(torch.equal(a, b) for a, b in zip(first, back))

    # Anchors follow the feature maps' dtype.
    image_list64, features64 = _two_level_inputs(torch.float64)
    anchors64 = generator(image_list64, features64)
    assert anchors64[0].dtype == torch.float64
    assert torch.equal(anchors64[0], EXPECTED_ANCHORS.double())


# --- box coder ----------------------------------------------------------------------------------


def test_box_encoding_by_hand():
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    anchors = torch.tensor([[0.0, 0.0, 10.0, 20.0], [10.0, 10.0, 30.0, 20.0]])
    boxes = torch.tensor([[2.0, 4.0, 22.0, 24.0], [15.0, 5.0, 25.0, 35.0]])
    # Row 0: anchor centre (5, 10) size 10x20, box centre (12, 14) size 20x20.
    # Row 1: anchor centre (20, 15) size 20x10, box centre (20, 20) size 10x30.
    expected = torch.tensor(
        [
            [10 * 7 / 10, 10 * 4 / 20, 5 * math.log(2.0), 0.0],
            [0.0, 10 * 5 / 10, 5 * math.log(0.5), 5 * math.log(3.0)],
        ]
    )
    torch.testing.assert_close(coder.encode_single(boxes, anchors), expected, atol=1e-6, rtol=0)

    per_image = coder.encode([boxes[:1], boxes[1:]], [anchors[:1], anchors[1:]])
    assert len(per_image) == 2
    torch.testing.assert_close(torch.cat(per_image), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_box_coder_round_trip(weights):
    generator = torch.Generator().manual_seed(0)
    coder = BoxCoder(weights)

    def random_boxes(n: int) -> Tensor:
        corner = torch.rand(n, 2, generator=generator) * 200
        size = torch.rand(n, 2, generator=generator) * 100 + 1
        return torch.cat([corner, corner + size], dim=1)

    anchors, boxes = random_boxes(50), random_boxes(50)
    codes = coder.encode_single(boxes, anchors)
    torch.testing.assert_close(coder.decode_single(codes, anchors), boxes, atol=1e-3, rtol=0)

    # With K boxes per reference, decode returns [N, K, 4], each column decoded independently.
    other = random_boxes(50)
    stacked = torch.cat([codes, coder.encode_single(other, anchors)], dim=1)
    decoded = coder.decode(stacked, [anchors[:20], anchors[20:]])
    assert decoded.shape == (50, 2, 4)
    torch.testing.assert_close(decoded[:, 0], boxes, atol=1e-3, rtol=0)
    torch.testing.assert_close(decoded[:, 1], other, atol=1e-3, rtol=0)


def test_box_decoding_clamps_huge_size_offsets():
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    anchor = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    # dw = 100 is clamped to log(1000 / 16): width 10 * 62.5 = 625 around centre x = 5.
    decoded = coder.decode_single(torch.tensor([[0.0, 0.0, 100.0, 0.0]]), anchor)
    torch.testing.assert_close(decoded, torch.tensor([[-307.5, 0.0, 317.5, 10.0]]), atol=1e-3, rtol=0)


# --- matcher ------------------------------------------------------------------------------------

# 4 ground-truth boxes (rows) x 7 predictions (columns), thresholds 0.3 / 0.7.
IOU = torch.tensor(
    [
        [0.90, 0.10, 0.20, 0.00, 0.50, 0.00, 0.10],
        [0.10, 0.40, 0.40, 0.00, 0.60, 0.00, 0.00],
        [0.00, 0.20, 0.10, 0.25, 0.00, 0.25, 0.05],
        [0.00, 0.35, 0.00, 0.00, 0.00, 0.00, 0.00],
    ]
)


def test_matcher_thresholds():
    # Best per column: 0.9 (gt 0), 0.4, 0.4 (between), 0.25 (below), 0.6 (between), 0.25, 0.1.
    matches = Matcher(0.7, 0.3, allow_low_quality_matches=False)(IOU.clone())
    assert matches.tolist() == [0, -2, -2, -1, -2, -1, -1]
    assert matches.dtype == torch.int64


def test_matcher_allows_low_quality_matches_with_ties():
    # gt 1's best prediction is 4 (0.6); gt 2's best is shared by predictions 3 and 5 (a tie,
    # both kept); gt 3's best is prediction 1, which gets back *its own* best gt (1), not 3.
    # Prediction 2 (between) and 6 (below) are nobody's best and keep their codes.
    matches = Matcher(0.7, 0.3, allow_low_quality_matches=True)(IOU.clone())
    assert matches.tolist() == [0, 1, -2, 2, 1, 2, -1]


# --- sampler ------------------------------------------------------------------------------------


def _labels(positives: int, negatives: int, ignored: int) -> Tensor:
    labels = torch.cat(
        [torch.full((positives,), 3), torch.zeros(negatives, dtype=torch.int64), torch.full((ignored,), -1)]
    )
    return labels[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(positives))]


@pytest.mark.parametrize(
    "positives, negatives, expected_pos, expected_neg",
    [
        (10, 20, 4, 12),  # positives capped at 16 * 0.25, negatives fill the batch
        (2, 20, 2, 14),  # fewer positives than the cap: more negatives
        (2, 3, 2, 3),  # not enough of either: take everything
        (0, 30, 0, 16),  # an image without objects
    ],
)
def test_sampler_counts(positives, negatives, expected_pos, expected_neg):
    sampler = BalancedPositiveNegativeSampler(batch_size_per_image=16, positive_fraction=0.25)
    labels = _labels(positives, negatives, ignored=5)
    torch.manual_seed(0)
    (pos,), (neg,) = sampler([labels])
    assert pos.dtype == neg.dtype == torch.uint8 and pos.shape == neg.shape == labels.shape
    assert int(pos.sum()) == expected_pos and int(neg.sum()) == expected_neg
    assert bool((labels[pos.bool()] >= 1).all()) and bool((labels[neg.bool()] == 0).all())
    assert not bool((pos.bool() & neg.bool()).any())
    assert not bool((pos.bool() | neg.bool())[labels == -1].any())


def test_sampler_is_random_but_seeded():
    sampler = BalancedPositiveNegativeSampler(batch_size_per_image=8, positive_fraction=0.5)
    labels = [_labels(30, 30, 0), _labels(12, 40, 3)]
    torch.manual_seed(1)
    first = sampler(labels)
    torch.manual_seed(1)
    second = sampler(labels)
    third = sampler(labels)
    assert all(torch.equal(a, b) for a, b in zip(first[0] + first[1], second[0] + second[1]))
    assert not all(torch.equal(a, b) for a, b in zip(first[0] + first[1], third[0] + third[1]))


# --- box helpers --------------------------------------------------------------------------------


def test_clip_boxes_to_image():
    boxes = torch.tensor([[-5.0, -3.0, 50.0, 40.0], [10.0, 20.0, 30.0, 60.0], [70.0, 80.0, 90.0, 100.0]])
    clipped = box_ops.clip_boxes_to_image(boxes, (50, 60))  # (height, width)
    expected = torch.tensor([[0.0, 0.0, 50.0, 40.0], [10.0, 20.0, 30.0, 50.0], [60.0, 50.0, 60.0, 50.0]])
    assert torch.equal(clipped, expected)
    # Works on [..., 4] too (per-class boxes).
    assert torch.equal(box_ops.clip_boxes_to_image(boxes[None], (50, 60)), expected[None])


def test_remove_small_boxes():
    boxes = torch.tensor(
        [[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.5, 2.0], [0.0, 0.0, 2.0, 0.99], [5.0, 5.0, 8.0, 8.0]]
    )
    assert box_ops.remove_small_boxes(boxes, 1.0).tolist() == [0, 3]


# --- loss ---------------------------------------------------------------------------------------


def test_fastrcnn_loss_by_hand():
    # Two RoIs, 3 classes: RoI 0 is class 2, RoI 1 background. Equal logits -> CE = log(3).
    class_logits = torch.zeros(2, 3)
    box_regression = torch.zeros(2, 12)
    box_regression[0, 8:12] = torch.tensor([0.05, -1.0, 0.0, 0.0])  # class 2's offsets
    box_regression[0, 4:8] = 7.0  # other classes' offsets are ignored
    targets = [torch.zeros(1, 4), torch.full((1, 4), 3.0)]  # background target is ignored
    cls_loss, box_loss = fastrcnn_loss(class_logits, box_regression, [torch.tensor([2]), torch.tensor([0])], targets)
    beta = 1 / 9
    # smooth L1: 0.5 x^2 / beta below beta, |x| - beta / 2 above; summed, then / 2 RoIs.
    expected_box = (0.5 * 0.05**2 / beta + (1.0 - 0.5 * beta)) / 2
    torch.testing.assert_close(cls_loss, torch.tensor(math.log(3.0)))
    torch.testing.assert_close(box_loss, torch.tensor(expected_box))


# --- transform ----------------------------------------------------------------------------------


def test_transform_resizes_pads_and_maps_back():
    transform = GeneralizedRCNNTransform(min_size=64, max_size=100, image_mean=MEAN, image_std=STD).eval()
    images = [torch.full((3, 100, 200), 0.5), torch.full((3, 60, 40), 0.25)]
    targets = [
        {"boxes": torch.tensor([[10.0, 20.0, 110.0, 80.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[4.0, 6.0, 20.0, 30.0]]), "labels": torch.tensor([2])},
    ]
    originals = copy.deepcopy(targets)
    image_list, resized_targets = transform(images, targets)

    # Image 0: scale min(64/100, 100/200) = 0.5 -> 50x100. Image 1: min(64/40, 100/60) = 1.6 -> 96x64.
    # The batch is padded to (96, 100) rounded up to multiples of 32.
    assert image_list.image_sizes == [(50, 100), (96, 64)]
    assert image_list.tensors.shape == (2, 3, 96, 128)
    for slot, value, (h, w) in zip(image_list.tensors, (0.5, 0.25), image_list.image_sizes):
        normalised = (value - torch.tensor(MEAN)) / torch.tensor(STD)
        torch.testing.assert_close(slot[:, :h, :w], normalised[:, None, None].expand(3, h, w))
        assert slot[:, h:, :].abs().sum() == 0 and slot[:, :, w:].abs().sum() == 0

    torch.testing.assert_close(resized_targets[0]["boxes"], torch.tensor([[5.0, 10.0, 55.0, 40.0]]))
    torch.testing.assert_close(resized_targets[1]["boxes"], torch.tensor([[6.4, 9.6, 32.0, 48.0]]))
    for target, original in zip(targets, originals):
        assert torch.equal(target["boxes"], original["boxes"]) and torch.equal(target["labels"], original["labels"])

    detections = [
        {"boxes": torch.tensor([[5.0, 10.0, 55.0, 40.0]]), "labels": torch.tensor([1]), "scores": torch.tensor([0.9])},
        {"boxes": torch.tensor([[8.0, 16.0, 32.0, 48.0]]), "labels": torch.tensor([2]), "scores": torch.tensor([0.8])},
    ]
    mapped = transform.postprocess(detections, image_list.image_sizes, [(100, 200), (60, 40)])
    torch.testing.assert_close(mapped[0]["boxes"], torch.tensor([[10.0, 20.0, 110.0, 80.0]]))
    torch.testing.assert_close(mapped[1]["boxes"], torch.tensor([[5.0, 10.0, 20.0, 30.0]]))


def test_extremely_elongated_image_keeps_one_pixel_and_detects(tiny_detector):
    """A 1x2000 strip: min(64/1, 100/2000) = 0.05 would make its height floor(0.05) = 0 (where
    torchvision's interpolate fails); it becomes 1x100 and the model runs on it."""
    transform = GeneralizedRCNNTransform(min_size=64, max_size=100, image_mean=MEAN, image_std=STD).eval()
    target = {"boxes": torch.tensor([[100.0, 0.0, 300.0, 1.0]]), "labels": torch.tensor([1])}
    image_list, (resized,) = transform([torch.rand(3, 1, 2000)], [target])
    assert image_list.image_sizes == [(1, 100)]
    torch.testing.assert_close(resized["boxes"], torch.tensor([[5.0, 0.0, 15.0, 1.0]]))

    model = tiny_detector(min_size=64, max_size=100)
    losses = model.train()([torch.rand(3, 1, 2000)], [target])
    assert all(torch.isfinite(v) for v in losses.values())
    with torch.no_grad():
        (detections,) = model.eval()([torch.rand(3, 2000, 1)])
    assert detections["boxes"].shape[1] == 4


def test_transform_min_size_choice():
    transform = GeneralizedRCNNTransform(min_size=(32, 48), max_size=1000, image_mean=MEAN, image_std=STD)
    image = torch.rand(3, 16, 24)
    # Evaluation uses the last min_size: 16x24 -> 48x72, padded to 64x96.
    image_list, _ = transform.eval()([image])
    assert image_list.image_sizes == [(48, 72)] and image_list.tensors.shape == (1, 3, 64, 96)
    # Training draws one of them per image, reproducibly under a seed.
    transform.train()
    torch.manual_seed(0)
    sizes = [transform([image])[0].image_sizes[0] for _ in range(20)]
    assert set(sizes) == {(32, 48), (48, 72)}
    torch.manual_seed(0)
    assert sizes == [transform([image])[0].image_sizes[0] for _ in range(20)]


# --- training on images without objects ---------------------------------------------------------


def test_batch_of_negative_images_trains(tiny_detector):
    torch.manual_seed(0)
    model = tiny_detector().train()
    images = [torch.rand(3, 64, 80), torch.rand(3, 72, 64)]
    targets = [{"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)} for _ in images]
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert losses["loss_box_reg"].item() == 0.0 and losses["loss_rpn_box_reg"].item() == 0.0
    assert math.isfinite(losses["loss_classifier"].item()) and losses["loss_classifier"].item() > 0
    assert math.isfinite(losses["loss_objectness"].item()) and losses["loss_objectness"].item() > 0

    sum(losses.values()).backward()
    predictor, rpn_head = model.roi_heads.box_predictor, model.rpn.head
    for param in (predictor.cls_score.weight, rpn_head.cls_logits.weight, model.backbone.conv.weight):
        assert param.grad is not None and bool(torch.isfinite(param.grad).all()) and param.grad.abs().sum() > 0
    # Nothing to regress: the box-offset layers receive exactly zero gradient.
    assert predictor.bbox_pred.weight.grad.abs().sum() == 0
    assert rpn_head.bbox_pred.weight.grad.abs().sum() == 0
