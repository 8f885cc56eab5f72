"""backbone/: key-for-key and output parity with torchvision, weight files, layer freezing."""
import math
from collections import OrderedDict

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool as TvLastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d as TvFrozenBatchNorm2d

from conftest import write_fake_vgg16_file
from backbone import (
    WEIGHT_FILE_NAMES,
    WEIGHT_URLS,
    Bottleneck,
    FeaturePyramidNetwork,
    FrozenBatchNorm2d,
    IntermediateLayerGetter,
    LastLevelMaxPool,
    MobileNetV2,
    ResNet,
    WeightFileError,
    load_weight_file,
    mobilenet_v2_backbone,
    resnet50_fpn_backbone,
    vgg,
    vgg_backbone,
)

ATOL = 1e-5


# Strict parity runs torchvision's exact sequence of operations (see conftest.reference_arithmetic).
pytestmark = pytest.mark.usefixtures("reference_arithmetic")


def _layout(module: nn.Module) -> list[tuple[str, torch.Size]]:
    return [(key, value.shape) for key, value in module.state_dict().items()]


def _randomise_norm_buffers(model: nn.Module, generator: torch.Generator) -> None:
    """Give every (frozen) batch norm non-trivial statistics and affine terms."""
    for module in model.modules():
        if isinstance(module, (TvFrozenBatchNorm2d, nn.BatchNorm2d)):
            n = module.running_mean.numel()
            with torch.no_grad():
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            if isinstance(module, nn.BatchNorm2d):
                module.num_batches_tracked.fill_(7)


def _assert_outputs_equal(ours: dict, theirs: dict) -> None:
    assert list(ours) == list(theirs)
    for name in theirs:
        assert ours[name].shape == theirs[name].shape, name
        torch.testing.assert_close(ours[name], theirs[name], atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def tv_fpn(image):
    """torchvision's ResNet-50 FPN backbone with random FrozenBN buffers, and its output on `image`."""
    torch.manual_seed(0)
    model = resnet_fpn_backbone(backbone_name="resnet50", weights=None).eval()
    _randomise_norm_buffers(model, torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(image)
    return model, out


# --- state dict layout -----------------------------------------------------------------------------

@pytest.mark.parametrize(
    "ours, theirs",
    [
        (lambda: ResNet(Bottleneck, [3, 4, 6, 3]), lambda: torchvision.models.resnet50()),
        (
            lambda: resnet50_fpn_backbone(),
            lambda: resnet_fpn_backbone(backbone_name="resnet50", weights=None),
        ),
        (
            lambda: resnet50_fpn_backbone(returned_layers=[2, 4]),
            lambda: resnet_fpn_backbone(backbone_name="resnet50", weights=None, returned_layers=[2, 4]),
        ),
        (lambda: MobileNetV2(), lambda: torchvision.models.mobilenet_v2()),
        (lambda: vgg("vgg16"), lambda: torchvision.models.vgg16()),
        (lambda: vgg("vgg11"), lambda: torchvision.models.vgg11()),
        (lambda: vgg("vgg19"), lambda: torchvision.models.vgg19()),
    ],
    ids=["resnet50", "resnet50_fpn", "resnet50_fpn_layers24", "mobilenet_v2", "vgg16", "vgg11", "vgg19"],
)
def test_state_dict_layout_matches_torchvision(ours, theirs):
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        assert _layout(ours()) == _layout(theirs())


def test_backbone_out_channels():
    with torch.device("meta"):
        assert resnet50_fpn_backbone().out_channels == 256
        assert mobilenet_v2_backbone().out_channels == 1280
        assert vgg_backbone("vgg13").out_channels == 512


# --- initialisation and forward parity --------------------------------------------------------------

def test_resnet50_fpn_init_matches_torchvision_under_same_seed():
    torch.manual_seed(0)
    ours = resnet50_fpn_backbone()
    torch.manual_seed(0)
    theirs = resnet_fpn_backbone(backbone_name="resnet50", weights=None)
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert all(torch.equal(ours_sd[k], theirs_sd[k]) for k in theirs_sd)


def test_fpn_conv_init_is_kaiming_uniform_a1_with_zero_bias():
    fpn = FeaturePyramidNetwork([64, 128], 256)
    for conv in [m for m in fpn.modules() if isinstance(m, nn.Conv2d)]:
        fan_in = conv.weight[0].numel()
        bound = math.sqrt(3.0 / fan_in)  # gain sqrt(2 / (1 + a^2)) = 1 for a = 1
        assert conv.weight.abs().max() <= bound
        assert conv.weight.abs().max() > 0.95 * bound
        assert torch.count_nonzero(conv.bias) == 0


def test_resnet50_fpn_forward_matches_torchvision(tv_fpn, image):
    theirs, expected = tv_fpn
    ours = resnet50_fpn_backbone().eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    with torch.no_grad():
        out = ours(image)
    assert list(out) == ["0", "1", "2", "3", "pool"]
    assert [tuple(v.shape[-2:]) for v in out.values()] == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    _assert_outputs_equal(out, expected)


def test_fpn_top_down_upsamples_to_odd_lateral_sizes():
    """Nearest upsampling must target each lateral's exact size, also when it is not 2x the coarser one."""
    torch.manual_seed(0)
    ours = FeaturePyramidNetwork([4, 8, 16], 6, extra_blocks=LastLevelMaxPool())
    theirs = torchvision.ops.FeaturePyramidNetwork([4, 8, 16], 6, extra_blocks=TvLastLevelMaxPool())
    theirs.load_state_dict(ours.state_dict(), strict=True)
    feats = OrderedDict(
        [("a", torch.randn(2, 4, 13, 11)), ("b", torch.randn(2, 8, 7, 6)), ("c", torch.randn(2, 16, 3, 3))]
    )
    out = ours(feats)
    assert list(out) == ["a", "b", "c", "pool"]
    assert out["pool"].shape == (2, 6, 2, 2)
    _assert_outputs_equal(out, theirs(feats))

    ours.extra_blocks = None
    assert list(ours(feats)) == ["a", "b", "c"]


def test_mobilenet_v2_init_matches_torchvision_under_same_seed():
    torch.manual_seed(0)
    ours = MobileNetV2().state_dict()
    torch.manual_seed(0)
    theirs = torchvision.models.mobilenet_v2().state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


# --- weight files -----------------------------------------------------------------------------------

def test_official_urls_match_torchvision():
    weights = torchvision.models
    expected = {
        "resnet50": weights.ResNet50_Weights.IMAGENET1K_V1.url,
        "mobilenet_v2": weights.MobileNet_V2_Weights.IMAGENET1K_V1.url,
        "vgg11": weights.VGG11_Weights.IMAGENET1K_V1.url,
        "vgg13": weights.VGG13_Weights.IMAGENET1K_V1.url,
        "vgg16": weights.VGG16_Weights.IMAGENET1K_V1.url,
        "vgg19": weights.VGG19_Weights.IMAGENET1K_V1.url,
        "fasterrcnn_resnet50_fpn_coco": weights.detection.FasterRCNN_ResNet50_FPN_Weights.COCO_V1.url,
    }
    for kind, url in expected.items():
        file_name = WEIGHT_FILE_NAMES[kind]
        assert url.endswith("/" + file_name)
        assert WEIGHT_URLS[file_name] == url


def test_resnet50_weight_file_loads_into_fpn_backbone(tmp_path):
    torch.manual_seed(5)
    resnet = torchvision.models.resnet50()  # plain BatchNorm2d: the file holds num_batches_tracked
    _randomise_norm_buffers(resnet, torch.Generator().manual_seed(6))
    saved = resnet.state_dict()
    path = tmp_path / "resnet50-0676ba61.pth"
    torch.save(saved, path)

    model = resnet50_fpn_backbone(weights_path=str(path))
    body = model.body.state_dict()
    assert not any(k.endswith("num_batches_tracked") for k in body)
    expected_keys = {k for k in saved if not k.endswith("num_batches_tracked") and not k.startswith("fc.")}
    assert set(body) == expected_keys
    for key, value in body.items():
        assert torch.equal(value, saved[key]), key
    # freezing still applies after loading (default: layer2..layer4 trainable)
    assert not model.body.conv1.weight.requires_grad
    assert not model.body.layer1[0].conv1.weight.requires_grad
    assert model.body.layer2[0].conv1.weight.requires_grad


def test_mobilenet_v2_weight_file_and_checkpoint_wrapper(tmp_path, image):
    torch.manual_seed(7)
    theirs = torchvision.models.mobilenet_v2()
    _randomise_norm_buffers(theirs, torch.Generator().manual_seed(8))
    theirs.eval()
    plain = tmp_path / "mobilenet_v2-b0353104.pth"
    torch.save(theirs.state_dict(), plain)
    wrapped = tmp_path / "model-0.pth"
    torch.save({"model": theirs.state_dict(), "epoch": 3}, wrapped)

    ours = MobileNetV2(weights_path=str(plain)).eval()
    ours_sd = ours.state_dict()
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours_sd[key], value), key
    with torch.no_grad():
        torch.testing.assert_close(ours(image), theirs(image), atol=ATOL, rtol=0)

    features = mobilenet_v2_backbone(weights_path=str(wrapped)).eval()
    with torch.no_grad():
        out = features(image)
        assert out.shape == (1, 1280, 2, 2)
        torch.testing.assert_close(out, theirs.features(image), atol=ATOL, rtol=0)


def test_mobilenet_v2_backbone_frozen_bn_drops_num_batches_tracked(tmp_path):
    torch.manual_seed(9)
    theirs = torchvision.models.mobilenet_v2()
    _randomise_norm_buffers(theirs, torch.Generator().manual_seed(10))
    path = tmp_path / "mobilenet_v2-b0353104.pth"
    torch.save(theirs.state_dict(), path)
    features = mobilenet_v2_backbone(weights_path=str(path), norm_layer=FrozenBatchNorm2d)
    assert isinstance(features[0][1], FrozenBatchNorm2d)
    assert torch.equal(features[0][1].running_var, theirs.features[0][1].running_var)


def test_vgg16_weight_file_and_backbone_match_torchvision(tmp_path, image):
    path = tmp_path / "vgg16-397923af.pth"
    state = write_fake_vgg16_file(path, seed=11)

    backbone = vgg_backbone("vgg16", weights_path=str(path))  # loads the whole VGG strictly first
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, state["features." + key]), key
    with torch.device("meta"):
        theirs = torchvision.models.vgg16().features
    theirs = theirs.to_empty(device="cpu")
    theirs.load_state_dict({k[len("features."):]: v for k, v in state.items() if k.startswith("features.")})
    assert isinstance(theirs[-1], nn.MaxPool2d)
    assert len(backbone) == len(theirs) - 1
    with torch.no_grad():
        out = backbone(image)
        assert out.shape == (1, 512, 4, 4)  # stride 16
        torch.testing.assert_close(out, theirs[:-1](image), atol=ATOL, rtol=0)


def test_old_fpn_key_layout_loads_from_coco_style_checkpoint(tmp_path, tv_fpn, image):
    theirs, expected = tv_fpn
    old_layout = OrderedDict()
    for key, value in theirs.state_dict().items():
        for block in ("inner_blocks", "layer_blocks"):
            if key.startswith(f"fpn.{block}."):
                key = key.replace(".0.weight", ".weight").replace(".0.bias", ".bias")
        old_layout["backbone." + key] = value
    assert "backbone.fpn.inner_blocks.0.weight" in old_layout
    assert "backbone.fpn.layer_blocks.3.bias" in old_layout
    path = tmp_path / "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth"
    torch.save({"model": old_layout}, path)

    detector = nn.Module()  # stands in for the detector: keys are prefixed with "backbone."
    detector.backbone = resnet50_fpn_backbone().eval()
    detector.load_state_dict(load_weight_file(str(path), "fasterrcnn_resnet50_fpn_coco"), strict=True)
    with torch.no_grad():
        _assert_outputs_equal(detector.backbone(image), expected)


@pytest.mark.parametrize(
    "build, file_name",
    [
        (lambda p: resnet50_fpn_backbone(weights_path=p), "resnet50-0676ba61.pth"),
        (lambda p: MobileNetV2(weights_path=p), "mobilenet_v2-b0353104.pth"),
        (lambda p: vgg_backbone("vgg19", weights_path=p), "vgg19-dcbb9e9d.pth"),
        (
            lambda p: load_weight_file(p, "fasterrcnn_resnet50_fpn_coco"),
            "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth",
        ),
    ],
    ids=["resnet50", "mobilenet_v2", "vgg19", "coco"],
)
def test_missing_weight_file_names_path_and_url(tmp_path, build, file_name):
    missing = str(tmp_path / "nowhere" / file_name)
    with torch.device("meta"), pytest.raises(FileNotFoundError) as info:
        build(missing)
    message = str(info.value)
    assert "\n" not in message
    assert missing in message
    assert "https://download.pytorch.org/models/" + file_name in message


def test_non_state_dict_file_is_rejected(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(WeightFileError, match="list.pth"):
        load_weight_file(str(path), "resnet50")


# --- freezing -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("trainable_layers", range(6))
def test_trainable_layers_match_torchvision(trainable_layers):
    with torch.device("meta"):
        ours = resnet50_fpn_backbone(trainable_layers=trainable_layers)
        theirs = resnet_fpn_backbone(
            backbone_name="resnet50", weights=None, trainable_layers=trainable_layers
        )

    def trainable(model: nn.Module) -> list[str]:
        return [name for name, p in model.named_parameters() if p.requires_grad]

    assert trainable(ours) == trainable(theirs)
    count = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    assert count == sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    # the FPN itself always trains; the ResNet stem only with 5 layers
    assert all(p.requires_grad for p in ours.fpn.parameters())
    assert ours.body.conv1.weight.requires_grad == (trainable_layers == 5)


@pytest.mark.parametrize("trainable_layers", [6, -1])
def test_trainable_layers_out_of_range(trainable_layers):
    with pytest.raises(ValueError, match="trainable_layers"):
        resnet50_fpn_backbone(trainable_layers=trainable_layers)


def test_returned_layers_out_of_range():
    with pytest.raises(ValueError, match="returned_layers"):
        resnet50_fpn_backbone(returned_layers=[0, 1])


# --- building blocks ----------------------------------------------------------------------------------

def test_frozen_batch_norm_matches_eval_batch_norm_and_ignores_num_batches_tracked():
    bn = nn.BatchNorm2d(5, eps=1e-3)
    _randomise_norm_buffers(bn, torch.Generator().manual_seed(12))
    bn.eval()
    frozen = FrozenBatchNorm2d(5, eps=1e-3)
    frozen.load_state_dict(bn.state_dict(), strict=True)
    assert "num_batches_tracked" in bn.state_dict()
    assert list(frozen.state_dict()) == ["weight", "bias", "running_mean", "running_var"]
    assert list(frozen.parameters()) == []
    x = torch.randn(2, 5, 4, 3)
    torch.testing.assert_close(frozen(x), bn(x), atol=ATOL, rtol=0)


def test_intermediate_layer_getter_keeps_children_up_to_last_requested():
    model = nn.Sequential(OrderedDict([("a", nn.Linear(3, 4)), ("b", nn.ReLU()), ("c", nn.Linear(4, 2))]))
    getter = IntermediateLayerGetter(model, {"a": "first", "b": "second"})
    assert list(getter.keys()) == ["a", "b"]
    x = torch.randn(2, 3)
    out = getter(x)
    assert list(out) == ["first", "second"]
    torch.testing.assert_close(out["second"], torch.relu(model.a(x)))
    with pytest.raises(ValueError, match="'z'"):
        IntermediateLayerGetter(model, {"z": "0"})
