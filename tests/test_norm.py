"""The ResNets' normalisation (--norm) and torchvision's from-scratch rule: frozen BatchNorm and 3
trainable stages with ImageNet weights, trainable BatchNorm and all 5 stages without; the choice in
the checkpoint's model schema; checkpoints without it load with frozen BatchNorm as before."""
import math
import warnings

import pytest
import torch
from torch import nn

from backbone import FrozenBatchNorm2d
from backbone.norms import GROUP_NORM_GROUPS, norm_layer_for
from conftest import load, metrics, train
from train_utils.cli import training_model_config
from train_utils.engine.args import build_parser
from train_utils.model.builder import build_model
from train_utils.model.config import ModelConfig, apply_weights_rule

SMALL = dict(num_classes=3, min_size=(64,), max_size=64)


def training_config(*flags: str, pretrained: bool, backbone: str = "resnet50_fpn") -> ModelConfig:
    args = build_parser("test", {"backbone": backbone}).parse_args(list(flags))
    return training_model_config(args, 3, pretrained)


def norm_types(model: nn.Module) -> set:
    return {type(m) for m in model.backbone.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, FrozenBatchNorm2d))}


@pytest.mark.parametrize("backbone", ["resnet50_fpn", "resnet50_c4", "tv:resnet18"])
def test_from_scratch_means_trainable_batch_norm_and_every_stage(backbone):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rule's own choice warns of nothing
        scratch = training_config(pretrained=False, backbone=backbone)
        pretrained = training_config(pretrained=True, backbone=backbone)
    assert (scratch.norm, scratch.trainable_layers) == ("bn", 5)
    assert (pretrained.norm, pretrained.trainable_layers) == ("frozen_bn", 3)
    # Flags given on the command line win over the rule.
    given = training_config("--norm", "gn", "--trainable-layers", "2", pretrained=False, backbone=backbone)
    assert (given.norm, given.trainable_layers) == ("gn", 2)
    assert training_config("--norm", "bn", pretrained=True, backbone=backbone).norm == "bn"

    model = build_model(scratch.replace(min_size=(64,), max_size=64))
    assert norm_types(model) == {nn.BatchNorm2d}
    assert all(p.requires_grad for p in model.backbone.parameters())  # conv1 and the stem's bn1 too
    frozen = build_model(pretrained.replace(min_size=(64,), max_size=64))
    assert norm_types(frozen) == {FrozenBatchNorm2d}
    stem = next(m for name, m in frozen.backbone.named_modules() if name.endswith("conv1"))
    assert stem.weight.requires_grad == backbone.startswith("tv:")  # tv: backbones train every stage


def test_other_backbones_keep_their_defaults_and_refuse_norm():
    for pretrained in (False, True):
        config = training_config(pretrained=pretrained, backbone="mobilenet_v2")
        assert (config.norm, config.trainable_layers) == (None, 3)
    with pytest.raises(ValueError, match="^--norm applies to the ResNet backbones; mobilenet_v2 has its own"):
        ModelConfig(num_classes=3, backbone="mobilenet_v2", norm="bn")
    with pytest.raises(ValueError, match="^--norm: unknown normalisation 'layer'"):
        ModelConfig(num_classes=3, norm="layer")


def test_frozen_batch_norm_from_random_weights_warns():
    with pytest.warns(UserWarning, match="--norm frozen_bn from random weights: the resnet50_fpn backbone"):
        config = training_config("--norm", "frozen_bn", pretrained=False)
    assert (config.norm, config.trainable_layers) == ("frozen_bn", 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_weights_rule(ModelConfig(num_classes=3, norm="frozen_bn"), ["norm"], pretrained=True)


def test_state_dict_keys_per_norm():
    """frozen_bn (and a config without the field): the keys of torchvision's detector, which the
    official files load into strictly; bn adds each layer's num_batches_tracked; gn has no statistics."""
    keys = {norm: list(build_model(ModelConfig(**SMALL, norm=norm)).state_dict())
            for norm in (None, "frozen_bn", "bn", "syncbn", "gn")}
    frozen = keys["frozen_bn"]
    assert keys[None] == frozen and not any(k.endswith("num_batches_tracked") for k in frozen)
    statistics = [k for k in frozen if k.endswith("running_var")]
    assert len(statistics) == 53  # ResNet-50: the stem, 16 blocks x 3, 4 projections
    assert set(keys["bn"]) == set(frozen) | {k.replace("running_var", "num_batches_tracked") for k in statistics}
    assert keys["syncbn"] == keys["bn"]
    assert set(keys["gn"]) == set(frozen) - {k.replace("running_var", s) for k in statistics
                                             for s in ("running_var", "running_mean")}
    groups = {m.num_groups for m in build_model(ModelConfig(**SMALL, norm="gn")).modules() if isinstance(m, nn.GroupNorm)}
    assert groups == {GROUP_NORM_GROUPS}


def test_norm_round_trips_through_the_schema_and_old_checkpoints_load_frozen(tmp_path):
    from train_utils.checkpoint import Checkpoint, read_checkpoint, save_checkpoint

    for norm in ("bn", "gn"):
        config = ModelConfig(**SMALL, norm=norm)
        assert ModelConfig.from_dict(config.to_dict()) == config and config.to_dict()["norm"] == norm
    # A config written before the field existed: no "norm" key.
    model = build_model(ModelConfig(**SMALL))
    old = ModelConfig(**SMALL).to_dict()
    del old["norm"]
    restored = ModelConfig.from_dict(old)
    assert restored.norm is None
    rebuilt = build_model(restored)
    assert norm_types(rebuilt) == {FrozenBatchNorm2d}
    rebuilt.load_state_dict(model.state_dict(), strict=True)

    # Through a checkpoint file: a GroupNorm model comes back as one, weights equal.
    gn = build_model(ModelConfig(**SMALL, norm="gn"))
    path = tmp_path / "gn.pth"
    save_checkpoint(Checkpoint(model=gn.state_dict(), config=ModelConfig(**SMALL, norm="gn")), str(path))
    stored = read_checkpoint(str(path))
    again = build_model(stored.config)
    assert stored.config.norm == "gn" and norm_types(again) == {nn.GroupNorm}
    again.load_state_dict(stored.model, strict=True)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), gn.state_dict().values()))


def test_group_norm_refuses_an_imagenet_file():
    with pytest.raises(ValueError, match=r"^--norm gn: GroupNorm cannot take the BatchNorm statistics of "
                                         r"backbone/resnet50\.pth; train it from scratch"):
        norm_layer_for("gn", "backbone/resnet50.pth")
    assert norm_layer_for("bn", "backbone/resnet50.pth") is nn.BatchNorm2d
    assert norm_layer_for(None) is FrozenBatchNorm2d


@pytest.mark.slow
def test_resnet50_fpn_trains_from_scratch_with_batch_norm(demo_voc, tmp_path):
    """train_resnet50_fpn.py --backbone-weights none at --lr 0.01 -b 8: trainable BatchNorm, all
    stages trained, finite losses over 8 iterations. (The same flags with --norm frozen_bn
    --trainable-layers 3, the old behaviour, stopped with a non-finite loss at epoch 3, iteration 0,
    measured on the CPU; see docs/gpus.md.)"""
    done = train("train_resnet50_fpn.py", demo_voc, tmp_path, "--epochs", "4", "-b", "8", "--lr", "0.01",
                 "--warmup-iters", "1", "--lr-steps", "14", "--anchor-sizes", "16,32,64,128,256", "--eval-interval", "4")
    assert "UserWarning" not in done.stderr
    records = metrics(tmp_path)
    assert [r["epoch"] for r in records] == [0, 1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in records), records
    ckpt = load(tmp_path / "last.pth")
    assert (ckpt["model_config"]["norm"], ckpt["model_config"]["trainable_layers"]) == ("bn", 5)
    state = ckpt["model"]
    assert state["backbone.body.bn1.num_batches_tracked"].item() == 8  # 19 images: 2 batches of 8 per epoch
    assert not torch.equal(state["backbone.body.bn1.running_var"], torch.ones(64))
    assert not torch.equal(state["backbone.body.bn1.weight"], torch.ones(64))  # the stem's BatchNorm trained
