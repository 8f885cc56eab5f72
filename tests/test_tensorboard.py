"""--tensorboard: the event files hold exactly the numbers of iterations.jsonl and metrics.jsonl
and the validation images with their predictions; a run with it resumes bit for bit; a resume
purges the interrupted run's later events; a missing package is one line."""
import io
import json
import random
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import List, Tuple

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import load, metrics, train
from train_utils.data.catalog import build_dataset
from train_utils.data.transforms import get_transforms
from train_utils.engine.hooks import TensorBoardHook, tensorboard_dir
from train_utils.evaluation import COCO_STAT_NAMES
from train_utils.engine.loop import EpochState
from train_utils.loading import load_model
from train_utils.vis.draw import draw_detections

LOSS_TERMS = ("loss", "loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg")


def accumulate(folder: Path) -> EventAccumulator:
    """Every event under ``folder`` (no sampling), as TensorBoard reads it."""
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def scalars(acc: EventAccumulator, tag: str) -> List[Tuple[int, float]]:
    return [(event.step, event.value) for event in acc.Scalars(tag)]


def f32(value: float) -> float:
    """What an event file stores of a float (simple_value is a 32-bit float)."""
    return float(np.float32(value))


def logged_image(acc: EventAccumulator, tag: str, step: int) -> np.ndarray:
    event = next(e for e in acc.Images(tag) if e.step == step)
    return np.asarray(Image.open(io.BytesIO(event.encoded_image_string)))


@pytest.fixture(scope="module")
def tb_run(demo_voc, tmp_path_factory) -> Path:
    """train_mobilenet.py with --tensorboard: one epoch, then resumed for the second."""
    out = tmp_path_factory.mktemp("tb_run")
    train("train_mobilenet.py", demo_voc, out, "--epochs", "1", "--tensorboard")
    train("train_mobilenet.py", demo_voc, out, "--epochs", "2", "--resume", "auto", "--tensorboard")
    return out


@pytest.fixture(scope="module")
def val_set(demo_voc):
    return build_dataset("voc", demo_voc, "val.txt", get_transforms(False), demo_voc / "classes.json")


@pytest.fixture(scope="module")
def val_pictures(demo_voc):
    """The validation split as decoded PIL images (no transforms)."""
    return build_dataset("voc", demo_voc, "val.txt", None, demo_voc / "classes.json")


def epoch_end_steps(out: Path) -> dict:
    """epoch -> its last global step, from iterations.jsonl (the last step of an epoch is logged)."""
    steps = [json.loads(line) for line in (out / "iterations.jsonl").read_text().splitlines()]
    return {e: max(r["step"] for r in steps if r["epoch"] == e) for e in {r["epoch"] for r in steps}}


def test_a_tensorboard_run_resumes_to_the_weights_of_a_run_without_it(tb_run, uninterrupted):
    got, want = load(tb_run / "model-1.pth")["model"], load(uninterrupted / "model-1.pth")["model"]
    assert list(got) == list(want)
    for key, value in want.items():
        assert torch.equal(got[key], value), key
    def untimed(out: Path) -> list:
        return [{k: v for k, v in r.items() if k != "epoch_time"} for r in metrics(out)]

    assert untimed(tb_run) == untimed(uninterrupted)


def test_step_scalars_are_the_numbers_of_iterations_jsonl(tb_run):
    acc = accumulate(tb_run / "tensorboard")
    records = [json.loads(line) for line in (tb_run / "iterations.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6, 8]  # --print-freq 2, 4 iterations per epoch
    train_tags = sorted(t for t in acc.Tags()["scalars"] if t.startswith("train/"))
    assert train_tags == sorted(f"train/{k}" for k in (*LOSS_TERMS, "lr"))
    for key in (*LOSS_TERMS, "lr"):
        assert scalars(acc, f"train/{key}") == [(r["step"], f32(r[key])) for r in records], key


def test_epoch_scalars_are_the_numbers_of_metrics_jsonl(tb_run):
    acc = accumulate(tb_run / "tensorboard")
    records, ends = metrics(tb_run), epoch_end_steps(tb_run)
    assert ends == {0: 4, 1: 8}
    for key in (*LOSS_TERMS, "lr", "epoch_time"):
        assert scalars(acc, f"epoch/{key}") == [(ends[r["epoch"]], f32(r[key])) for r in records], key
    for index, name in enumerate(COCO_STAT_NAMES):
        want = [(ends[r["epoch"]], f32(r["coco"][index])) for r in records if r["coco"][index] != -1]
        assert (scalars(acc, f"coco/{name}") if f"coco/{name}" in acc.Tags()["scalars"] else []) == want, name
    assert len(scalars(acc, "coco/AP@.5")) == 2


def test_four_fixed_validation_images_are_drawn_with_the_checkpoints_predictions(tb_run, val_set, val_pictures):
    acc = accumulate(tb_run / "tensorboard")
    chosen = [0, 1, 2, 4]  # 5 validation images: the first, the last and two evenly between
    assert sorted(acc.Tags()["images"]) == sorted(f"predictions/{val_set.ids[i]}" for i in chosen)
    for epoch, step in epoch_end_steps(tb_run).items():
        model = load_model(str(tb_run / f"model-{epoch}.pth"))
        for index in chosen:
            image, _ = val_set[index]
            with torch.inference_mode():
                output = model([image])[0]
            keep = output["scores"] >= 0.5
            original = val_pictures[index][0]
            want = draw_detections(original, output["boxes"][keep].tolist(), output["labels"][keep].tolist(),
                                   output["scores"][keep].tolist(), val_set.class_names)
            assert np.array_equal(logged_image(acc, f"predictions/{val_set.ids[index]}", step), np.asarray(want))


def fake_trainer(model, val_set, step: int, epochs: int = 2) -> SimpleNamespace:
    """What the hook reads of a Trainer (the images show the evaluated model: ``model``)."""
    return SimpleNamespace(evaluated_model=lambda: model, val_set=val_set, device=torch.device("cpu"),
                           scheduler=SimpleNamespace(last_epoch=step), args=SimpleNamespace(epochs=epochs, print_freq=1),
                           train_batches=SimpleNamespace(full_length=4))


def confident_model(checkpoint: Path):
    """The checkpoint's detector calling every proposal class 1 (score ~0.99), 3 detections per image,
    drawing from every random generator in each forward pass (as a stochastic plugin model might)."""
    model = load_model(str(checkpoint))
    model.roi_heads.box_predictor.cls_score.weight.data.zero_()
    model.roi_heads.box_predictor.cls_score.bias.data.copy_(torch.tensor([0.0, 6.0, 0.0, 0.0]))
    model.roi_heads.detections_per_img = 3
    def draw_randomly(module, inputs) -> None:
        torch.rand(1), random.random(), np.random.rand()

    model.register_forward_pre_hook(draw_randomly)
    return model


def test_drawn_boxes_and_untouched_random_states_and_mode(tb_run, val_set, val_pictures, tmp_path):
    model = confident_model(tb_run / "model-1.pth")
    hook = TensorBoardHook(str(tmp_path))
    hook.before_train(fake_trainer(model, val_set, 0))
    model.train()
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy(), np.random.get_state()[2])
    record = {"epoch": 1, "loss": 1.0, "lr": 0.01, "coco": [0.5] * 12}
    hook.after_epoch(fake_trainer(model, val_set, 8), record)
    hook.epoch_extras(fake_trainer(model, val_set, 8), record)  # the images
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    assert np.array_equal(np.random.get_state()[1], before[2]) and np.random.get_state()[2] == before[3]
    assert model.training
    model.eval()
    acc = accumulate(tmp_path)
    for index in (0, 1, 2, 4):
        image, _ = val_set[index]
        with torch.inference_mode():
            output = model([image])[0]
        assert len(output["boxes"]) == 3 and bool((output["scores"] > 0.5).all())
        original = val_pictures[index][0]
        want = np.asarray(draw_detections(original, output["boxes"].tolist(), output["labels"].tolist(),
                                          output["scores"].tolist(), val_set.class_names))
        got = logged_image(acc, f"predictions/{val_set.ids[index]}", 8)
        assert np.array_equal(got, want) and not np.array_equal(got, np.asarray(original))


def log_steps(log_dir: Path, start_step: int, losses: List[float]) -> None:
    """A hook as a (resumed) run at global step ``start_step`` uses it: steps start_step + 1, ..."""
    trainer = fake_trainer(None, [], start_step)
    hook = TensorBoardHook(str(log_dir))
    hook.before_train(trainer)
    for offset, loss in enumerate(losses, start=1):
        trainer.scheduler.last_epoch = start_step + offset
        hook.after_step(trainer, EpochState(0, start_step + offset, lr=0.1, last_losses={"loss": loss}))


def test_a_resume_hides_the_interrupted_runs_later_events(tmp_path):
    log_steps(tmp_path, 0, [4.0, 3.0, 2.0, 1.0])  # interrupted after step 4; its checkpoint was at step 2
    log_steps(tmp_path, 2, [2.5, 1.5])
    assert scalars(accumulate(tmp_path), "train/loss") == [(1, 4.0), (2, 3.0), (3, 2.5), (4, 1.5)]


def test_the_tensorboard_flag_and_a_missing_package(monkeypatch, capsys, tmp_path):
    from train_utils.engine.args import parse_training_args
    from train_mobilenet import DEFAULTS

    def parse(*argv: str):
        return parse_training_args("test", DEFAULTS, argv=["--output-dir", str(tmp_path), *argv])

    assert tensorboard_dir(parse()) is None
    assert tensorboard_dir(parse("--tensorboard")) == str(tmp_path / "tensorboard")
    assert tensorboard_dir(parse("--tensorboard", "tb/run1", "--epochs", "3")) == "tb/run1"
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    assert tensorboard_dir(parse()) is None  # not needed without the flag
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        parse("--tensorboard")
    assert stopped.value.code == 2
    assert capsys.readouterr().err == "error: --tensorboard needs the tensorboard package: pip install tensorboard\n"
