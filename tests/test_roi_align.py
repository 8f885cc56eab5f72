"""Parity of our CPU RoIAlign and multi-scale pooler with torchvision, values and input gradients."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import Tensor

from network_files.ops import roi_align as roi_align_module
from network_files.ops.poolers import MultiScaleRoIAlign, map_levels


def roi_align(
    input: Tensor,
    boxes,
    output_size,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """RoIAlign through our pooling kernel on one level, called like ``torchvision.ops.roi_align``.

    input: Tensor[N, C, H, W] feature map.
    boxes: Tensor[K, 5] (batch_index, x1, y1, x2, y2) or a list of Tensor[L_i, 4] per image,
        in image coordinates.
    output_size: PH or (PH, PW) bins.
    spatial_scale: feature size / image size.
    sampling_ratio: samples per bin along each axis; <= 0 uses ceil(roi size / bins) per RoI.
    aligned: shift boxes by -0.5 pixel (Detectron2 convention) and allow boxes smaller than a pixel.
    Returns Tensor[K, C, PH, PW] in the dtype of input.
    """
    rois = roi_align_module.boxes_to_rois(boxes)
    if not roi_align_module._uses_fast_path([input]):
        return torchvision.ops.roi_align(input, rois, roi_align_module._pair(output_size), spatial_scale,
                                         sampling_ratio, aligned)
    if input.dim() != 4:
        raise ValueError(f"roi_align: input must be [N, C, H, W], got {list(input.shape)}")
    return roi_align_module.pyramid_roi_align([input], rois, None, [spatial_scale], output_size, sampling_ratio,
                                              aligned)


def make_rois(num_images: int, image_h: int, image_w: int, seed: int) -> Tensor:
    """Tensor[K, 5] boxes of every kind: inside, partly and fully outside, tiny, huge, empty, inverted."""
    g = torch.Generator().manual_seed(seed)
    groups = []
    for _ in range(num_images):
        size = torch.tensor([image_w, image_h], dtype=torch.float32)
        start = torch.rand(12, 2, generator=g) * size * 0.9
        normal = torch.cat([start, start + torch.rand(12, 2, generator=g) * size * 0.5 + 1.0], 1)
        tiny_start = torch.rand(4, 2, generator=g) * size
        tiny = torch.cat([tiny_start, tiny_start + torch.rand(4, 2, generator=g) * 0.8], 1)
        partly_out = torch.cat([-torch.rand(4, 2, generator=g) * size * 0.3, torch.rand(4, 2, generator=g) * size], 1)
        beyond = size * 1.2 + torch.rand(3, 2, generator=g) * 10.0
        fully_out = torch.cat([beyond, beyond + 5.0], 1)
        huge = torch.cat([-size * 0.5, size * 1.7]).repeat(2, 1)
        huge[1] = torch.cat([torch.zeros(2), size])  # exactly the whole image
        inverted = torch.cat([start[:2] + 3.0, start[:2]], 1)  # x2 < x1, y2 < y1
        point = torch.cat([start[2:4], start[2:4]], 1)  # x1 == x2, y1 == y2
        groups.append(torch.cat([normal, tiny, partly_out, fully_out, huge, inverted, point]))
    ids = torch.cat([torch.full((b.shape[0], 1), float(i)) for i, b in enumerate(groups)])
    return torch.cat([ids, torch.cat(groups)], 1)


def pool_both(features: Tensor, rois, output_size, scale: float, sampling: int, aligned: bool, seed: int = 0):
    """Run ours and torchvision on clones of features with the same random upstream gradient."""
    ours_in = features.detach().clone().requires_grad_()
    ref_in = features.detach().clone().requires_grad_()
    ours = roi_align(ours_in, rois, output_size, scale, sampling, aligned)
    ref = torchvision.ops.roi_align(ref_in, rois, output_size, scale, sampling, aligned)
    upstream = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed), dtype=ref.dtype)
    ours.backward(upstream)
    ref.backward(upstream)
    return ours, ref, ours_in.grad, ref_in.grad


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 1, 2, 3])
@pytest.mark.parametrize("output_size", [7, (2, 3)])
@pytest.mark.parametrize("spatial_scale", [0.25, 1 / 16])
def test_matches_torchvision_forward_and_gradient(aligned, sampling_ratio, output_size, spatial_scale):
    features = torch.randn(3, 4, 11, 13, generator=torch.Generator().manual_seed(1))
    rois = make_rois(3, int(11 / spatial_scale), int(13 / spatial_scale), seed=2)
    ours, ref, ours_grad, ref_grad = pool_both(features, rois, output_size, spatial_scale, sampling_ratio, aligned)
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours_grad, ref_grad, rtol=0, atol=1e-4)
    assert ref_grad.abs().sum() > 0  # the boxes really reach the map


def test_list_of_boxes_equals_batch_index_form():
    features = torch.randn(2, 3, 9, 10, generator=torch.Generator().manual_seed(3))
    rois = make_rois(2, 36, 40, seed=4)
    per_image = [rois[rois[:, 0] == i, 1:] for i in range(2)]
    ours, ref, ours_grad, ref_grad = pool_both(features, per_image, (3, 4), 0.25, 2, False)
    torch.testing.assert_close(ours, roi_align(features, rois, (3, 4), 0.25, 2), rtol=0, atol=0)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours_grad, ref_grad, rtol=0, atol=1e-4)


def test_channels_last_input_and_single_pixel_map():
    features = torch.randn(2, 5, 6, 7).to(memory_format=torch.channels_last)
    rois = make_rois(2, 24, 28, seed=5)
    ours, ref, ours_grad, ref_grad = pool_both(features, rois, 7, 0.25, -1, True)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours_grad, ref_grad, rtol=0, atol=1e-4)

    dot = torch.randn(1, 2, 1, 1)
    ours, ref, ours_grad, ref_grad = pool_both(dot, make_rois(1, 4, 4, seed=6), 2, 0.25, 2, False)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours_grad, ref_grad, rtol=0, atol=1e-4)


def test_samples_exactly_on_the_validity_limits_are_kept():
    # One sample per bin at the box centre: y = 5 = H, y = -1, x = 6 = W and x = -1 exactly.
    features = torch.randn(1, 2, 5, 6, generator=torch.Generator().manual_seed(19))
    rois = torch.tensor(
        [[0, 1.0, 4.0, 2.0, 6.0], [0, 1.0, -2.0, 2.0, 0.0], [0, 5.0, 1.0, 7.0, 2.0], [0, -2.0, 1.0, 0.0, 2.0]]
    )
    ours, ref, ours_grad, ref_grad = pool_both(features, rois, 1, 1.0, 1, False)
    assert torch.count_nonzero(ref) == 8
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours_grad, ref_grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("boxes", [torch.zeros(0, 5), [torch.zeros(0, 4), torch.zeros(0, 4)]])
def test_empty_box_set_gives_empty_output_and_zero_gradient(boxes):
    features = torch.randn(2, 3, 5, 5, requires_grad=True)
    out = roi_align(features, boxes, (2, 3), 0.5, 2)
    assert out.shape == (0, 3, 2, 3)
    out.sum().backward()
    assert features.grad is not None and features.grad.shape == features.shape
    assert torch.count_nonzero(features.grad) == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_input_computes_in_float32(dtype):
    features = torch.randn(2, 4, 10, 12, generator=torch.Generator().manual_seed(7)).to(dtype)
    rois = make_rois(2, 40, 48, seed=8)
    low = features.clone().requires_grad_()
    out = roi_align(low, rois, 7, 0.25, 2)
    assert out.dtype == dtype
    ref_in = features.float().requires_grad_()
    ref = torchvision.ops.roi_align(ref_in, rois, 7, 0.25, 2)
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)
    upstream = torch.randn(ref.shape, generator=torch.Generator().manual_seed(9))
    out.backward(upstream.to(dtype))
    ref.backward(upstream)
    assert low.grad.dtype == dtype
    torch.testing.assert_close(low.grad.float(), ref_in.grad, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_autocast_follows_torchvision_rule(dtype):
    features = torch.randn(2, 4, 10, 12, generator=torch.Generator().manual_seed(10)).to(dtype)
    rois = make_rois(2, 40, 48, seed=11)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, ref, ours_grad, ref_grad = pool_both(features, rois, 7, 0.25, 2, False)
    # torchvision casts input and boxes to float32, pools, and casts back to the input dtype.
    assert ours.dtype == ref.dtype == dtype
    assert ours_grad.dtype == ref_grad.dtype == dtype
    tol = 0.0 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(ours.float(), ref.float(), rtol=tol, atol=max(tol, 1e-5))
    torch.testing.assert_close(ours_grad.float(), ref_grad.float(), rtol=tol, atol=max(tol, 1e-4))


@pytest.mark.parametrize("aligned, sampling_ratio", [(False, -1), (True, 2), (False, 3)])
def test_gradcheck_float64(aligned, sampling_ratio):
    features = torch.randn(2, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor(
        [[0, 1.3, 0.7, 9.1, 8.2], [1, -2.0, 3.5, 6.0, 30.0], [1, 4.4, 4.4, 4.9, 5.2], [0, 0.0, 0.0, 24.0, 20.0]],
        dtype=torch.float64,
    )
    pool = lambda x: roi_align(x, rois, (2, 3), 0.25, sampling_ratio, aligned)  # noqa: E731
    # Pooling is linear in the input, so finite differences are exact up to rounding: tight tolerances.
    assert torch.autograd.gradcheck(pool, (features,), atol=1e-8, rtol=1e-6, fast_mode=True)
    ref = torchvision.ops.roi_align(features, rois, (2, 3), 0.25, sampling_ratio, aligned)
    torch.testing.assert_close(roi_align(features, rois, (2, 3), 0.25, sampling_ratio, aligned), ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_too_many_taps_falls_back_to_torchvision_kernel(monkeypatch, dtype):
    monkeypatch.setattr(roi_align_module, "_MAX_DENSE_TAPS", 10)
    features = torch.randn(2, 3, 8, 9, generator=torch.Generator().manual_seed(20)).to(dtype)
    rois = make_rois(2, 32, 36, seed=21)
    ours_in = features.clone().requires_grad_()
    ours = roi_align(ours_in, rois, 3, 0.25, -1)
    ours.float().sum().backward()
    ref_in = features.float().requires_grad_()
    ref = torchvision.ops.roi_align(ref_in, rois, 3, 0.25, -1)
    ref.sum().backward()
    assert ours.dtype == dtype and ours_in.grad.dtype == dtype
    torch.testing.assert_close(ours, ref.to(dtype), rtol=0, atol=0)
    torch.testing.assert_close(ours_in.grad, ref_in.grad.to(dtype), rtol=0, atol=0)


def test_cpu_float_input_never_calls_torchvision(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("torchvision.ops.roi_align called on the CPU fast path")

    monkeypatch.setattr(roi_align_module.torchvision.ops, "roi_align", forbidden)
    out = roi_align(torch.randn(1, 2, 6, 6), torch.tensor([[0, 1.0, 1.0, 4.0, 5.0]]), 2)
    assert out.shape == (1, 2, 2, 2)


def test_unsupported_input_goes_to_torchvision(monkeypatch):
    calls = []

    def recorder(input, rois, output_size, spatial_scale, sampling_ratio, aligned):
        calls.append((input.device.type, tuple(rois.shape), output_size, spatial_scale, sampling_ratio, aligned))
        return torch.empty(0)

    monkeypatch.setattr(roi_align_module.torchvision.ops, "roi_align", recorder)
    meta = torch.empty(2, 3, 8, 8, device="meta")
    roi_align(meta, [torch.zeros(3, 4, device="meta"), torch.zeros(1, 4, device="meta")], 5, 0.5, 2, True)
    assert calls == [("meta", (4, 5), (5, 5), 0.5, 2, True)]


def test_bad_batch_index_and_box_shape_raise():
    features = torch.randn(2, 3, 5, 5)
    with pytest.raises(ValueError, match="batch index"):
        roi_align(features, torch.tensor([[2, 0.0, 0.0, 3.0, 3.0]]), 2)
    with pytest.raises(ValueError, match=r"boxes\[1\]"):
        roi_align(features, [torch.zeros(1, 4), torch.zeros(1, 5)], 2)


def fpn_features(image_hw: tuple[int, int], channels: int, seed: int) -> dict[str, Tensor]:
    """FPN-like maps '0'..'3' at strides 4..32 for a padded batch of 2 images, plus an unused 'pool'."""
    g = torch.Generator().manual_seed(seed)
    feats = {}
    for name, stride in zip("0123", (4, 8, 16, 32)):
        h, w = -(-image_hw[0] // stride), -(-image_hw[1] // stride)
        feats[name] = torch.randn(2, channels, h, w, generator=g)
    feats["pool"] = torch.randn(2, channels, 3, 3, generator=g)
    return feats


def fpn_boxes(image_shapes: list[tuple[int, int]], seed: int) -> list[Tensor]:
    """Boxes from 8 to ~600 pixels per image, so every pyramid level receives some."""
    g = torch.Generator().manual_seed(seed)
    boxes = []
    for h, w in image_shapes:
        side = torch.exp(torch.linspace(2.0, 6.4, 24)) * (0.8 + 0.4 * torch.rand(24, generator=g))
        aspect = 0.5 + torch.rand(24, generator=g)
        x1 = torch.rand(24, generator=g) * w * 0.8
        y1 = torch.rand(24, generator=g) * h * 0.8
        boxes.append(torch.stack([x1, y1, x1 + side * aspect, y1 + side / aspect], 1))
    return boxes


def pool_multiscale_both(names, features, boxes, image_shapes, output_size=7, sampling_ratio=2):
    ours_feats = {k: v.clone().requires_grad_() for k, v in features.items()}
    ref_feats = {k: v.clone().requires_grad_() for k, v in features.items()}
    ours = MultiScaleRoIAlign(names, output_size, sampling_ratio)(ours_feats, boxes, image_shapes)
    ref = torchvision.ops.MultiScaleRoIAlign(names, output_size, sampling_ratio)(ref_feats, boxes, image_shapes)
    upstream = torch.randn(ref.shape, generator=torch.Generator().manual_seed(12))
    ours.backward(upstream)
    ref.backward(upstream)
    return ours, ref, ours_feats, ref_feats


def test_multiscale_matches_torchvision_on_four_levels():
    image_shapes = [(512, 640), (448, 600)]
    features = fpn_features((512, 640), channels=3, seed=13)
    boxes = fpn_boxes(image_shapes, seed=14)
    levels = map_levels(boxes, 2, 5, 224, 4)
    assert set(levels.tolist()) == {0, 1, 2, 3}

    names = ["0", "1", "2", "3"]
    ours, ref, ours_feats, ref_feats = pool_multiscale_both(names, features, boxes, image_shapes)
    assert ours.shape == (48, 3, 7, 7)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    for name in names:
        torch.testing.assert_close(ours_feats[name].grad, ref_feats[name].grad, rtol=0, atol=1e-4)
        assert ref_feats[name].grad.abs().sum() > 0
    assert ours_feats["pool"].grad is None


def test_multiscale_single_level_and_image_without_boxes():
    image_shapes = [(60, 90), (75, 64)]
    features = {"0": torch.randn(2, 4, 10, 12, generator=torch.Generator().manual_seed(15))}
    boxes = [fpn_boxes([(75, 90)], seed=16)[0][:10], torch.zeros(0, 4)]
    ours, ref, ours_feats, ref_feats = pool_multiscale_both(["0"], features, boxes, image_shapes, (3, 2), 0)
    assert ours.shape == (10, 4, 3, 2)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours_feats["0"].grad, ref_feats["0"].grad, rtol=0, atol=1e-4)


def test_multiscale_has_no_state_and_matches_torchvision_state_dict():
    ours = MultiScaleRoIAlign(["0", "1"], 7, 2, canonical_scale=112, canonical_level=3)
    ref = torchvision.ops.MultiScaleRoIAlign(["0", "1"], 7, 2, canonical_scale=112, canonical_level=3)
    assert ours.state_dict() == {} == dict(ref.state_dict())
    assert list(ours.parameters()) == [] and list(ours.buffers()) == []


def test_multiscale_canonical_level_changes_assignment_like_torchvision():
    image_shapes = [(256, 256), (256, 256)]
    features = fpn_features((256, 256), channels=2, seed=17)
    boxes = fpn_boxes(image_shapes, seed=18)
    names = ["0", "1", "2", "3"]
    feats = {k: v for k, v in features.items() if k in names}
    ours = MultiScaleRoIAlign(names, 5, 2, canonical_scale=64, canonical_level=3)(feats, boxes, image_shapes)
    ref = torchvision.ops.MultiScaleRoIAlign(names, 5, 2, canonical_scale=64, canonical_level=3)(
        feats, boxes, image_shapes
    )
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def linear_both(names, features, boxes, image_shapes, weight, bias):
    """Our fused pooling + linear layer, and torchvision's pooler followed by F.linear, on clones
    of the inputs with the same upstream gradient."""
    ours_in = {k: v.clone().requires_grad_() for k, v in features.items()}
    ref_in = {k: v.clone().requires_grad_() for k, v in features.items()}
    params = {side: [p.clone().requires_grad_() if p is not None else None for p in (weight, bias)]
              for side in ("ours", "ref")}
    ours = MultiScaleRoIAlign(names, 7, 2).forward_linear(ours_in, boxes, image_shapes, *params["ours"])
    pooled = torchvision.ops.MultiScaleRoIAlign(names, 7, 2)(ref_in, boxes, image_shapes)
    ref = torch.nn.functional.linear(pooled.flatten(1), *params["ref"])
    upstream = torch.randn(ref.shape, generator=torch.Generator().manual_seed(21))
    ours.backward(upstream)
    ref.backward(upstream)
    return ours, ref, (ours_in, params["ours"]), (ref_in, params["ref"])


@pytest.mark.parametrize("chunk_elements", [1 << 24, 3 * 7 * 7 * 5])  # one chunk; chunks of 5 RoIs
@pytest.mark.parametrize("with_bias", [True, False])
def test_fused_pooling_and_linear_match_torchvision_values_and_all_gradients(monkeypatch, chunk_elements, with_bias):
    monkeypatch.setattr(roi_align_module, "_LINEAR_CHUNK_ELEMENTS", chunk_elements)
    calls = []
    original = roi_align_module._SparsePoolLinear.apply
    monkeypatch.setattr(roi_align_module._SparsePoolLinear, "apply", lambda *a: calls.append(1) or original(*a))
    image_shapes = [(512, 640), (448, 600)]
    features = fpn_features((512, 640), channels=3, seed=13)
    boxes = fpn_boxes(image_shapes, seed=14)
    g = torch.Generator().manual_seed(20)
    weight = torch.randn(6, 3 * 7 * 7, generator=g)
    bias = torch.randn(6, generator=g) if with_bias else None
    names = ["0", "1", "2", "3"]
    ours, ref, (ours_in, ours_params), (ref_in, ref_params) = linear_both(names, features, boxes, image_shapes,
                                                                           weight, bias)
    assert calls, "the fused path did not run"
    assert ours.shape == (48, 6)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_params[0].grad, ref_params[0].grad, rtol=1e-5, atol=1e-4)
    if with_bias:
        torch.testing.assert_close(ours_params[1].grad, ref_params[1].grad, rtol=1e-5, atol=1e-5)
    for name in names:
        torch.testing.assert_close(ours_in[name].grad, ref_in[name].grad, rtol=0, atol=1e-4)
        assert ref_in[name].grad.abs().sum() > 0


def test_fused_pooling_and_linear_without_boxes_and_under_autocast(monkeypatch):
    calls = []
    original = roi_align_module._SparsePoolLinear.apply
    monkeypatch.setattr(roi_align_module._SparsePoolLinear, "apply", lambda *a: calls.append(1) or original(*a))
    features = {"0": torch.randn(2, 4, 10, 12, generator=torch.Generator().manual_seed(15))}
    weight, bias = torch.randn(3, 4 * 49, requires_grad=True), torch.randn(3, requires_grad=True)
    pooler = MultiScaleRoIAlign(["0"], 7, 2)
    empty = pooler.forward_linear(features, [torch.zeros(0, 4), torch.zeros(0, 4)], [(60, 90), (75, 64)], weight, bias)
    assert empty.shape == (0, 3) and calls
    empty.sum().backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight)) and torch.equal(bias.grad, torch.zeros(3))

    # Without autograd (inference) the plain composition runs: one product over all RoIs.
    calls.clear()
    with torch.no_grad():
        pooler.forward_linear(features, [torch.ones(2, 4).cumsum(1), torch.zeros(0, 4)], [(60, 90), (75, 64)],
                              weight, bias)
    assert not calls

    boxes = [fpn_boxes([(75, 90)], seed=16)[0][:10], torch.zeros(0, 4)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = pooler.forward_linear(features, boxes, [(60, 90), (75, 64)], weight, bias)
        expected = torch.nn.functional.linear(pooler(features, boxes, [(60, 90), (75, 64)]).flatten(1), weight, bias)
    assert mixed.dtype == torch.bfloat16  # autocast's linear, as in the unfused head
    assert torch.equal(mixed, expected)


def test_pooling_in_chunks_of_few_rois_matches_torchvision(monkeypatch):
    monkeypatch.setattr(roi_align_module, "_CHUNK_ELEMENTS", 5 * 4 * 3 * 2)  # 5 RoIs of [4, 3, 2] per chunk
    features = torch.randn(2, 4, 12, 16, generator=torch.Generator().manual_seed(30))
    rois = make_rois(2, 48, 64, seed=31)
    ours, ref, ours_grad, ref_grad = pool_both(features, rois, (3, 2), 0.25, 2, False)
    assert rois.shape[0] > 20
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours_grad, ref_grad, rtol=0, atol=1e-4)


def test_scale_inference_uses_the_longer_side():
    """A 10x1000 image resized to 1x192 and padded to 32x192 has a stride-16 map of 2x12: its
    height would say scale 2, its width says the true 1/16."""
    from network_files.ops.poolers import infer_scale

    assert infer_scale(torch.zeros(1, 8, 2, 12), (1, 192)) == 1 / 16
    assert infer_scale(torch.zeros(1, 8, 12, 2), (192, 1)) == 1 / 16
    # Ordinary images: the same scales as torchvision's pooler, whichever side is longer.
    for image_size, feature_size in (((800, 1066), (200, 267)), ((1066, 800), (34, 25)), ((600, 600), (75, 75))):
        feature = torch.zeros(1, 8, *feature_size)
        expected = torchvision.ops.poolers._infer_scale(feature, list(image_size))
        assert infer_scale(feature, image_size) == expected


def test_training_fuses_pooling_into_fc6_only_when_nothing_is_skipped(tiny_detector, monkeypatch):
    calls = []
    original = roi_align_module._SparsePoolLinear.apply
    monkeypatch.setattr(roi_align_module._SparsePoolLinear, "apply", lambda *a: calls.append(1) or original(*a))
    torch.manual_seed(0)
    model = tiny_detector()
    images = [torch.rand(3, 64, 80), torch.rand(3, 72, 64)]
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 50.0]]), "labels": torch.tensor([1])}] * 2

    model.train()(images, targets)
    assert len(calls) == 1

    fired = []
    hook = model.roi_heads.box_head.register_forward_hook(lambda *args: fired.append(1))
    model(images, targets)
    assert fired and len(calls) == 1  # a hook expects the head's own forward: not fused
    hook.remove()

    with torch.no_grad():
        model(images, targets)  # no autograd: nothing to save, not fused
    model.eval()
    model(images)
    assert len(calls) == 1

    quantized = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    with torch.no_grad():
        assert quantized(images)[0]["boxes"].shape[1] == 4
