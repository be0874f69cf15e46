#!/usr/bin/env bash
# Issue 5's one GPU check: the `gpu` kernel tests, then bench/kernel_speed.py. Everything it writes goes
# to $OUT (default bench/results): env.txt, gpu_tests.log, gpu_tests.xml, bench.log, kernels.json.
# About 4-6 minutes on an H100 in full, most of it Triton compiling and autotuning.
#
#   OUT=/some/dir bash bench/gpu_check.sh
#
# It uses the first Python whose torch sees CUDA and which has triton, and needs no install:
# a temporary folder holds a `presso` link to this checkout (the package maps onto the repo root).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"

PY=""
for cand in python3 /opt/torch/.venv/bin/python3 python .venv/bin/python; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c \
        "import sys, torch, triton; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        PY=$cand
        break
    fi
done
if [ -z "$PY" ]; then
    echo "no Python with CUDA torch and triton found" | tee "$OUT/env.txt"
    exit 1
fi

SHIM=$(mktemp -d)
ln -s "$PWD" "$SHIM/presso"
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
export MLFLOW_DISABLE_TELEMETRY=true RAY_USAGE_STATS_ENABLED=0
unset TRITON_INTERPRET

{
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version --format=csv
    "$PY" -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, \
'triton', triton.__version__, torch.cuda.get_device_name())"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# The benchmark first: on a short lease its numbers matter most. BENCH_ARGS trims it (e.g.
# "--skip-ct-layout --skip-crossover --reps 100"); GPU_TESTS adds test files beyond the kernels'.
timeout "${BENCH_TIMEOUT:-330}" "$PY" bench/kernel_speed.py --out "$OUT/kernels.json" ${BENCH_ARGS:-} \
    2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}

# pyproject's addopts and timeout apply; -p no:cacheprovider keeps the checkout clean.
timeout "${TESTS_TIMEOUT:-240}" "$PY" -m pytest tests/kernels/test_gpu_kernels.py ${GPU_TESTS:-} \
    -m gpu -q -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml" 2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}

echo "gpu tests exit $tests_rc, benchmark exit $bench_rc" | tee -a "$OUT/bench.log"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
