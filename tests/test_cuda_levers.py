"""The GPU speed levers, run on the CPU inside ``fast_path.force_cuda_levers()``: BatchNorm folded
in mixed-precision training (the backbone stays in bf16), the folded float32 bias added after the
low-precision convolution, folded weights cached for parameters without gradient, channels-last.

Under bf16 autocast the levers are held against torchvision's detector under the same autocast,
with torchvision's own bf16-vs-float32 gap as the yardstick: at these random weights that gap is
already about 1.2% on the FPN features and 2% on the classification loss, so ours must stay
within twice it of torchvision and about as close to float32 as torchvision is."""
import contextlib
from typing import Dict, List, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from backbone import Bottleneck, FrozenBatchNorm2d
from backbone import conv_bn as conv_bn_module
from backbone.conv_bn import ConvBNSequential, conv_bn, folded_parameters
from my_dataset import VOCDataSet
from network_files import fast_path
from test_fast_path import count_folds, randomise_norms_
from train_utils.data.transforms import get_transforms
from train_utils.loading import load_model


def bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_levers_are_off_on_the_cpu_unless_forced():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not fast_path.cuda_levers(cpu) and fast_path.cuda_levers(cuda)
    with fast_path.force_cuda_levers():
        assert fast_path.cuda_levers(cpu)
        with fast_path.reference_mode():
            assert not fast_path.cuda_levers(cpu) and not fast_path.cuda_levers(cuda)
    assert not fast_path.cuda_levers(cpu)
    assert fast_path.use_channels_last(torch.empty(1, 3, 4, 4, device="meta")) is False
    with fast_path.reference_mode():
        assert not fast_path.use_channels_last(torch.empty(1, 3, 4, 4))


def test_folded_convolution_under_autocast_adds_the_float32_bias_after_it():
    """The folded convolution runs in bf16 without bias; its output gets the float32 bias with a
    single rounding to bf16."""
    torch.manual_seed(0)
    conv, norm = nn.Conv2d(4, 8, 3, padding=1, bias=True), FrozenBatchNorm2d(8)
    randomise_norms_(nn.Sequential(norm), seed=1)
    x = torch.randn(2, 4, 9, 7)
    weight, bias = folded_parameters(conv, norm)
    expected = (F.conv2d(x.bfloat16(), weight.bfloat16(), padding=1).float() + bias.reshape(1, -1, 1, 1)).bfloat16()
    with torch.no_grad(), bf16():
        for force in (False, True):  # inference folds anyway; forced, through the weight cache
            with fast_path.force_cuda_levers() if force else contextlib.nullcontext():
                got = conv_bn(x, conv, norm)
            assert got.dtype == torch.bfloat16 and torch.equal(got, expected)


def test_bf16_training_folds_only_with_the_levers_and_keeps_gradients(monkeypatch):
    """A frozen-BN bottleneck in a bf16 training step: without the levers (CPU default) nothing
    folds and the output is float32; with them all four convolutions fold, the output stays bf16,
    and the output and gradients match the unfolded step to bf16 rounding."""
    folds = count_folds(monkeypatch)
    torch.manual_seed(0)
    downsample = ConvBNSequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), FrozenBatchNorm2d(32))
    block = Bottleneck(16, 8, stride=2, downsample=downsample, norm_layer=FrozenBatchNorm2d).train()
    randomise_norms_(block, seed=4)
    x = torch.randn(2, 16, 12, 10).contiguous(memory_format=torch.channels_last)
    results = {}
    for force in (False, True):
        folds.clear()
        inputs = x.clone().requires_grad_()
        with fast_path.force_cuda_levers() if force else contextlib.nullcontext(), bf16():
            out = block(inputs)
        grads = torch.autograd.grad(out.float().square().sum(), [inputs] + list(block.parameters()))
        results[force] = (out, grads)
        assert len(folds) == (4 if force else 0)
        assert out.dtype == (torch.bfloat16 if force else torch.float32)
    (plain, plain_grads), (levers, lever_grads) = results[False], results[True]
    assert relative(levers, plain) < 1e-2
    for got, expected in zip(lever_grads, plain_grads):
        assert F.cosine_similarity(got.double().flatten(), expected.double().flatten(), dim=0) > 0.999


def test_cached_folded_weights_follow_changes(monkeypatch):
    """Without gradient the folded weights are made once and reused, in float32 bit for bit the
    uncached result; changing a weight or a statistic in place, or loading a state dict, makes
    them again."""
    folds = count_folds(monkeypatch)
    torch.manual_seed(0)
    block = ConvBNSequential(nn.Conv2d(3, 4, 3, padding=1), FrozenBatchNorm2d(4)).eval()
    randomise_norms_(block, seed=2)
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        uncached = block(x)
        folds.clear()
        with fast_path.force_cuda_levers():
            first, again = block(x), block(x)
            assert torch.equal(first, uncached) and torch.equal(again, uncached) and len(folds) == 1
            block[0].weight.mul_(2.0)
            block[1].running_var.fill_(4.0)
            changed = block(x)
            state = {k: v.clone() for k, v in block.state_dict().items()}
            state["1.bias"].add_(1.0)
            block.load_state_dict(state)
            loaded = block(x)
            assert len(folds) == 3
        block.load_state_dict(state)  # the reference of `loaded`, and below the one of `changed`
        with fast_path.reference_mode():
            torch.testing.assert_close(loaded, block(x), rtol=1e-6, atol=1e-6)
            state["1.bias"].sub_(1.0)
            block.load_state_dict(state)
            torch.testing.assert_close(changed, block(x), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(changed, loaded)
    with fast_path.force_cuda_levers():  # with autograd on trainable weights: no cache, folded each call
        folds.clear()
        block(x).sum().backward()
        block(x)
        assert len(folds) == 2 and block[0].weight.grad is not None


def test_folded_weights_cached_by_an_inference_serve_training(monkeypatch):
    """Made in inference mode (an evaluation), the cached folded weights of a frozen stage are
    reused by the next training step, whose backward needs them."""
    folds = count_folds(monkeypatch)
    torch.manual_seed(0)
    block = ConvBNSequential(nn.Conv2d(3, 4, 3, padding=1), FrozenBatchNorm2d(4)).requires_grad_(False)
    randomise_norms_(block, seed=3)
    x = torch.randn(1, 3, 6, 6, requires_grad=True)
    with fast_path.force_cuda_levers():
        with torch.inference_mode():
            block(x.detach())
        block(x).square().sum().backward()
    assert len(folds) == 1 and x.grad is not None
    expected = torch.autograd.grad(block[1](block[0](x)).square().sum(), x)[0]
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-5)


def training_run(model: nn.Module, images, targets, amp: bool) -> Tuple[Dict[str, torch.Tensor], Dict[str, float], torch.Tensor]:
    """One training step under seed 0, in bf16 autocast if ``amp`` (on the images' device):
    (FPN features, losses, all gradients flattened in float64)."""
    captured = {}
    hook = model.backbone.register_forward_hook(lambda module, args, out: captured.update(out))
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    device_type = images[0].device.type
    try:
        with torch.autocast(device_type, dtype=torch.bfloat16) if amp else contextlib.nullcontext():
            losses = model(images, targets)
        sum(losses.values()).backward()
    finally:
        hook.remove()
    grads = torch.cat([p.grad.double().flatten() for p in model.parameters() if p.grad is not None])
    return ({k: v.detach() for k, v in captured.items()}, {k: v.item() for k, v in losses.items()}, grads)


def assert_bf16_levers_match_torchvision(ours: nn.Module, theirs: nn.Module, images, targets) -> str:
    """A bf16 training step of ours (the levers on where the caller put them) against
    torchvision's in bf16 and in float32; returns the figures measured. (On CUDA the float32 step
    keeps PyTorch's default TF32 convolutions: 10 mantissa bits against bf16's 7, a reference
    still 8 times finer than the gaps measured here.)"""
    features32, losses32, grads32 = training_run(theirs, images, targets, amp=False)
    features_tv, losses_tv, grads_tv = training_run(theirs, images, targets, amp=True)
    features, losses, grads = training_run(ours, images, targets, amp=True)

    assert set(features) == set(features32) == {"0", "1", "2", "3", "pool"}
    gaps = []
    for name, reference in features32.items():
        assert features[name].dtype == torch.bfloat16  # the levers ran: folded, bf16 throughout
        assert features[name].is_contiguous(memory_format=torch.channels_last)
        torchvision_gap = relative(features_tv[name], reference)
        gaps.append((relative(features[name], features_tv[name]), relative(features[name], reference), torchvision_gap))
        assert gaps[-1][0] <= 2 * torchvision_gap, (name, gaps[-1])
        assert gaps[-1][1] <= 1.25 * torchvision_gap, (name, gaps[-1])  # measured on the CPU: at most 1.02
    # The losses are single numbers, so their bf16 errors scatter more: each may be off float32
    # by 1e-2 relative or by twice torchvision's own bf16 error (measured on the CPU: classification
    # loss float32 14.48, torchvision bf16 14.65, ours 14.29; the other three within 0.2%).
    for name, reference in losses32.items():
        allowed = max(1e-2 * abs(reference), 2 * abs(losses_tv[name] - reference))
        assert abs(losses[name] - reference) <= allowed, (name, losses[name], losses_tv[name], reference)
    cosines = [F.cosine_similarity(a, b, dim=0).item() for a, b in ((grads, grads_tv), (grads, grads32), (grads_tv, grads32))]
    # Measured on the CPU: ours vs torchvision 0.99911, ours vs float32 0.99934, torchvision vs float32 0.99900.
    assert cosines[0] >= 0.999 and cosines[1] >= cosines[2] - 5e-4, cosines
    worst = max(gaps, key=lambda g: g[0] / g[2])
    return (f"features (worst level) ours-torchvision {worst[0]:.4f}, ours-float32 {worst[1]:.4f}, torchvision-float32 "
            f"{worst[2]:.4f}; gradient cosines ours-tv {cosines[0]:.5f}, ours-fp32 {cosines[1]:.5f}, tv-fp32 {cosines[2]:.5f}")


@pytest.mark.slow
def test_r50_fpn_bf16_training_with_the_levers_matches_torchvision_under_bf16():
    from tools.bench_models import build_pair, make_inputs

    ours, theirs = build_pair("r50", regime="plain")
    for model in (ours, theirs):
        model.transform.min_size, model.transform.max_size = (128,), 160
        model.train()
    images, targets = make_inputs(2, (128, 160), regime="plain")
    with fast_path.force_cuda_levers():
        assert_bf16_levers_match_torchvision(ours, theirs, images, targets)


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_r50_fpn_bf16_training_with_the_levers_on_cuda():
    """The same on a GPU, where the levers apply unforced: 2 VOC-sized images (800x1066 inside)."""
    from tools.bench_models import VOC_SIZE, build_pair, make_inputs

    device = torch.device("cuda")
    ours, theirs = (model.to(device).train() for model in build_pair("r50", regime="plain"))
    images, targets = make_inputs(2, VOC_SIZE, regime="plain")
    images = [image.to(device) for image in images]
    targets = [{k: v.to(device) for k, v in target.items()} for target in targets]
    print(f"\ncuda levers bf16: {assert_bf16_levers_match_torchvision(ours, theirs, images, targets)}", flush=True)
    del ours, theirs
    torch.cuda.empty_cache()


def match_detections(got: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor]) -> List[bool]:
    """For each detection of ``got``: does ``expected`` hold one of its label at IoU >= 0.99 whose
    score is within 1e-2?"""
    from torchvision.ops import box_iou

    if len(expected["boxes"]) == 0:
        return [False] * len(got["boxes"])
    iou = box_iou(got["boxes"].float(), expected["boxes"].float())
    twins = (iou >= 0.99) & (got["labels"][:, None] == expected["labels"][None, :]) \
        & ((got["scores"][:, None].float() - expected["scores"][None, :].float()).abs() <= 1e-2)
    return twins.any(dim=1).tolist()


def matched_fraction(got: List[Dict[str, torch.Tensor]], expected: List[Dict[str, torch.Tensor]]) -> float:
    matched = [m for g, e in zip(got, expected) for m in match_detections(g, e)]
    assert matched, "no detections"
    return sum(matched) / len(matched)


def test_trained_detector_bf16_inference_with_the_levers_matches_torchvision_sequence(trained_run, demo_voc):
    """The trained checkpoint under bf16 autocast with the levers (cached bf16 folded weights,
    channels-last), against the same model in reference mode (torchvision's exact sequence of
    operations, see tests/test_parity.py) in bf16 and in float32. This one-epoch demo detector
    scores every box about 0.256 (near ties everywhere), so bf16 alone already re-ranks and
    swaps many of them: measured, torchvision's sequence in bf16 keeps 61% of its float32
    detections, ours with the levers 63%, and 74% of ours match torchvision's bf16 ones. The
    test asks that the levers lose no more than 5 points to torchvision's own bf16 agreement
    (the issue's bound, 99% of a trained model's detections matched, is not checked by any test yet:
    it needs a well-trained checkpoint on a GPU)."""
    model = load_model(str(trained_run / "last.pth"))
    dataset = VOCDataSet(demo_voc, transforms=get_transforms(False), txt_name="val.txt",
                         classes_json=str(demo_voc / "classes.json"))
    images = [dataset[i][0] for i in range(len(dataset))]
    with torch.inference_mode():
        with fast_path.reference_mode():
            float32 = model(images)
        with bf16():
            with fast_path.force_cuda_levers():
                levers = model(images)
            with fast_path.reference_mode():
                reference = model(images)
    torchvision_agreement = min(matched_fraction(reference, float32), matched_fraction(float32, reference))
    for got, expected in ((levers, float32), (float32, levers), (levers, reference), (reference, levers)):
        assert matched_fraction(got, expected) >= torchvision_agreement - 0.05


def test_torch_still_counts_tensor_versions():
    """backbone/conv_bn.py's cache of folded weights watches ``Tensor._version`` (no public API):
    an in-place change must bump it."""
    weight = torch.zeros(3)
    assert hasattr(weight, "_version"), "torch removed Tensor._version: backbone/conv_bn.py's folded-weight cache needs another signal"
    before = weight._version
    weight.add_(1)
    assert weight._version > before
