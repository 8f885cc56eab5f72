"""tools/gpu_check.sh's own logic (log folder, arguments, time limits, summary, exit code), run
with a stand-in for Python that answers its calls as a CUDA machine would."""
import os
import subprocess
from pathlib import Path

from conftest import ROOT

# Each branch answers one kind of call gpu_check.sh makes; $TESTS_MODE picks the tests' outcome.
FAKE_PYTHON = r"""#!/usr/bin/env bash
case "$*" in
  *"-m pytest"*)
    echo "pytest args: $*"
    if [[ "$TESTS_MODE" == hang ]]; then exec sleep 20; fi
    echo "cuda train_r50 (batch 2, 375x500 images): ours 44.0 ms  torchvision 45.0 ms  ratio 0.98"
    echo "FAILED tests/test_cuda.py::test_resume - AssertionError: gap 1.06"
    echo "1 failed, 8 passed in 3.21s"
    exit 1 ;;
  *tools/benchmark.py*)
    echo "benchmark args: $*"
    echo "device Fake GPU; torch 9.9"
    echo "| case | ours ms |"
    echo "| train_r50_b8_bf16 | 60.0 |"
    exit 0 ;;
  *pycocotools*) echo "python 3.12, torch 9.9 (env)" ;;
  *get_device_name*) echo "Fake GPU" ;;
  *is_available*) exit 0 ;;
  *torchvision.__version__*) echo "torch 9.9, torchvision 8.8, CUDA 13.0" ;;
  *) echo "unexpected call: $*" >&2; exit 3 ;;
esac
"""


def run_check(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    return subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": str(fake), **env}, timeout=60)


def test_failed_test_gives_its_exit_code_logs_and_a_summary(tmp_path):
    out = tmp_path / "logs"
    done = run_check(tmp_path, "--out", str(out), "-k", "amp", GPU_CHECK_BENCH_ARGS="--quick")
    assert done.returncode == 1, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["benchmark.log", "env.txt", "pytest.log", "summary.txt"]
    pytest_args = (out / "pytest.log").read_text().splitlines()[0]
    assert pytest_args.endswith(f"--junitxml {out}/pytest.xml tests/test_cuda.py "
                                "tests/test_cuda_levers.py::test_r50_fpn_bf16_training_with_the_levers_on_cuda -k amp")
    bench_args = (out / "benchmark.log").read_text().splitlines()[0]
    assert bench_args == f"benchmark args: tools/benchmark.py --device cuda --json {out}/benchmark.json --quick"
    assert "python 3.12, torch 9.9 (env)" in (out / "env.txt").read_text()

    summary = (out / "summary.txt").read_text().splitlines()
    assert summary[1].startswith("================ gpu_check summary: Fake GPU; torch 9.9, torchvision 8.8, CUDA 13.0;")
    assert summary[2].startswith("tests/test_cuda.py: 1 failed, 8 passed in 3.21s -- FAILED, exit 1 after ")
    assert summary[3:5] == ["FAILED tests/test_cuda.py::test_resume - AssertionError: gap 1.06",
                            "  cuda train_r50 (batch 2, 375x500 images): ours 44.0 ms  torchvision 45.0 ms  ratio 0.98"]
    assert summary[5].startswith("tools/benchmark.py --device cuda: ok, ")
    assert summary[6:] == ["device Fake GPU; torch 9.9", "| case | ours ms |", "| train_r50_b8_bf16 | 60.0 |",
                           f"logs: {out}"]
    assert done.stdout.endswith("\n".join(summary) + "\n")  # printed too


def test_tests_past_their_limit_are_stopped_and_the_benchmark_still_runs(tmp_path):
    out = tmp_path / "from_env"
    done = run_check(tmp_path, GPU_CHECK_OUT=str(out), GPU_CHECK_TEST_LIMIT="1", TESTS_MODE="hang")
    assert done.returncode == 124
    summary = (out / "summary.txt").read_text()
    assert "tests/test_cuda.py: no pytest tally (see pytest.log) -- TIMED OUT after " in summary
    assert "tools/benchmark.py --device cuda: ok, " in summary and "| train_r50_b8_bf16 | 60.0 |" in summary
