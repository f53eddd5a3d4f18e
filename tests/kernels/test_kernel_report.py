"""The static report (scripts/kernel_report.py, committed in kernels/tuned/static/): every kernel variant and launch
configuration ``tune`` may pick, compiled offline for sm_90. The report must cover the current candidates (a changed
grid or default needs a fresh report), and no config tune may pick may spill registers or miss wgmma (fp16 on
sm_90); the rule itself is checked on planted bad configs compiled for real (slow: a subprocess without the
interpreter, cold Triton cache so ptxas reports the spills)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rmt_fast.bench import tune_plan

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import kernel_report  # noqa: E402

SM90 = tune_plan.ASSUMED_SMEM["sm90"]


@pytest.fixture(autouse=True)
def _gpu_defaults():
    """The built-in defaults of a GPU run (in the interpreter the heuristic gives its tiny test blocks)."""
    with tune_plan.launch_configs.interpreter_mode(False):
        yield


def _records() -> dict:
    data = json.loads(tune_plan.STATIC_REPORT.read_text())
    return {(r["kind"], r["dtype"], r["head_dim"], r["layout"], tuple(r["config"])): r for r in data["records"]}


@pytest.mark.parametrize("quick", [False, True], ids=["full", "quick"])
def test_the_committed_report_covers_every_config_tune_may_pick(quick):
    records = _records()
    missing = []
    for d in tune_plan.HEAD_DIMS:
        for kind in ("fwd", "dq", "dkdv"):
            keep, _ = tune_plan.candidates(kind, d, quick, SM90, static=False)
            missing += [(kind, d, c) for c in keep if (kind, "fp16", d, "causal+counts", tuple(c)) not in records]
    assert not missing, f"stale report: run python scripts/kernel_report.py (missing {missing[:5]} ...)"


def test_no_config_tune_may_pick_spills_or_misses_wgmma():
    records = _records()
    bad = []
    for d in tune_plan.HEAD_DIMS:
        for kind in ("fwd", "dq", "dkdv"):
            keep, _ = tune_plan.candidates(kind, d, False, SM90)  # the static filter on
            for c in keep:
                rec = records[(kind, "fp16", d, "causal+counts", tuple(c))]
                if rec["problems"]:
                    bad.append((kind, d, c, rec["problems"]))
    assert not bad, bad


def test_candidates_drop_what_the_report_flags(monkeypatch, tmp_path):
    rec = dict(
        kind="dq",
        head_dim=64,
        dtype="fp16",
        layout="causal+counts",
        config=[64, 32, 8, 2, "inline"],
        problems=["register spills: 8 B stored, 8 B loaded, 16 B stack, 255 registers"],
    )
    report = {"records": [rec, {**rec, "config": [64, 32, 8, 3, "inline"], "problems": ["no wgmma: 4 mma.sync"]}]}
    path = tmp_path / "sm90.json"
    path.write_text(json.dumps(report))
    monkeypatch.setattr(tune_plan, "STATIC_REPORT", path)
    keep, rows = tune_plan.candidates("dq", 64, False, SM90)
    assert (64, 32, 8, 2, "inline") not in keep and (64, 32, 8, 3, "inline") not in keep
    assert any(r["config"] == "64x32 w8 s2 inline" and "register spills" in r["reason"] for r in rows)
    keep, _ = tune_plan.candidates("dq", 64, False, 166912)  # an A100: no wgmma there, spills still count
    assert (64, 32, 8, 3, "inline") in keep and (64, 32, 8, 2, "inline") not in keep
    assert (64, 32, 8, 2, "inline") in tune_plan.candidates("dq", 64, False, SM90, static=False)[0]


def test_problem_rules():
    ok = dict(wgmma_expected=True, wgmma=12, mma_sync=0, regs=200, stack=0, spill_stores=0, spill_loads=0, shared=40960)
    assert kernel_report.problems(ok) == []
    assert "register spills" in kernel_report.problems({**ok, "spill_stores": 4})[0]
    assert "register spills" in kernel_report.problems({**ok, "spill_stores": None, "stack": 64})[0]
    assert "no wgmma" in kernel_report.problems({**ok, "wgmma": 0, "mma_sync": 8})[0]
    assert kernel_report.problems({**ok, "wgmma": 0, "wgmma_expected": False}) == []
    assert "shared memory" in kernel_report.problems({**ok, "shared": 300000})[0]


@pytest.mark.slow
def test_planted_bad_configs_are_caught_and_the_defaults_are_clean(tmp_path):
    """Compiles for sm_90 (about a minute): a config with too many registers (dK/dV 64x128 with 4 warps at head
    dim 128: spills), one with tiny tiles (16x16: no wgmma), and the built-in dQ default (clean)."""
    if not Path(kernel_report._tool("ptxas-blackwell")).exists():
        pytest.skip("triton's NVIDIA backend (ptxas) is not installed")
    code = (
        "import json, sys; sys.path.insert(0, 'scripts'); import kernel_report as k; from rmt_fast.bench import "
        "tune_plan as t; print(json.dumps([k.analyse('dkdv', 'fp16', 128, (64, 128, 4, 3)), "
        "k.analyse('fwd', 'fp16', 64, (16, 16, 4, 1)), "
        "k.analyse('dq', 'fp16', 64, t.heuristic_config('dq', 64, 'float16'))]))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    spills, tiny, default = json.loads(done.stdout.strip().splitlines()[-1])
    assert spills["spill_stores"] > 0 and any("register spills" in p for p in spills["problems"]), spills
    assert tiny["wgmma"] == 0 and any("no wgmma" in p for p in tiny["problems"]), tiny
    assert default["variant"] == "inline" and default["problems"] == [] and default["wgmma"] > 0, default
    assert default["regs"] <= 255, default
