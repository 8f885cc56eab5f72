"""The inference fast path (BatchNorm folded into convolutions) against the reference arithmetic."""
import torch
from torch import nn

from backbone import FrozenBatchNorm2d, mobilenet_v2_backbone, resnet50_fpn_backbone
from backbone.conv_bn import ConvBNSequential, conv_bn, folded_parameters
from my_dataset import VOCDataSet
from network_files import fast_path
from train_utils.inference.loading import load_model
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


def test_training_never_folds():
    backbone = mobilenet_v2_backbone()
    randomise_norms_(backbone, seed=3)
    backbone.eval()
    x = torch.rand(1, 3, 64, 64)
    fast = backbone(x)  # autograd on: reference arithmetic
    with fast_path.reference_mode():
        reference = backbone(x)
    assert torch.equal(fast, reference)


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
