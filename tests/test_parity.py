"""Parity with torchvision: state-dict layout, the official COCO checkpoint layout, detections, losses.

torchvision's detector is built with random weights, its (frozen) batch norms and heads are
randomised, and its state dict is copied into ours. Evaluation must then give the same
detections and training the same losses under the same seed. Images are small and the proposal
budgets reduced so that each ResNet-50 forward pass takes a few seconds on two CPU cores.
"""
import copy
import re
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN as TvFasterRCNN
from torchvision.models.detection import fasterrcnn_resnet50_fpn
from torchvision.models.detection.anchor_utils import AnchorGenerator as TvAnchorGenerator
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops import MultiScaleRoIAlign as TvMultiScaleRoIAlign
from torchvision.ops.misc import FrozenBatchNorm2d as TvFrozenBatchNorm2d

from backbone import load_weight_file, mobilenet_v2_backbone, resnet50_fpn_backbone
from network_files import AnchorsGenerator, FasterRCNN, MultiScaleRoIAlign

COCO_FILE_NAME = "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth"
BOX_ATOL = 1e-4
SCORE_ATOL = 1e-5
LOSS_ATOL = 1e-5

# Shared by both implementations. A zero score threshold keeps up to 100 detections per image.
FAST_OPTIONS = dict(
    min_size=160,
    max_size=256,
    rpn_pre_nms_top_n_train=300,
    rpn_post_nms_top_n_train=150,
    rpn_pre_nms_top_n_test=300,
    rpn_post_nms_top_n_test=150,
    rpn_batch_size_per_image=64,
    box_batch_size_per_image=64,
    box_score_thresh=0.0,
)

Targets = List[Dict[str, Tensor]]


# Strict parity runs torchvision's exact sequence of operations (see conftest.reference_arithmetic).
pytestmark = pytest.mark.usefixtures("reference_arithmetic")


def randomise_(model: nn.Module, seed: int, calibration_images: List[Tensor]) -> None:
    """Give the detector random but well-scaled weights.

    Each (frozen) batch norm of the backbone gets a random affine transform and statistics drawn
    around those of its actual input on the calibration batch (padding included), so that
    activations stay moderate through the random ResNet. The RPN head and the box head get
    Kaiming-like random weights scaled to the features' size, and random biases, so objectness,
    offsets and class scores are far from uniform but not saturated.
    """
    generator = torch.Generator().manual_seed(seed)

    def normal(shape: torch.Size, std: float = 1.0) -> Tensor:
        return torch.randn(shape, generator=generator) * std

    def uniform(n: int, low: float, high: float) -> Tensor:
        return torch.rand(n, generator=generator) * (high - low) + low

    def calibrate(module: nn.Module, inputs: Tuple[Tensor]) -> None:
        mean = inputs[0].mean(dim=(0, 2, 3))
        var = inputs[0].var(dim=(0, 2, 3))
        n = mean.numel()
        module.running_mean.copy_(mean + normal(mean.shape, 0.1) * var.sqrt())
        module.running_var.copy_(var * uniform(n, 0.5, 1.5) + 1e-3)
        module.weight.copy_(uniform(n, 0.5, 1.5))
        module.bias.copy_(normal(mean.shape, 0.1))

    norms = [m for m in model.backbone.modules() if isinstance(m, (TvFrozenBatchNorm2d, nn.BatchNorm2d))]
    hooks = [m.register_forward_pre_hook(calibrate) for m in norms]
    model.eval()
    with torch.no_grad():
        image_list, _ = model.transform(calibration_images)
        # Each hook runs before its layer, so these are already the features of the final weights.
        features = model.backbone(image_list.tensors)
    for hook in hooks:
        hook.remove()
    if isinstance(features, Tensor):
        features = {"0": features}
    feature_rms = torch.cat([f.flatten() for f in features.values()]).square().mean().sqrt().item()

    head, box_head, predictor = model.rpn.head, model.roi_heads.box_head, model.roi_heads.box_predictor
    gains = (
        (head.conv[0][0], 2**0.5 / feature_rms),
        (head.cls_logits, 2.0),
        (head.bbox_pred, 0.3),
        (box_head.fc6, 2**0.5 / feature_rms),
        (box_head.fc7, 2**0.5),
        (predictor.cls_score, 2.0),
        (predictor.bbox_pred, 0.5),
    )
    with torch.no_grad():
        for layer, gain in gains:
            # Rescaling the random initial weights is much cheaper than drawing 64M new ones.
            fan_in = layer.weight[0].numel()
            layer.weight.mul_(gain / (fan_in**0.5 * layer.weight.std()))
            layer.bias.copy_(normal(layer.bias.shape, 0.1))


def copy_into_ours(theirs: nn.Module, ours: nn.Module) -> nn.Module:
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours


def layout(model: nn.Module) -> List[Tuple[str, torch.Size]]:
    """State-dict keys in order, with their shapes."""
    return [(key, value.shape) for key, value in model.state_dict().items()]


def tv_resnet50_fpn_coco_layout(**options) -> nn.Module:
    """torchvision's detector as in the official COCO checkpoint (FrozenBatchNorm2d backbone)."""
    return TvFasterRCNN(resnet_fpn_backbone(backbone_name="resnet50", weights=None), num_classes=91, **options)


def make_images(seed: int) -> List[Tensor]:
    """Three images of different sizes and aspect ratios."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=generator) for h, w in ((120, 160), (150, 100), (128, 128))]


def make_targets() -> Targets:
    """Objects in images 0 and 2; image 1 has none."""
    return [
        {
            "boxes": torch.tensor([[10.0, 20.0, 90.0, 100.0], [60.0, 5.0, 150.0, 60.0]]),
            "labels": torch.tensor([3, 17]),
        },
        {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)},
        {"boxes": torch.tensor([[30.0, 30.0, 100.0, 110.0]]), "labels": torch.tensor([5])},
    ]


def assert_same_detections(ours: Targets, theirs: Targets, min_count: int) -> None:
    assert len(ours) == len(theirs)
    for index, (mine, reference) in enumerate(zip(ours, theirs)):
        assert set(mine) == {"boxes", "labels", "scores"}
        count = reference["boxes"].shape[0]
        assert count >= min_count, f"image {index}: only {count} reference detections"
        assert mine["boxes"].shape == (count, 4), f"image {index}"
        assert torch.equal(mine["labels"], reference["labels"]), f"image {index}"
        torch.testing.assert_close(mine["boxes"], reference["boxes"], atol=BOX_ATOL, rtol=0)
        torch.testing.assert_close(mine["scores"], reference["scores"], atol=SCORE_ATOL, rtol=0)


def losses_in_train_mode(model: nn.Module, images: List[Tensor], targets: Targets, seed: int) -> Dict[str, Tensor]:
    model.train()
    torch.manual_seed(seed)
    with torch.no_grad():
        return model(images, targets)


def assert_same_losses(ours: Dict[str, Tensor], theirs: Dict[str, Tensor]) -> None:
    expected_names = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert set(ours) == set(theirs) == expected_names
    for name, value in theirs.items():
        assert torch.isfinite(value) and value > 0, f"{name} = {value} is not a useful reference"
        torch.testing.assert_close(ours[name], value, atol=LOSS_ATOL, rtol=0, msg=name)


def assert_targets_unchanged(targets: Targets, originals: Targets) -> None:
    assert len(targets) == len(originals)
    for target, original in zip(targets, originals):
        assert set(target) == set(original)
        for key, value in original.items():
            assert target[key].dtype == value.dtype and torch.equal(target[key], value), key


# --- ResNet-50 FPN -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def r50_pair() -> Tuple[nn.Module, nn.Module]:
    """(torchvision's model with random weights, ours with its state dict), both in eval mode."""
    torch.manual_seed(0)
    theirs = tv_resnet50_fpn_coco_layout(**FAST_OPTIONS)
    randomise_(theirs, seed=1, calibration_images=make_images(seed=1))
    ours = copy_into_ours(theirs, FasterRCNN(resnet50_fpn_backbone(), num_classes=91, **FAST_OPTIONS))
    return theirs.eval(), ours.eval()


def test_state_dict_matches_torchvision_coco_layout(r50_pair):
    theirs, ours = r50_pair
    assert layout(ours) == layout(theirs)


def test_state_dict_matches_fasterrcnn_resnet50_fpn_without_weights():
    # Without any weights torchvision builds the backbone with nn.BatchNorm2d, whose state dict
    # adds `num_batches_tracked`; apart from that the layout is ours, and it loads strictly.
    theirs = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    ours = FasterRCNN(resnet50_fpn_backbone(), num_classes=91)
    without_counters = [(k, s) for k, s in layout(theirs) if not k.endswith("num_batches_tracked")]
    assert len(without_counters) < len(layout(theirs))
    assert layout(ours) == without_counters
    reference = theirs.state_dict()
    ours.load_state_dict(reference, strict=True)
    for key, value in ours.state_dict().items():
        assert torch.equal(value, reference[key]), key

    # With the same norm layer the layouts are identical, counters included.
    ours_bn = FasterRCNN(resnet50_fpn_backbone(norm_layer=nn.BatchNorm2d, trainable_layers=5), num_classes=91)
    assert layout(ours_bn) == layout(theirs)
    ours_bn.load_state_dict(theirs.state_dict(), strict=True)


def to_old_coco_layout(state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Rename keys as in checkpoints written before torchvision 0.13 (e.g. the official COCO file):
    ``rpn.head.conv.0.0.*`` -> ``rpn.head.conv.*`` and ``fpn.{inner,layer}_blocks.{i}.0.*`` ->
    ``fpn.{inner,layer}_blocks.{i}.*``. The result is a plain dict without version metadata."""
    renamed = {}
    for key, value in state_dict.items():
        key = key.replace("rpn.head.conv.0.0.", "rpn.head.conv.")
        for block in ("inner_blocks", "layer_blocks"):
            for level in range(4):
                key = key.replace(f"fpn.{block}.{level}.0.", f"fpn.{block}.{level}.")
        renamed[key] = value.clone()
    return renamed


def test_official_coco_checkpoint_layout_loads_and_matches_torchvision(r50_pair, tmp_path: Path):
    source, _ = r50_pair
    old = to_old_coco_layout(source.state_dict())
    assert "rpn.head.conv.weight" in old and "backbone.fpn.inner_blocks.3.weight" in old
    assert "backbone.fpn.layer_blocks.0.bias" in old
    assert not any(key.startswith("rpn.head.conv.0") or re.search(r"fpn\.\w+_blocks\.\d\.0\.", key) for key in old)
    path = tmp_path / COCO_FILE_NAME
    torch.save(old, path)

    ours = FasterRCNN(resnet50_fpn_backbone(), num_classes=91, **FAST_OPTIONS)
    ours.load_state_dict(load_weight_file(str(path), "fasterrcnn_resnet50_fpn_coco"), strict=True)
    theirs = tv_resnet50_fpn_coco_layout(**FAST_OPTIONS)
    theirs.load_state_dict(torch.load(path, weights_only=True), strict=True)
    loaded = ours.state_dict()
    for key, value in source.state_dict().items():
        assert torch.equal(loaded[key], value), key

    image = make_images(seed=5)[:1]
    with torch.no_grad():
        assert_same_detections(ours.eval()(image), theirs.eval()(image), min_count=20)


def test_resnet50_fpn_detections_match_torchvision(r50_pair):
    theirs, ours = r50_pair
    images = make_images(seed=2)
    with torch.no_grad():
        expected = theirs.eval()(images)
        got = ours.eval()(images)
    assert_same_detections(got, expected, min_count=50)
    # Boxes are mapped back to each input image and clipped to it.
    for detections, image in zip(got, images):
        height, width = image.shape[-2:]
        assert detections["boxes"][:, 0::2].max() <= width and detections["boxes"][:, 1::2].max() <= height


def test_resnet50_fpn_losses_match_torchvision(r50_pair):
    theirs, ours = r50_pair
    images, targets = make_images(seed=3), make_targets()
    originals = copy.deepcopy(targets)
    expected = losses_in_train_mode(theirs, images, targets, seed=4)
    got = losses_in_train_mode(ours, images, targets, seed=4)
    assert_same_losses(got, expected)
    assert_targets_unchanged(targets, originals)


# --- MobileNetV2 ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mobilenet_pair() -> Tuple[nn.Module, nn.Module]:
    """Single-level detectors on MobileNetV2 features (1280 channels), torchvision's and ours."""
    torch.manual_seed(0)
    features = torchvision.models.mobilenet_v2().features
    features.out_channels = 1280
    theirs = TvFasterRCNN(
        features,
        num_classes=21,
        rpn_anchor_generator=TvAnchorGenerator(((32, 64, 128, 256, 512),), ((0.5, 1.0, 2.0),)),
        box_roi_pool=TvMultiScaleRoIAlign(["0"], 7, 2),
        **FAST_OPTIONS,
    )
    randomise_(theirs, seed=1, calibration_images=make_images(seed=1))
    ours = FasterRCNN(
        mobilenet_v2_backbone(),
        num_classes=21,
        rpn_anchor_generator=AnchorsGenerator(((32, 64, 128, 256, 512),), ((0.5, 1.0, 2.0),)),
        box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2),
        **FAST_OPTIONS,
    )
    assert layout(ours) == layout(theirs)
    return theirs.eval(), copy_into_ours(theirs, ours).eval()


def test_mobilenet_detections_match_torchvision(mobilenet_pair):
    theirs, ours = mobilenet_pair
    images = make_images(seed=6)
    with torch.no_grad():
        assert_same_detections(ours.eval()(images), theirs.eval()(images), min_count=50)


def test_mobilenet_losses_match_torchvision(mobilenet_pair):
    theirs, ours = mobilenet_pair
    images, targets = make_images(seed=7), make_targets()
    originals = copy.deepcopy(targets)
    # Training mode also updates the BatchNorm running statistics, identically in both models.
    expected = losses_in_train_mode(theirs, images, targets, seed=8)
    got = losses_in_train_mode(ours, images, targets, seed=8)
    assert_same_losses(got, expected)
    assert_targets_unchanged(targets, originals)
    updated = ours.state_dict()
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(updated[key], value, atol=1e-6, rtol=0, msg=key)


# --- with autograd: losses and every parameter gradient -------------------------------------------


def gradients_in_train_mode(model: nn.Module, images: List[Tensor], targets: Targets, seed: int):
    """Losses and parameter gradients of one backward pass, on a copy (the fixtures stay intact)."""
    model = copy.deepcopy(model).train()
    torch.manual_seed(seed)
    losses = model(images, targets)
    sum(losses.values()).backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


@pytest.mark.slow
@pytest.mark.parametrize("fast", [False, True], ids=["reference", "fast-paths-float64"])
@pytest.mark.parametrize("pair", ["r50_pair", "mobilenet_pair"])
def test_losses_and_gradients_with_autograd_match_torchvision(pair, fast, request, monkeypatch):
    """Training as it really runs: our RoIAlign pools straight into fc6 (never storing the pooled
    features) and its backward pass pools again; every gradient must still be torchvision's.

    With the fast paths on (the default outside these parity tests) the backbone also runs on a
    channels-last batch, frozen BatchNorm is folded into its convolution, and the RPN head's and
    FPN's 3x3 convolutions compute their gradients at the non-zero positions only. That changes
    the order of the float arithmetic, which these random 50-layer networks amplify (float32: the
    classifier loss moves by 2e-4 relative), so that comparison runs in float64, where any
    difference in the computation itself would show far above the tolerances."""
    from network_files.ops import fast_path, roi_align as roi_align_module, sparse_grad_conv

    fused_calls, sparse_calls, layouts = [], [], []
    original = roi_align_module._SparsePoolLinear.apply
    monkeypatch.setattr(roi_align_module._SparsePoolLinear, "apply",
                        lambda *args: fused_calls.append(1) or original(*args))
    sparse_backward = sparse_grad_conv._SparseBackward.add
    monkeypatch.setattr(sparse_grad_conv._SparseBackward, "add",
                        lambda self, positions: sparse_calls.append(len(positions)) or sparse_backward(self, positions))
    monkeypatch.setattr(fast_path, "_enabled", fast)
    monkeypatch.setattr(sparse_grad_conv, "DENSE_FRACTION", 1.0)  # these small maps would go dense
    theirs, ours = request.getfixturevalue(pair)
    images, targets = make_images(seed=9), make_targets()
    if fast:
        theirs, ours = copy.deepcopy(theirs).double(), copy.deepcopy(ours).double()
        images = [image.double() for image in images]
        targets = [{**target, "boxes": target["boxes"].double()} for target in targets]
    hook = ours.backbone.register_forward_pre_hook(
        lambda module, inputs: layouts.append(inputs[0].is_contiguous(memory_format=torch.channels_last)))
    expected_losses, expected = gradients_in_train_mode(theirs, images, targets, seed=10)
    try:
        got_losses, got = gradients_in_train_mode(ours, images, targets, seed=10)
    finally:
        hook.remove()
    assert layouts == [fast]  # the channels-last training path ran (or not, for the reference)
    assert bool(sparse_calls) == fast
    assert bool(fused_calls) != fast, "the fused pooling path (float32 only) did not run"
    assert_same_losses(got_losses, expected_losses)
    assert set(got) == set(expected)
    # Relative to each gradient, plus a floor relative to the largest one: some BatchNorm biases
    # get near-zero gradients made of cancelling terms (exactly zero in exact arithmetic), where
    # any summation order, torchvision's own included, gives different rounding noise.
    largest = max(float(grad.abs().max()) for grad in expected.values())
    for name, grad in expected.items():
        scale = float(grad.abs().max())
        error = float((got[name] - grad).abs().max())
        assert error <= 1e-4 * scale + 1e-6 * largest, f"{name}: gradient differs by {error:.2e} (scale {scale:.2e})"
    # The comparison is meaningful: fc6 (fused with the pooling) and the backbone (reached through
    # the pooling's backward pass) get real gradients.
    assert float(expected["roi_heads.box_head.fc6.weight"].abs().max()) > 1e-3 * largest
    assert any(k.startswith("backbone") and float(g.abs().max()) > 1e-3 * largest for k, g in expected.items())
