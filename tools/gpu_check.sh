#!/usr/bin/env bash
# Check this build on an NVIDIA GPU: runs tests/test_cuda.py (AMP + GradScaler resume, CUDA random
# states in checkpoints, torchrun/NCCL, pinned-memory loading, GPU vs CPU evaluation, ResNet50-FPN
# ours vs torchvision with the throughput lines printed).
#
#     tools/gpu_check.sh              # from any folder
#     tools/gpu_check.sh -k amp       # extra arguments go to pytest
#
# Exit code: pytest's (0 = every check passed), 1 without a CUDA GPU, 124 when it ran past 10 minutes.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ -x .venv/bin/python ]]; then
    PY=.venv/bin/python
else
    PY=python3
fi

echo "== GPUs (nvidia-smi -L)"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L || echo "nvidia-smi -L failed (exit $?)"
else
    echo "nvidia-smi: not found"
fi

echo "== $PY"
"$PY" -c 'import torch, torchvision
print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, CUDA build {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}, GPUs visible {torch.cuda.device_count() if torch.cuda.is_available() else 0}")'

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA GPU: torch.cuda.is_available() is False here (no NVIDIA driver/GPU, or a CPU-only torch build); nothing checked" >&2
    exit 1
fi
GPU=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))')

# Reproducible cuBLAS reductions for the resume comparisons (kept when already set).
export CUBLAS_WORKSPACE_CONFIG="${CUBLAS_WORKSPACE_CONFIG:-:4096:8}"

echo "== pytest tests/test_cuda.py on $GPU"
start=$SECONDS
# SIGINT at the limit: pytest stops like on Ctrl-C and its subprocess.run calls kill the training runs.
if timeout -s INT -k 30 600 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py -s "$@"; then
    rc=0
else
    rc=$?
fi
elapsed=$((SECONDS - start))

case $rc in
    0) echo "gpu_check: PASSED: tests/test_cuda.py on $GPU in ${elapsed}s" ;;
    124|137) echo "gpu_check: TIMED OUT: tests/test_cuda.py on $GPU passed the 600s limit (exit $rc)" ;;
    *) echo "gpu_check: FAILED: tests/test_cuda.py on $GPU, pytest exit $rc after ${elapsed}s (see above)" ;;
esac
exit "$rc"
