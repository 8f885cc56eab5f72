"""Long runs: iteration checkpoints, stop signals, kill -9, torchrun restarts, multi-node on one
host, dead and hung ranks, damaged checkpoint files and disk errors.

Every interrupted run is resumed with ``--resume auto`` and must end with the weights of the
uninterrupted run (CPU, float32: bit for bit)."""
import errno
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

import pytest
import torch

from conftest import ROOT, SCHEDULE, TINY_COMMON_FLAGS, TINY_TRAIN_FLAGS, free_port, load, metrics, train

# Several processes share two cores: one thread each. Single-process runs keep the default
# environment of conftest.train, whose reference runs they are compared with bit for bit.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
PROGRESS = re.compile(r"^Epoch (\d+) \[(\d+)/(\d+)\]")


def script_cmd(script: str, demo_voc: Path, out: Path, *extra: str) -> List[str]:
    flags = TINY_COMMON_FLAGS if script == "train_resnet50_fpn.py" else TINY_TRAIN_FLAGS
    return [str(ROOT / script), "--data-path", str(demo_voc), "--classes-json", str(demo_voc / "classes.json"),
            "--output-dir", str(out), *flags, *SCHEDULE, "--print-freq", "1", *extra]


def torchrun_cmd(port: int, *extra: str) -> List[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
            f"--master-port={port}", *extra]


class Run:
    """A training process whose output is read line by line while it runs."""

    def __init__(self, cmd: List[str], env: Optional[dict] = None) -> None:
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=env or dict(os.environ), start_new_session=True)
        self.lines: List[str] = []
        self.times: List[float] = []  # when each line read by until() arrived (time.monotonic)

    def until(self, prefix: str) -> None:
        """Read until a line starts with ``prefix`` (fails if the process ends first)."""
        for line in self.proc.stdout:
            self.lines.append(line)
            self.times.append(time.monotonic())
            if line.startswith(prefix):
                return
        raise AssertionError(f"no line starting with {prefix!r}:\n{''.join(self.lines[-30:])}")

    def finish(self, timeout: float = 300) -> int:
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        finally:
            try:  # whatever is left of the session (a launcher's orphaned workers)
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.lines += out.splitlines(keepends=True)
        return self.proc.returncode

    @property
    def text(self) -> str:
        return "".join(self.lines)


def mobilenet_args(argv: List[str]):
    """train_mobilenet.py's flags parsed in-process (for a Trainer built in the test)."""
    from train_utils.engine.args import parse_training_args
    from train_mobilenet import DEFAULTS

    return parse_training_args("test", DEFAULTS, argv=argv)


def iterations_printed(text: str) -> set:
    return {(int(m.group(1)), int(m.group(2))) for line in text.splitlines() if (m := PROGRESS.match(line))}


def assert_same_weights(resumed: Path, reference: Path) -> None:
    got, want = load(resumed)["model"], load(reference)["model"]
    assert list(got) == list(want)
    for key, value in want.items():
        assert torch.equal(got[key], value), key


def assert_each_step_logged_once(out: Path, steps: int) -> None:
    logged = [json.loads(line)["step"] for line in (out / "iterations.jsonl").read_text().splitlines()]
    assert logged == list(range(1, steps + 1))


# ------------------------------------------------------------------------------------------ one process
@pytest.mark.parametrize("how, at, every, workers", [
    ("SIGTERM", "Epoch 1 [1/", "0", "0"),   # graceful stop inside epoch 1, no periodic checkpoints
    ("SIGKILL", "Epoch 1 [3/", "2", "0"),   # no cleanup: the iteration checkpoint of step 2 is what is left
    ("SIGUSR1", "Epoch 0 [2/", "0", "2"),   # SLURM's warning signal, with loader workers (same augmentation)
])
def test_interrupted_run_resumes_to_the_uninterrupted_weights(how, at, every, workers, demo_voc, uninterrupted,
                                                              tmp_path):
    first = Run([sys.executable, *script_cmd("train_mobilenet.py", demo_voc, tmp_path, "--epochs", "2",
                                             "--checkpoint-every", every, "--workers", workers)])
    first.until(at)
    first.proc.send_signal(getattr(signal, how))
    code = first.finish()
    signum = getattr(signal, how)
    if how == "SIGKILL":
        assert code == -signal.SIGKILL
    else:
        assert code == 128 + signum, first.text[-3000:]
        stop_lines = [line for line in first.lines if line.startswith(f"stopped by {how} at epoch ")]
        assert len(stop_lines) == 1 and f"{tmp_path}/last.pth" in stop_lines[0] and "--resume auto" in stop_lines[0]
    stopped = load(tmp_path / "last.pth")
    progress = stopped["progress"]
    assert progress is not None and progress["world_size"] == 1 and 1 <= progress["iteration"] <= 4
    assert not list(tmp_path.glob(".*.tmp")), "no temporary file left behind"

    second = train("train_mobilenet.py", demo_voc, tmp_path, "--epochs", "2", "--resume", "auto",
                   "--print-freq", "1", "--workers", workers)
    assert f"at epoch {stopped['epoch'] + 1}, iteration {progress['iteration']}" in second.stdout
    assert_same_weights(tmp_path / "model-1.pth", uninterrupted / "model-1.pth")
    assert [r["loss"] for r in metrics(tmp_path)] == [r["loss"] for r in metrics(uninterrupted)]
    assert_each_step_logged_once(tmp_path, 8)
    repeated = iterations_printed(first.text) & iterations_printed(second.stdout)
    assert len(repeated) <= (int(every) if how == "SIGKILL" else 0), repeated


@pytest.mark.slow
def test_a_second_signal_stops_at_once(demo_voc, tmp_path):
    run = Run([sys.executable, *script_cmd("train_mobilenet.py", demo_voc, tmp_path, "--epochs", "3")])
    run.until("train: ")  # still building the model: the first stop can only come after an iteration
    run.proc.send_signal(signal.SIGINT)
    run.until("SIGINT received")
    run.proc.send_signal(signal.SIGINT)
    code = run.finish()
    assert code == 128 + signal.SIGINT
    assert "stopped at once by a second SIGINT" in run.text and "Traceback" not in run.text
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.slow
def test_checkpoint_every_n_iterations_writes_last_inside_the_epoch(demo_voc, tmp_path):
    done = train("train_mobilenet.py", demo_voc, tmp_path, "--epochs", "1", "--checkpoint-every", "3")
    assert done.stdout.count("iteration checkpoint last.pth (epoch 0, iteration 3)") == 1
    last = load(tmp_path / "last.pth")
    assert last["progress"] is None and last["epoch"] == 0  # the epoch end came after
    assert (tmp_path / "last.pth").read_bytes() == (tmp_path / "model-0.pth").read_bytes(), "a copy of the epoch file"
    assert not os.path.samefile(tmp_path / "last.pth", tmp_path / "model-0.pth")


SLOW_EVAL_ENV = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "SLOW_EVAL_SECONDS": "2"}


def longest_iteration(run: Run) -> float:
    """The longest gap between two progress lines of a training epoch that ``run`` printed."""
    stamps = [t for line, t in zip(run.lines, run.times) if PROGRESS.match(line)]
    return max(b - a for a, b in zip(stamps, stamps[1:]))


def assert_stopped_at_the_epoch_end(run: Run, out: Path, elapsed: float, iterations: int) -> None:
    """One stop line; the trained epoch 0 in last.pth, marked as not evaluated; no evaluation
    finished and nothing else written; ``elapsed`` within one iteration + the write + 5 s."""
    stop_lines = [line for line in run.lines if line.startswith("stopped by SIGTERM at ")]
    assert len(stop_lines) == 1 and "the end of epoch 0 (trained, not yet evaluated)" in stop_lines[0], run.text[-3000:]
    written = re.search(r"last\.pth \(end of epoch 0, not yet evaluated\) written in ([\d.]+)s", run.text)
    assert written, run.text[-3000:]
    assert elapsed < longest_iteration(run) + float(written.group(1)) + 5, (elapsed, run.text[-3000:])
    assert not re.search(r"^evaluated \d+ images", run.text, re.M) and "Test [3/" not in run.text
    stopped = load(out / "last.pth")
    assert stopped["epoch"] == -1 and stopped["progress"]["end_pending"] is True
    assert stopped["progress"]["iteration"] == iterations
    assert sorted(p.name for p in out.glob("*.pth")) == ["last.pth"] and metrics(out) == []
    assert not list(out.glob("*.png")) and not list(out.glob(".*.tmp"))


def results_lines(out: Path) -> List[str]:
    return [line for path in sorted(out.glob("results*.txt")) for line in path.read_text().splitlines()]


def assert_same_epoch_ends(out: Path, reference: Path) -> None:
    """The resumed run's epoch ends equal the uninterrupted run's: weights, metrics, results, best.pth."""
    assert_same_weights(out / "model-1.pth", reference / "model-1.pth")
    assert_same_weights(out / "best.pth", reference / "best.pth")
    assert load(out / "best.pth")["metrics"] == load(reference / "best.pth")["metrics"]
    drop_time = [{k: v for k, v in r.items() if k != "epoch_time"} for r in metrics(out)]
    assert drop_time == [{k: v for k, v in r.items() if k != "epoch_time"} for r in metrics(reference)]
    assert results_lines(out) == results_lines(reference)


@pytest.mark.slow
@pytest.mark.parametrize("when", ["last iteration", "evaluation"])
def test_a_stop_at_an_epoch_end_never_waits_for_the_evaluation(when, demo_voc, uninterrupted, tmp_path):
    """SIGTERM in epoch 0's last iteration (of 4) or while its evaluation runs (2 s per image):
    the trained epoch is saved at once, and --resume auto evaluates it first."""
    run = Run([sys.executable, *script_cmd("train_mobilenet.py", demo_voc, tmp_path, "--epochs", "2",
                                           "--checkpoint-every", "0", "--plugin", "slow_eval_plugin")],
              env=SLOW_EVAL_ENV)
    run.until("Epoch 0 [3/4]" if when == "last iteration" else "Test [1/5]")
    sent = time.monotonic()
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == 128 + signal.SIGTERM, run.text[-3000:]
    assert_stopped_at_the_epoch_end(run, tmp_path, time.monotonic() - sent, iterations=4)

    second = train("train_mobilenet.py", demo_voc, tmp_path, "--epochs", "2", "--resume", "auto", "--print-freq", "1")
    assert f"resumed from {tmp_path / 'last.pth'} at epoch 0, iteration 4 (all trained" in second.stdout
    assert min(epoch for epoch, _ in iterations_printed(second.stdout)) == 1  # no batch of epoch 0 again
    assert_same_epoch_ends(tmp_path, uninterrupted)
    assert_each_step_logged_once(tmp_path, 8)


@pytest.mark.slow
def test_a_stop_after_the_last_epochs_records_skips_its_extras_and_a_resume_draws_them(demo_voc, tmp_path):
    """SIGTERM once the last epoch's records and checkpoints are written (an extra hook sends it):
    the run exits on the signal without drawing the curves, and --resume auto, with nothing left to
    train, draws them and ends as a finished run."""
    from train_utils.engine.control import TrainingStopped
    from train_utils.engine.hooks import Hook
    from train_utils.engine.trainer import LAST_EPOCH_SKIPPED, Trainer

    class StopAfterRecords(Hook):
        def after_epoch(self, trainer, record) -> None:
            os.kill(os.getpid(), signal.SIGTERM)

    argv = ["--data-path", str(demo_voc), "--classes-json", str(demo_voc / "classes.json"),
            "--output-dir", str(tmp_path), "--epochs", "1", *TINY_TRAIN_FLAGS]
    with pytest.raises(TrainingStopped) as stopped:
        Trainer(mobilenet_args(argv), extra_hooks=[StopAfterRecords()]).train()
    assert stopped.value.signum == signal.SIGTERM and LAST_EPOCH_SKIPPED in str(stopped.value)
    assert [r["epoch"] for r in metrics(tmp_path)] == [0] and (tmp_path / "model-0.pth").is_file()
    assert not (tmp_path / "mAP.png").exists() and not (tmp_path / "loss_and_lr.png").exists()

    record = Trainer(mobilenet_args([*argv, "--resume", "auto"])).train()
    assert record == {} and (tmp_path / "mAP.png").is_file() and (tmp_path / "loss_and_lr.png").is_file()
    assert [r["epoch"] for r in metrics(tmp_path)] == [0]


@pytest.mark.slow
def test_a_float16_scaler_state_is_never_dropped_silently(demo_voc, trained_run, tmp_path, capsys):
    """A checkpoint of a float16 run (it holds a GradScaler state) resumed where --amp means
    bfloat16: one error naming the file and the flag to add; with an explicit --amp-dtype, a warning."""
    from train_utils.engine.trainer import Trainer

    ckpt = load(trained_run / "last.pth")
    ckpt["scaler"] = {"scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                      "_growth_tracker": 3}
    torch.save(ckpt, tmp_path / "last.pth")
    argv = ["--data-path", str(demo_voc), "--classes-json", str(demo_voc / "classes.json"),
            "--output-dir", str(tmp_path), "--epochs", "2", "--resume", "auto", "--amp", *TINY_TRAIN_FLAGS, *SCHEDULE]
    trainer = Trainer(mobilenet_args(argv))
    try:
        with pytest.raises(ValueError, match="trained with float16 autocast and a GradScaler; resume it with "
                                             "--amp --amp-dtype float16"):
            trainer.setup()
    finally:
        trainer.signals.uninstall()
    trainer = Trainer(mobilenet_args([*argv, "--amp-dtype", "bfloat16"]))
    try:
        trainer.setup()
    finally:
        trainer.signals.uninstall()
    assert trainer.scaler is None and trainer.start_epoch == 1
    assert "holds a float16 GradScaler state; --amp-dtype bfloat16 drops it" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ torchrun
@pytest.fixture(scope="module")
def uninterrupted_ddp(demo_voc, tmp_path_factory) -> Path:
    """Two processes (torchrun, gloo), 2 epochs of 5 iterations in one go."""
    out = tmp_path_factory.mktemp("ddp_reference")
    done = subprocess.run(torchrun_cmd(free_port()) + script_cmd("train_multi_GPU.py", demo_voc, out, "--epochs", "2",
                                                                 "-b", "2", "--backbone", "mobilenet_v2"),
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return out


def worker_pid(out: Path, rank: int) -> int:
    """The PID of the training process of ``rank`` writing to ``out``."""
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if str(out).encode() in cmdline and b"train_multi_GPU.py" in b" ".join(cmdline) \
                and f"RANK={rank}".encode() in environ and b"-m" not in cmdline[:3]:
            return int(entry.name)
    raise AssertionError(f"no rank {rank} process for {out}")


def ddp_cmd(demo_voc: Path, out: Path, *extra: str, launcher: Optional[List[str]] = None) -> List[str]:
    return (launcher or torchrun_cmd(free_port())) + script_cmd(
        "train_multi_GPU.py", demo_voc, out, "--epochs", "2", "-b", "2", "--backbone", "mobilenet_v2", *extra)


def test_torchrun_sigterm_stops_every_rank_at_one_iteration_then_resumes(demo_voc, uninterrupted_ddp, tmp_path):
    run = Run(ddp_cmd(demo_voc, tmp_path, "--checkpoint-every", "0"), env=ENV)
    run.until("Epoch 1 [2/")
    run.proc.send_signal(signal.SIGTERM)  # the agent passes it on to both workers
    assert run.finish() != 0
    assert run.text.count("stopped by SIGTERM at ") == 1, run.text[-3000:]
    progress = load(tmp_path / "last.pth")["progress"]
    assert progress["world_size"] == 2 and len(load(tmp_path / "last.pth")["rng_state"]) == 2

    done = subprocess.run(ddp_cmd(demo_voc, tmp_path, "--resume", "auto"), cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=ENV)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert f"at epoch 1, iteration {progress['iteration']}" in done.stdout
    assert_same_weights(tmp_path / "model-1.pth", uninterrupted_ddp / "model-1.pth")
    assert_each_step_logged_once(tmp_path, 10)


@pytest.mark.slow
@pytest.mark.parametrize("when", ["last iteration", "evaluation"])
def test_torchrun_stop_at_an_epoch_end_never_waits_for_the_evaluation(when, demo_voc, uninterrupted_ddp, tmp_path):
    """Two processes: SIGTERM to the agent in epoch 0's last iteration (of 5) or while the
    evaluation runs (3 images per rank, 2 s each); every rank drops it, rank 0 writes the epoch.
    The bound holds up to rank 0's stop line (the file written, every rank agreed); torchrun's
    own teardown after it (workers' interpreter exit, the agent's) took 4-6 s here, as before
    this change, well inside the 30 s it gives workers before killing them."""
    run = Run(ddp_cmd(demo_voc, tmp_path, "--checkpoint-every", "0", "--plugin", "slow_eval_plugin"),
              env={**SLOW_EVAL_ENV, "OMP_NUM_THREADS": "1"})
    run.until("Epoch 0 [4/5]" if when == "last iteration" else "Test [1/3]")
    sent = time.monotonic()
    run.proc.send_signal(signal.SIGTERM)  # the agent passes it on to both workers
    run.until("stopped by SIGTERM at ")
    stopped = time.monotonic() - sent
    assert run.finish() != 0 and time.monotonic() - sent < 30
    assert_stopped_at_the_epoch_end(run, tmp_path, stopped, iterations=5)

    done = subprocess.run(ddp_cmd(demo_voc, tmp_path, "--resume", "auto"), cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=ENV)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "at epoch 0, iteration 5 (all trained" in done.stdout
    assert_same_epoch_ends(tmp_path, uninterrupted_ddp)
    assert_each_step_logged_once(tmp_path, 10)


def test_torchrun_restarts_a_killed_worker_and_finishes(demo_voc, uninterrupted_ddp, tmp_path):
    launcher = torchrun_cmd(free_port(), "--max-restarts=1")
    run = Run(ddp_cmd(demo_voc, tmp_path, "--checkpoint-every", "1", "--resume", "auto", launcher=launcher), env=ENV)
    run.until("Epoch 1 [2/")
    os.kill(worker_pid(tmp_path, 1), signal.SIGKILL)
    assert run.finish() == 0, run.text[-4000:]
    resumed = re.findall(r"resumed from \S+ at epoch (\d+), iteration (\d+)", run.text)
    assert len(resumed) == 1 and resumed[0][0] == "1" and int(resumed[0][1]) >= 1, run.text[-3000:]
    assert_same_weights(tmp_path / "model-1.pth", uninterrupted_ddp / "model-1.pth")
    assert_each_step_logged_once(tmp_path, 10)


def test_two_agents_like_two_nodes_with_separate_output_folders(demo_voc, uninterrupted_ddp, tmp_path):
    """nnodes=2 on one host (c10d rendezvous): one epoch, then --resume auto with each agent
    writing to its own folder (no shared storage): every rank continues from the same state."""
    import validation

    def two_agents(epochs: str, *extra: str) -> None:
        endpoint, runs = f"127.0.0.1:{free_port()}", []
        for node in (0, 1):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                   "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", "--rdzv-id=test",
                   *script_cmd("train_multi_GPU.py", demo_voc, tmp_path / f"node{node}", "--epochs", epochs,
                               "-b", "2", "--backbone", "mobilenet_v2", *extra)]
            runs.append(Run(cmd, env=ENV))
        for run in runs:
            assert run.finish(timeout=300) == 0, run.text[-3000:]

    two_agents("1")
    two_agents("2", "--resume", "auto")
    written = [folder for folder in tmp_path.iterdir() if (folder / "model-1.pth").is_file()]
    assert len(written) == 1
    assert_same_weights(written[0] / "model-1.pth", uninterrupted_ddp / "model-1.pth")

    record = tmp_path / "record.txt"
    assert validation.main(["--weights-path", str(written[0] / "model-1.pth"), "--workers", "0",
                            "--output", str(record)]) == 0
    assert json.loads(record.with_suffix(".json").read_text())["coco_stats"] == pytest.approx(
        load(written[0] / "model-1.pth")["metrics"]["coco_stats"], abs=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["SIGKILL", "SIGSTOP"])
def test_a_dead_or_hung_rank_ends_the_others_with_one_line(fault, demo_voc, tmp_path):
    """Two processes started by hand (no agent to clean up): rank 1 is killed or frozen; rank 0
    names it and exits within --dist-timeout (15 s) plus a margin."""
    port, runs = free_port(), []
    for rank in (1, 0):
        env = {**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        runs.append(Run([sys.executable, *script_cmd("train_multi_GPU.py", demo_voc, tmp_path, "--epochs", "3",
                                                     "-b", "2", "--backbone", "mobilenet_v2",
                                                     "--dist-timeout", "0.25")], env=env))
    rank1, rank0 = runs
    try:
        rank0.until("Epoch 0 [2/")
        started = time.monotonic()
        os.kill(rank1.proc.pid, getattr(signal, fault))
        code = rank0.finish(timeout=60)
        elapsed = time.monotonic() - started
    finally:
        os.killpg(rank1.proc.pid, signal.SIGKILL)
        rank1.proc.wait()
    errors = [line for line in rank0.lines if line.startswith("error:")]
    assert code == 1 and len(errors) == 1, rank0.text[-3000:]
    assert "rank 1 stopped answering (died or hung)" in errors[0] and "--resume auto" in errors[0]
    assert "Traceback" not in rank0.text
    assert elapsed < 15 + 5 + 15


# ------------------------------------------------------------------------------------------ bad files
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_resume_auto_passes_over_a_damaged_newest_checkpoint(damage, demo_voc, uninterrupted, tmp_path):
    (tmp_path / "model-0.pth").write_bytes((uninterrupted / "model-0.pth").read_bytes())
    good = (uninterrupted / "model-1.pth").read_bytes()
    (tmp_path / "last.pth").write_bytes(good[: len(good) // 2] if damage == "truncated" else os.urandom(4096))
    done = train("train_mobilenet.py", demo_voc, tmp_path, "--epochs", "2", "--resume", "auto")
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning: skipping a damaged")]
    assert len(warnings) == 1 and str(tmp_path / "last.pth") in warnings[0], done.stderr
    assert f"resumed from {tmp_path / 'model-0.pth'} at epoch 1" in done.stdout
    assert_same_weights(tmp_path / "model-1.pth", uninterrupted / "model-1.pth")


def one_error_line(script: str, demo_voc: Path, out: Path, *extra: str) -> str:
    cmd = [sys.executable, *script_cmd(script, demo_voc, out, "--epochs", "2", *extra)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]
    return lines[0]


def test_resume_from_a_file_that_is_not_a_checkpoint(demo_voc, uninterrupted, tmp_path):
    garbage = tmp_path / "notes.pth"
    garbage.write_text("not a checkpoint")
    assert str(garbage) in one_error_line("train_mobilenet.py", demo_voc, tmp_path / "a", "--resume", str(garbage))
    bare = tmp_path / "weights.pth"
    torch.save(load(uninterrupted / "model-1.pth")["model"], bare)
    line = one_error_line("train_mobilenet.py", demo_voc, tmp_path / "b", "--resume", str(bare))
    assert f"{bare} is not a training checkpoint" in line and "--weights" in line


def test_resume_from_another_models_checkpoint(demo_voc, uninterrupted, tmp_path):
    line = one_error_line("train_resnet50_fpn.py", demo_voc, tmp_path, "--resume", str(uninterrupted / "last.pth"))
    assert f"{uninterrupted / 'last.pth'} was written for another model" in line
    assert "--backbone" in line and "backbone=mobilenet_v2" in line


@pytest.mark.slow
def test_a_full_disk_stops_with_one_line_and_keeps_the_previous_checkpoint(demo_voc, tmp_path, monkeypatch, capsys):
    """ENOSPC in the middle of writing epoch 1's checkpoint: one line, last.pth still holds epoch 0."""
    from train_utils.engine.trainer import main

    real_save = torch.save

    def save(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("epoch") == 1:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    argv = script_cmd("train_mobilenet.py", demo_voc, tmp_path, "--epochs", "2", "--checkpoint-every", "0")[1:]
    args = mobilenet_args(argv)
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot write {tmp_path / 'model-1.pth'}: No space left")
    assert load(tmp_path / "last.pth")["epoch"] == 0
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["best.pth", "last.pth", "model-0.pth"]
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.slow
def test_a_real_write_failure_is_one_line(demo_voc, tmp_path):
    """A file-size limit (RLIMIT_FSIZE: writes fail with EFBIG, as on a full disk they fail with
    ENOSPC) below the checkpoint's size: torch.save's error becomes one line naming the file."""
    import resource

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (512 * 1024, resource.RLIM_INFINITY))

    cmd = [sys.executable, *script_cmd("train_mobilenet.py", demo_voc, tmp_path, "--epochs", "1")]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, preexec_fn=limit_file_size)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith(f"error: cannot write {tmp_path / 'model-0.pth'}: File too large")
    assert not list(tmp_path.glob("*.pth")) and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.slow
def test_keep_checkpoints(demo_voc, tmp_path):
    train("train_mobilenet.py", demo_voc, tmp_path, "--epochs", "2", "--keep-checkpoints", "1")
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["best.pth", "last.pth", "model-1.pth"]
    assert (tmp_path / "last.pth").read_bytes() == (tmp_path / "model-1.pth").read_bytes()
    assert load(tmp_path / "best.pth")["epoch"] in (0, 1)


# ------------------------------------------------------------------------------------------ the parts
def test_checkpoint_every_accepts_iterations_times_and_off():
    from train_utils.engine.control import CheckpointEvery

    assert CheckpointEvery.parse("500") == CheckpointEvery(iterations=500)
    assert CheckpointEvery.parse("90s") == CheckpointEvery(seconds=90.0)
    assert CheckpointEvery.parse("15m") == CheckpointEvery(seconds=900.0)
    assert CheckpointEvery.parse("1.5h") == CheckpointEvery(seconds=5400.0)
    assert CheckpointEvery.parse("0") == CheckpointEvery.parse("off") == CheckpointEvery()
    for bad in ("ten", "5x", "1.5", "-3"):
        with pytest.raises(ValueError, match="--checkpoint-every"):
            CheckpointEvery.parse(bad)
    every = CheckpointEvery(iterations=3)
    assert [every.due(i, 0.0) for i in (1, 2, 3)] == [False, False, True]
    assert CheckpointEvery(seconds=60).due(1, 59.0) is False and CheckpointEvery(seconds=60).due(1, 60.0) is True
    assert CheckpointEvery().due(10 ** 9, 1e9) is False


def test_run_control_saves_every_n_iterations_and_on_a_signal():
    from train_utils.engine.control import CheckpointEvery, RunControl, StopSignals

    signals = StopSignals()
    control = RunControl(CheckpointEvery(iterations=2), signals)
    decisions = [control.poll() for _ in range(3)]
    assert decisions == [{"save": 0, "stop": 0}, {"save": 1, "stop": 0}, {"save": 1, "stop": 0}]
    control.mark()
    assert control.poll() == {"save": 0, "stop": 0}
    signals.signum = signal.SIGTERM  # what the handler records
    assert control.poll() == {"save": 1, "stop": int(signal.SIGTERM)}
    assert control.stop_requested() == signal.SIGTERM


def test_an_evaluation_polls_for_a_stop_before_each_batch_and_before_ending():
    from train_utils.engine.control import CheckpointEvery, RunControl, StopRequested, StopSignals

    signals = StopSignals()
    polled = RunControl(CheckpointEvery(), signals).polled([10, 20, 30])
    assert len(polled) == 3 and list(polled) == [10, 20, 30]
    seen = []
    with pytest.raises(StopRequested) as request:
        for batch in polled:
            seen.append(batch)
            if batch == 20:
                signals.signum = signal.SIGUSR1  # what the handler records, here during batch 20
    assert seen == [10, 20] and request.value.signum == signal.SIGUSR1


def test_an_epoch_trained_to_its_end_resumes_complete_in_any_world_size():
    """A stop at an epoch's end stores its full count (8 of 8 with 2 processes); resumed by one
    process (16 per epoch) the epoch is still complete, its loss means kept; an ordinary position
    keeps the number of images seen (4 of 8 -> 8 of 16)."""
    from argparse import Namespace

    from train_utils.engine.checkpointer import Checkpointer

    checkpointer = Checkpointer(Namespace(output_dir="unused"), rank=0, world_size=1)
    stored = {"iteration": 8, "loss_sums": {"loss": 12.0}, "lr": 0.01, "world_size": 2}
    state = checkpointer.epoch_state(3, {**stored, "end_pending": True}, full_length=16)
    assert (state.epoch, state.iteration, state.means()) == (3, 16, {"loss": 1.5, "lr": 0.01})
    state = checkpointer.epoch_state(3, {**stored, "iteration": 4, "loss_sums": {"loss": 6.0}}, full_length=16)
    assert (state.iteration, state.means()["loss"]) == (8, 1.5)


def test_augmentation_is_a_function_of_seed_epoch_and_image(demo_voc):
    """The same (epoch, index) gives the same augmented sample whatever was read before, the
    caller's random state is untouched, and another epoch draws other flips."""
    from my_dataset import VOCDataSet
    from train_utils.data.samplers import SeededSamples
    from train_utils.data.transforms import get_transforms

    dataset = VOCDataSet(demo_voc, transforms=get_transforms(True, "full"), txt_name="train.txt",
                         classes_json=str(demo_voc / "classes.json"))
    seeded = SeededSamples(dataset, seed=7)
    first = seeded[(3, 5)]
    state = torch.get_rng_state()
    for key in [(3, 1), (0, 5), (3, 2)]:
        seeded[key]
    assert torch.equal(torch.get_rng_state(), state)
    again = seeded[(3, 5)]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1]["boxes"], again[1]["boxes"])
    other_epochs = [seeded[(epoch, 5)][1]["boxes"] for epoch in range(8)]
    assert any(not torch.equal(boxes, first[1]["boxes"]) for boxes in other_epochs)


def test_resumable_batches_skip_the_first_batches_of_the_same_order():
    from torch.utils.data import BatchSampler, DistributedSampler

    from train_utils.data.samplers import ResumableBatches

    sampler = DistributedSampler(range(20), num_replicas=1, rank=0, shuffle=True, seed=3)
    batches = ResumableBatches(BatchSampler(sampler, 3, drop_last=True), sampler)
    batches.set_epoch(4)
    whole = list(batches)
    assert len(whole) == len(batches) == batches.full_length == 6
    assert all(epoch == 4 for batch in whole for epoch, _ in batch)
    batches.set_epoch(4, skip=4)
    assert list(batches) == whole[4:] and len(batches) == 2 and batches.full_length == 6
    batches.set_epoch(5)
    assert [[i for _, i in b] for b in batches] != [[i for _, i in b] for b in whole]


def test_random_states_round_trip_through_a_checkpoint_file(tmp_path):
    import random

    import numpy as np

    from train_utils.engine import rng

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save({"rng": [rng.capture()]}, tmp_path / "state.pth")
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    states = rng.from_stored(torch.load(tmp_path / "state.pth", weights_only=True)["rng"])
    assert rng.restore_rank(states, 0) and not rng.restore_rank(states, 1)
    got = (random.random(), float(np.random.rand()), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])
    # Formats 1-2 stored torch's CPU state alone.
    torch.manual_seed(5)
    old = torch.get_rng_state()
    want = torch.rand(2)
    assert rng.restore_rank(rng.from_stored(old), 0) and torch.equal(torch.rand(2), want)


def test_epoch_state_continues_the_running_means():
    from train_utils.engine.loop import EpochState

    whole = EpochState(2)
    for step, loss in enumerate([4.0, 2.0, 3.0, 1.0]):
        whole.add({"loss": loss}, lr=0.1 * step)
    part = EpochState(2)
    for step, loss in enumerate([4.0, 2.0]):
        part.add({"loss": loss}, lr=0.1 * step)
    resumed = EpochState.from_dict(2, part.to_dict())
    for step, loss in [(2, 3.0), (3, 1.0)]:
        resumed.add({"loss": loss}, lr=0.1 * step)
    assert resumed.means() == whole.means() == {"loss": 2.5, "lr": pytest.approx(0.3)}


def test_prune_and_copy_checkpoints(tmp_path, monkeypatch):
    from train_utils import checkpoint as ckpt

    for epoch in (0, 1, 2, 10):
        (tmp_path / f"model-{epoch}.pth").write_bytes(bytes([epoch]))
    (tmp_path / "model-x.pth").write_bytes(b"other")
    ckpt.copy_checkpoint(str(tmp_path / "model-10.pth"), str(tmp_path / "last.pth"))
    assert (tmp_path / "last.pth").read_bytes() == bytes([10])
    assert not os.path.samefile(tmp_path / "last.pth", tmp_path / "model-10.pth")
    assert ckpt.checkpoint_candidates(str(tmp_path)) == [str(tmp_path / n) for n in
                                                          ("last.pth", "model-10.pth", "model-2.pth", "model-1.pth",
                                                           "model-0.pth")]
    assert ckpt.prune_checkpoints(str(tmp_path), 0) == []
    assert ckpt.prune_checkpoints(str(tmp_path), 2) == [str(tmp_path / "model-1.pth"), str(tmp_path / "model-0.pth")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth", "model-10.pth", "model-2.pth", "model-x.pth"]

    def unsupported(*_):
        raise OSError(errno.EXDEV, "not between these files")

    big = os.urandom(3 * 2**20 + 5)
    (tmp_path / "model-2.pth").write_bytes(big)
    monkeypatch.setattr(ckpt.fcntl, "ioctl", unsupported)  # no reflinks: copy_file_range
    ckpt.copy_checkpoint(str(tmp_path / "model-2.pth"), str(tmp_path / "best.pth"))
    assert (tmp_path / "best.pth").read_bytes() == big
    real_copy_file_range = os.copy_file_range

    def gives_up_after_one_mib(src, dst, count, offset_src=None, offset_dst=None):
        if offset_src >= 2**20:
            return 0
        return real_copy_file_range(src, dst, min(count, 2**20), offset_src, offset_dst)

    (tmp_path / "best.pth").unlink()
    monkeypatch.setattr(os, "copy_file_range", gives_up_after_one_mib)  # stops early: Python does the rest
    ckpt.copy_checkpoint(str(tmp_path / "model-2.pth"), str(tmp_path / "best.pth"))
    assert (tmp_path / "best.pth").read_bytes() == big
    monkeypatch.setattr(os, "copy_file_range", unsupported)  # nor that: through Python
    ckpt.copy_checkpoint(str(tmp_path / "model-2.pth"), str(tmp_path / "best.pth"))
    assert (tmp_path / "best.pth").read_bytes() == big
    missing = f"cannot write {tmp_path / 'best.pth'}: .*model-9.pth is intact"
    with pytest.raises(ckpt.CheckpointWriteError, match=missing):
        ckpt.copy_checkpoint(str(tmp_path / "model-9.pth"), str(tmp_path / "best.pth"))
    assert (tmp_path / "best.pth").read_bytes() == big
    assert not list(tmp_path.glob(".*.tmp"))


def test_damaging_one_checkpoint_file_leaves_the_others_readable(trained_run, tmp_path):
    """model-0.pth, last.pth and best.pth as the trainer writes them: truncating one in place
    (as a crash or a `cp` over it would) damages no other."""
    from backbone import WeightFileError
    from train_utils.checkpoint import copy_checkpoint, read_checkpoint

    names = ("model-0.pth", "last.pth", "best.pth")
    for damaged in names:
        out = tmp_path / damaged
        out.mkdir()
        (out / "model-0.pth").write_bytes((trained_run / "model-0.pth").read_bytes())
        for copy in names[1:]:
            copy_checkpoint(str(out / "model-0.pth"), str(out / copy))
        with open(out / damaged, "r+b") as handle:
            handle.truncate(1000)
        for name in names:
            if name == damaged:
                with pytest.raises(WeightFileError, match=str(out / name)):
                    read_checkpoint(str(out / name))
            else:
                read_checkpoint(str(out / name))
                assert_same_weights(out / name, trained_run / "model-0.pth")


def _share(rank: int, port: int, result_dir: str) -> None:
    import torch.distributed as dist

    from train_utils import distributed as dist_utils

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    dist_utils.init_distributed_mode("cpu", timeout_minutes=1)
    try:
        # Rank 1 holds the newer state (another node's output folder), rank 0 an older one.
        choice = ("node1/last.pth", {"step": 12, "weights": torch.arange(3.0)}) if rank == 1 else \
            ("node0/model-0.pth", {"step": 5, "weights": torch.zeros(3)})
        path, state = dist_utils.share_newest(choice, lambda s: (s["step"],))
        outcome = {"path": path, "step": state["step"], "weights": state["weights"].tolist()}
        try:
            dist_utils.share_newest(None, lambda s: (0,), error="damaged.pth is truncated" if rank == 0 else None)
        except ValueError as exc:
            outcome["error"] = str(exc)
        nothing = dist_utils.share_newest(None, lambda s: (0,))
        outcome["nothing"] = list(nothing)
        Path(result_dir, f"{rank}.json").write_text(json.dumps(outcome))
    finally:
        dist.destroy_process_group()


def test_every_rank_resumes_from_the_newest_checkpoint_of_any_rank(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_share, args=(free_port(), str(tmp_path)), nprocs=2, start_method="fork")
    for rank in (0, 1):
        outcome = json.loads((tmp_path / f"{rank}.json").read_text())
        assert outcome["path"] == "node1/last.pth" and outcome["step"] == 12
        assert outcome["weights"] == [0.0, 1.0, 2.0]
        assert outcome["error"] == "rank 0: damaged.pth is truncated"
        assert outcome["nothing"] == [None, None]


@pytest.mark.slow
def test_loader_workers_end_with_the_run_even_on_an_error(demo_voc, tmp_path):
    """Workers ignore stop signals, so the Trainer stops them itself: after a failed run none is
    left for the interpreter's exit to wait on."""
    from train_utils.engine.hooks import Hook
    from train_utils.engine.trainer import Trainer

    class Boom(Hook):
        def after_step(self, trainer, state):
            raise RuntimeError("boom")

    argv = script_cmd("train_mobilenet.py", demo_voc, tmp_path, "--epochs", "1", "--workers", "2")[1:]
    trainer = Trainer(mobilenet_args(argv),
                      extra_hooks=[Boom()])
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    workers = trainer.train_loader._iterator._workers
    assert len(workers) == 2 and not any(worker.is_alive() for worker in workers)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the stop handlers are removed


def test_torch_still_has_the_loader_internals_the_trainer_uses():
    """stop_loader_workers calls ``DataLoader._iterator._shutdown_workers`` (torch has no public
    way to stop persistent workers): this fails loudly if torch renames either."""
    from torch.utils.data import DataLoader

    from train_utils.engine.trainer import stop_loader_workers

    loader = DataLoader(range(4), batch_size=2, num_workers=1, persistent_workers=True)
    assert [batch.tolist() for batch in loader] == [[0, 1], [2, 3]]
    workers = loader._iterator._workers
    assert len(workers) == 1 and workers[0].is_alive() and callable(loader._iterator._shutdown_workers)
    stop_loader_workers(loader, None)
    assert not workers[0].is_alive()


def test_a_resume_with_other_batches_per_epoch_moves_the_schedule_to_the_same_epoch(demo_voc, uninterrupted,
                                                                                    tmp_path, capsys):
    """model-0.pth was written after epoch 0 at 4 batches per epoch (step 4). Resumed with -b 2
    (9 batches per epoch, as another world size would change it) the schedule goes on at step 9,
    the start of epoch 1 in this run, not at step 4 (the middle of epoch 0)."""
    from train_utils.engine.trainer import Trainer

    argv = script_cmd("train_mobilenet.py", demo_voc, tmp_path, "--epochs", "2", "-b", "2",
                      "--aspect-ratio-group-factor", "-1", "--resume", str(uninterrupted / "model-0.pth"))[1:]
    trainer = Trainer(mobilenet_args(argv))
    try:
        trainer.setup()
        schedule = trainer.scheduler
        assert trainer.train_batches.full_length == 9 and schedule.last_epoch == 9 and trainer.start_epoch == 1
        assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * schedule.lr_lambdas[0](9))
        assert schedule.get_last_lr() == [group["lr"] for group in trainer.optimizer.param_groups]
    finally:
        trainer.signals.uninstall()
        trainer.shut_down_loaders()
    assert "schedule was at step 4; with 9 batches per epoch this run goes on at step 9" in capsys.readouterr().err


def test_a_non_finite_loss_names_the_terms_and_images_before_any_update():
    from train_utils.engine.loop import EpochState, NonFiniteLossError, train_one_epoch

    class Exploding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, images, targets):
            return {"loss_classifier": self.w * float("nan"), "loss_box_reg": self.w * 0.5}

    model = Exploding()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    batch = ([torch.zeros(3, 4, 4)], [{"image_id": torch.tensor(7), "boxes": torch.zeros(0, 4)}])
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at epoch 3, iteration 0 \(loss_classifier=nan, "
                                                 r"loss_box_reg=0.5\); images in the batch: img7\. Lower --lr"):
        train_one_epoch(model, optimizer, [batch], torch.device("cpu"), EpochState(3), scheduler,
                        describe_images=lambda ids: ", ".join(f"img{i}" for i in ids))
    assert model.w.item() == 1.0 and model.w.grad is None


def test_one_read_per_step_logs_the_per_term_values_and_trains_the_same_weights(tiny_detector):
    """The loop reads its loss terms with one transfer per step; the logged values and the final
    weights equal those of an independent float32 loop that reads each term with ``.item()``."""
    import copy

    from train_utils.engine.loop import EpochState, train_one_epoch

    generator = torch.Generator().manual_seed(3)
    batches = []
    for index in range(3):
        images = [torch.rand(3, 64, 80, generator=generator) for _ in range(2)]
        targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 8.0, 70.0, 60.0]]) + index,
                    "labels": torch.tensor([1, 2]), "image_id": torch.tensor(i)} for i in range(2)]
        batches.append((images, targets))
    torch.manual_seed(0)
    model = tiny_detector()
    reference = copy.deepcopy(model)

    def sgd(net):
        optimizer = torch.optim.SGD(net.parameters(), lr=0.02, momentum=0.9)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))

    logged = []
    optimizer, scheduler = sgd(model)
    torch.manual_seed(1)
    train_one_epoch(model, optimizer, batches, torch.device("cpu"), EpochState(0), scheduler, print_freq=100,
                    after_step=lambda state: logged.append(dict(state.last_losses)))

    expected = []
    optimizer, scheduler = sgd(reference)
    reference.train()
    torch.manual_seed(1)
    for images, targets in batches:
        loss_dict = reference(images, targets)
        values = {name: value.item() for name, value in loss_dict.items()}
        expected.append({**values, "loss": sum(values.values())})
        optimizer.zero_grad(set_to_none=True)
        sum(loss_dict.values()).backward()
        optimizer.step()
        scheduler.step()

    assert logged == expected and all(math.isfinite(step["loss"]) for step in logged)
    assert len({step["loss"] for step in logged}) == 3  # three different steps were compared
    for (name, mine), theirs in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(mine, theirs), name


def test_float16_skips_non_finite_steps_until_too_many_in_a_row(monkeypatch):
    """With an enabled GradScaler (float16) a non-finite loss is a skipped step (the scaler lowers
    its scale, the weights stay); the K-th in a row stops with the usual message. Without one
    (float32, bfloat16) the first stops."""
    from train_utils.engine import loop

    class Flaky(torch.nn.Module):
        def __init__(self, values):
            super().__init__()
            self.w, self.values = torch.nn.Parameter(torch.ones(1)), iter(values)

        def forward(self, images, targets):
            return {"loss_classifier": self.w * next(self.values)}

    def run(values, scaler):
        model = Flaky(values)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        batch = ([torch.zeros(3, 4, 4)], [{"image_id": torch.tensor(7), "boxes": torch.zeros(0, 4)}])
        state = loop.EpochState(0)
        with pytest.raises(loop.NonFiniteLossError, match=r"non-finite loss at epoch 0, iteration (\d+) .*Lower --lr") \
                as error:
            loop.train_one_epoch(model, optimizer, [batch] * len(values), torch.device("cpu"), state, scheduler, scaler)
        return model, state, error.value, scheduler

    assert loop.MAX_CONSECUTIVE_FP16_SKIPS == 20
    monkeypatch.setattr(loop, "MAX_CONSECUTIVE_FP16_SKIPS", 3)
    inf = float("inf")
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    model, state, error, scheduler = run([1.0, inf, inf, 1.0, inf, float("nan"), inf], scaler)
    assert "iteration 6 " in str(error)
    assert model.w.item() == pytest.approx(0.8)  # only the two finite steps moved it (lr 0.1, gradient 1)
    assert scaler.get_scale() == 1024.0 / 2 ** 4  # halved at each of the four skipped steps
    assert (state.iteration, state.skipped, state.streak) == (6, 4, 2) and scheduler.last_epoch == 6
    assert state.means()["loss"] == pytest.approx((1.0 + 0.9) / 2)  # the mean of the steps that trained (w 1, 0.9)
    assert loop.EpochState.from_dict(0, state.to_dict()) == loop.EpochState(0, 6, state.loss_sums, state.lr,
                                                                            skipped=4, streak=2)
    for no_skips in (None, torch.amp.GradScaler("cpu", enabled=False)):  # float32 / bfloat16
        model, state, error, _ = run([1.0, inf, 1.0], no_skips)
        assert "iteration 1 " in str(error) and model.w.item() == pytest.approx(0.9) and state.skipped == 0


@pytest.mark.parametrize("message, peer", [
    ("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:40360: Connection reset by "
     "peer. This is typically caused by a remote worker hanging", True),                      # a dead rank
    ("[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 15000ms for recv "
     "operation to complete", True),                                                            # a hung rank
    ("Application timeout caused pair closure", True),                                          # a hung rank, in DDP
    ("CUDA out of memory. Tried to allocate 2.00 GiB", False),
    ("mat1 and mat2 shapes cannot be multiplied (4x3 and 4x5)", False),
])
def test_which_errors_mean_a_lost_peer(message, peer):
    from train_utils.distributed import mentions_peer_failure

    assert mentions_peer_failure(message) is peer
