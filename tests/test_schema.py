"""Unit tests of the model schema (ModelConfig), the backbone registry, the command-line model
flags, the checkpoint format and the model builder. Only tiny or meta-device models are built."""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import pickle
import sys
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from torch import nn

import backbone.registry as registry
from backbone import WeightFileError, get_backbone, register_backbone, validate_trainable_layers
from backbone.registry import DetectorParts, all_option_fields, backbone_help, option
from backbone.torchvision_backbones import TorchvisionOptions
from backbone.weight_files import WEIGHT_URLS
from network_files import FasterRCNN
from train_utils.checkpoint import Checkpoint, checkpoint_candidates, read_checkpoint, save_checkpoint
from train_utils.cli import (
    add_model_flags,
    apply_model_flags,
    model_config_from_args,
    model_flags_given,
)
from train_utils.flags import HelpFormatter, ListAction, import_plugins
from train_utils.model.builder import anchor_generator, build_model
from train_utils.model.config import ARCHITECTURE, INFERENCE, TRAINING, ModelConfig, settings

TINY_MOBILENET = dict(num_classes=3, backbone="mobilenet_v2",
                      backbone_options={"width_mult": 0.25, "feature_stride": 16},
                      representation_size=32, min_size=(64,), max_size=64)
TEST_BACKBONE = "schema_test_tiny"


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def inference_parser(one_token: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter)
    add_model_flags(parser, training=False, one_token=one_token)
    return parser


def training_parser() -> argparse.ArgumentParser:
    from train_utils.engine.args import build_parser

    return build_parser("t", {})


# ------------------------------------------------------------------------------------ schema
def test_detector_defaults_are_faster_rcnn_signature_defaults():
    """Every detector=True field defaults to FasterRCNN's own keyword default; detector_kwargs
    returns exactly those fields."""
    signature = inspect.signature(FasterRCNN.__init__).parameters
    config = ModelConfig(num_classes=5)
    detector_fields = [f for f in dataclasses.fields(ModelConfig) if f.metadata["detector"]]
    # Every numeric rpn_/box_ keyword of FasterRCNN is in the schema, and nothing else (17 of
    # torchvision's, the paper's three training rules and the three soft-NMS settings).
    numeric = {n for n, p in signature.items() if n.startswith(("rpn_", "box_")) and p.default is not None}
    assert {f.name for f in detector_fields} == numeric and len(numeric) == 23
    for f in detector_fields:
        assert f.name in signature, f.name
        assert getattr(config, f.name) == signature[f.name].default, f.name
        assert type(getattr(config, f.name)) is type(signature[f.name].default), f.name
    assert config.detector_kwargs() == {f.name: signature[f.name].default for f in detector_fields}
    # The other defaults (the schema's own).
    assert (config.backbone, config.backbone_options, config.trainable_layers) == ("resnet50_fpn", {}, 3)
    assert (config.representation_size, config.roi_op, config.anchor_sizes) == (1024, "align", None)
    assert (config.aspect_ratios, config.min_size, config.max_size) == ((0.5, 1.0, 2.0), (800,), 1333)
    assert config.frozen_bn_eps is None


def test_settings_roles_partition_the_flag_fields():
    """settings() lists every flag field once, in declaration order; the roles split it."""
    names = [f.name for f in settings()]
    assert names == [f.name for f in dataclasses.fields(ModelConfig) if f.metadata["flag"]]
    assert {"num_classes", "backbone_options", "frozen_bn_eps"}.isdisjoint(names)
    by_role = {role: [f.name for f in settings(role)] for role in (ARCHITECTURE, INFERENCE, TRAINING)}
    assert sorted(sum(by_role.values(), [])) == sorted(names)
    assert by_role[ARCHITECTURE] == ["backbone", "norm", "representation_size", "roi_op", "anchor_sizes",
                                     "aspect_ratios"]
    assert "trainable_layers" in by_role[TRAINING] and "rpn_pre_nms_top_n_train" in by_role[TRAINING]
    assert "min_size" in by_role[INFERENCE] and "box_score_thresh" in by_role[INFERENCE]
    for f in settings():
        assert f.metadata["help"], f.name


@pytest.mark.parametrize("values", [
    dict(num_classes=5),
    TINY_MOBILENET,
    dict(num_classes=21, backbone="resnet50_c4", trainable_layers=0, roi_op="pool", anchor_sizes=(16, 32),
         aspect_ratios=(1.0,), min_size=(480, 512, 800), max_size=1000, box_score_thresh=0.3, frozen_bn_eps=0.0),
    dict(num_classes=4, backbone="tv:resnet18",
         backbone_options={"return_nodes": ["layer3", "layer4"], "fpn": False}),
])
def test_to_dict_is_plain_and_round_trips(values):
    """to_dict holds lists (never tuples) and from_dict(to_dict(c)) == c."""
    config = ModelConfig(**values)
    stored = config.to_dict()
    assert set(stored) == {f.name for f in dataclasses.fields(ModelConfig)}

    def assert_plain(value):
        assert not isinstance(value, tuple), value
        if isinstance(value, (list, dict)):
            for item in (value.values() if isinstance(value, dict) else value):
                assert_plain(item)
        else:
            assert value is None or isinstance(value, (int, float, str, bool)), value

    assert_plain(stored)
    assert stored["min_size"] == list(config.min_size)
    assert stored["aspect_ratios"] == list(config.aspect_ratios)
    assert ModelConfig.from_dict(stored) == config
    assert pickle.loads(pickle.dumps(stored)) == stored


def test_config_is_frozen_and_replace_validates():
    """Fields cannot be assigned; replace returns a validated copy."""
    config = ModelConfig(num_classes=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.num_classes = 4  # type: ignore[misc]
    assert config.replace(max_size=999).max_size == 999
    assert config.max_size == 1333
    with pytest.raises(ValueError, match="--trainable-layers"):
        config.replace(trainable_layers=7)


def _first_layout(backbone: str) -> dict:
    """A model_config as the first layout stored it: flat backbone options, None = default."""
    return {
        "backbone": backbone,
        "num_classes": 21,
        "min_size": 600,
        "max_size": 1000,
        "trainable_layers": 5,
        "width_mult": 0.5,
        "feature_stride": 16,
        "representation_size": 512,
        "anchor_sizes": [64, 128, 256, 512, 1024] if backbone == "resnet50_fpn" else [32, 64, 128],
        "aspect_ratios": None,
        "roi_op": "pool",
        "return_nodes": None,
        "fpn": None,
        "rpn_pre_nms_top_n_train": None,
        "rpn_pre_nms_top_n_test": 500,
        "rpn_post_nms_top_n_train": 1500,
        "rpn_post_nms_top_n_test": None,
        "box_batch_size_per_image": 128,
        "box_detections_per_img": None,
        "box_score_thresh": 0.01,
    }


@pytest.mark.parametrize("backbone, options, anchors", [
    ("mobilenet_v2", {"width_mult": 0.5, "feature_stride": 16}, (32, 64, 128)),
    ("resnet50_fpn", {}, (64, 128, 256, 512, 1024)),
])
def test_from_dict_reads_the_first_layout(backbone, options, anchors):
    """Flat options go to backbone_options (the backbone's own only), None means the default,
    an int min_size becomes a one-element tuple."""
    config = ModelConfig.from_dict(_first_layout(backbone))
    defaults = ModelConfig(num_classes=2)
    assert config.backbone == backbone
    assert config.backbone_options == options
    assert config.num_classes == 21
    assert config.min_size == (600,)
    assert config.max_size == 1000
    assert config.trainable_layers == 5
    assert config.representation_size == 512
    assert config.anchor_sizes == anchors
    assert config.aspect_ratios == (0.5, 1.0, 2.0)
    assert config.roi_op == "pool"
    assert config.rpn_pre_nms_top_n_train == defaults.rpn_pre_nms_top_n_train == 2000
    assert config.rpn_pre_nms_top_n_test == 500
    assert config.rpn_post_nms_top_n_train == 1500
    assert config.rpn_post_nms_top_n_test == defaults.rpn_post_nms_top_n_test == 1000
    assert config.box_batch_size_per_image == 128
    assert config.box_detections_per_img == 100
    assert config.box_score_thresh == 0.01
    # Everything not in the stored dict keeps the schema default.
    assert config.box_nms_thresh == defaults.box_nms_thresh and config.frozen_bn_eps is None
    assert ModelConfig.from_dict(config.to_dict()) == config


def test_from_dict_unknown_key_is_named():
    """An unknown setting is a ValueError naming it."""
    with pytest.raises(ValueError, match="unknown settings.*'anchor_size'"):
        ModelConfig.from_dict({"num_classes": 3, "anchor_size": [32]})


@pytest.mark.parametrize("changes, message", [
    ({"num_classes": 1}, "num_classes.*at least 2, got 1"),
    ({"num_classes": 0}, "num_classes.*got 0"),
    ({"backbone": "nope"}, "unknown backbone 'nope'"),
    ({"backbone": "mobilenet_v2", "backbone_options": {"fpn": False}}, "--fpn .*mobilenet_v2"),
    ({"backbone": "resnet50_fpn", "backbone_options": {"width_mult": 0.5}}, "--width-mult .*resnet50_fpn"),
    ({"trainable_layers": 6}, "--trainable-layers must be 0..5, got 6"),
    ({"trainable_layers": -1}, "--trainable-layers"),
    ({"roi_op": "max"}, "roi_op 'max'"),
    ({"min_size": (0,)}, r"--min-size needs positive values, got \[0\]"),
    ({"min_size": ()}, "--min-size needs positive values"),
    ({"min_size": (600, -800)}, "--min-size"),
    ({"max_size": 0}, "--max-size"),
    ({"anchor_sizes": (32, 0, 128)}, r"--anchor-sizes needs positive values, got \[32, 0, 128\]"),
    ({"aspect_ratios": (-1.0,)}, "--aspect-ratios"),
])
def test_validation_rules_name_the_setting(changes, message):
    """Each rule of __post_init__ rejects a bad value with a message naming the flag/setting."""
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{"num_classes": 3, **changes})


# ---------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class _TestOptions:
    depth: int = option(2, "schema test: conv layers", choices=(1, 2, 3))
    width_mult: float = option(1.0, "schema test: width (shared with mobilenet_v2)")
    label: Optional[str] = option(None, "schema test: a free text option")


class _TinyNet(nn.Module):
    out_channels = 8

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, kernel_size=8, stride=8)

    def forward(self, x):
        return self.conv(x)


@pytest.fixture
def test_backbone():
    """A backbone registered for the test and removed afterwards (with its options)."""
    built = []

    def build(weights_path, trainable_layers, depth, width_mult, label):
        built.append((weights_path, trainable_layers, depth, width_mult, label))
        return DetectorParts(_TinyNet(), ((16, 32),), ["0"])

    register_backbone(TEST_BACKBONE, options=_TestOptions, help="schema test backbone")(build)
    try:
        yield built
    finally:
        registry.BACKBONES.pop(TEST_BACKBONE, None)
    assert "depth" not in all_option_fields()


def test_registered_backbone_is_found_with_its_options(test_backbone):
    """get_backbone, all_option_fields (type, owners) and backbone_help list the new entry."""
    spec = get_backbone(TEST_BACKBONE)
    assert spec.name == TEST_BACKBONE and spec.options is _TestOptions and spec.url is None
    assert spec.option_names() == ["depth", "width_mult", "label"]
    fields = all_option_fields()
    field, hint, owners = fields["depth"]
    assert (field.default, hint, owners) == (2, int, [TEST_BACKBONE])
    assert field.metadata["choices"] == (1, 2, 3)
    assert fields["label"][1] == Optional[str]
    assert fields["width_mult"][1] is float
    assert fields["width_mult"][2] == ["mobilenet_v2", TEST_BACKBONE]
    assert TEST_BACKBONE in backbone_help().split("; ")[0].split(", ")
    assert spec.make_options({"depth": 3, "label": None}) == _TestOptions(depth=3)
    with pytest.raises(ValueError, match="--feature-stride do.*schema_test_tiny"):
        spec.make_options({"feature_stride": 16})


def test_registered_backbone_builds_through_the_config(test_backbone):
    """ModelConfig validates its options; build_model passes them as keywords."""
    config = ModelConfig(num_classes=3, backbone=TEST_BACKBONE, backbone_options={"depth": 1},
                         trainable_layers=0, representation_size=16, min_size=(64,), max_size=64)
    assert ModelConfig.from_dict(config.to_dict()) == config
    model = build_model(config)
    assert test_backbone == [(None, 0, 1, 1.0, None)]
    assert model.rpn.anchor_generator.sizes == ((16, 32),)
    with pytest.raises(ValueError, match="--feature-stride"):
        config.replace(backbone_options={"feature_stride": 16})


def test_duplicate_registration(test_backbone):
    """A second registration of a name is a ValueError unless replace=True."""
    def other(weights_path, trainable_layers):
        raise AssertionError("not built")

    with pytest.raises(ValueError, match="already registered"):
        register_backbone(TEST_BACKBONE)(other)
    with pytest.raises(ValueError, match="'mobilenet_v2' is already registered"):
        register_backbone("mobilenet_v2")(other)
    assert get_backbone(TEST_BACKBONE).options is _TestOptions
    register_backbone(TEST_BACKBONE, replace=True, help="replaced")(other)
    assert get_backbone(TEST_BACKBONE).build is other
    assert get_backbone(TEST_BACKBONE).help == "replaced"
    with pytest.raises(TypeError, match="options must be a dataclass"):
        register_backbone(TEST_BACKBONE, replace=True, options=dict)(other)


def test_unknown_backbone_lists_the_choices():
    """The error names the backbone and every choice, the tv: family included."""
    with pytest.raises(ValueError) as err:
        get_backbone("nope")
    message = str(err.value)
    assert "'nope'" in message
    for name in ("mobilenet_v2", "resnet50_fpn", "resnet50_c4", "vgg16", "tv:<name>"):
        assert name in message


def test_torchvision_family():
    """tv:resnet18 resolves with TorchvisionOptions and torchvision's official URL."""
    spec = get_backbone("tv:resnet18")
    assert spec.name == "tv:resnet18"
    assert spec.options is TorchvisionOptions
    assert spec.weights == "resnet18"
    assert spec.url == WEIGHT_URLS["resnet18-f37072fd.pth"] == "https://download.pytorch.org/models/resnet18-f37072fd.pth"
    assert spec.option_names() == ["return_nodes", "fpn"]
    assert spec.make_options({"fpn": False}) == TorchvisionOptions(return_nodes=None, fpn=False)
    field, hint, owners = all_option_fields()["fpn"]
    assert (field.default, hint, owners) == (True, bool, ["tv:<name>"])
    assert "tv:<name>" in backbone_help()
    with pytest.raises(ValueError, match="tv:not_a_model"):
        get_backbone("tv:not_a_model")


@pytest.mark.parametrize("value", [0, 1, 2, 3, 4, 5])
def test_trainable_layers_accepted(value):
    """0..5 are valid and returned as is."""
    assert validate_trainable_layers(value) == value


@pytest.mark.parametrize("value", [-1, 6, 2.5, "3", None])
def test_trainable_layers_rejected(value):
    """Out of range or not an int: ValueError naming the owner and the range."""
    with pytest.raises(ValueError, match=r"--trainable-layers must be 0\.\.5"):
        validate_trainable_layers(value, "--trainable-layers")


# ----------------------------------------------------------------------------------------- CLI
def test_training_parser_has_every_model_flag_with_schema_defaults():
    """One flag per settings() field with ModelConfig's default (lists as lists; None for the
    settings the trainer chooses by whether weights are loaded) and one per backbone option
    (default None: the backbone's own)."""
    parser = training_parser()
    options = {o: a for a in parser._actions for o in a.option_strings}
    defaults = ModelConfig.__dataclass_fields__
    args = parser.parse_args([])
    ruled = {f.name for f in settings() if f.metadata["weights_rule"]}
    assert ruled == {"trainable_layers", "norm"}
    for f in settings():
        assert flag(f.name) in options, f.name
        expected = None if f.name in ruled else f.default
        expected = list(expected) if isinstance(expected, tuple) else expected
        assert getattr(args, f.name) == expected, f.name
        assert defaults[f.name].default == f.default
    for name in all_option_fields():
        assert flag(name) in options, name
        assert getattr(args, name) is None
    assert "--no-fpn" in options
    assert model_config_from_args(args, num_classes=3) == ModelConfig(num_classes=3)
    assert model_flags_given(args) == [flag(f.name) for f in settings() if f.default is not None and f.name not in ruled]


def test_model_config_from_training_flags():
    """Flags become the ModelConfig, options under backbone_options; an invalid value is a
    ValueError naming the flag."""
    parser = training_parser()
    args = parser.parse_args(["--backbone", "mobilenet_v2", "--width-mult", "0.25", "--min-size", "64,96",
                              "--anchor-sizes", "16", "32", "--box-score-thresh", "0.2"])
    config = model_config_from_args(args, num_classes=4)
    assert config == ModelConfig(num_classes=4, backbone="mobilenet_v2", backbone_options={"width_mult": 0.25},
                                 min_size=(64, 96), anchor_sizes=(16, 32), box_score_thresh=0.2)
    bad = parser.parse_args(["--backbone", "mobilenet_v2", "--fpn"])
    with pytest.raises(ValueError, match="--fpn"):
        model_config_from_args(bad, num_classes=4)
    with pytest.raises(ValueError, match="--trainable-layers"):
        model_config_from_args(parser.parse_args(["--trainable-layers", "9"]), num_classes=4)


def test_inference_parser_has_only_architecture_and_inference_flags():
    """No training-role flag; every default None (the checkpoint's)."""
    parser = inference_parser()
    options = {o for a in parser._actions for o in a.option_strings}
    for f in settings(ARCHITECTURE) + settings(INFERENCE):
        assert flag(f.name) in options, f.name
    for f in settings(TRAINING):
        assert flag(f.name) not in options, f.name
    assert "--trainable-layers" not in options and "--rpn-pre-nms-top-n-train" not in options
    for name in all_option_fields():
        assert flag(name) in options
    args = parser.parse_args([])
    assert all(value is None for value in vars(args).values()), vars(args)
    assert model_flags_given(args) == []
    assert model_flags_given(parser.parse_args(["--min-size", "300", "--no-fpn"])) == ["--min-size", "--fpn"]


@pytest.mark.parametrize("name, forms, expected", [
    ("anchor_sizes", (["32,64,128"], ["32", "64", "128"], ["32,64", "128"]), [32, 64, 128]),
    ("aspect_ratios", (["0.5,1,2"], ["0.5", "1", "2"], ["0.5", "1,2"]), [0.5, 1.0, 2.0]),
    ("min_size", (["480,512"], ["480", "512"], ["480,", "512"]), [480, 512]),
    ("return_nodes", (["layer2,layer3"], ["layer2", "layer3"], ["layer2,layer3", ""]), ["layer2", "layer3"]),
])
def test_list_flags_parse_every_form(name, forms, expected):
    """Comma-separated, space-separated and mixed give the same typed list."""
    for parser in (training_parser(), inference_parser()):
        for form in forms:
            value = getattr(parser.parse_args([flag(name), *form]), name)
            assert value == expected, (form, value)
            assert [type(v) for v in value] == [type(v) for v in expected]


def test_lr_steps_list_flag():
    """--lr-steps takes the three forms too."""
    parser = training_parser()
    for form in (["8,11"], ["8", "11"], ["8,", "11"]):
        assert parser.parse_args(["--lr-steps", *form]).lr_steps == [8, 11]
    assert parser.parse_args([]).lr_steps == [16, 22]


def test_one_token_list_flags_leave_positionals_alone():
    """one_token=True: `--min-size 300 a.jpg` keeps a.jpg as a positional."""
    parser = inference_parser(one_token=True)
    parser.add_argument("inputs", nargs="+")
    args = parser.parse_args(["--min-size", "300", "a.jpg", "b.jpg"])
    assert args.min_size == [300] and args.inputs == ["a.jpg", "b.jpg"]
    args = parser.parse_args(["--anchor-sizes", "16,32", "a.jpg"])
    assert args.anchor_sizes == [16, 32] and args.inputs == ["a.jpg"]
    # Without one_token the list flag swallows the positional.
    greedy = inference_parser()
    greedy.add_argument("inputs", nargs="*")
    assert greedy.parse_args(["--min-size", "300", "400"]).min_size == [300, 400]


@pytest.mark.parametrize("argv", [["--anchor-sizes", "32,abc"], ["--min-size", "1.5"],
                                  ["--aspect-ratios", "x"], ["--lr-steps", "4,five"]])
def test_invalid_list_item_exits(argv, capsys):
    """A value of the wrong type is a usage error naming the flag."""
    with pytest.raises(SystemExit) as exit_info:
        training_parser().parse_args(argv)
    assert exit_info.value.code == 2
    assert f"{argv[0]}: expected" in capsys.readouterr().err


def test_list_action_on_its_own():
    """ListAction converts items with item_type and keeps the default."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--xs", action=ListAction, item_type=float, default=[1.0])
    parser.add_argument("--ys", action=ListAction, item_type=int, one_token=True)
    parser.add_argument("rest", nargs="*")
    assert parser.parse_args([]).xs == [1.0]
    args = parser.parse_args(["--xs", "1,2", "3", "--ys", "4,5", "6"])
    assert (args.xs, args.ys, args.rest) == ([1.0, 2.0, 3.0], [4, 5], ["6"])


def test_help_formatter_default_rules():
    """No '(default: None)'; no appended default when the help already mentions one."""
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter)
    parser.add_argument("--none", default=None, help="no default here")
    parser.add_argument("--stated", default=4, help="workers (default: 4 at most)")
    parser.add_argument("--plain", default=7, help="a number")
    parser.add_argument("--empty", default=3)
    formatter = parser._get_formatter()
    helps = {a.dest: formatter._expand_help(a) for a in parser._actions if a.help is not None or a.dest == "empty"}
    assert helps["none"] == "no default here"
    assert helps["stated"] == "workers (default: 4 at most)"
    assert helps["plain"] == "a number (default: 7)"
    assert "(default: None)" not in parser.format_help()


def _help_checks(parser: argparse.ArgumentParser) -> None:
    text = parser.format_help()
    assert "(default: None)" not in text
    assert not [line for line in text.splitlines() if line.lower().count("default") > 1]
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.help:
            expanded = " ".join(formatter._expand_help(action).split())
            assert "(default: None)" not in expanded and expanded.count("(default:") <= 1, expanded
            if "default" in action.help:  # stated by the help itself: nothing appended
                assert expanded == " ".join((action.help % {**vars(action), "prog": parser.prog}).split())


def test_help_of_the_entry_points():
    """Training, predict.py and validation.py --help: no '(default: None)', no doubled default."""
    from train_utils.evaluation.validate import validation_parser
    from train_utils.inference.predict import predict_parser

    for parser in (training_parser(), predict_parser("predict"), validation_parser("validation")):
        _help_checks(parser)
    with pytest.raises(SystemExit):
        training_parser().parse_args(["--help"])


def _stored_tiny() -> ModelConfig:
    return ModelConfig(**TINY_MOBILENET)


def test_apply_model_flags_overrides_inference_settings():
    """Inference flags replace the stored values; nothing else changes."""
    stored = _stored_tiny()
    args = inference_parser().parse_args(["--min-size", "300,320", "--box-score-thresh", "0.3",
                                          "--box-detections-per-img", "7"])
    config = apply_model_flags(stored, args, "ckpt.pth")
    assert config == stored.replace(min_size=(300, 320), box_score_thresh=0.3, box_detections_per_img=7)
    assert apply_model_flags(stored, inference_parser().parse_args([]), "ckpt.pth") == stored


def test_apply_model_flags_architecture_must_agree():
    """A disagreeing architecture flag is a ValueError naming the flag; an agreeing one passes."""
    stored = _stored_tiny()
    parser = inference_parser()
    with pytest.raises(ValueError, match="--representation-size: ckpt.pth was trained with representation_size=32"):
        apply_model_flags(stored, parser.parse_args(["--representation-size", "64"]), "ckpt.pth")
    with pytest.raises(ValueError, match="--backbone"):
        apply_model_flags(stored, parser.parse_args(["--backbone", "resnet50_fpn"]), "ckpt.pth")
    with pytest.raises(ValueError, match="--aspect-ratios"):
        apply_model_flags(stored, parser.parse_args(["--aspect-ratios", "1"]), "ckpt.pth")
    same = parser.parse_args(["--representation-size", "32", "--aspect-ratios", "0.5,1,2",
                              "--backbone", "mobilenet_v2", "--max-size", "80"])
    assert apply_model_flags(stored, same, "ckpt.pth") == stored.replace(max_size=80)


def test_apply_model_flags_disagreeing_backbone_option_is_an_error():
    """--width-mult 1.0 against a model trained with 0.5 should be refused, not ignored."""
    stored = ModelConfig(num_classes=3, backbone="mobilenet_v2", backbone_options={"width_mult": 0.5})
    with pytest.raises(ValueError, match="--width-mult: ckpt.pth was trained with width_mult=0.5"):
        apply_model_flags(stored, inference_parser().parse_args(["--width-mult", "1.0"]), "ckpt.pth")


def test_apply_model_flags_agreeing_backbone_option_passes():
    """--width-mult 0.25 agrees with TINY_MOBILENET and should pass."""
    stored = _stored_tiny()
    assert apply_model_flags(stored, inference_parser().parse_args(["--width-mult", "0.25"]), "c.pth") == stored


def test_import_plugins(tmp_path, monkeypatch):
    """--plugin modules are imported (registering their backbones) before the parser is built;
    a missing module is a SystemExit naming it."""
    name = "schema_test_plugin_mod"
    (tmp_path / f"{name}.py").write_text(
        "from backbone import register_backbone\n"
        "from backbone.registry import DetectorParts\n"
        "@register_backbone('schema_plugin_backbone', help='from a plugin')\n"
        "def build(weights_path, trainable_layers):\n"
        "    raise NotImplementedError\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert import_plugins(["--data-path", "x", "--plugin", name, "--epochs", "1"]) == [name]
        assert get_backbone("schema_plugin_backbone").help == "from a plugin"
        assert "schema_plugin_backbone" in backbone_help()
        assert training_parser().parse_args(["--backbone", "schema_plugin_backbone"]).backbone == \
            "schema_plugin_backbone"
    finally:
        registry.BACKBONES.pop("schema_plugin_backbone", None)
        sys.modules.pop(name, None)
    assert import_plugins([]) == []
    with pytest.raises(SystemExit, match="--plugin schema_no_such_module"):
        import_plugins(["--plugin", "schema_no_such_module"])


# --------------------------------------------------------------------------------- checkpoint
def _state() -> dict:
    return {"conv.weight": torch.arange(6.0).reshape(2, 3), "conv.bias": torch.tensor([1.5, -2.0]),
            "bn.num_batches_tracked": torch.tensor(3)}


def _assert_state_equal(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_format_3_round_trip(tmp_path):
    """save_checkpoint then read_checkpoint gives back every field, the per-rank random states and
    the position inside an epoch included."""
    from train_utils.engine import rng

    config = ModelConfig(**TINY_MOBILENET)
    progress = {"iteration": 7, "loss_sums": {"loss": 3.5}, "lr": 0.01, "world_size": 2}
    written = Checkpoint(
        model=_state(), config=config, class_names=["cat", "dog"], epoch=4,
        optimizer={"state": {0: {"momentum_buffer": torch.ones(2)}}, "param_groups": [{"lr": 0.01, "params": [0]}]},
        lr_scheduler={"milestones": {16: 1}, "last_epoch": 5}, scaler=None, rng_state=[rng.capture(), rng.capture()],
        args={"lr": 0.01, "min_size": [64]}, coco_stats=[0.1 * i for i in range(12)], best_ap50=0.42,
        plugins=["my_plugin"], progress=progress)
    path = tmp_path / "ckpt.pth"
    save_checkpoint(written, str(path))
    read = read_checkpoint(str(path))
    _assert_state_equal(read.model, written.model)
    assert read.config == config
    assert read.class_names == ["cat", "dog"]
    assert read.epoch == 4
    assert torch.equal(read.optimizer["state"][0]["momentum_buffer"], torch.ones(2))
    assert read.optimizer["param_groups"] == written.optimizer["param_groups"]
    assert read.lr_scheduler == written.lr_scheduler
    assert read.scaler is None
    assert len(read.rng_state) == 2 and torch.equal(read.rng_state[1]["torch"], written.rng_state[1]["torch"])
    assert read.rng_state[0]["python"] == written.rng_state[0]["python"]
    assert read.progress == progress
    assert read.args == written.args
    assert read.coco_stats == written.coco_stats
    assert read.best_ap50 == 0.42
    assert read.plugins == ["my_plugin"]
    assert read.can_resume()
    raw = torch.load(path, weights_only=True)
    assert raw["format_version"] == 4
    assert raw["model_config"] == config.to_dict()
    assert raw["metrics"] == {"coco_stats": written.coco_stats, "best_ap50": 0.42}


def test_save_checkpoint_is_atomic(tmp_path):
    """No temporary file is left, the file loads with weights_only=True, and a failed save
    leaves the previous file untouched."""
    path = tmp_path / "out" / "last.pth"
    save_checkpoint(Checkpoint(model=_state(), config=ModelConfig(num_classes=3), epoch=0), str(path))
    assert [p.name for p in path.parent.iterdir()] == ["last.pth"]
    assert torch.load(path, weights_only=True)["epoch"] == 0
    before = path.read_bytes()
    with pytest.raises(Exception):
        save_checkpoint(Checkpoint(model=_state(), args={"fn": lambda: None}), str(path))
    assert [p.name for p in path.parent.iterdir()] == ["last.pth"]
    assert path.read_bytes() == before


def _format_1(state: dict) -> dict:
    """A training checkpoint of the first layout: no format_version, metrics at the top level,
    backbone options inside a flat model_config."""
    return {
        "model": state,
        "model_config": {"backbone": "mobilenet_v2", "num_classes": 3, "min_size": 64, "max_size": 64,
                         "trainable_layers": 3, "width_mult": 0.25, "feature_stride": 16,
                         "representation_size": 32, "anchor_sizes": None, "aspect_ratios": None, "roi_op": "align",
                         "return_nodes": None, "fpn": None, "rpn_pre_nms_top_n_train": None,
                         "rpn_pre_nms_top_n_test": None, "rpn_post_nms_top_n_train": None,
                         "rpn_post_nms_top_n_test": None, "box_batch_size_per_image": None,
                         "box_detections_per_img": None, "box_score_thresh": None},
        "class_names": ["cat", "dog"],
        "epoch": 7,
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.01, "params": [0]}]},
        "lr_scheduler": {"last_epoch": 8},
        "args": {"epochs": 20},
        "coco_stats": [0.5] * 12,
        "best_ap50": 0.61,
    }


def test_reads_format_1(tmp_path):
    """The first layout: config from the flat dict, metrics from the top level."""
    path = tmp_path / "model-7.pth"
    torch.save(_format_1(_state()), path)
    read = read_checkpoint(str(path))
    _assert_state_equal(read.model, _state())
    assert read.config == ModelConfig(**TINY_MOBILENET)
    assert read.class_names == ["cat", "dog"]
    assert read.epoch == 7
    assert read.coco_stats == [0.5] * 12
    assert read.best_ap50 == 0.61
    assert read.args == {"epochs": 20}
    assert read.plugins == [] and read.scaler is None and read.rng_state is None
    assert read.can_resume()


def test_reads_wz_style_and_bare_state_dicts(tmp_path):
    """WZ's {"model", "optimizer", "lr_scheduler", "epoch"}: no config, so no resume; a bare
    state dict: weights only."""
    wz = tmp_path / "wz.pth"
    torch.save({"model": _state(), "optimizer": {"state": {}, "param_groups": []},
                "lr_scheduler": {"last_epoch": 3}, "epoch": 2}, wz)
    read = read_checkpoint(str(wz))
    _assert_state_equal(read.model, _state())
    assert (read.config, read.class_names, read.epoch) == (None, None, 2)
    assert read.optimizer == {"state": {}, "param_groups": []} and read.lr_scheduler == {"last_epoch": 3}
    assert (read.coco_stats, read.best_ap50, read.args, read.plugins) == (None, -1.0, {}, [])
    assert not read.can_resume()

    bare = tmp_path / "bare.pth"
    torch.save(_state(), bare)
    read = read_checkpoint(str(bare))
    _assert_state_equal(read.model, _state())
    assert (read.config, read.class_names, read.epoch, read.optimizer, read.lr_scheduler) == (None,) * 5
    assert (read.coco_stats, read.best_ap50) == (None, -1.0)
    assert not read.can_resume()


def _assert_one_line_error(path, exc_type=WeightFileError) -> str:
    with pytest.raises(exc_type) as err:
        read_checkpoint(str(path))
    message = str(err.value)
    assert isinstance(err.value, WeightFileError)
    assert "\n" not in message and str(path) in message, message
    return message


def test_newer_format_is_refused(tmp_path):
    """format_version above 2: a WeightFileError saying the file is newer."""
    path = tmp_path / "future.pth"
    raw = Checkpoint(model=_state(), config=ModelConfig(num_classes=3)).to_dict()
    torch.save({**raw, "format_version": 99}, path)
    message = _assert_one_line_error(path)
    assert "newer" in message and "99" in message


def test_unusable_model_config_names_the_plugins(tmp_path):
    """A config of an unregistered backbone names the file and the plugins it was trained with."""
    path = tmp_path / "plugin.pth"
    raw = Checkpoint(model=_state(), config=ModelConfig(num_classes=3), plugins=["their_plugin"]).to_dict()
    raw["model_config"]["backbone"] = "unregistered_backbone"
    torch.save(raw, path)
    message = _assert_one_line_error(path)
    assert "unusable model_config" in message and "--plugin their_plugin" in message


class _Custom:
    def __init__(self) -> None:
        self.value = 1


@pytest.mark.parametrize("kind", ["text", "custom_object", "tensor_list", "missing", "empty"])
def test_unreadable_files(tmp_path, kind):
    """Each unusable file is a one-line WeightFileError naming the path (FileNotFoundError too
    when the file is missing)."""
    path = tmp_path / f"{kind}.pth"
    if kind == "text":
        path.write_text("not a checkpoint\nsecond line\n")
    elif kind == "custom_object":
        torch.save({"model": _Custom()}, path)
    elif kind == "tensor_list":
        torch.save([torch.zeros(2), torch.ones(2)], path)
    elif kind == "empty":
        path.write_bytes(b"")
    exc_type = FileNotFoundError if kind == "missing" else WeightFileError
    message = _assert_one_line_error(path, exc_type)
    if kind == "tensor_list":
        assert "holds a list" in message


def test_checkpoint_candidates(tmp_path):
    """last.pth first, then model-N.pth by falling N (numeric order); nothing else."""
    assert checkpoint_candidates(str(tmp_path)) == []
    assert checkpoint_candidates(str(tmp_path / "absent")) == []
    for name in ("model-9.pth", "model-10.pth", "model-2.pth", "model-x.pth", "model-11.pth.tmp", "other.pth"):
        (tmp_path / name).write_bytes(b"")
    assert checkpoint_candidates(str(tmp_path)) == [str(tmp_path / f"model-{n}.pth") for n in (10, 9, 2)]
    (tmp_path / "last.pth").write_bytes(b"")
    assert checkpoint_candidates(str(tmp_path))[:2] == [str(tmp_path / "last.pth"), str(tmp_path / "model-10.pth")]


# ------------------------------------------------------------------------------------ builder
def test_build_model_from_dict_equals_from_config():
    """A ModelConfig and its dict form build the same architecture."""
    config = ModelConfig(**TINY_MOBILENET)
    from_config = build_model(config).state_dict()
    from_dict = build_model(config.to_dict()).state_dict()
    assert list(from_config) == list(from_dict)
    assert {k: v.shape for k, v in from_config.items()} == {k: v.shape for k, v in from_dict.items()}
    assert from_config["roi_heads.box_head.fc7.weight"].shape == (32, 32)
    assert from_config["roi_heads.box_predictor.cls_score.weight"].shape == (3, 32)


def test_build_model_applies_the_config():
    """Sizes, detector keywords and single-map anchors come from the config."""
    config = ModelConfig(**{**TINY_MOBILENET, "anchor_sizes": (16, 32, 64), "aspect_ratios": (1.0,),
                            "box_score_thresh": 0.25, "rpn_post_nms_top_n_test": 50, "roi_op": "pool"})
    model = build_model(config)
    assert model.rpn.anchor_generator.sizes == ((16, 32, 64),)
    assert model.rpn.anchor_generator.aspect_ratios == ((1.0,),)
    assert model.rpn.head.cls_logits.out_channels == 3
    assert model.transform.min_size == (64,) and model.transform.max_size == 64
    assert model.roi_heads.score_thresh == 0.25
    assert model.rpn.post_nms_top_n() == 2000  # training mode
    model.eval()
    assert model.rpn.post_nms_top_n() == 50
    assert type(model.roi_heads.box_roi_pool).__name__ == "MultiScaleRoIPool"
    default = build_model(ModelConfig(**TINY_MOBILENET))
    assert default.rpn.anchor_generator.sizes == ((32, 64, 128, 256, 512),)


def test_fpn_anchors_one_size_per_level():
    """On resnet50_fpn (built on the meta device) five sizes go one per level; three are an error."""
    with torch.device("meta"):
        model = build_model(ModelConfig(num_classes=3, anchor_sizes=(16, 32, 64, 128, 256)))
        assert model.rpn.anchor_generator.sizes == ((16,), (32,), (64,), (128,), (256,))
        assert model.rpn.anchor_generator.aspect_ratios == ((0.5, 1.0, 2.0),) * 5
        default = build_model(ModelConfig(num_classes=3))
        assert default.rpn.anchor_generator.sizes == ((32,), (64,), (128,), (256,), (512,))
        with pytest.raises(ValueError, match="has 5 feature maps, got 3 sizes"):
            build_model(ModelConfig(num_classes=3, anchor_sizes=(32, 64, 128)))


def test_anchor_generator_with_fake_parts():
    """anchor_generator alone: flat sizes spread per map, or all on a single map."""
    five = DetectorParts(nn.Identity(), ((32,), (64,), (128,), (256,), (512,)), ["0", "1", "2", "3"])
    one = DetectorParts(nn.Identity(), ((32, 64),), ["0"])
    config = ModelConfig(num_classes=3)
    assert anchor_generator(config, five).sizes == five.anchor_sizes
    assert anchor_generator(config, one).sizes == ((32, 64),)
    sized = config.replace(anchor_sizes=(8, 16, 24, 32, 40))
    assert anchor_generator(sized, five).sizes == ((8,), (16,), (24,), (32,), (40,))
    assert anchor_generator(sized, one).sizes == ((8, 16, 24, 32, 40),)
    with pytest.raises(ValueError, match="resnet50_fpn backbone has 5 feature maps, got 2 sizes"):
        anchor_generator(config.replace(anchor_sizes=(8, 16)), five)


def test_apply_model_flags_option_of_another_backbone_is_an_error():
    """--no-fpn names no option of a mobilenet_v2 checkpoint: one line naming the flag and the file."""
    stored = ModelConfig(num_classes=3, backbone="mobilenet_v2")
    with pytest.raises(ValueError, match="^--fpn does not apply to the model in ckpt.pth$"):
        apply_model_flags(stored, inference_parser().parse_args(["--no-fpn"]), "ckpt.pth")
