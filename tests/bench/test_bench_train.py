"""rmt-fast-bench train: the tiny CPU default writes its outputs; OOM, over-budget and error points are rows
(the runner's status words: the points of a method after its failure are ``skipped``)."""

import csv
import json
import math

import pytest
import torch

from rmt_fast.bench import cli, runner, train


def _read(out):
    with open(out / "train.csv") as f:
        rows = list(csv.DictReader(f))
    return rows, json.loads((out / "train.json").read_text())


def test_cli_tiny_default_writes_csv_json_png(tmp_path):
    out = tmp_path / "train"
    code = cli.main(
        ["train", "--out", str(out), "--quick", "--segments", "1,2", "--methods", "reference,fast,fast-compiled,full"]
    )
    assert code == 0
    rows, doc = _read(out)
    assert (out / "train.png").stat().st_size > 0
    assert {r["setting"] for r in rows} == {"tiny-encoder", "tiny-decoder"}
    assert len(rows) == 2 * 4 * 2 and all(r["status"] == "ok" for r in rows)
    for r in rows:
        seg = train.SETTINGS[r["setting"]].segment
        assert int(r["tokens"]) == int(r["batch"]) * int(r["segments"]) * seg
        assert float(r["tokens_per_s"]) > 0 and math.isfinite(float(r["loss"]))
        assert float(r["tokens_per_s"]) == pytest.approx(int(r["tokens"]) / float(r["step_ms"]) * 1e3, rel=1e-3)
    # the RMT wrappers see the same data and weights: their first-step losses agree
    for setting in ("tiny-encoder", "tiny-decoder"):
        losses = {r["method"]: float(r["loss"]) for r in rows if r["setting"] == setting and r["segments"] == "2"}
        assert losses["fast"] == pytest.approx(losses["reference"], rel=1e-4)
        assert losses["fast-compiled"] == pytest.approx(losses["fast"], rel=1e-4)
    assert doc["summary"]["ok"] and doc["env"]["torch"] == torch.__version__
    assert doc["summary"]["targets"] == {}  # the tiny settings have no target point


def test_oom_is_a_row_and_the_sweep_goes_on(tmp_path):
    def hook(setting, method, n):
        if method == "fast" and n == 2:
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")

    summary = runner.run(
        train, tmp_path, setting=["tiny-decoder"], segments=[1, 2, 4], methods=["fast", "reference"], fail_hook=hook
    )
    rows, _ = _read(tmp_path)
    status = {(r["method"], int(r["segments"])): r["status"] for r in rows}
    assert status == {
        ("reference", 1): "ok",
        ("reference", 2): "ok",
        ("reference", 4): "ok",
        ("fast", 1): "ok",
        ("fast", 2): "oom",
        ("fast", 4): "skipped",
    }
    note = next(r["note"] for r in rows if r["method"] == "fast" and r["segments"] == "4")
    assert "not run: oom" in note and "segments=2" in note
    assert summary["oom_points"] == 1 and summary["skipped_points"] == 1 and summary["ok"]


def test_over_budget_points_are_rows(tmp_path):
    calls = []

    def clock():  # the budget runs out after the first point
        calls.append(None)
        return 0.0 if len(calls) <= 2 else 1e6

    summary = runner.run(
        train,
        tmp_path,
        setting=["tiny-encoder"],
        segments=[1, 2],
        methods=["fast", "fast-ckpt"],
        budget_s=10.0,
        clock=clock,
    )
    rows, _ = _read(tmp_path)
    assert [r["status"] for r in rows] == ["ok", "over_budget", "over_budget", "over_budget"]
    assert rows[1]["tokens_per_s"] == "" and summary["over_budget_points"] == 3 and summary["ok"]
    assert (tmp_path / "train.png").exists()


def test_other_failures_are_error_rows_and_fail_the_summary(tmp_path):
    def hook(setting, method, n):
        raise ValueError("boom")

    summary = runner.run(train, tmp_path, setting=["tiny-encoder"], segments=[1], methods=["reference"], fail_hook=hook)
    rows, _ = _read(tmp_path)
    assert rows[0]["status"] == "error" and "boom" in rows[0]["note"] and summary["ok"] is False


def test_bad_arguments():
    with pytest.raises(ValueError, match="--setting"):
        runner.run(train, "unused", setting=["c"])
    with pytest.raises(ValueError, match="--methods"):
        runner.run(train, "unused", setting=["tiny"], methods=["fastest"])
    with pytest.raises(ValueError, match="--segments"):
        runner.run(train, "unused", setting=["tiny"], segments=[0])


def test_target_ratios():
    a, b = train.SETTINGS["a"], train.SETTINGS["b"]

    def row(setting, method, n, tps, peak, base, status="ok"):
        return dict(
            setting=setting,
            method=method,
            segments=n,
            status=status,
            tokens_per_s=tps,
            peak_mb=peak,
            act_peak_mb=peak - base,
        )

    rows = [
        row("a", "reference", 7, 100.0, 4000.0, 1000.0),
        row("a", "fast", 7, 160.0, 1800.0, 1000.0),
        row("a", "fast-ckpt", 7, 120.0, 1500.0, 1000.0),
        row("b", "fast-ckpt", 64, 1.0, 70000.0, 20000.0),
    ]
    got = train.targets(rows, [a, b])
    fast = got["a@7"]["fast"]
    assert fast["speedup"] == 1.6 and fast["peak_ratio"] == 0.45 and fast["activation_peak_ratio"] == 0.267
    assert fast["meets_speedup"] and fast["meets_memory"]
    ckpt = got["a@7"]["fast-ckpt"]
    assert not ckpt["meets_speedup"] and ckpt["meets_memory"]
    assert got["a@7"]["fast-compiled"] is None and got["a@7"]["recommended"] == "fast"
    assert fast["tokens_per_s"] == 160.0 and fast["peak_gb"] == round(1800 * 2**20 / 1e9, 2)
    assert got["b@8"] == {**{m: None for m in train.FAST_METHODS}, "recommended": None}
    assert got["b@64 fast-ckpt"] == {"status": "ok", "peak_gb": 73.4, "fits_80GB": True, "tokens_per_s": 1.0}


def test_target_point_without_the_reference():
    """llama-1.2B at 8 segments: the reference runs out of memory; FastRMT's and the checkpointed variant's
    tokens/s and peak memory are still reported, and the faster FastRMT variant is the recommended one."""
    b = train.SETTINGS["b"]
    rows = [
        dict(setting="b", method="reference", segments=8, status="oom"),
        dict(
            setting="b",
            method="fast",
            segments=8,
            status="ok",
            tokens_per_s=38278.8,
            step_ms=856.0,
            peak_mb=85880.6,
            act_peak_mb=66954.2,
        ),
        dict(
            setting="b",
            method="fast-ckpt",
            segments=8,
            status="ok",
            tokens_per_s=26468.6,
            step_ms=1238.0,
            peak_mb=29438.2,
            act_peak_mb=10504.2,
        ),
        dict(
            setting="b",
            method="fast-compiled",
            segments=8,
            status="ok",
            tokens_per_s=41000.0,
            step_ms=799.2,
            peak_mb=80000.0,
            act_peak_mb=61000.0,
        ),
    ]
    got = train.targets(rows, [b])["b@8"]
    assert got["fast"]["tokens_per_s"] == 38278.8 and got["fast"]["peak_gb"] == 90.05
    assert got["fast-ckpt"]["tokens_per_s"] == 26468.6 and got["fast-ckpt"]["peak_gb"] == 30.87
    assert got["fast"]["speedup"] is None and got["fast-ckpt"]["meets_memory"] is None
    assert got["recommended"] == "fast-compiled"


def test_quick_run_lists_fast_compiled():
    for name in ("a", "b"):
        assert "fast-compiled" in train.SETTINGS[name].quick_methods


def test_million_summary_crossover():
    from rmt_fast.bench.cuda_graph import _million_summary

    lengths = [4096, 8192, 16384, 32768]
    rmt = {4096: 0.010, 8192: 0.008, 16384: 0.016, 32768: 0.032, 2**20: 0.9}
    full = {4096: 0.004, 8192: 0.009, 16384: 0.028}  # 32768: out of memory
    rows = [dict(method="graphed", tokens=n, seconds=t, status="ok") for n, t in rmt.items()]
    rows += [dict(method="full (SDPA)", tokens=n, seconds=t, status="ok") for n, t in full.items()]
    rows += [
        dict(method="full (SDPA)", tokens=32768, status="oom"),
        dict(method="graphed+compiled", status="error: no compiler"),
    ]
    got = _million_summary(rows, 2**20, lengths)
    assert got["seconds_graphed"] == 0.9 and got["meets_1s_graphed"] is True
    assert got["crossover_tokens_graphed"] == 8192 and got["meets_crossover_graphed"] is True
    assert got["seconds_graphed+compiled"] is None and got["crossover_tokens_graphed+compiled"] is None
    assert got["meets_crossover_graphed+compiled"] is False
    rows[1]["seconds"] = 0.0095  # slower than full attention at 8192: the crossover moves to 16384
    assert _million_summary(rows, 2**20, lengths)["crossover_tokens_graphed"] == 16384
    assert _million_summary(rows, 2**20, lengths, targets_apply=False)["meets_1s_graphed"] is None
