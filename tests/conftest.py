"""Shared test fixtures: the repository root on ``sys.path`` and a tiny, fast detector."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable

from filelock import FileLock  # a dependency of torch

# Before torch loads OpenMP, and inherited by every subprocess a test starts: idle OpenMP threads
# sleep instead of spinning. With several processes on two cores, spinning threads multiply a tiny
# training run's CPU time about five times (as the Makefile's export, for a bare `pytest`).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Fixtures that run real training, here or in a test module (tb_run: test_tensorboard.py,
# uninterrupted_ddp: test_long_runs.py): every test using one, directly or through another
# fixture, is marked slow, so `make check` (-m "not slow") never starts them.
TRAINING_FIXTURES = frozenset({"trained_run", "uninterrupted", "tb_run", "uninterrupted_ddp"})


def pytest_collection_modifyitems(items: list) -> None:
    for item in items:
        if TRAINING_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def reference_arithmetic():
    """Run a test with the inference fast path off (no BatchNorm folding): the model performs
    exactly torchvision's operations, for strict parity checks. tests/test_fast_path.py compares
    the fast path with this reference."""
    from network_files.ops import fast_path

    with fast_path.reference_mode():
        yield


class TinyBackbone(nn.Module):
    """One 8x8 conv with stride 8 and a ReLU: ``[B, 3, H, W] -> [B, 8, H/8, W/8]``."""

    out_channels = 8

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, self.out_channels, kernel_size=8, stride=8)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x).relu()


@pytest.fixture
def tiny_detector() -> Callable[..., nn.Module]:
    """Factory for a Faster R-CNN small enough to train a step in well under a second.

    Keyword arguments override the ``FasterRCNN`` defaults chosen here (64..96 pixel images,
    anchors 16/32/64 on the single stride-8 map, 3 classes including background).
    """
    from network_files import AnchorsGenerator, FasterRCNN, MultiScaleRoIAlign

    def build(**overrides) -> nn.Module:
        options = dict(
            num_classes=3,
            min_size=64,
            max_size=96,
            rpn_anchor_generator=AnchorsGenerator(((16, 32, 64),), ((0.5, 1.0, 2.0),)),
            box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2),
            rpn_batch_size_per_image=32,
            box_batch_size_per_image=32,
        )
        options.update(overrides)
        return FasterRCNN(TinyBackbone(), **options)

    return build


def write_fake_vgg16_file(path: Path, seed: int) -> dict:
    """Random tensors in torchvision's vgg16 layout saved at ``path`` (an official file name).

    The two huge classifier matrices are broadcast views, so the file stays small."""
    import torch
    import torchvision
    from collections import OrderedDict

    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        layout = torchvision.models.vgg16().state_dict()
    state = OrderedDict()
    for key, meta in layout.items():
        if meta.numel() > 10_000_000:
            state[key] = torch.randn(1, generator=generator).expand(meta.shape)
        else:
            state[key] = torch.randn(meta.shape, generator=generator) * 0.05
    torch.save(state, path)
    return state


# MobileNetV2's own options; other backbones refuse them.
MOBILENET_OPTIONS = ["--feature-stride", "16", "--width-mult", "0.5"]
TINY_COMMON_FLAGS = [
    "--backbone-weights", "none",
    "--representation-size", "64", "--min-size", "128", "--max-size", "128", "-b", "4",
    "--workers", "0", "--anchor-sizes", "32,64,128", "--box-batch-size-per-image", "32",
    "--rpn-pre-nms-top-n-train", "300", "--rpn-post-nms-top-n-train", "100",
    "--rpn-pre-nms-top-n-test", "200", "--rpn-post-nms-top-n-test", "50", "--print-freq", "2",
]
TINY_TRAIN_FLAGS = TINY_COMMON_FLAGS + MOBILENET_OPTIONS


def shared_folder(tmp_path_factory, name: str, make: Callable[[Path], None]) -> Path:
    """A session fixture's folder, made once per test run: under pytest-xdist (``make test`` runs
    two workers) the first worker to ask makes it under a lock in the run's common temp folder,
    and the others reuse it, so a training fixture never runs twice."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        out = tmp_path_factory.mktemp(name)
        make(out)
        return out
    out = tmp_path_factory.getbasetemp().parent / name
    complete = out.with_name(f"{name}.complete")  # beside the folder: tests list the folders' files
    with FileLock(f"{out}.lock"):
        if not complete.is_file():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            make(out)
            complete.touch()
    return out


@pytest.fixture(scope="session")
def demo_voc(tmp_path_factory) -> Path:
    """A small generated VOC2012 folder of coloured shapes (24 images, 128 px; 19 train / 5 val)
    with its classes json at ``<root>/classes.json``."""
    from tools.make_demo_voc import make_demo_voc

    return shared_folder(tmp_path_factory, "demo_voc", lambda root: make_demo_voc(root, num_images=24, seed=0, size=128))


# 19 training images, batch 4 -> 4 iterations per epoch. The warmup (7 iterations) and the LR
# step (epoch 1) both straddle the epoch boundary where the resumed run restarts.
SCHEDULE = ["--lr", "0.01", "--warmup-iters", "7", "--lr-scheduler", "multistep", "--lr-steps", "1",
            "--lr-gamma", "0.5"]


def train(script: str, demo_voc: Path, out: Path, *extra: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / script), "--data-path", str(demo_voc),
           "--classes-json", str(demo_voc / "classes.json"), "--output-dir", str(out),
           *(TINY_COMMON_FLAGS if script == "train_resnet50_fpn.py" else TINY_TRAIN_FLAGS), *SCHEDULE, *extra]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{script} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a process group's rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def metrics(out: Path) -> list:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def trained_run(demo_voc, tmp_path_factory) -> Path:
    """Output folder of a real one-epoch ``train_mobilenet.py`` run on ``demo_voc`` (tiny model,
    the flags and schedule of ``train``): the one trained model of the session, for every test that
    needs one. Its weights are the first epoch of ``uninterrupted``; test_training resumes a copy.

    Holds model-0.pth, last.pth, best.pth, results*.txt, metrics.jsonl and the curves.
    """
    return shared_folder(tmp_path_factory, "trained_run",
                         lambda out: train("train_mobilenet.py", demo_voc, out, "--epochs", "1"))


@pytest.fixture(scope="session")
def confident_checkpoint(trained_run, tmp_path_factory) -> Path:
    """The trained checkpoint with a box classifier that calls every proposal "circle" (label 1,
    score ~0.99) and at most 3 detections per image, so every image gets boxes to check."""
    import torch
    from backbone import read_weight_file

    checkpoint = read_weight_file(str(trained_run / "best.pth"))
    checkpoint["model"]["roi_heads.box_predictor.cls_score.weight"].zero_()
    checkpoint["model"]["roi_heads.box_predictor.cls_score.bias"].copy_(torch.tensor([0.0, 6.0, 0.0, 0.0]))
    checkpoint["model_config"]["box_detections_per_img"] = 3
    path = tmp_path_factory.mktemp("confident") / "confident.pth"
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="session")
def uninterrupted(demo_voc, tmp_path_factory) -> Path:
    """train_mobilenet.py for 2 epochs in one go: the reference for resumed runs."""
    return shared_folder(tmp_path_factory, "uninterrupted",
                         lambda out: train("train_mobilenet.py", demo_voc, out, "--epochs", "2"))
