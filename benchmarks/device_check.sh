#!/usr/bin/env bash
# One command for a GPU machine (offline): install, GPU tests, tune the dispatch table, quick benchmarks; one
# results folder, packed into ONE archive.
#
#   bash benchmarks/device_check.sh [RESULTS_DIR]
#
# Default RESULTS_DIR: benchmarks/results/<gpu>-<date>-<sha>/. Run through the device tool, where $OUT is the
# folder that comes back (8 files at most, 2 folders deep): the results folder is packed into
# $OUT/device_check.tar.gz, again after every step, so a run stopped from outside still returns what it did.
# The summary is printed last (the tool's output tail shows it).
#
# Steps run in order of value, each under its own `timeout`; a failing step is recorded and the next one runs.
# A step whose limit, from the second it would start, ends past TOTAL_S (default 540 s: 9 minutes) is skipped
# and recorded. The limits come from the 2026-12-04 H200 run (benchmarks/results/h200-2026-12-04/): tune 86 s
# (73 s of cases at --budget-s 80), GPU tests stopped at 110 s cold after 32 of 44 (56 s warm), the 1M-token
# run over 50 s cold (43 s warm), armt 62 s, latency 55 s, train 66 s (setup ~25 s beyond --budget-s). The
# benchmarks' --budget-s are set so that every step fits its limit (the new steps' limits are estimates: none of
# them has run on a GPU yet).
#
# Adding a step: one line `step NAME LIMIT_S COMMAND...` where its value puts it; keep the sum of the limits
# within TOTAL_S (tests/bench/test_device_check.py checks it) and write outputs under "$RES/NAME". Left out to make
# room (one line each to add back, from the reserve): `kernels --quick` (45 s), `host-overhead --quick` (20 s),
# `input-checks --quick` (20 s), `profile --quick` (30 s).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
START=$(date +%s)
TOTAL=${TOTAL_S:-540}
# The CPU dry run on a busy machine: every limit (and the total) times DEVICE_CHECK_LIMIT_SCALE (default 1).
SCALE=${DEVICE_CHECK_LIMIT_SCALE:-1}
TOTAL=$(( TOTAL * SCALE ))
RETURN_DIR=${OUT:-}

gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1 | tr ' /' '__')
gpu=${gpu:-nogpu}
sha=$(git rev-parse --short=10 HEAD 2>/dev/null || $PY -c "from rmt_fast.bench.common import git_sha; print(git_sha()[:10])" 2>/dev/null || echo unknown)
RES=${1:-benchmarks/results/${gpu}-$(date +%Y%m%d-%H%M)-${sha}}
mkdir -p "$RES"
echo "results -> $RES"

pack() {  # the results folder as ONE archive in the device tool's $OUT (after every step)
    if [ -n "$RETURN_DIR" ] && [ -d "$RETURN_DIR" ]; then
        tar czf "$RETURN_DIR/device_check.tar.gz.part" -C "$(dirname "$RES")" "$(basename "$RES")" &&
            mv -f "$RETURN_DIR/device_check.tar.gz.part" "$RETURN_DIR/device_check.tar.gz"
    fi
}

declare -a NAMES STATUS SECS
ONLY=",${DEVICE_CHECK_STEPS:-},"   # a comma-separated selection of steps (default: every step)
step() {  # step NAME LIMIT_S CMD...
    local name=$1 limit=$(( $2 * SCALE ))
    shift 2
    if [ "$ONLY" != ",," ] && [[ "$ONLY" != *",$name,"* ]]; then return; fi
    local t0=$(date +%s)
    local at=$(( t0 - START ))
    if [ $(( at + limit )) -gt "$TOTAL" ]; then
        NAMES+=("$name"); STATUS+=("skipped"); SECS+=(0)
        echo "=== $name at ${at}s skipped: its limit ${limit}s would end past the total ${TOTAL}s"
        return
    fi
    echo "=== $name at ${at}s (timeout ${limit}s): $*"
    timeout --kill-after=5 "$limit" "$@" >"$RES/$name.log" 2>&1
    local rc=$?
    local st="ok"
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then st="timeout"; elif [ $rc -ne 0 ]; then st="rc=$rc"; fi
    NAMES+=("$name"); STATUS+=("$st"); SECS+=("$(( $(date +%s) - t0 ))")
    tail -n 5 "$RES/$name.log"
    pack
}

# --- environment
{
    echo "date: $(date -Is)"; echo "git sha: $sha"; echo "host: $(hostname)"
    nvidia-smi 2>&1
    $PY -c "import json; from rmt_fast.bench.common import env_info; print(json.dumps(env_info(), indent=2))" 2>&1
    $PY -m pip list 2>/dev/null | grep -iE "^(torch|triton|transformers|numpy|pytest) "
} >"$RES/env.txt"

# The CPU dry run (tests/bench/test_device_check.py) takes the tiny models where a benchmark has them, and a 5 s
# --budget-s: it checks that every step runs, not what it measures.
budget() { if [ "$gpu" = nogpu ]; then echo 5; else echo "$1"; fi; }
TINY=""
[ "$gpu" = nogpu ] && TINY="--tiny"
LAT_SIZE="--min-tokens 4096 --max-tokens 65536"  # bert-base fp16, batch 1 and 16, 4k-64k tokens (issue 17)
[ "$gpu" = nogpu ] && LAT_SIZE="--tiny"
LAT_METHODS="FastRMT (auto),FastRMT (SDPA),FastRMT (CUDA graph),ReferenceRMT,Full attention (SDPA)"
GPU_TESTS="$PY -m pytest -m gpu -q -p no:cacheprovider --durations=15"
BD_VARIANTS="--variants eager,graphed,graphed+compiled"
[ "$gpu" = nogpu ] && BD_VARIANTS="--variants eager"

# --- the steps, in order of value. NAME, limit (s), command. -----------------------------------------------
# First call (the limits sum to 540 s): correctness, the dispatch table, the segment step, ARMT, the stream, latency.
# offline, no dependency resolution (the CPU dry run skips it)
[ -z "${DEVICE_CHECK_SKIP_INSTALL:-}" ] && step install 15  $PY -m pip install --no-deps --no-build-isolation --no-index -e .
# correctness first: the GPU tests (cold Triton compiles), then those that compile with torch.compile
step tests         140  $GPU_TESTS --ignore=tests/runtime/test_compile.py --ignore=tests/runtime/test_compiled_step.py
# (a failing compiled-step test writes tests/compile_diag.py's JSON, errors against float64, into compile_diag/)
export RMT_FAST_DIAG_DIR="$RES/compile_diag"
step compile_tests  50  $GPU_TESTS tests/runtime/test_compile.py tests/runtime/test_compiled_step.py
# the measured dispatch table, every backend raced (16 quick cases); every later step runs with it (exported below)
step tune          100  $PY -m rmt_fast.bench.cli tune --quick --budget-s $(budget 80) --out "$RES/tune"
TABLE=$(ls "$RES"/tune/sm*.json 2>/dev/null | grep -v example | head -n1)
if [ -n "$TABLE" ]; then export RMT_FAST_DISPATCH_TABLE="$TABLE"; echo "dispatch table: $TABLE"; fi
# 1M tokens: graphed, graphed + compiled, fast_inference (issue 25)
step million        80  $PY -m rmt_fast.bench.cli cuda-graph --quick --million --out "$RES/million"
# FastARMT sequential / diagonal, eager and graphed, and full attention
step armt           80  $PY -m rmt_fast.bench.cli armt --quick --budget-s $(budget 60) $TINY --out "$RES/armt"
# the document stream vs static batching vs one at a time (issue 27)
step eval_stream    45  $PY -m rmt_fast.bench.cli eval-stream --quick $TINY --out "$RES/eval_stream"
step latency        30  $PY -m rmt_fast.bench.cli latency --quick --budget-s $(budget 20) --batches 1,16 $LAT_SIZE \
                        --methods "$LAT_METHODS" --out "$RES/latency"
# Second call (DEVICE_CHECK_STEPS=train,host_overhead,kernels,breakdown on a warm machine; 240 s of limits, the
# breakdown after them): training with fast-compiled, host time, every backend per shape, kernels by kind.
step train         120  $PY -m rmt_fast.bench.cli train --quick --budget-s $(budget 90) --out "$RES/train"
step host_overhead  25  $PY -m rmt_fast.bench.cli host-overhead --quick --out "$RES/host_overhead"
step kernels        95  $PY -m rmt_fast.bench.cli kernels --quick --budget-s $(budget 75) --out "$RES/kernels"
step breakdown     120  $PY -m rmt_fast.bench.cli segment-breakdown --quick $BD_VARIANTS --out "$RES/breakdown"
# ---------------------------------------------------------------------------------------------------------------

# --- summary (last)
{
    echo
    printf "%-14s %-10s %6s\n" step status seconds
    printf -- "--------------------------------\n"
    for i in "${!NAMES[@]}"; do printf "%-14s %-10s %6s\n" "${NAMES[$i]}" "${STATUS[$i]}" "${SECS[$i]}"; done
    for t in tests compile_tests; do grep -hE "passed|failed|error" "$RES/$t.log" 2>/dev/null | tail -n 1; done
    for i in "${!NAMES[@]}"; do
        case "${NAMES[$i]}" in install|tests|compile_tests) continue ;; esac
        [ -f "$RES/${NAMES[$i]}.log" ] && { echo "--- ${NAMES[$i]}"; tail -n 8 "$RES/${NAMES[$i]}.log"; }
    done
    echo "total: $(( $(date +%s) - START )) s; results in $RES"
} | tee "$RES/summary.txt"
pack
[ -n "$RETURN_DIR" ] && [ -d "$RETURN_DIR" ] && echo "packed: $RETURN_DIR/device_check.tar.gz"
exit 0
