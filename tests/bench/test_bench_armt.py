"""benchmarks/armt.py through the runner: the sweep, the CSV's columns and bare statuses, the ratios, the plot."""

import argparse
import csv

from rmt_fast.bench import armt, runner


def _ctx(tmp_path, quick=False, **opts):
    options = argparse.Namespace(**{"tiny": False, "max_tokens": None, "threads": None, **opts})
    return runner.Context("armt", tmp_path, quick=quick, device="cpu", options=options)


def test_cases_cover_every_method_and_the_targets(tmp_path, monkeypatch):
    cpu = armt.cases(_ctx(tmp_path))
    assert {c["method"] for c in cpu} == set(armt.METHODS)
    assert {"sequential-graphed", "diagonal-graphed"} <= set(armt.METHODS)
    assert any(c["setting"] == armt.CPU_LATENCY.name and c["tokens"] == 32 * 64 for c in cpu)
    assert any(c["setting"] == armt.CPU_COMPUTE.name and c["tokens"] == 12 * 128 for c in cpu)
    ctx = _ctx(tmp_path)
    monkeypatch.setattr(runner.Context, "cuda", property(lambda self: True))  # the GPU sweep, planned here
    gpu = armt.cases(ctx)
    assert {c["tokens"] for c in gpu} == set(armt.GPU_LENGTHS)
    assert {c["method"] for c in gpu} == set(armt.METHODS)
    keys = {t[0] for t in armt.gpu_targets(armt.settings(ctx))}
    assert {"llama-1b-m128_seq_over_seq_graphed_32768", "llama-1b-m128_diag_over_diag_graphed_131072"} <= keys
    assert {s.mem for s in armt.settings(ctx)} == {128, 16}
    ctx.quick = True
    assert {c["tokens"] for c in armt.cases(ctx)} == {2048, 32768, 131072}  # every GPU target's length
    monkeypatch.undo()
    assert max(c["tokens"] for c in armt.cases(_ctx(tmp_path, max_tokens=512))) == 512


def test_ratios_come_from_rows_of_the_run():
    rows = [
        dict(setting="s", method="sequential", tokens=64, status="ok", seconds=3.0),
        dict(setting="s", method="diagonal", tokens=64, status="ok", seconds=1.0),
        dict(setting="s", method="full", tokens=64, status="oom", seconds=None),
    ]
    got = armt.ratios(
        rows,
        [
            ("a", "s", "sequential", "diagonal", 64, 2.0),
            ("b", "s", "full", "diagonal", 64, 3.0),
            ("c", "s", "sequential", "diagonal", 128, 1.0),
        ],
    )
    assert got["a"] == {"ratio": 3.0, "target": 2.0, "met": True}
    assert got["b"]["ratio"] is None and got["c"]["ratio"] is None


def test_run_writes_csv_and_plot(tmp_path):
    summary = runner.run(armt, tmp_path, quick=True, tiny=True)
    rows = list(csv.DictReader(open(tmp_path / "armt.csv")))
    assert {r["method"] for r in rows} == set(armt.METHODS)
    assert {"method", "tokens", "seconds", "peak_mb", "status", "note"} <= set(rows[0])
    assert {r["status"] for r in rows} <= set(runner.STATUS)
    for r in rows:
        assert r["status"] == "ok" and float(r["seconds"]) > 0, r
        assert (r["note"] == armt.CPU_GRAPHED_NOTE) == r["method"].endswith("-graphed"), r
    assert summary == {}  # the tiny setting has no targets
    assert (tmp_path / "armt.png").stat().st_size > 0 and (tmp_path / "armt.json").is_file()
    assert "armt" in runner.NOT_IN_ALL


def test_graphed_goals_come_from_rows_of_the_run():
    rows = [
        dict(setting="s", method="sequential-graphed", tokens=32768, status="ok", seconds=0.5),
        dict(setting="s", method="diagonal-graphed", tokens=32768, status="ok", seconds=0.2),
        dict(setting="s", method="diagonal-graphed", tokens=131072, status="oom", seconds=None),
    ]
    got = armt.goals(rows, ["s"])
    assert got["s_sequential-graphed_32768"] == {"seconds": 0.5, "goal_s": 0.6, "met": True}
    assert got["s_diagonal-graphed_32768"]["met"] is False
    assert got["s_diagonal-graphed_131072"] == {"seconds": None, "goal_s": 0.55, "met": None}
