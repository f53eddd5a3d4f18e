"""Smoke tests of the latency and profile benchmarks in their tiny configurations (a few seconds each)."""

from __future__ import annotations

import csv
import json

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from rmt_fast.bench import latency, profile, runner  # noqa: E402

LATENCY_COLUMNS = {
    "method",
    "family",
    "tokens",
    "seconds",
    "cpu_seconds",
    "ms_per_token",
    "peak_mb",
    "status",
}


def _rows(path):
    with path.open() as fh:
        return list(csv.DictReader(fh))


def test_latency_tiny_writes_outputs(tmp_path):
    summary = runner.run(latency, tmp_path, tiny=True)
    rows = _rows(tmp_path / "latency.csv")
    assert LATENCY_COLUMNS <= set(rows[0])
    methods = {r["method"] for r in rows}
    assert {
        "FastRMT (auto)",
        "FastRMT (SDPA)",
        "FastRMT (CUDA graph)",
        "ReferenceRMT",
        "Full attention (SDPA)",
        "Full attention (FlexAttention)",
        "Full attention (xformers)",
    } <= methods
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["method"] for r in ok} >= {"FastRMT (auto)", "ReferenceRMT", "Full attention (SDPA)"}
    assert all(float(r["seconds"]) > 0 for r in ok)
    assert (tmp_path / "latency.png").stat().st_size > 0
    info = json.loads((tmp_path / "latency.json").read_text())
    assert {"env", "config", "slopes"} <= set(info)
    assert info["slopes"]["FastRMT (auto)"] is not None
    assert "ok" in summary and "slope[FastRMT (auto)]" in summary


def test_latency_over_budget_is_a_row_not_a_crash(tmp_path):
    summary = runner.run(
        latency, tmp_path, tiny=True, per_call_budget_s=1e-9, methods=["FastRMT (auto)", "Full attention (SDPA)"]
    )
    rows = _rows(tmp_path / "latency.csv")
    assert [r["status"] for r in rows] == ["over_budget", "over_budget"]
    assert all(r["tokens"] == "128" for r in rows)
    assert summary["ok"] is None  # a tiny run checks no slopes
    assert (tmp_path / "latency.png").exists()


def test_latency_memory_budget(tmp_path):
    runner.run(latency, tmp_path, tiny=True, memory_budget_mb=-1.0, methods=["Full attention (SDPA)"])
    rows = _rows(tmp_path / "latency.csv")
    if rows[0]["peak_mb"] == "":  # no peak measurement on this machine: nothing to compare against
        assert rows[-1]["status"] == "ok"
    else:
        assert rows[0]["status"] == "over_budget" and "memory budget" in rows[0]["note"]


def test_latency_short_budget_still_gives_every_method_at_the_first_length(tmp_path):
    """The cases interleave the methods (each length: every method, shortest lengths first), so a --budget-s
    too short for the sweep still leaves every method a row at the first length. A fake clock moves 10 s per
    measured case: the 35 s budget lets 4 cases run, i.e. the 4 methods at 128 tokens, and no more."""
    import dataclasses

    now = [0.0]

    def measure(ctx, case, state):
        try:
            return latency.measure(ctx, case, state)
        finally:
            now[0] += 10.0

    bench = dataclasses.replace(latency.BENCHMARK, measure=measure)
    methods = ["FastRMT (auto)", "FastRMT (SDPA)", "ReferenceRMT", "Full attention (SDPA)"]
    runner.run(bench, tmp_path, tiny=True, methods=methods, budget_s=35.0, clock=lambda: now[0])
    rows = _rows(tmp_path / "latency.csv")
    first = [r for r in rows if r["tokens"] == "128"]
    assert sorted(r["method"] for r in first) == sorted(methods)
    assert all(r["status"] == "ok" for r in first), first
    later = [r for r in rows if r["tokens"] != "128"]
    assert later and all(r["status"] == "over_budget" and "budget of 35 s is spent" in r["note"] for r in later)
    assert [r["tokens"] for r in rows] == sorted((r["tokens"] for r in rows), key=int)  # shortest first


def test_latency_fit_slope():
    rows = [dict(tokens=n, seconds=1e-6 * n**2, status="ok") for n in (256, 512, 1024, 2048)]
    assert latency.fit_slope(rows)["slope"] == pytest.approx(2.0)
    rows = [dict(tokens=n, seconds=3e-4 * n, status="ok") for n in (256, 512, 1024)]
    assert latency.fit_slope(rows)["slope"] == pytest.approx(1.0)
    assert latency.fit_slope(rows[:1]) is None


def test_profile_tiny_writes_outputs(tmp_path):
    summary = runner.run(profile, tmp_path, tiny=True)
    rows = _rows(tmp_path / "profile.csv")
    assert {"backbone", "wrapper", "category", "cpu_ms", "ops_per_segment", "wall_ms_profiled"} <= set(rows[0])
    assert {r["wrapper"] for r in rows} == {"ReferenceRMT", "FastRMT"}
    assert {r["category"] for r in rows} == set(profile.CATEGORIES)
    md = (tmp_path / "profile.md").read_text()
    assert "| ReferenceRMT | FastRMT |" in md and "FastRMT dispatches" in md
    for name in ("profile.png", "profile_fast.json", "profile_reference.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    json.loads((tmp_path / "profile_fast.json").read_text())
    assert summary["bert/FastRMT ops/segment"] > 0
    # the reference builds transformers' masks; FastRMT hands the layout to the attention instead
    ref = next(r for r in rows if r["wrapper"] == "ReferenceRMT" and r["category"] == "mask")
    fast = next(r for r in rows if r["wrapper"] == "FastRMT" and r["category"] == "mask")
    assert float(ref["ops_per_segment_in_category"]) > float(fast["ops_per_segment_in_category"])
