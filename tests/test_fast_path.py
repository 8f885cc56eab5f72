"""The fast paths (BatchNorm folded into convolutions, in inference and training) against the
reference arithmetic."""
import contextlib

import torch
from torch import nn

from backbone import Bottleneck, FrozenBatchNorm2d, mobilenet_v2_backbone, resnet50_fpn_backbone
from backbone.conv_bn import ConvBNSequential, conv_bn, folded_parameters
from my_dataset import VOCDataSet
from network_files.ops import fast_path
from train_utils.loading import load_model
from train_utils.data.transforms import get_transforms


def randomise_norms_(model: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (FrozenBatchNorm2d, nn.BatchNorm2d)):
            n = module.running_var.numel()
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(n, generator=generator) * 0.1)


def outputs(model: nn.Module, x: torch.Tensor, reference: bool) -> dict:
    with torch.no_grad():
        if reference:
            with fast_path.reference_mode():
                out = model(x)
        else:
            out = model(x)
    return out if isinstance(out, dict) else {"0": out}


def test_folded_conv_bn_equals_conv_then_bn():
    torch.manual_seed(0)
    for norm in (FrozenBatchNorm2d(8, eps=1e-3), nn.BatchNorm2d(8).eval()):
        conv = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=True)
        randomise_norms_(nn.Sequential(norm), seed=1)
        x = torch.randn(2, 3, 17, 13)
        with torch.no_grad():
            expected = norm(conv(x))
            folded = conv_bn(x, conv, norm)
            weight, bias = folded_parameters(conv, norm)
            single_conv = torch.nn.functional.conv2d(x, weight, bias, stride=2, padding=1)
        torch.testing.assert_close(folded, expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(folded, single_conv)  # the folded path really ran


def test_backbones_match_reference_and_state_dict_is_unchanged():
    torch.manual_seed(0)
    x = torch.rand(1, 3, 160, 224)
    for backbone in (resnet50_fpn_backbone(), mobilenet_v2_backbone()):
        randomise_norms_(backbone, seed=2)
        backbone.eval()
        keys = list(backbone.state_dict())
        fast, reference = outputs(backbone, x, False), outputs(backbone, x, True)
        for name in reference:
            scale = reference[name].abs().max()
            assert ((fast[name] - reference[name]).abs().max() / scale) < 1e-5, name
        assert list(backbone.state_dict()) == keys


def test_folded_weights_follow_weight_changes():
    conv, norm = nn.Conv2d(3, 4, 1, bias=False), FrozenBatchNorm2d(4)
    block = ConvBNSequential(conv, norm).eval()
    x = torch.randn(1, 3, 5, 5)
    with torch.no_grad():
        block(x)
        conv.weight.mul_(2.0)  # an optimiser step or load_state_dict changes tensors in place
        norm.running_var.fill_(4.0)
        fast = block(x)
        with fast_path.reference_mode():
            reference = block(x)
    torch.testing.assert_close(fast, reference, rtol=1e-6, atol=1e-6)


def count_folds(monkeypatch) -> list:
    from backbone import conv_bn as conv_bn_module

    calls = []
    original = conv_bn_module.folded_parameters
    monkeypatch.setattr(conv_bn_module, "folded_parameters", lambda *a: calls.append(1) or original(*a))
    return calls


def test_frozen_bn_folds_in_training_with_equal_gradients(monkeypatch):
    """A ResNet block with frozen BatchNorm in a training step: folded, the output and the
    gradients of the input and of every convolution weight equal the reference (float64)."""
    folds = count_folds(monkeypatch)
    torch.manual_seed(0)
    downsample = ConvBNSequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), FrozenBatchNorm2d(32))
    block = Bottleneck(16, 8, stride=2, downsample=downsample, norm_layer=FrozenBatchNorm2d).double().train()
    randomise_norms_(block, seed=4)
    x = torch.randn(2, 16, 12, 10, dtype=torch.float64)
    results = {}
    for reference in (True, False):
        folds.clear()
        inputs = x.clone().requires_grad_()
        with fast_path.reference_mode() if reference else contextlib.nullcontext():
            out = block(inputs)
        grads = torch.autograd.grad((out * out).sum(), [inputs] + list(block.parameters()))
        results[reference] = (out.detach(), grads)
        assert len(folds) == (0 if reference else 4)  # conv1..3 and the projection
    (out_ref, grads_ref), (out_fast, grads_fast) = results[True], results[False]
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-12, atol=1e-12)
    for got, expected in zip(grads_fast, grads_ref):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_no_folding_in_mixed_precision_training(monkeypatch):
    """Under autocast the unfolded frozen BatchNorm returns float32 activations; training keeps
    that (no fold), inference folds as before."""
    folds = count_folds(monkeypatch)
    block = Bottleneck(16, 4, norm_layer=FrozenBatchNorm2d).train()
    randomise_norms_(block, seed=5)
    x = torch.randn(1, 16, 8, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x)
        with fast_path.reference_mode():
            reference = block(x)
    assert not folds and torch.equal(out, reference)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        block(x)
    assert folds


def test_batch_statistics_never_fold(monkeypatch):
    """MobileNetV2 training its BatchNorm (batch statistics) is the reference arithmetic; in eval
    mode the same BatchNorm has fixed statistics and folds."""
    folds = count_folds(monkeypatch)
    backbone = mobilenet_v2_backbone()
    randomise_norms_(backbone, seed=3)
    x = torch.rand(2, 3, 64, 64)
    fast = backbone.train()(x)
    with fast_path.reference_mode():
        reference = backbone(x)
    assert torch.equal(fast, reference) and not folds
    with torch.no_grad():
        backbone.eval()(x)
    assert folds


def test_trained_detector_detections_match_reference(trained_run, demo_voc):
    """A real trained checkpoint gives the same detections: same count, the same score sequence
    (to 1e-5), and every detection has a twin with the same label, box within 1e-3 px and score.
    Only detections whose scores tie within float rounding may swap places."""
    model = load_model(str(trained_run / "last.pth"))
    dataset = VOCDataSet(demo_voc, transforms=get_transforms(False), txt_name="val.txt",
                         classes_json=str(demo_voc / "classes.json"))
    images = [dataset[i][0] for i in range(len(dataset))]
    with torch.no_grad():
        fast = model(images)
        with fast_path.reference_mode():
            reference = model(images)
    assert sum(len(r["boxes"]) for r in reference) > 0
    for got, expected in zip(fast, reference):
        assert len(got["boxes"]) == len(expected["boxes"])
        torch.testing.assert_close(got["scores"], expected["scores"], rtol=0, atol=1e-5)
        for box, label, score in zip(got["boxes"], got["labels"], got["scores"]):
            twins = ((expected["boxes"] - box).abs().amax(dim=1) <= 1e-3) & (expected["labels"] == label) \
                & ((expected["scores"] - score).abs() <= 1e-5)
            assert twins.any(), (box, label, score)
