"""Weight EMA (--ema): the average against a hand-computed one, its place in the checkpoint, the
weights validation.py/predict.py load, and training runs that resume it bit for bit (CPU), under
bf16 autocast and under 2-rank gloo DDP."""
import argparse
import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import ROOT, load, metrics, train
from train_utils.checkpoint import Checkpoint, read_checkpoint, save_checkpoint
from train_utils.engine.ema import DEFAULT_DECAY, DEFAULT_TAU, ModelEMA

EMA_FLAGS = ["--ema", "0.9", "--ema-warmup", "4"]  # 8 steps in the tiny runs: the average moves visibly


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def train_steps(model: nn.Module, ema: ModelEMA, steps: int, on_step=lambda: None) -> None:
    """``steps`` SGD steps on random data, the EMA updated after each, ``on_step`` after that."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    generator = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        x = torch.randn(16, 4, generator=generator)
        loss = (model(x) - x[:, :2]).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update(model)
        on_step()


# ------------------------------------------------------------------------------------------ the average
def test_ema_after_n_steps_equals_a_hand_computed_ema():
    """Every float tensor (parameters and BatchNorm statistics) follows ema = d_t ema + (1 - d_t) w
    with d_t = decay (1 - exp(-t / tau)): bit for bit against the same float32 arithmetic, within
    float32 rounding of the formula in float64; the integer buffer is copied."""
    model = tiny_model()
    decay, tau, steps = 0.9, 5.0, 30
    ema = ModelEMA(model, decay, tau)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    exact = {k: v.clone() for k, v in model.state_dict().items()}
    wide = {k: v.double() for k, v in model.state_dict().items() if v.is_floating_point()}
    t = 0

    def reference() -> None:
        nonlocal t
        t += 1
        d = decay * (1 - math.exp(-t / tau))
        for key, w in model.state_dict().items():
            if key in wide:
                exact[key] = w + d * (exact[key] - w)
                wide[key] = d * wide[key] + (1 - d) * w.double()
            else:
                exact[key] = w.clone()

    train_steps(model, ema, steps, reference)
    got = ema.module.state_dict()
    assert ema.updates == steps and list(got) == list(exact)
    for key, value in got.items():
        assert torch.equal(value, exact[key]), key
        if key in wide:
            assert torch.allclose(value.double(), wide[key], rtol=0, atol=1e-6), key
            # an average, not a copy; the bias before BatchNorm gets no gradient and stays put exactly
            moved = not torch.equal(model.state_dict()[key], start[key])
            assert moved != (key == "0.bias") and torch.equal(value, model.state_dict()[key]) != moved, key
    assert int(got["1.num_batches_tracked"]) == steps == int(model.state_dict()["1.num_batches_tracked"])
    assert all(not p.requires_grad for p in ema.module.parameters()) and not ema.module.training


def test_decay_warm_up_and_its_absence():
    ema = ModelEMA(nn.Linear(2, 2))
    assert (ema.decay, ema.tau) == (DEFAULT_DECAY, DEFAULT_TAU) == (0.9998, 2000.0)
    assert ema.decay_at(1) == 0.9998 * (1 - math.exp(-1 / 2000))
    assert ema.decay_at(2000) == pytest.approx(0.9998 * (1 - 1 / math.e), rel=1e-15)
    assert ModelEMA(nn.Linear(2, 2), 0.99, 0).decay_at(1) == 0.99


def test_a_weight_that_does_not_move_stays_exact():
    """A frozen tensor's average is the tensor itself, bit for bit, however many updates."""
    model = nn.Linear(3, 3)
    model.weight.data = torch.randn(3, 3) * 1e3
    ema = ModelEMA(model, 0.9998, 10)
    for _ in range(200):
        ema.update(model)
    assert torch.equal(ema.module.weight, model.weight) and torch.equal(ema.module.bias, model.bias)


def test_the_average_is_float32_for_a_lower_precision_model():
    """A bfloat16 model's average is kept (and updated) in float32."""
    model = nn.Linear(4, 4).to(torch.bfloat16)
    ema = ModelEMA(model, 0.5, 0)
    start = ema.module.weight.clone()
    with torch.no_grad():
        model.weight.add_(1)
    ema.update(model)
    assert ema.module.weight.dtype == torch.float32 and model.weight.dtype == torch.bfloat16
    w = model.weight.float()
    assert torch.equal(ema.module.weight, w + 0.5 * (start - w))


def test_state_round_trip_continues_the_same_average():
    model = tiny_model()
    ema = ModelEMA(model, 0.9, 3)
    train_steps(model, ema, 4)
    other = ModelEMA(tiny_model(), 0.9, 3)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 4
    ema.update(model)
    other.update(model)
    for key, value in ema.module.state_dict().items():
        assert torch.equal(other.module.state_dict()[key], value), key


class SqrtLoss(nn.Module):
    """Loss ``w * x``, or (target ``inf_grad``) ``sqrt(w - w)``: finite (0) with an infinite gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0]))

    def forward(self, images, targets):
        if bool(targets[0]["inf_grad"]):
            return {"loss_w": torch.sqrt(self.w - self.w.detach()).sum()}
        return {"loss_w": (self.w * images[0]).sum()}


def test_a_step_the_grad_scaler_skips_for_inf_gradients_leaves_the_ema_alone():
    """A finite loss whose gradients overflow: the GradScaler skips the step (the weights stay),
    and the trainer does not update the EMA for it (its update count and weights stay too)."""
    from train_utils.engine.control import CheckpointEvery, RunControl, StopSignals
    from train_utils.engine.loop import EpochState, train_one_epoch
    from train_utils.engine.trainer import Trainer

    model = SqrtLoss()
    trainer = Trainer(argparse.Namespace(ema=0.5, ema_warmup=0.0, compile=False))
    trainer.model_without_ddp = model
    trainer.build_ema()
    trainer.control = RunControl(CheckpointEvery(), StopSignals())
    seen = []

    def after_step(state):
        trainer.after_step(state)
        seen.append((state.stepped, model.w.item(), trainer.ema.module.w.item(), trainer.ema.updates))

    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    batches = [([torch.tensor([x])], [{"inf_grad": torch.tensor(inf), "image_id": torch.tensor(i)}])
               for i, (x, inf) in enumerate([(1.0, False), (0.0, True), (2.0, False)])]
    train_one_epoch(model, optimizer, batches, torch.device("cpu"), EpochState(0), scheduler,
                    torch.amp.GradScaler("cpu"), print_freq=100, after_step=after_step)
    # w: 1 - 0.5 * 1 = 0.5; skipped; 0.5 - 0.5 * 2 = -0.5. EMA (d = 0.5): 0.75; 0.75; 0.125
    assert seen == [(True, 0.5, 0.75, 1), (False, 0.5, 0.75, 1), (True, -0.5, 0.125, 2)]


def test_resuming_a_run_without_ema_with_ema_warns_about_the_best_comparison(capsys):
    """The resumed best AP@0.5 is the raw weights'; from now on the EMA's is compared with it."""
    from train_utils.engine.checkpointer import Checkpointer

    trainer = argparse.Namespace(ema=ModelEMA(tiny_model(), 0.9, 0), best_ap50=0.4125)
    Checkpointer(argparse.Namespace(output_dir="out"), 0, 1).restore_ema(trainer, Checkpoint(model={}), "old.pth")
    assert capsys.readouterr().err == ("warning: old.pth holds no EMA weights: the average starts from its weights "
                                       "now, and best.pth is chosen by comparing the EMA's AP@0.5 with the raw "
                                       "weights' best so far (0.4125)\n")


# ------------------------------------------------------------------------------------------ flags
def parse_training(*argv: str) -> argparse.Namespace:
    from train_mobilenet import DEFAULTS
    from train_utils.engine.args import parse_training_args

    return parse_training_args("test", DEFAULTS, argv=list(argv))


def test_ema_flags():
    assert parse_training().ema is None
    assert parse_training("--ema").ema == DEFAULT_DECAY
    bare = parse_training("--ema", "--epochs", "3")
    assert (bare.ema, bare.epochs, bare.ema_warmup) == (DEFAULT_DECAY, 3, DEFAULT_TAU)
    given = parse_training("--ema", "0.999", "--ema-warmup", "0")
    assert (given.ema, given.ema_warmup) == (0.999, 0.0)


@pytest.mark.parametrize("argv, message", [(["--ema", "1.5"], "--ema: the decay must lie between 0 and 1"),
                                           (["--ema", "--ema-warmup", "-1"], "--ema-warmup: TAU must be 0")])
def test_bad_ema_flags_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_training(*argv)
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ checkpoints
TINY_MOBILENET = dict(num_classes=3, backbone="mobilenet_v2", backbone_options={"width_mult": 0.25, "feature_stride": 16},
                      representation_size=32, min_size=(64,), max_size=64)


def ema_checkpoint(path: Path) -> tuple:
    """A tiny detector's checkpoint whose EMA weights differ from its raw ones (every float
    tensor + 1); returns (raw state, ema state)."""
    from train_utils.model.builder import build_model
    from train_utils.model.config import ModelConfig

    config = ModelConfig(**TINY_MOBILENET)
    raw = build_model(config).state_dict()
    average = {k: v + 1 if v.is_floating_point() else v.clone() for k, v in raw.items()}
    save_checkpoint(Checkpoint(model=raw, config=config, class_names=["cat", "dog"], epoch=0,
                               ema={"model": average, "updates": 7, "decay": 0.9, "tau": 4.0}), str(path))
    return raw, average


def test_the_checkpoint_holds_the_ema_section_and_older_files_have_none(tmp_path):
    raw, average = ema_checkpoint(tmp_path / "ema.pth")
    stored = torch.load(tmp_path / "ema.pth", weights_only=True)
    assert stored["format_version"] == 4 and stored["ema"]["updates"] == 7
    read = read_checkpoint(str(tmp_path / "ema.pth"))
    assert (read.ema["updates"], read.ema["decay"], read.ema["tau"]) == (7, 0.9, 4.0)
    assert read.weights("f")[0] is read.ema["model"] and read.weights("f", "ema")[1] == "ema"
    assert read.weights("f", "raw")[0] is read.model

    format_3 = {k: v for k, v in stored.items() if k != "ema"}
    torch.save({**format_3, "format_version": 3}, tmp_path / "old.pth")
    old = read_checkpoint(str(tmp_path / "old.pth"))
    assert old.ema is None and old.weights("f")[0] is old.model and old.weights("f")[1] == "raw"
    with pytest.raises(ValueError, match=r"old.pth holds no EMA weights \(trained without --ema\)"):
        old.weights(str(tmp_path / "old.pth"), "ema")


def load_with(path: Path, *argv: str):
    from train_utils.cli import add_model_arguments
    from train_utils.loading import add_weights_variant_flag, load_detector

    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    add_weights_variant_flag(parser)
    return load_detector(parser.parse_args(["--device", "cpu", *argv]), str(path))


@pytest.mark.parametrize("variant", [None, "ema", "raw"])
def test_loading_picks_the_ema_weights_by_default_and_raw_on_request(variant, tmp_path, capsys):
    raw, average = ema_checkpoint(tmp_path / "ema.pth")
    detector = load_with(tmp_path / "ema.pth", *(["--weights-variant", variant] if variant else []))
    want = raw if variant == "raw" else average
    for key, value in detector.model.state_dict().items():
        assert torch.equal(value, want[key]), key
    lines = capsys.readouterr().err.splitlines()
    said = "using its trained (raw) weights" if variant == "raw" else "using its EMA weights (--weights-variant raw"
    assert len(lines) == 1 and said in lines[0] and "ema.pth" in lines[0]

    from train_utils.loading import load_model
    model = load_model(str(tmp_path / "ema.pth"), variant=variant)
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())


def test_a_file_without_ema_loads_its_weights_silently_and_refuses_ema(tmp_path, capsys):
    raw, _ = ema_checkpoint(tmp_path / "ema.pth")
    stored = torch.load(tmp_path / "ema.pth", weights_only=True)
    torch.save({**stored, "ema": None}, tmp_path / "plain.pth")
    detector = load_with(tmp_path / "plain.pth")
    assert all(torch.equal(v, raw[k]) for k, v in detector.model.state_dict().items())
    assert capsys.readouterr().err == ""
    with pytest.raises(ValueError, match="plain.pth holds no EMA weights"):
        load_with(tmp_path / "plain.pth", "--weights-variant", "ema")


def test_fine_tuning_starts_from_the_ema_weights(tmp_path, capsys):
    from train_utils.checkpoint import load_detector_weights
    from train_utils.model.builder import build_model
    from train_utils.model.config import ModelConfig

    _, average = ema_checkpoint(tmp_path / "ema.pth")
    model = build_model(ModelConfig(**TINY_MOBILENET))
    load_detector_weights(model, str(tmp_path / "ema.pth"), ModelConfig(**TINY_MOBILENET))
    assert all(torch.equal(v, average[k]) for k, v in model.state_dict().items())
    assert capsys.readouterr().out == f"{tmp_path / 'ema.pth'}: starting from its EMA weights\n"


# ------------------------------------------------------------------------------------------ training runs
def assert_same_checkpoint_weights(got: dict, want: dict) -> None:
    """Raw and EMA weights equal bit for bit, and the same EMA update count."""
    assert got["ema"]["updates"] == want["ema"]["updates"]
    for section in (got["model"], want["model"]), (got["ema"]["model"], want["ema"]["model"]):
        assert list(section[0]) == list(section[1])
        for key, value in section[1].items():
            assert torch.equal(section[0][key], value), key


@pytest.fixture(scope="module")
def ema_run(demo_voc, tmp_path_factory) -> Path:
    """train_mobilenet.py with EMA_FLAGS, 2 epochs of 4 iterations in one go."""
    out = tmp_path_factory.mktemp("ema_run")
    train("train_mobilenet.py", demo_voc, out, "--epochs", "2", *EMA_FLAGS)
    return out


@pytest.mark.slow
def test_an_ema_run_evaluates_saves_and_validates_its_ema_weights(ema_run, tmp_path):
    import validation

    records = metrics(ema_run)
    assert [r["weights"] for r in records] == ["ema", "ema"]
    last = load(ema_run / "model-1.pth")
    assert last["ema"]["updates"] == 8 and (last["ema"]["decay"], last["ema"]["tau"]) == (0.9, 4.0)
    assert {v.dtype for v in last["ema"]["model"].values() if v.is_floating_point()} == {torch.float32}
    assert any(not torch.equal(v, last["model"][k]) for k, v in last["ema"]["model"].items())
    best = load(ema_run / "best.pth")
    assert best["metrics"]["best_ap50"] == max(r["coco"][1] for r in records)

    # The numbers of the run's evaluation are those of validation.py on the EMA weights (its default).
    scored = {}
    for variant in ("ema", "raw"):
        report = tmp_path / f"{variant}.txt"
        assert validation.main(["--weights-path", str(ema_run / "model-1.pth"), "--workers", "0",
                                "--output", str(report), "--weights-variant", variant]) == 0
        scored[variant] = json.loads(report.with_suffix(".json").read_text())["coco_stats"]
    assert scored["ema"] == pytest.approx(records[1]["coco"], abs=1e-12)
    assert scored["raw"] != scored["ema"]


@pytest.mark.slow
def test_an_ema_run_resumes_bit_exact_from_an_epoch_and_an_iteration_checkpoint(demo_voc, ema_run, tmp_path):
    """1 epoch + resume, and a SIGTERM inside epoch 1 + resume, end with the uninterrupted run's
    raw and EMA weights and evaluation numbers."""
    from test_long_runs import Run, script_cmd

    by_epoch = tmp_path / "by_epoch"
    train("train_mobilenet.py", demo_voc, by_epoch, "--epochs", "1", *EMA_FLAGS)
    assert load(by_epoch / "last.pth")["ema"]["updates"] == 4
    train("train_mobilenet.py", demo_voc, by_epoch, "--epochs", "2", "--resume", "auto", *EMA_FLAGS)

    by_iteration = tmp_path / "by_iteration"
    first = Run([sys.executable, *script_cmd("train_mobilenet.py", demo_voc, by_iteration, "--epochs", "2",
                                             "--checkpoint-every", "0", *EMA_FLAGS)])
    first.until("Epoch 1 [1/")
    first.proc.send_signal(signal.SIGTERM)
    assert first.finish() == 128 + signal.SIGTERM, first.text[-3000:]
    stopped = load(by_iteration / "last.pth")
    assert stopped["progress"] is not None and stopped["ema"]["updates"] == 4 + stopped["progress"]["iteration"]
    train("train_mobilenet.py", demo_voc, by_iteration, "--epochs", "2", "--resume", "auto", *EMA_FLAGS)

    reference = load(ema_run / "model-1.pth")
    for out in (by_epoch, by_iteration):
        assert_same_checkpoint_weights(load(out / "model-1.pth"), reference)
        assert [r["coco"] for r in metrics(out)] == [r["coco"] for r in metrics(ema_run)]


@pytest.mark.slow
def test_an_ema_run_under_bf16_autocast_on_the_cpu(demo_voc, tmp_path):
    train("train_mobilenet.py", demo_voc, tmp_path, "--epochs", "1", "--amp", "--device", "cpu", *EMA_FLAGS)
    last = load(tmp_path / "last.pth")
    assert last["args"]["amp"] and last["ema"]["updates"] == 4
    assert {v.dtype for v in last["ema"]["model"].values() if v.is_floating_point()} == {torch.float32}
    assert metrics(tmp_path)[0]["weights"] == "ema"


@pytest.mark.slow
def test_torchrun_ema_run_resumes_to_the_uninterrupted_weights(demo_voc, tmp_path):
    """2 gloo ranks: rank 0 saves the EMA of the unwrapped module; 1 epoch + resume ends where
    2 epochs in one go do (raw and EMA weights, evaluation numbers)."""
    from test_long_runs import ENV, ddp_cmd

    def run(out: Path, epochs: str, *extra: str) -> None:
        cmd = ddp_cmd(demo_voc, out, *EMA_FLAGS, "--epochs", epochs, *extra)  # the last --epochs counts
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]

    run(tmp_path / "straight", "2")
    run(tmp_path / "resumed", "1")
    assert load(tmp_path / "resumed" / "last.pth")["ema"]["updates"] == 5  # 19 images, 2 ranks x 2 per batch
    run(tmp_path / "resumed", "2", "--resume", "auto")
    straight = load(tmp_path / "straight" / "model-1.pth")
    assert straight["ema"]["updates"] == 10
    assert_same_checkpoint_weights(load(tmp_path / "resumed" / "model-1.pth"), straight)
    assert [r["coco"] for r in metrics(tmp_path / "resumed")] == [r["coco"] for r in metrics(tmp_path / "straight")]
    assert [r["weights"] for r in metrics(tmp_path / "straight")] == ["ema", "ema"]
