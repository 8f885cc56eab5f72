#!/usr/bin/env bash
# Check this build on an NVIDIA GPU in one go (under 6 minutes on one GPU): tests/test_cuda.py (AMP +
# GradScaler resume, CUDA random states in checkpoints, torchrun/NCCL, pinned-memory loading, GPU vs
# CPU evaluation, ResNet50-FPN ours vs torchvision) and the bf16 levers test of
# tests/test_cuda_levers.py, then `tools/benchmark.py --device cuda` (the
# model cases in float32/bf16/fp16), then a one-screen summary.
#
#     tools/gpu_check.sh                          # from any folder
#     tools/gpu_check.sh --out DIR -k amp         # logs into DIR; further arguments go to pytest
#     GPU_CHECK_OUT=DIR tools/gpu_check.sh        # the same, the folder from the environment
#
# Logs (all kept in the output folder, default /tmp/gpu_check-<time>): env.txt (GPU, versions),
# pytest.log + pytest.xml, benchmark.log + benchmark.json, summary.txt.
# Python: $PYTHON, else .venv/bin/python when it runs, else python3. Packages that the Python lacks
# (pycocotools, say) can come through PYTHONPATH: it is passed on to every test and subprocess.
# Time limits (seconds): GPU_CHECK_TEST_LIMIT (default 240), GPU_CHECK_BENCH_LIMIT (default 150);
# GPU_CHECK_BENCH_ARGS adds benchmark options (e.g. "--quick").
# Exit code: 0 when every test passed and every benchmark case ran; 1 without a CUDA GPU; else the
# tests' exit code (124 when they ran past their limit), or the benchmark's when only it failed.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

OUT="${GPU_CHECK_OUT:-/tmp/gpu_check-$(date -u +%Y%m%d-%H%M%S)}"
if [[ "${1:-}" == "--out" ]]; then
    [[ $# -ge 2 ]] || { echo "gpu_check: --out needs a folder" >&2; exit 2; }
    OUT="$2"
    shift 2
fi
mkdir -p "$OUT" || { echo "gpu_check: cannot create the log folder $OUT" >&2; exit 2; }
OUT="$(cd "$OUT" && pwd)"

if [[ -n "${PYTHON:-}" ]]; then
    PY="$PYTHON"
elif .venv/bin/python -c '' >/dev/null 2>&1; then
    PY=.venv/bin/python
else
    PY=python3
fi

{
    echo "== $(date -u '+%Y-%m-%d %H:%M:%S UTC'), $(git rev-parse --short HEAD 2>/dev/null || echo 'no git') $(git rev-parse --abbrev-ref HEAD 2>/dev/null)"
    echo "== GPUs (nvidia-smi -L)"
    if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi -L || echo "nvidia-smi -L failed"; else echo "nvidia-smi: not found"; fi
    echo "== $PY, PYTHONPATH=${PYTHONPATH:-}"
    "$PY" -c 'import sys, torch, torchvision
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"CUDA build {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
      f"GPUs visible {torch.cuda.device_count() if torch.cuda.is_available() else 0}")
try:
    import pycocotools
    print(f"pycocotools from {pycocotools.__file__}")
except ImportError:
    print("pycocotools: NOT importable (the evaluation tests will fail; put it on PYTHONPATH)")'
} 2>&1 | tee "$OUT/env.txt"

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA GPU: torch.cuda.is_available() is False here (no NVIDIA driver/GPU, or a CPU-only torch build); nothing checked" >&2
    exit 1
fi
GPU=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))')
VERSIONS=$("$PY" -c 'import torch, torchvision; print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, CUDA {torch.version.cuda}")')

# Reproducible cuBLAS reductions for the resume comparisons (kept when already set).
export CUBLAS_WORKSPACE_CONFIG="${CUBLAS_WORKSPACE_CONFIG:-:4096:8}"
export PYTHONUNBUFFERED=1

# The GPU speed levers against torchvision under bf16 (the rest of that file runs on the CPU).
LEVERS_TEST=tests/test_cuda_levers.py::test_r50_fpn_bf16_training_with_the_levers_on_cuda
echo "== pytest tests/test_cuda.py on $GPU (limit ${GPU_CHECK_TEST_LIMIT:-240}s)"
start=$SECONDS
# SIGINT at the limit: pytest stops like on Ctrl-C and its subprocess.run calls kill the training runs.
timeout -s INT -k 30 "${GPU_CHECK_TEST_LIMIT:-240}" "$PY" -m pytest -q -p no:cacheprovider -rfE -s \
    --junitxml "$OUT/pytest.xml" tests/test_cuda.py "$LEVERS_TEST" "$@" 2>&1 | tee "$OUT/pytest.log"
test_rc=${PIPESTATUS[0]}
test_s=$((SECONDS - start))

echo "== tools/benchmark.py --device cuda ${GPU_CHECK_BENCH_ARGS:-} (limit ${GPU_CHECK_BENCH_LIMIT:-150}s)"
start=$SECONDS
# shellcheck disable=SC2086 # GPU_CHECK_BENCH_ARGS holds several options
timeout -s INT -k 15 "${GPU_CHECK_BENCH_LIMIT:-150}" "$PY" tools/benchmark.py --device cuda \
    --json "$OUT/benchmark.json" ${GPU_CHECK_BENCH_ARGS:-} 2>&1 | tee "$OUT/benchmark.log"
bench_rc=${PIPESTATUS[0]}
bench_s=$((SECONDS - start))

describe() {  # describe EXIT_CODE SECONDS: "ok", "TIMED OUT" or "FAILED", with the time
    case $1 in
        0) echo "ok, ${2}s" ;;
        124|137) echo "TIMED OUT after ${2}s (exit $1)" ;;
        *) echo "FAILED, exit $1 after ${2}s" ;;
    esac
}

{
    echo
    echo "================ gpu_check summary: $GPU; $VERSIONS; $(date -u '+%Y-%m-%d %H:%M UTC')"
    tally=$(grep -E '[0-9]+ (passed|failed|error|errors|skipped)|no tests ran' "$OUT/pytest.log" | tail -1)
    echo "tests/test_cuda.py: ${tally:-no pytest tally (see pytest.log)} -- $(describe "$test_rc" "$test_s")"
    grep -E '^(FAILED|ERROR) ' "$OUT/pytest.log" | cut -c1-160
    grep -E '^cuda |AP@0\.5|weight gap|from scratch on cuda' "$OUT/pytest.log" | cut -c1-200 | sed 's/^/  /'
    echo "tools/benchmark.py --device cuda: $(describe "$bench_rc" "$bench_s")"
    grep -E '^(device |\| )' "$OUT/benchmark.log" | cut -c1-200
    grep -E '^(Traceback|[A-Za-z]*Error)' "$OUT/benchmark.log" | tail -3
    echo "logs: $OUT"
} 2>&1 | tee "$OUT/summary.txt"

if [[ $test_rc -ne 0 ]]; then exit "$test_rc"; fi
exit "$bench_rc"
