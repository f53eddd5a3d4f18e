"""The benchmark runner: one row per case with its status word, series that stop or record after a failure,
the budget, the timer's quantiles, declared options and the files."""

import argparse
import csv
import importlib.machinery
import json
import sys
import types

import pytest
import torch

from rmt_fast.bench import runner
from rmt_fast.bench.runner import Benchmark, Option, OverBudget, Unavailable


def _measure(ctx, case, state):
    state["n"] = state.get("n", 0) + 1  # per series
    if case["x"] == "oom":
        raise torch.OutOfMemoryError("simulated")
    if case["x"] == "boom":
        raise ValueError("boom")
    if case["x"] == "slow":
        raise OverBudget("too slow")
    if case["x"] == "missing":
        raise Unavailable("no such library")
    return {"value": 10 * state["n"]}


def _module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    return module


def _cases(series):
    return [dict(method=m, x=x) for m, xs in series.items() for x in xs]


def test_status_words_and_series(tmp_path):
    ctx = runner.Context("t", tmp_path, device="cpu")
    cases = _cases({"a": ["ok", "oom", "ok"], "b": ["ok", "boom", "ok"], "c": ["slow", "ok"], "d": ["missing", "ok"]})
    rows = ctx.sweep(cases, _measure, series=("method",), after_failure="record")
    assert [(r["method"], r["status"]) for r in rows] == [
        ("a", "ok"),
        ("a", "oom"),
        ("a", "skipped"),
        ("b", "ok"),
        ("b", "error"),
        ("b", "skipped"),
        ("c", "over_budget"),
        ("c", "skipped"),
        ("d", "unavailable"),
        ("d", "ok"),
    ]
    assert rows[1]["note"].startswith("OutOfMemoryError") and "boom" in rows[4]["note"]
    assert rows[2]["note"] == "not run: oom at x=oom"
    assert [r["value"] for r in rows if r["status"] == "ok"] == [10, 10, 20]  # state: one dict per series
    stop = ctx.sweep(cases, _measure, series=("method",), after_failure="stop")
    assert [r["status"] for r in stop] == ["ok", "oom", "ok", "error", "over_budget", "unavailable", "ok"]
    go_on = ctx.sweep(cases, _measure, series=("method",), after_failure="continue")
    assert len(go_on) == len(cases)


def test_budget_spent_cases_are_over_budget_rows(tmp_path):
    ticks = iter([0.0, 0.0, 5.0, 5.0, 5.0])
    ctx = runner.Context("t", tmp_path, budget_s=1.0, device="cpu", clock=lambda: next(ticks))
    rows = ctx.sweep(_cases({"a": ["ok", "ok"], "b": ["ok"]}), _measure, series=("method",))
    assert [r["status"] for r in rows] == ["ok", "over_budget", "over_budget"]
    assert "budget" in rows[1]["note"]


def test_timer_median_and_quantiles():
    xs = [5.0, 1.0, 3.0, 2.0, 4.0]
    t = runner.timing_of(xs, cpu=[1.0, 1.0, 2.0])
    assert (t.median_s, t.p20_s, t.p80_s, t.samples, t.cpu_s) == (3.0, 1.8, 4.2, 5, 1.0)
    calls = []
    got = runner.Timer("cpu")(lambda: calls.append(1), repeats=4, warmup=2, inner=3)
    assert len(calls) == 2 + 4 * 3 and got.samples == 4 and got.p20_s <= got.median_s <= got.p80_s
    with pytest.raises(ValueError, match="clock"):
        runner.Timer("cpu")(lambda: None, clock="cpu")


def test_eager_timer_sizes_its_samples_to_the_target():
    import time

    calls = []

    def sleepy():
        calls.append(1)
        time.sleep(0.002)

    t = runner.Timer("cpu").eager(sleepy, target_ms=10)
    assert t.samples == 3 and 2.0 <= t.ms < 50  # per call, not per sample
    assert 1 + 1 + 3 * 3 <= len(calls) <= 1 + 1 + 3 * 6  # warm-up, the probe, 3 samples of ~5 calls (>= 3)


def test_declared_benchmark_writes_its_files_and_parses_its_options(tmp_path, monkeypatch):
    def cases(ctx):
        return [dict(method="m", x="ok", scale=ctx.option("scale"))]

    def summarize(ctx, rows):
        return {"ok": True, "n": len(rows)}, {"config": {"scale": ctx.option("scale")}}

    bench = Benchmark(
        "toy",
        cases,
        _measure,
        summarize=summarize,
        markdown=lambda ctx, rows, rec: "# toy\n",
        options=(Option("--scale", type=int, default=1),),
    )
    module = _module("toy_bench")
    module.BENCHMARK = bench
    monkeypatch.setitem(sys.modules, "toy_bench", module)
    monkeypatch.setitem(runner.BENCHMARKS, "toy", "toy_bench")
    res = runner.run_one("toy", tmp_path, quick=True, extra=["--scale", "3"], device="cpu")
    assert res["status"] == "ok" and res["summary"] == {"ok": True, "n": 1}
    with open(tmp_path / "toy.csv") as fh:
        assert next(csv.DictReader(fh)) == {
            "method": "m",
            "x": "ok",
            "scale": "3",
            "value": "10",
            "status": "ok",
            "note": "",
        }
    doc = json.loads((tmp_path / "toy.json").read_text())
    assert doc["config"] == {"scale": 3} and doc["summary"]["n"] == 1 and doc["env"]["git_sha"]
    assert (tmp_path / "toy.md").read_text() == "# toy\n"
    with pytest.raises(SystemExit):
        runner.run_one("toy", tmp_path, quick=True, extra=["--size", "3"])
    with pytest.raises(TypeError, match="unknown options"):
        runner.run(bench, tmp_path, size=3)


def test_needs_cuda_and_failed_checks(tmp_path, monkeypatch):
    if not torch.cuda.is_available():
        gpu_only = Benchmark("gpu", run=lambda ctx: {"ran": True}, needs_cuda=True)
        assert runner.run(gpu_only, tmp_path / "gpu") == {"skipped": "no CUDA"}
        assert not (tmp_path / "gpu").exists()
    module = _module("checks_bench")
    module.BENCHMARK = Benchmark("checks", run=lambda ctx: {"quick": ctx.quick, "ok": False})
    monkeypatch.setitem(sys.modules, "checks_bench", module)
    monkeypatch.setitem(runner.BENCHMARKS, "checks", "checks_bench")
    res = runner.run_one("checks", tmp_path, quick=True)
    assert res["summary"]["quick"] is True and res["status"] == "failed checks"
    module.BENCHMARK = Benchmark("checks", run=lambda ctx: 1 / 0)
    assert runner.run_one("checks", tmp_path, quick=True)["status"] == "error"  # a crash is a status, not a raise


def test_over_budget_keeps_the_measured_row(tmp_path):
    def measure(ctx, case, state):
        raise OverBudget("measured 2 s > 1 s", {"seconds": 2.0})

    rows = runner.Context("t", tmp_path, device="cpu").sweep(
        [dict(method="a", n=1), dict(method="a", n=2)], measure, series=("method",)
    )
    assert rows == [{"method": "a", "n": 1, "seconds": 2.0, "status": "over_budget", "note": "measured 2 s > 1 s"}]


def test_option_types():
    assert runner.names(" a, b ,,c") == ["a", "b", "c"] and runner.ints("1,16") == [1, 16]
    with pytest.raises(argparse.ArgumentTypeError, match="comma-separated ints"):
        runner.ints("1,x")
