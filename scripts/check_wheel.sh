#!/usr/bin/env bash
# Build rmt-fast's wheel and install it (not editable) into a fresh virtual environment beside Hugging Face's
# `kernels` package; then check, from outside the repository:
#   * the wheel holds one top-level package, rmt_fast (kernels/ -> rmt_fast.kernels, benchmarks/ -> rmt_fast.bench);
#   * `import rmt_fast` and its public API;
#   * `import kernels` is Hugging Face's package, not ours;
#   * `rmt-fast-bench flops --out DIR` runs.
# Usage: bash scripts/check_wheel.sh   (CI runs it; PYTHON picks the interpreter, default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY="${PYTHON:-python3}"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

echo "[check_wheel] building the wheel"
"$PY" -m pip wheel -q --no-deps -w "$WORK/dist" "$ROOT" 2>&1 | grep -v "^WARNING: Location" || true
WHEEL=$(ls "$WORK"/dist/rmt_fast-*.whl)
"$PY" - "$WHEEL" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
tops = sorted({n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")})
assert tops == ["rmt_fast"], f"the wheel installs top-level names {tops}, expected only rmt_fast"
for need in ("rmt_fast/kernels/triton_attention.py", "rmt_fast/kernels/triton_kernels.py", "rmt_fast/kernels/layout.py",
             "rmt_fast/kernels/tuned/sm90.json", "rmt_fast/bench/cli.py"):
    assert need in names, f"{need} is missing from the wheel"
print(f"[check_wheel] wheel ok: {len(names)} files, top-level {tops}")
PY

echo "[check_wheel] installing it into a fresh venv with Hugging Face's kernels package"
"$PY" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
"$VPY" -m pip install -q "$TORCH_SPEC" 2>&1 | grep -v "^WARNING: Location" || true
"$VPY" -m pip install -q "${WHEEL}[bench]" kernels 2>&1 | grep -v "^WARNING: Location" || true

cd "$WORK"   # away from the repository, whose folders would shadow the installed packages
"$VPY" - <<'PY'
import importlib.metadata as md
import sys

import kernels
import rmt_fast
from rmt_fast import FastRMT, ReferenceRMT, RMTOutput, SegmentLayout, memory_detached_before
from rmt_fast.kernels.sdpa_attention import sdpa_rmt_attention
import rmt_fast.bench.cli

assert "site-packages" in rmt_fast.__file__, rmt_fast.__file__
hf = md.distribution("kernels")
assert kernels.__file__.startswith(str(hf.locate_file("kernels"))), (kernels.__file__, hf.locate_file("kernels"))
assert hasattr(kernels, "get_kernel"), f"`import kernels` is not Hugging Face's package: {kernels.__file__}"
assert not hasattr(kernels, "SegmentLayout")
print(f"[check_wheel] imports ok: rmt_fast {rmt_fast.__version__} from {rmt_fast.__file__}; "
      f"kernels {hf.version} (Hugging Face) from {kernels.__file__}")
PY
"$WORK/venv/bin/rmt-fast-bench" flops --quick --out "$WORK/flops" > "$WORK/flops.log" 2>&1 || { cat "$WORK/flops.log"; exit 1; }
test -s "$WORK/flops/flops/flops.csv" || test -s "$WORK/flops/flops.csv" || { ls -R "$WORK/flops"; echo "no flops.csv"; exit 1; }
echo "[check_wheel] rmt-fast-bench flops ran: $(ls "$WORK"/flops | tr '\n' ' ')"
echo "[check_wheel] passed"
