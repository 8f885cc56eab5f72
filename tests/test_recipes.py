"""``--recipe small-data``: the levers the study of docs/levers.md found helpful, set in one go."""
import json

import pytest

from train_utils.cli import model_config_from_args
from train_utils.engine.args import build_parser, parse
from train_utils.engine.recipes import SMALL_DATA, describe_recipe


def test_small_data_sets_its_levers_and_typed_flags_win():
    args = parse(build_parser("t", {}), ["--recipe", "small-data"])
    assert {key: getattr(args, key) for key in SMALL_DATA.values} == SMALL_DATA.values
    assert (args.augment, args.ema, args.box_nms) == ("hflip", None, "soft-gaussian")
    assert model_config_from_args(args, num_classes=3).box_nms == "soft-gaussian"  # what predict/validation load
    typed = parse(build_parser("t", {}), ["--recipe", "small-data", "--ema", "--box-nms", "hard"])
    assert (typed.ema, typed.box_nms, typed.recipe_overridden) == (0.9998, "hard", ["--box-nms"])
    assert describe_recipe(typed) == ("recipe small-data: 1 of its 2 flag values in use; overridden on the "
                                      "command line: --box-nms")


def test_the_levers_page_lists_the_recipe_values():
    """docs/levers.md's recipe paragraph names every flag the recipe sets, with its value."""
    from conftest import ROOT

    page = (ROOT / "docs" / "levers.md").read_text()
    for flag in ("--augment hflip", "--box-nms soft-gaussian"):
        assert f"`{flag}`" in page, flag


@pytest.mark.slow
def test_a_small_data_run_stores_the_recipe_and_soft_nms(demo_voc, tmp_path):
    from conftest import load, metrics, train

    train("train_mobilenet.py", demo_voc, tmp_path / "run", "--epochs", "1", "--recipe", "small-data")
    stored = load(tmp_path / "run" / "best.pth")
    assert stored["args"]["recipe"] == "small-data" and stored["model_config"]["box_nms"] == "soft-gaussian"
    assert stored.get("ema") is None and metrics(tmp_path / "run")[-1]["weights"] == "raw"
    json.dumps(stored["args"])  # the recipe's values are plain data in the checkpoint
