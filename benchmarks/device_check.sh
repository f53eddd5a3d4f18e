#!/usr/bin/env bash
# One command for a GPU machine (offline): install, GPU tests, quick benchmarks, one results folder.
#
#   bash benchmarks/device_check.sh [RESULTS_DIR]
#   XFORMERS_WHEEL=/path/to/xformers.whl bash benchmarks/device_check.sh
#
# Default RESULTS_DIR: benchmarks/results/<gpu>-<date>-<sha>/. Every step has its own `timeout`; the whole
# script stays within 8 minutes (install 60 s, tests 120 s, kernels 90 s, latency 120 s, profile 45 s,
# cuda_graph 45 s when benchmarks/cuda_graph.py exists). A failing step is recorded and the next one runs.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
START=$(date +%s)

gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1 | tr ' /' '__')
gpu=${gpu:-nogpu}
sha=$($PY -c "from rmt_fast.bench.common import git_sha; print(git_sha()[:10])" 2>/dev/null || echo unknown)
OUT=${1:-benchmarks/results/${gpu}-$(date +%Y%m%d-%H%M)-${sha}}
mkdir -p "$OUT"
echo "results -> $OUT"

declare -a NAMES STATUS SECS
step() {  # step NAME TIMEOUT_S CMD...
    local name=$1 limit=$2
    shift 2
    local t0=$(date +%s)
    echo "=== $name (timeout ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    local st="ok"
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then st="timeout"; elif [ $rc -ne 0 ]; then st="rc=$rc"; fi
    NAMES+=("$name"); STATUS+=("$st"); SECS+=("$(( $(date +%s) - t0 ))")
    tail -n 5 "$OUT/$name.log"
}

# --- environment
{
    echo "date: $(date -Is)"; echo "git sha: $sha"; echo "host: $(hostname)"
    nvidia-smi 2>&1
    $PY -c "import json; from rmt_fast.bench.common import env_info; print(json.dumps(env_info(), indent=2))" 2>&1
    $PY -m pip list 2>/dev/null | grep -iE "^(torch|triton|transformers|xformers|numpy|pytest) "
} >"$OUT/env.txt"

# --- install (offline, no dependency resolution)
step install 60 $PY -m pip install --no-deps --no-build-isolation --no-index -e .
if [ -n "${XFORMERS_WHEEL:-}" ]; then
    step xformers 60 $PY -m pip install --no-deps --no-index "$XFORMERS_WHEEL"
fi

# --- GPU tests and quick benchmarks
step tests 120 $PY -m pytest -m gpu -q -p no:cacheprovider
step kernels 90 $PY -m rmt_fast.bench.cli kernels --quick --out "$OUT/kernels"
step latency 120 $PY -m rmt_fast.bench.cli latency --quick --out "$OUT/latency"
step profile 45 $PY -m rmt_fast.bench.cli profile --quick --out "$OUT/profile"
if [ -f benchmarks/cuda_graph.py ]; then
    step cuda_graph 45 $PY -m rmt_fast.bench.cuda_graph --quick --out "$OUT/cuda_graph"
fi

# --- summary (last)
{
    echo
    printf "%-12s %-10s %6s\n" step status seconds
    printf -- "------------------------------\n"
    for i in "${!NAMES[@]}"; do printf "%-12s %-10s %6s\n" "${NAMES[$i]}" "${STATUS[$i]}" "${SECS[$i]}"; done
    grep -hE "passed|failed|error" "$OUT/tests.log" 2>/dev/null | tail -n 1
    for b in kernels latency profile; do
        [ -f "$OUT/$b.log" ] && grep -A 30 "^benchmark " "$OUT/$b.log" | sed -n '3,14p'
    done
    echo "total: $(( $(date +%s) - START )) s; results in $OUT"
} | tee "$OUT/summary.txt"
