#!/usr/bin/env bash
# One command for a GPU machine (offline): install, tune the dispatch table, GPU tests, quick benchmarks, one
# results folder packed into one archive.
#
#   bash benchmarks/device_check.sh [RESULTS_DIR]
#
# Default RESULTS_DIR: benchmarks/results/<gpu>-<date>-<sha>/. Run through the device tool, where $OUT is the
# folder that comes back (8 files at most), the results folder is also packed into $OUT/device_check.tar.gz and
# summary.txt is copied beside it. Every step has its own `timeout`; a failing step is recorded and the next one
# runs. Step limits (s), in priority order: install 30, tune 100 (compilation included: it runs first and warms
# Triton's cache for what follows), GPU tests 100 (cold Triton compiles), kernels 45, train 70, 1M tokens 50,
# latency 60 (45 s budget), armt 90 (70 s budget), torch.compile GPU tests 75 (inductor), host overhead 20, input checks 20, profile 30. A step that could end past
# TOTAL_S (default 480 s: the 8-minute budget, leaving a lent GPU's 15 minutes room for a rerun) from the start is
# skipped and recorded.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
START=$(date +%s)
RETURN_DIR=${OUT:-}

gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1 | tr ' /' '__')
gpu=${gpu:-nogpu}
sha=$(git rev-parse --short=10 HEAD 2>/dev/null || $PY -c "from rmt_fast.bench.common import git_sha; print(git_sha()[:10])" 2>/dev/null || echo unknown)
RES=${1:-benchmarks/results/${gpu}-$(date +%Y%m%d-%H%M)-${sha}}
mkdir -p "$RES"
echo "results -> $RES"

declare -a NAMES STATUS SECS
step() {  # step NAME TIMEOUT_S CMD...
    local name=$1 limit=$2
    shift 2
    local t0=$(date +%s)
    local at=$(( t0 - START ))
    if [ $(( at + limit )) -gt "${TOTAL_S:-480}" ]; then
        NAMES+=("$name"); STATUS+=("skipped"); SECS+=(0)
        echo "=== $name at ${at}s skipped: its limit ${limit}s would end past the total ${TOTAL_S:-480}s"
        return
    fi
    echo "=== $name at ${at}s (timeout ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" >"$RES/$name.log" 2>&1
    local rc=$?
    local st="ok"
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then st="timeout"; elif [ $rc -ne 0 ]; then st="rc=$rc"; fi
    NAMES+=("$name"); STATUS+=("$st"); SECS+=("$(( $(date +%s) - t0 ))")
    tail -n 5 "$RES/$name.log"
}

# --- environment
{
    echo "date: $(date -Is)"; echo "git sha: $sha"; echo "host: $(hostname)"
    nvidia-smi 2>&1
    $PY -c "import json; from rmt_fast.bench.common import env_info; print(json.dumps(env_info(), indent=2))" 2>&1
    $PY -m pip list 2>/dev/null | grep -iE "^(torch|triton|transformers|numpy|pytest) "
} >"$RES/env.txt"

# --- install (offline, no dependency resolution)
if [ -z "${DEVICE_CHECK_SKIP_INSTALL:-}" ]; then  # the CPU dry run (tests/test_device_check.py) skips it
    step install 30 $PY -m pip install --no-deps --no-build-isolation --no-index -e .
fi

# --- tune first: writes the measured dispatch table; the later steps run with it
step tune 100 $PY -m rmt_fast.bench.cli tune --quick --budget-s 80 --out "$RES/tune"
TABLE=$(ls "$RES"/tune/sm*.json 2>/dev/null | grep -v example | head -n1)
if [ -n "$TABLE" ]; then export RMT_FAST_DISPATCH_TABLE="$TABLE"; echo "dispatch table: $TABLE"; fi

# --- GPU tests and quick benchmarks
step tests 100 $PY -m pytest -m gpu -q -p no:cacheprovider --ignore=tests/test_compile.py --ignore=tests/test_compiled_step.py
step kernels 45 $PY -m rmt_fast.bench.cli kernels --quick --out "$RES/kernels"
step train 70 $PY -m rmt_fast.bench.cli train --quick --budget-s 40 --out "$RES/train"
step million 50 $PY -m rmt_fast.bench.cli cuda-graph --quick --million --out "$RES/million"
# latency (issue 17): bert-base fp16, batch 1 and 16, 4k-64k tokens; the CPU dry run takes the tiny BERT
LAT_SIZE="--min-tokens 4096 --max-tokens 65536"
[ "$gpu" = nogpu ] && LAT_SIZE="--tiny"
step latency 60 $PY -m rmt_fast.bench.cli latency --quick --budget-s 45 --batches 1,16 $LAT_SIZE \
    --methods "FastRMT (auto),FastRMT (SDPA),FastRMT (CUDA graph),ReferenceRMT,Full attention (SDPA)" \
    --out "$RES/latency"
# armt (issue 16): FastARMT sequential / diagonal / full attention, the 1B shape, m = 128, 2k, 32k and 128k tokens
# (the targets' lengths); the CPU dry run takes the tiny test model
ARMT_SIZE=""
[ "$gpu" = nogpu ] && ARMT_SIZE="--tiny"
step armt 90 $PY -m rmt_fast.bench.cli armt --quick --budget-s 70 $ARMT_SIZE --out "$RES/armt"
step compile_tests 75 $PY -m pytest -m gpu -q -p no:cacheprovider tests/test_compile.py tests/test_compiled_step.py
step host_overhead 20 $PY -m rmt_fast.bench.cli host-overhead --quick --out "$RES/host_overhead"
step input_checks 20 $PY -m rmt_fast.bench.cli input-checks --quick --out "$RES/input_checks"
step profile 30 $PY -m rmt_fast.bench.cli profile --quick --out "$RES/profile"

# --- summary (last)
{
    echo
    printf "%-12s %-10s %6s\n" step status seconds
    printf -- "------------------------------\n"
    for i in "${!NAMES[@]}"; do printf "%-12s %-10s %6s\n" "${NAMES[$i]}" "${STATUS[$i]}" "${SECS[$i]}"; done
    for t in tests compile_tests; do grep -hE "passed|failed|error" "$RES/$t.log" 2>/dev/null | tail -n 1; done
    for b in tune kernels train million latency host_overhead; do
        [ -f "$RES/$b.log" ] && { echo "--- $b"; tail -n 8 "$RES/$b.log"; }
    done
    echo "total: $(( $(date +%s) - START )) s; results in $RES"
} | tee "$RES/summary.txt"

# --- pack for the device tool (only 8 files come back, at most 2 folders deep)
if [ -n "$RETURN_DIR" ] && [ -d "$RETURN_DIR" ]; then
    tar czf "$RETURN_DIR/device_check.tar.gz" -C "$(dirname "$RES")" "$(basename "$RES")"
    cp "$RES/summary.txt" "$RETURN_DIR/summary.txt"
    [ -n "$TABLE" ] && cp "$TABLE" "$RETURN_DIR/"
    echo "packed: $RETURN_DIR/device_check.tar.gz"
fi
