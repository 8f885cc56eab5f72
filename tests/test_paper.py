"""The paper's VGG16 detector and VOC07 recipe (Ren et al., 2015; py-faster-rcnn end2end).

Reference values are worked out here independently of the code under test: parameter counts from
VGG16's layer shapes, the anchors inside an image by a loop over an anchor grid built here, the RPN
labels and losses from the paper's matching rule written out (only the random draw of the sampler
is shared, through the seed).
"""
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision

from backbone import WeightFileError, freeze_vgg_blocks, vgg_backbone
from network_files import AnchorsGenerator, ImageList, RegionProposalNetwork, RoIHeads, RPNHead, fastrcnn_loss
from network_files.det_utils import BalancedPositiveNegativeSampler
from network_files.rpn_function import anchors_inside_image
from train_utils.checkpoint import Checkpoint, save_checkpoint
from train_utils.cli import model_config_from_args
from train_utils.engine.args import build_parser, parse
from train_utils.engine.recipes import PAPER_VGG16, describe_recipe
from train_utils.engine.checkpointer import plain_args
from train_utils.loading import load_model
from train_utils.model.builder import build_model
from train_utils.model.config import ModelConfig

# VGG16's 13 convs (in, out), 3x3 with bias; conv1_1..conv2_2 are the first four.
VGG16_CONVS = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
               (256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]
VGG16_BLOCKS = [2, 2, 3, 3, 3]  # convs per block, blocks end at a max pool
PAPER = dict(backbone="vgg16", backbone_options={"box_head": "vgg"}, roi_op="pool", trainable_layers=3,
             anchor_sizes=(128, 256, 512))


def conv_params(c_in: int, c_out: int) -> int:
    return c_in * c_out * 9 + c_out


def linear_params(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


# --- the paper's head, loaded from the ImageNet file ----------------------------------------------


def test_paper_head_loads_conv_fc6_fc7_strictly_and_freezes_conv1_conv2(tmp_path):
    """torchvision's vgg16 (random) saved as the official file: the conv layers and fc6/fc7 are
    the file's tensors, 260,160 conv1-conv2 parameters are frozen, everything else trains."""
    path = tmp_path / "vgg16-397923af.pth"
    torch.manual_seed(0)
    state = torchvision.models.vgg16(weights=None).state_dict()
    torch.save(state, path)
    model = build_model(ModelConfig(num_classes=21, **PAPER), str(path))

    trunk = model.backbone.state_dict()
    assert set(trunk) == {k[len("features."):] for k in state if k.startswith("features.")}
    assert all(torch.equal(v, state["features." + k]) for k, v in trunk.items())
    head = model.roi_heads.box_head.state_dict()
    assert set(head) == {"fc6.weight", "fc6.bias", "fc7.weight", "fc7.bias"}
    for ours, theirs in (("fc6", "classifier.0"), ("fc7", "classifier.3")):
        for kind in ("weight", "bias"):
            assert torch.equal(head[f"{ours}.{kind}"], state[f"{theirs}.{kind}"])

    frozen = sum(conv_params(*c) for c in VGG16_CONVS[:4])
    rpn = conv_params(512, 512) + linear_params(512, 9) + linear_params(512, 36)  # 1x1 convs = linears
    trainable = (sum(conv_params(*c) for c in VGG16_CONVS[4:]) + linear_params(512 * 7 * 7, 4096)
                 + linear_params(4096, 4096) + rpn + linear_params(4096, 21) + linear_params(4096, 84))
    assert (frozen, trainable) == (260_160, 136_813_462)
    counted = {flag: sum(p.numel() for p in model.parameters() if p.requires_grad == flag) for flag in (False, True)}
    assert counted == {False: frozen, True: trainable}
    assert [name for name, p in model.backbone.named_parameters() if not p.requires_grad] == [
        f"{i}.{kind}" for i in (0, 2, 5, 7) for kind in ("weight", "bias")]


def test_incomplete_or_reshaped_file_is_one_line_naming_it(tmp_path):
    path = tmp_path / "vgg16-397923af.pth"
    with torch.device("meta"):
        layout = torchvision.models.vgg16().state_dict()
    # Big matrices as broadcast views keep the file small.
    state = {k: torch.zeros(v.shape) if v.numel() < 10**6 else torch.zeros(1).expand(v.shape)
             for k, v in layout.items()}
    del state["classifier.3.bias"]
    torch.save(state, path)
    with pytest.raises(WeightFileError) as info:
        build_model(ModelConfig(num_classes=3, **PAPER), str(path))
    assert str(info.value) == (f"weight file '{path}' is not a torchvision vgg16 state dict: "
                               "1 missing (e.g. classifier.3.bias)")
    state["classifier.3.bias"] = torch.zeros(4096)
    state["features.0.bias"] = torch.zeros(32)
    torch.save(state, path)
    with pytest.raises(WeightFileError, match=r"1 wrong shape \(e.g. features.0.bias \[32\] \(needs \[64\]\)\)$"):
        build_model(ModelConfig(num_classes=3, **PAPER), str(path))


@pytest.mark.parametrize("trainable_layers", range(6))
def test_trainable_layers_count_vgg_blocks_from_the_top(trainable_layers):
    with torch.device("meta"):
        features = vgg_backbone("vgg16")
    freeze_vgg_blocks(features, trainable_layers)
    frozen_convs = sum(VGG16_BLOCKS[:5 - trainable_layers])
    expected = sum(conv_params(*c) for c in VGG16_CONVS[:frozen_convs])
    assert sum(p.numel() for p in features.parameters() if not p.requires_grad) == expected


def test_light_head_is_unchanged():
    """--box-head mlp (the default): TwoMLPHead keys, every conv layer trains whatever --trainable-layers."""
    with torch.device("meta"):
        model = build_model(ModelConfig(num_classes=3, backbone="vgg16", trainable_layers=0, representation_size=64))
    assert all(p.requires_grad for p in model.parameters())
    assert [k for k in model.state_dict() if "box_head" in k] == [
        f"roi_heads.box_head.{fc}.{kind}" for fc in ("fc6", "fc7") for kind in ("weight", "bias")]
    assert model.roi_heads.box_head.fc6.weight.shape == (64, 512 * 7 * 7)


def test_box_head_option_belongs_to_vgg():
    with pytest.raises(SystemExit):
        parse(build_parser("t", {}), ["--backbone", "resnet50_fpn", "--box-head", "vgg"])
    with pytest.raises(ValueError, match=r"^--box-head do\(es\) not apply to the resnet50_fpn backbone$"):
        ModelConfig(num_classes=3, backbone="resnet50_fpn", backbone_options={"box_head": "vgg"})


# --- cross-boundary anchors -------------------------------------------------------------------------


def brute_force_anchors(height: int, width: int, stride: int = 16) -> list:
    """Every anchor (x1, y1, x2, y2) of the padded image's stride-16 grid, sizes 128/256/512 x
    ratios (h/w) 0.5/1/2 centred on the cell corners, half sides rounded."""
    grid_h, grid_w = math.ceil(height / 32) * 32 // stride, math.ceil(width / 32) * 32 // stride
    halves = [(round(s / math.sqrt(r) / 2), round(s * math.sqrt(r) / 2))
              for r in (0.5, 1.0, 2.0) for s in (128, 256, 512)]
    return [(stride * j - hw, stride * i - hh, stride * j + hw, stride * i + hh)
            for i in range(grid_h) for j in range(grid_w) for hw, hh in halves]


def paper_rpn(ignore: bool, channels: int = 8) -> RegionProposalNetwork:
    torch.manual_seed(3)
    generator = AnchorsGenerator(((128, 256, 512),), ((0.5, 1.0, 2.0),))
    return RegionProposalNetwork(generator, RPNHead(channels, 9), 0.7, 0.3, 256, 0.5,
                                 dict(training=12000, testing=6000), dict(training=2000, testing=300), 0.7,
                                 ignore_cross_boundary=ignore)


def padded_inputs(height: int, width: int, channels: int = 8):
    padded = (math.ceil(height / 32) * 32, math.ceil(width / 32) * 32)
    images = ImageList(torch.zeros(1, 3, *padded), [(height, width)])
    generator = torch.Generator().manual_seed(1)
    features = {"0": torch.randn(1, channels, padded[0] // 16, padded[1] // 16, generator=generator)}
    return images, features


@pytest.mark.parametrize("height, width, inside", [(600, 1000, 8044), (800, 800, 9321)])
def test_anchors_inside_the_image_match_a_brute_force_count(height, width, inside):
    grid = brute_force_anchors(height, width)
    count = sum(1 for x1, y1, x2, y2 in grid if x1 >= 0 and y1 >= 0 and x2 <= width and y2 <= height)
    assert count == inside
    rpn = paper_rpn(ignore=True)
    images, features = padded_inputs(height, width)
    anchors = rpn.anchor_generator(images, list(features.values()))
    assert anchors[0].tolist() == [list(map(float, a)) for a in grid]
    assert int(anchors_inside_image(anchors[0], (height, width)).sum()) == inside
    # An image without objects: every inside anchor is background, every other one ignored.
    labels, _ = rpn.assign_targets_inside_image(anchors, [{"boxes": torch.zeros(0, 4)}], [(height, width)])
    assert (int((labels[0] == 0).sum()), int((labels[0] == -1).sum())) == (inside, len(grid) - inside)


def reference_rpn_losses(rpn: RegionProposalNetwork, images: ImageList, features: dict, boxes: torch.Tensor,
                         seed: int) -> tuple:
    """The paper's RPN losses written out: labels from the inside anchors only (IoU >= 0.7 object,
    < 0.3 background, each box's best inside anchors objects), the project's sampler drawing from
    the same seed, BCE on the sampled anchors, smooth L1 (beta 1/9) on the positives / sampled."""
    (height, width), = images.image_sizes
    grid = torch.tensor(brute_force_anchors(*images.tensors.shape[-2:]), dtype=torch.float32)
    inside = torch.tensor([a[0] >= 0 and a[1] >= 0 and a[2] <= width and a[3] <= height for a in grid.tolist()])
    iou = torchvision.ops.box_iou(boxes, grid)  # [G, A]
    iou[:, ~inside] = -1.0
    best_iou, best_box = iou.max(dim=0)
    labels = torch.full((len(grid),), -1.0)
    labels[inside & (best_iou < 0.3)] = 0.0
    labels[best_iou >= 0.7] = 1.0
    for g in range(len(boxes)):
        labels[(iou[g] == iou[g].max()) & inside] = 1.0
    torch.manual_seed(seed)
    (positive,), (negative,) = BalancedPositiveNegativeSampler(256, 0.5)([labels])
    sampled = torch.where((positive + negative).bool())[0]
    logits, deltas = (level[0][0] for level in rpn.head(list(features.values())))  # the map of image 0
    logits = logits.permute(1, 2, 0).reshape(-1)  # [A, H, W] -> [H, W, A], the anchors' order
    deltas = deltas.view(9, 4, *deltas.shape[-2:]).permute(2, 3, 0, 1).reshape(-1, 4)
    objectness = F.binary_cross_entropy_with_logits(logits[sampled], labels[sampled])
    pos = torch.where(positive.bool())[0]
    a, g = grid[pos], boxes[best_box[pos]]
    aw, ah, gw, gh = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1], g[:, 2] - g[:, 0], g[:, 3] - g[:, 1]
    targets = torch.stack([((g[:, 0] + g[:, 2]) - (a[:, 0] + a[:, 2])) / 2 / aw,
                           ((g[:, 1] + g[:, 3]) - (a[:, 1] + a[:, 3])) / 2 / ah,
                           torch.log(gw / aw), torch.log(gh / ah)], dim=1)
    diff = (deltas[pos] - targets).abs()
    box = torch.where(diff < 1 / 9, 0.5 * diff**2 * 9, diff - 0.5 / 9).sum() / len(sampled)
    return objectness, box, labels


def test_rpn_losses_use_only_inside_anchors():
    """A training step of the RPN with the paper's rule gives the losses written out by hand;
    the box at the top-left corner has its best anchor outside the image: the rule picks the
    best inside one instead."""
    images, features = padded_inputs(600, 1000)
    boxes = torch.tensor([[0.0, 0.0, 100.0, 60.0], [300.0, 200.0, 560.0, 520.0], [700.0, 100.0, 990.0, 300.0]])
    rpn = paper_rpn(ignore=True).train()
    torch.manual_seed(7)
    _, losses = rpn(images, features, [{"boxes": boxes, "labels": torch.ones(3, dtype=torch.int64)}])
    objectness, box, labels = reference_rpn_losses(rpn, images, features, boxes, seed=7)
    torch.testing.assert_close(losses["loss_objectness"], objectness, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(losses["loss_rpn_box_reg"], box, rtol=1e-6, atol=1e-7)

    grid = torch.tensor(brute_force_anchors(600, 1000), dtype=torch.float32)
    best_overall = int(torchvision.ops.box_iou(boxes[:1], grid)[0].argmax())
    assert grid[best_overall, :2].min() < 0 and labels[best_overall] == -1
    default = paper_rpn(ignore=False).train()
    torch.manual_seed(7)
    _, other = default(images, features, [{"boxes": boxes, "labels": torch.ones(3, dtype=torch.int64)}])
    assert other["loss_objectness"] != losses["loss_objectness"]


def test_no_anchor_inside_the_image_is_one_line():
    rpn = paper_rpn(ignore=True).train()
    images, features = padded_inputs(100, 120)
    with pytest.raises(ValueError, match=r"^rpn_ignore_cross_boundary: no anchor lies inside the 120x100 "):
        rpn(images, features, [{"boxes": torch.tensor([[10.0, 10.0, 50.0, 50.0]]), "labels": torch.tensor([1])}])


# --- background floor and the box loss -----------------------------------------------------------------


def test_background_floor_ignores_rois_far_from_every_object():
    """IoUs 0.05, 0.2, 0.6 with the object: with a floor of 0.1 the first RoI is not sampled."""
    heads = RoIHeads(None, None, None, 0.5, 0.5, 128, 0.25, None, 0.05, 0.3, 100, bg_iou_low_thresh=0.1)
    gt = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    # IoU of [0, 0, w, 100] with gt = w / 100 (inside it); [0, 0, 100 / iou, 100] when larger.
    proposals = torch.tensor([[0.0, 0.0, 5.0, 100.0], [0.0, 0.0, 20.0, 100.0], [0.0, 0.0, 60.0, 100.0]])
    _, labels = heads.assign_targets_to_proposals([proposals, proposals], [gt, torch.zeros(0, 4)],
                                                  [torch.tensor([4]), torch.zeros(0, dtype=torch.int64)])
    assert labels[0].tolist() == [-1, 0, 4]
    assert labels[1].tolist() == [0, 0, 0]  # no objects: all background
    heads.bg_iou_low_thresh = 0.0
    assert heads.assign_targets_to_proposals([proposals], [gt], [torch.tensor([4])])[1][0].tolist() == [0, 0, 4]
    with pytest.raises(ValueError, match=r"^--box-bg-iou-low-thresh 0.6 must lie in \[0, --box-bg-iou-thresh 0.5\]$"):
        ModelConfig(num_classes=3, box_bg_iou_low_thresh=0.6)


def test_box_loss_with_py_faster_rcnn_beta():
    """beta 1: 0.5 x^2 below 1, |x| - 0.5 above; offsets 0.5 and -3 on one of two RoIs."""
    box_regression = torch.zeros(2, 8)
    box_regression[0, 4:6] = torch.tensor([0.5, -3.0])
    _, box_loss = fastrcnn_loss(torch.zeros(2, 2), box_regression, [torch.tensor([1, 0])], [torch.zeros(2, 4)],
                                beta=1.0)
    assert float(box_loss) == pytest.approx((0.5 * 0.25 + 2.5) / 2, abs=1e-7)


# --- the recipe ----------------------------------------------------------------------------------------


SMALL = ["--min-size", "224", "--max-size", "320", "--backbone-weights", "none", "--rpn-pre-nms-top-n-train", "600",
         "--rpn-post-nms-top-n-train", "200", "--rpn-pre-nms-top-n-test", "300", "--rpn-post-nms-top-n-test", "50"]


def test_recipe_sets_every_value_and_typed_flags_win():
    defaults = dict(backbone="resnet50_fpn", lr=0.01, batch_size=4, epochs=20, lr_steps=[14, 18])
    args = parse(build_parser("t", defaults), ["--recipe", "paper-vgg16"])
    assert {key: getattr(args, key) for key in PAPER_VGG16.values} == PAPER_VGG16.values
    assert args.recipe_overridden == []
    typed = ["--lr", "0.02", "--recipe", "paper-vgg16", *SMALL, "--no-rpn-ignore-cross-boundary"]
    args = parse(build_parser("t", defaults), typed)
    assert (args.lr, args.min_size, args.max_size, args.rpn_ignore_cross_boundary) == (0.02, [224], 320, False)
    assert (args.backbone, args.box_head, args.epochs, args.lr_steps, args.batch_size) == ("vgg16", "vgg", 28, [20], 2)
    assert args.recipe_overridden == ["--min-size", "--max-size", "--rpn-ignore-cross-boundary",
                                      "--rpn-pre-nms-top-n-train", "--rpn-post-nms-top-n-train",
                                      "--rpn-pre-nms-top-n-test", "--rpn-post-nms-top-n-test", "--lr"]
    assert describe_recipe(args).startswith("recipe paper-vgg16: 30 of its 38 flag values in use; overridden")
    stored = plain_args(args)
    assert (stored["recipe"], stored["recipe_overridden"]) == ("paper-vgg16", args.recipe_overridden)
    plain = parse(build_parser("t", defaults), [])
    assert (plain.recipe, plain.backbone, plain.lr, plain.box_head) == (None, "resnet50_fpn", 0.01, None)


def test_recipe_model_config_matches_py_faster_rcnn():
    config = model_config_from_args(parse(build_parser("t", {}), ["--recipe", "paper-vgg16"]), num_classes=21)
    assert config == ModelConfig(
        num_classes=21, backbone="vgg16", backbone_options={"box_head": "vgg"}, roi_op="pool", trainable_layers=3,
        min_size=(600,), max_size=1000, anchor_sizes=(128, 256, 512), rpn_pre_nms_top_n_train=12000,
        rpn_pre_nms_top_n_test=6000, rpn_post_nms_top_n_test=300, rpn_ignore_cross_boundary=True,
        box_batch_size_per_image=128, box_bg_iou_low_thresh=0.1, box_smooth_l1_beta=1.0, box_nms_thresh=0.3)


@pytest.mark.slow
def test_paper_recipe_trains_a_step_evaluates_and_rebuilds_from_its_checkpoint(tmp_path):
    args = parse(build_parser("t", {}), ["--recipe", "paper-vgg16", *SMALL])
    config = model_config_from_args(args, num_classes=4)
    model = build_model(config)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                momentum=args.momentum, weight_decay=args.weight_decay)
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 240, 320, generator=generator), torch.rand(3, 300, 240, generator=generator)]
    targets = [{"boxes": torch.tensor([[20.0, 30.0, 200.0, 220.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[10.0, 40.0, 180.0, 290.0], [50.0, 20.0, 120.0, 90.0]]),
                "labels": torch.tensor([3, 2])}]
    conv1, conv3 = model.backbone[0].weight.detach().clone(), model.backbone[10].weight.detach().clone()
    model.train()
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    optimizer.zero_grad()
    sum(losses.values()).backward()
    optimizer.step()
    assert torch.equal(model.backbone[0].weight, conv1) and not torch.equal(model.backbone[10].weight, conv3)

    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert [len(d["boxes"]) <= 100 for d in detections] == [True, True]
    path = tmp_path / "paper.pth"
    save_checkpoint(Checkpoint(model=model.state_dict(), config=config, class_names=["a", "b", "c"], epoch=0,
                               args=plain_args(args)), str(path))
    rebuilt = load_model(str(path))
    assert rebuilt.roi_heads.box_head.fc6.weight.shape == (4096, 512 * 7 * 7)
    with torch.no_grad():
        again = rebuilt(images)
    for ours, theirs in zip(detections, again):
        assert all(torch.equal(ours[k], theirs[k]) for k in ("boxes", "labels", "scores"))
