#!/usr/bin/env bash
# On a machine with a CUDA GPU (the device tool's H100/H200, or your own): the CUDA correctness
# tests, then scripts/bench_cuda.py (tune + compare ResNet-50 layers at batch 1 and 32), writing
# ${OUT:-benchmarks}/cuda-<gpu>.md. Runs from the source tree (no install). Python packages missing
# there travel as wheels in .whl/ (fetch them here with scripts/fetch_gpu_wheels.sh and carry .whl).
#   bash scripts/gpu_check.sh            TRIALS=40 OUT=benchmarks by default
set -euo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/autoconv-site .whl/*.whl
    export PYTHONPATH="/tmp/autoconv-site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
export AUTOCONV_DB="${AUTOCONV_DB:-/tmp/autoconv-gpu/tuning.db}" AUTOCONV_SHIPPED_DB_DIR=""
probe="
import sys
from autoconv import AutoconvError
from autoconv.backends import get_backend
try:
    print('device:', get_backend('cuda').device.name)
except AutoconvError as exc:
    sys.exit(f'error: {exc}')
"
if ! python3 -c "$probe"; then
    echo "gpu_check.sh: no usable CUDA device here (see the error above); nothing to check" >&2
    exit 3
fi
# The simulated-CUDA tests run in CI; here only the real GPU (and the rest) is checked.
python3 -m pytest -q -p no:cacheprovider -k "not simulated" tests/test_cuda.py tests/test_backend_conformance.py tests/test_tuner.py
gpu=$(python3 -c "from autoconv.backends import get_backend; n = get_backend('cuda').device.name.lower(); print(next((g for g in ('h200', 'h100', 'a100', 'l40s') if g in n), n.split()[0]))")
mkdir -p "${OUT:-benchmarks}"
python3 scripts/bench_cuda.py --batches 1,32 --trials "${TRIALS:-40}" --out "${OUT:-benchmarks}/cuda-$gpu.md"
