"""More backbones: ResNet C4, any torchvision classifier (with or without FPN), VGG16, and RoIPool.

Weight files are torchvision's randomly initialised models saved under the official file names.
"""
import json
import math
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.ops import roi_pool
from torchvision.ops.poolers import _setup_scales

from backbone import DEFAULT_RETURN_NODES, FrozenBatchNorm2d, WeightFileError, torchvision_backbone
from conftest import ROOT, TINY_COMMON_FLAGS, TINY_TRAIN_FLAGS, write_fake_vgg16_file
from network_files import MultiScaleRoIAlign, MultiScaleRoIPool
from train_utils.loading import load_model
from train_utils.model.builder import build_model
from train_utils.engine.args import build_parser, parse

# A detector small enough for a CPU training step on 128-pixel images.
TINY = dict(
    num_classes=4, min_size=128, max_size=128, representation_size=64, box_batch_size_per_image=16,
    rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=100,
    rpn_post_nms_top_n_test=50,
)


def randomise_batch_norms(model: nn.Module, seed: int) -> None:
    """Non-trivial statistics and affine terms in every BatchNorm2d, so a lost copy shows."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            with torch.no_grad():
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)


def save_torchvision_classifier(name: str, path: Path, seed: int) -> tuple[nn.Module, dict]:
    """torchvision's random `name` classifier, saved to `path` like an official ImageNet file."""
    torch.manual_seed(seed)
    model = torchvision.models.get_model(name, weights=None)
    randomise_batch_norms(model, seed)
    state = model.state_dict()
    torch.save(state, path)
    return model.eval(), state


def expected_body_keys(state: dict) -> set:
    """Keys a detection backbone keeps from a classifier file: no head, no BatchNorm counters."""
    return {k for k in state if not k.endswith("num_batches_tracked") and not k.startswith(("fc.", "classifier."))}


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float32 rounding relative to the largest value (random trunks grow activations)."""
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


def train_step(model: nn.Module) -> dict:
    """One SGD step on two generated images; returns the losses. Checks they and the gradients are finite."""
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 128, 128, generator=generator), torch.rand(3, 96, 128, generator=generator)]
    targets = [
        {"boxes": torch.tensor([[10.0, 20.0, 70.0, 90.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[30.0, 10.0, 120.0, 90.0], [5.0, 5.0, 40.0, 40.0]]), "labels": torch.tensor([3, 2])},
    ]
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in trainable)
    # Small step: the random-init trunks without batch statistics have large activations.
    torch.optim.SGD(trainable, lr=1e-6).step()
    assert sum(not torch.equal(a, p) for a, p in zip(before, trainable)) > len(trainable) // 2

    model.eval()
    with torch.no_grad():
        detections = model(images[:1])
    assert set(detections[0]) == {"boxes", "labels", "scores"}
    return losses


# --- ResNet C4 ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "arch, file_name", [("resnet50", "resnet50-0676ba61.pth"), ("resnet101", "resnet101-63fe2227.pth")]
)
def test_resnet_c4_loads_imagenet_file_matches_torchvision_and_trains(arch, file_name, tmp_path):
    theirs, state = save_torchvision_classifier(arch, tmp_path / file_name, seed=1)
    model = build_model({**TINY, "backbone": f"{arch}_c4"}, str(tmp_path / file_name))

    trunk, head = model.backbone, model.roi_heads.box_head
    trunk_keys, head_keys = set(trunk.state_dict()), {"layer4." + k for k in head.layer4.state_dict()}
    assert not trunk_keys & head_keys
    assert trunk_keys | head_keys == expected_body_keys(state)
    assert all(torch.equal(v, state[k]) for k, v in trunk.state_dict().items())
    assert torch.equal(model.state_dict()["roi_heads.box_head.layer4.2.conv3.weight"], state["layer4.2.conv3.weight"])
    assert isinstance(trunk.bn1, FrozenBatchNorm2d) and isinstance(head.layer4[0].bn1, FrozenBatchNorm2d)
    assert trunk.out_channels == 1024 and head.out_channels == 2048
    assert model.roi_heads.box_predictor.cls_score.in_features == 2048
    pooler = model.roi_heads.box_roi_pool
    assert isinstance(pooler, MultiScaleRoIAlign) and pooler.output_size == (14, 14) and pooler.sampling_ratio == 2
    assert model.rpn.anchor_generator.sizes == ((32, 64, 128, 256, 512),)

    # trunk + head = torchvision's ResNet up to its global pool (eval BatchNorm = frozen statistics)
    image = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        c4 = trunk(image)
        assert c4.shape == (1, 1024, 4, 6)
        stem = theirs.maxpool(theirs.relu(theirs.bn1(theirs.conv1(image))))
        tv_c4 = theirs.layer3(theirs.layer2(theirs.layer1(stem)))
        assert_close_to_scale(c4, tv_c4)
        assert_close_to_scale(head(c4), torch.flatten(theirs.avgpool(theirs.layer4(tv_c4)), 1))

    # default trainable_layers=3: conv1 and layer1 frozen, layer2..layer4 (the head) trained
    trainable = {name.split(".")[0] for name, p in trunk.named_parameters() if p.requires_grad}
    assert trainable == {"layer2", "layer3"}
    assert all(p.requires_grad for p in head.parameters())
    train_step(model)
    assert model.backbone.layer2[0].conv1.weight.grad is not None
    assert head.layer4[0].conv2.weight.grad.abs().sum() > 0
    assert trunk.conv1.weight.grad is None


def test_resnet_c4_trainable_layers_follow_torchvision():
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    for layers in (0, 1, 5):
        with torch.device("meta"):
            model = build_model({**TINY, "backbone": "resnet50_c4", "trainable_layers": layers})
            reference = resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=layers)
        ours = [n for n, p in model.backbone.named_parameters() if p.requires_grad]
        ours += ["layer4." + n for n, p in model.roi_heads.box_head.layer4.named_parameters() if p.requires_grad]
        assert ours == [n for n, p in reference.body.named_parameters() if p.requires_grad], layers


# --- any torchvision classifier ---------------------------------------------------------------------

@pytest.mark.parametrize(
    "name, fpn, file_name, strides, pool_channels",
    [
        ("resnet34", True, "resnet34-b627a593.pth", [4, 8, 16, 32, 64], 256),
        ("mobilenet_v3_large", False, "mobilenet_v3_large-8738ca79.pth", [32], 960),
        ("efficientnet_b0", True, "efficientnet_b0_rwightman-7f5810bc.pth", [8, 16, 32, 64], 256),
    ],
)
def test_torchvision_backbone_loads_imagenet_file_matches_torchvision_and_trains(
    name, fpn, file_name, strides, pool_channels, tmp_path
):
    theirs, state = save_torchvision_classifier(name, tmp_path / file_name, seed=3)
    model = build_model({**TINY, "backbone": f"tv:{name}", "fpn": fpn}, str(tmp_path / file_name))

    backbone = model.backbone
    body = backbone.body.state_dict()
    nodes = DEFAULT_RETURN_NODES[name] if fpn else DEFAULT_RETURN_NODES[name][-1:]
    assert set(body) == expected_body_keys(state)
    assert all(torch.equal(v, state[k]) for k, v in body.items())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert backbone.strides == strides and backbone.out_channels == pool_channels
    assert (backbone.fpn is not None) == fpn
    if fpn:
        assert model.rpn.anchor_generator.sizes == tuple((8 * s,) for s in strides)
        assert model.roi_heads.box_roi_pool.featmap_names == [str(i) for i in range(len(nodes))]
    else:
        assert model.rpn.anchor_generator.sizes == ((32, 64, 128, 256, 512),)
        assert model.roi_heads.box_roi_pool.featmap_names == ["0"]

    # the body returns torchvision's own feature maps (eval mode: frozen statistics, no stochastic depth)
    model.eval()
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    reference = create_feature_extractor(theirs, {node: str(i) for i, node in enumerate(nodes)})
    with torch.no_grad():
        ours, expected = backbone.body(image), reference(image)
        assert list(ours) == list(expected)
        for key in expected:
            assert_close_to_scale(ours[key], expected[key])
        names = list(backbone(image))
    assert names == ([str(i) for i in range(len(nodes))] + ["pool"] if fpn else ["0"])
    train_step(model)


@pytest.mark.parametrize("name, strides", [("resnet18", [4, 8, 16, 32]), ("mobilenet_v2", [8, 16, 32])])
def test_default_return_nodes_double_the_stride(name, strides):
    backbone = torchvision_backbone(name)
    assert backbone.strides == strides + [2 * strides[-1]]
    assert torchvision_backbone(name, fpn=False).strides == strides[-1:]


def test_network_without_defaults_takes_nodes_and_any_weight_file(tmp_path):
    _, state = save_torchvision_classifier("squeezenet1_1", tmp_path / "squeezenet.pth", seed=11)
    backbone = torchvision_backbone("squeezenet1_1", ["features.7", "features.12"], fpn=False,
                                    weights_path=str(tmp_path / "squeezenet.pth"))
    assert backbone.strides == [16] and backbone.out_channels == 512
    key = "features.12.expand3x3.weight"
    assert torch.equal(backbone.body.state_dict()[key], state[key])
    url = torchvision.models.SqueezeNet1_1_Weights.IMAGENET1K_V1.url
    with pytest.raises(FileNotFoundError, match=url):
        torchvision_backbone("squeezenet1_1", ["features.12"], weights_path=str(tmp_path / "missing.pth"))


def test_torchvision_backbone_errors_name_the_problem():
    with pytest.raises(ValueError, match="bad return nodes"):
        torchvision_backbone("resnet18", ["layer2", "layer9"])
    with pytest.raises(ValueError, match=r"must each halve the resolution; their strides are \[4, 16\]"):
        torchvision_backbone("resnet18", ["layer1", "layer3"])
    with pytest.raises(ValueError, match="no default return nodes"):
        torchvision_backbone("alexnet")
    with pytest.raises(ValueError, match="not a torchvision classification model"):
        torchvision_backbone("fasterrcnn_resnet50_fpn")
    with pytest.raises(ValueError, match="has 5 feature maps, got 3 sizes"):
        build_model({**TINY, "backbone": "tv:resnet18", "anchor_sizes": [32, 64, 128]})
    with pytest.raises(ValueError, match="unknown roi_op 'max'"):
        build_model({**TINY, "backbone": "tv:resnet18", "fpn": False, "roi_op": "max"})


def test_command_line_backbone_flags():
    parser = build_parser("test", {})
    args = parse(parser, ["--backbone", "tv:resnet18", "--no-fpn", "--return-nodes", "layer2,layer3",
                          "--roi-op", "pool"])
    assert (args.backbone, args.fpn, args.return_nodes) == ("tv:resnet18", False, ["layer2", "layer3"])
    assert args.roi_op == "pool"
    args = parse(parser, ["--backbone", "resnet101_c4"])
    assert (args.fpn, args.return_nodes, args.roi_op) == (None, None, "align")
    for bad in (["--backbone", "tv:not_a_model"], ["--backbone", "vgg16", "--no-fpn"],
                ["--backbone", "mobilenet_v2", "--return-nodes", "features.6"], ["--roi-op", "max"]):
        with pytest.raises(SystemExit):
            parse(parser, bad)


# --- VGG16 ---------------------------------------------------------------------------------------------

def test_vgg16_loads_imagenet_file_and_trains(tmp_path):
    path = tmp_path / "vgg16-397923af.pth"
    state = write_fake_vgg16_file(path, seed=5)

    model = build_model({**TINY, "backbone": "vgg16"}, str(path))
    ours = model.backbone.state_dict()
    assert set(ours) == {k[len("features."):] for k in state if k.startswith("features.")}
    assert all(torch.equal(v, state["features." + k]) for k, v in ours.items())
    del state["features.28.bias"]
    torch.save(state, path)
    with pytest.raises(WeightFileError, match=r"vgg16-397923af.pth' is not a torchvision vgg16 state dict: "
                                              r"1 missing \(e.g. features.28.bias\)$"):
        build_model({**TINY, "backbone": "vgg16"}, str(path))
    train_step(model)


# --- RoIPool ---------------------------------------------------------------------------------------------

def pyramid(image_size: tuple[int, int], channels: int, seed: int) -> "OrderedDict[str, torch.Tensor]":
    """FPN-like maps "0".."3" at strides 4..32 plus "pool" at 64 for a batch of two images."""
    generator = torch.Generator().manual_seed(seed)
    h, w = image_size
    return OrderedDict(
        (name, torch.randn(2, channels, math.ceil(h / s), math.ceil(w / s), generator=generator))
        for name, s in zip(["0", "1", "2", "3", "pool"], [4, 8, 16, 32, 64])
    )


def random_boxes(image_shapes: list, count: int, seed: int) -> list:
    """Boxes from 4 to the whole image in size, so every pyramid level gets some."""
    generator = torch.Generator().manual_seed(seed)
    boxes = []
    for h, w in image_shapes:
        side = torch.exp(torch.empty(count).uniform_(math.log(4), math.log(min(h, w)), generator=generator))
        aspect = torch.empty(count).uniform_(0.5, 2.0, generator=generator)
        bw, bh = (side * aspect.sqrt()).clamp(max=w - 1), (side / aspect.sqrt()).clamp(max=h - 1)
        x1 = torch.rand(count, generator=generator) * (w - bw)
        y1 = torch.rand(count, generator=generator) * (h - bh)
        boxes.append(torch.stack([x1, y1, x1 + bw, y1 + bh], dim=1))
    return boxes


def roi_pool_reference(features: dict, names: list, boxes: list, image_shapes: list, output_size, **canonical):
    """torchvision's MultiScaleRoIAlign level mapping (its own LevelMapper) with torchvision's roi_pool per level."""
    maps = [v for k, v in features.items() if k in names]
    scales, mapper = _setup_scales(maps, image_shapes, canonical.get("canonical_scale", 224),
                                   canonical.get("canonical_level", 4))
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], dim=1) for i, b in enumerate(boxes)])
    levels = mapper(boxes) if len(maps) > 1 else torch.zeros(len(rois), dtype=torch.int64)
    result = torch.zeros((len(rois), maps[0].shape[1]) + tuple(output_size))
    for level, (feature, scale) in enumerate(zip(maps, scales)):
        index = torch.where(levels == level)[0]
        result[index] = roi_pool(feature, rois[index], output_size, scale)
    return result, levels


@pytest.mark.parametrize("canonical", [{}, {"canonical_scale": 64, "canonical_level": 3}])
def test_multiscale_roi_pool_equals_torchvision_level_mapping_with_roi_pool(canonical):
    image_shapes = [(256, 320), (224, 300)]
    names = ["0", "1", "2", "3"]
    boxes = random_boxes(image_shapes, 40, seed=6)
    ours_feats = {k: v.requires_grad_() for k, v in pyramid((256, 320), 3, seed=7).items()}
    ref_feats = {k: v.detach().clone().requires_grad_() for k, v in ours_feats.items()}

    ours = MultiScaleRoIPool(names, (7, 5), **canonical)(ours_feats, boxes, image_shapes)
    expected, levels = roi_pool_reference(ref_feats, names, boxes, image_shapes, (7, 5), **canonical)
    assert len(set(levels.tolist())) >= 3
    assert ours.shape == (80, 3, 7, 5)
    assert torch.equal(ours, expected)
    upstream = torch.randn(ours.shape, generator=torch.Generator().manual_seed(8))
    ours.backward(upstream)
    expected.backward(upstream)
    for name in names:
        assert torch.equal(ours_feats[name].grad, ref_feats[name].grad), name
    assert ours_feats["pool"].grad is None
    # RoIPool really is a different operation from RoIAlign
    align = MultiScaleRoIAlign(names, (7, 5), 2, **canonical)(ours_feats, boxes, image_shapes)
    assert not torch.allclose(align, ours)


def test_multiscale_roi_pool_single_level_and_state():
    image_shapes = [(60, 90), (75, 64)]
    features = {"0": torch.randn(2, 4, 10, 12, generator=torch.Generator().manual_seed(9))}
    boxes = [random_boxes([(75, 90)], 10, seed=10)[0], torch.zeros(0, 4)]
    ours = MultiScaleRoIPool(["0"], 3)(features, boxes, image_shapes)
    expected, _ = roi_pool_reference(features, ["0"], boxes, image_shapes, (3, 3))
    assert torch.equal(ours, expected)
    pooler = MultiScaleRoIPool(["0", "1"], 7)
    assert pooler.state_dict() == {} and list(pooler.parameters()) == []
    with pytest.raises(ValueError, match=r"MultiScaleRoIPool: none of \['0', '1'\] found"):
        pooler({"x": features["0"]}, boxes, image_shapes)


# --- the training script -----------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize(
    "flags, pooler",
    [(["--backbone", "mobilenet_v2", "--roi-op", "pool"], MultiScaleRoIPool),
     (["--backbone", "tv:mobilenet_v3_large", "--no-fpn"], MultiScaleRoIAlign)],
    ids=["mobilenet_v2-roipool", "tv-mobilenet_v3_large-no-fpn"],
)
def test_train_script_one_epoch_and_checkpoint_rebuilds(flags, pooler, demo_voc, tmp_path):
    cmd = [sys.executable, str(ROOT / "train_mobilenet.py"), "--data-path", str(demo_voc),
           "--classes-json", str(demo_voc / "classes.json"), "--output-dir", str(tmp_path), "--epochs", "1",
           *(TINY_TRAIN_FLAGS if flags[1] == "mobilenet_v2" else TINY_COMMON_FLAGS), *flags]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"training failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"

    checkpoint = torch.load(tmp_path / "last.pth", map_location="cpu", weights_only=True)
    config = checkpoint["model_config"]
    assert config["backbone"] == flags[1]
    assert config["roi_op"] == ("pool" if pooler is MultiScaleRoIPool else "align")
    assert config["backbone_options"].get("fpn") is (False if "--no-fpn" in flags else None)
    model = load_model(str(tmp_path / "last.pth"))  # strict load
    assert type(model.roi_heads.box_roi_pool) is pooler
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert record["epoch"] == 0 and len(record["coco"]) == 12
    assert math.isfinite(record["loss"])
