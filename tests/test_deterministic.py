"""``--deterministic``: the backend switches it sets, the model it refuses, and two runs with it
ending with equal weights (CPU; tests/test_cuda.py runs it on a GPU)."""
import os
from pathlib import Path

import pytest
import torch

from conftest import SCHEDULE, TINY_TRAIN_FLAGS


@pytest.fixture
def restore_backends(monkeypatch):
    """Put the process-wide switches back after the test (other tests share the process)."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark)
    yield
    torch.use_deterministic_algorithms(saved[0])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[1:]


def mobilenet_args(demo_voc: Path, out: Path, *extra: str):
    from train_mobilenet import DEFAULTS
    from train_utils.engine.args import parse_training_args

    return parse_training_args("test", DEFAULTS, argv=[
        "--data-path", str(demo_voc), "--classes-json", str(demo_voc / "classes.json"), "--output-dir", str(out),
        *TINY_TRAIN_FLAGS, *SCHEDULE, *extra])


def test_make_deterministic_sets_the_backend_switches(restore_backends, monkeypatch):
    from train_utils.engine.determinism import make_deterministic

    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, True
    make_deterministic()
    assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.deterministic is True and torch.backends.cudnn.benchmark is False
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # a value the user set is kept
    make_deterministic()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_roi_pool_is_refused_on_cuda_only():
    from train_utils.engine.determinism import check_model
    from train_utils.model.config import ModelConfig

    pooled = ModelConfig(backbone="vgg16", num_classes=3, roi_op="pool")
    with pytest.raises(ValueError, match=r"--deterministic: RoIPool \(--roi-op pool\) has no deterministic CUDA"):
        check_model(pooled, torch.device("cuda"))
    check_model(pooled, torch.device("cpu"))
    check_model(ModelConfig(backbone="vgg16", num_classes=3), torch.device("cuda"))


@pytest.mark.slow
def test_two_deterministic_runs_end_with_equal_weights(demo_voc, tmp_path, restore_backends):
    from train_utils.engine.trainer import Trainer

    weights = []
    for run in ("a", "b"):
        trainer = Trainer(mobilenet_args(demo_voc, tmp_path / run, "--epochs", "1", "--deterministic",
                                         "--workers", "1"))
        trainer.train()
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        weights.append(trainer.model_without_ddp.state_dict())
        torch.use_deterministic_algorithms(False)  # the second run switches it on again
    assert list(weights[0]) == list(weights[1])
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
    assert load_args(tmp_path / "a" / "model-0.pth")["deterministic"] is True


def load_args(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["args"]


def test_cudnn_benchmark_only_on_cuda_with_few_training_sizes_and_never_deterministic():
    from train_utils.device import MAX_BENCHMARK_SIZES, cudnn_benchmark_wanted

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert cudnn_benchmark_wanted(cuda, [800], deterministic=False)
    assert cudnn_benchmark_wanted(cuda, [480, 512, 544], deterministic=False) and MAX_BENCHMARK_SIZES == 3
    assert not cudnn_benchmark_wanted(cuda, [480, 512, 544, 576], deterministic=False)  # multi-scale: many shapes
    assert not cudnn_benchmark_wanted(cuda, [800], deterministic=True)  # benchmark picks kernels by timing
    assert not cudnn_benchmark_wanted(cpu, [800], deterministic=False)
