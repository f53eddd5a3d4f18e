"""benchmarks/armt.py on a tiny shape: the CSV's columns and statuses, the summary's ratios, the plot."""

import csv

from rmt_fast.bench import armt

TINY = armt.Shape("tiny", 2, 32, 2, 1, 64, 96, 8, 2, 8, "float32")


def test_cases_cover_every_method_and_the_targets():
    cpu = armt.cases(cuda=False, quick=True)
    assert {c.method for c in cpu} == set(armt.METHODS)
    assert any(c.shape is armt.CPU_LATENCY and c.tokens == 32 * 64 for c in cpu)
    assert any(c.shape is armt.CPU_COMPUTE and c.tokens == 12 * 128 for c in cpu)
    gpu = armt.cases(cuda=True, quick=False)
    assert {c.tokens for c in gpu} == set(armt.GPU_LENGTHS) and {c.shape.mem for c in gpu} == {128, 16}


def test_run_writes_csv_and_plot(tmp_path, monkeypatch):
    monkeypatch.setattr(armt, "CPU_LATENCY", TINY)
    monkeypatch.setattr(armt, "cases", lambda cuda, quick: [armt.Case(TINY, m, 24, 1) for m in armt.METHODS])
    summary = armt.run(tmp_path, quick=True)
    rows = list(csv.DictReader(open(tmp_path / "armt.csv")))
    assert [r["method"] for r in rows] == list(armt.METHODS)
    assert {"method", "tokens", "seconds", "peak_mb", "status"} <= set(rows[0])
    status = {r["method"]: r["status"] for r in rows}
    assert status["diagonal-graphed"].startswith("skipped")
    assert all(status[m] == "ok" for m in ("sequential", "diagonal", "full")), status
    assert summary["latency_bound_seq_over_diag"] is None  # no 2048-token point in this tiny run
    assert (tmp_path / "armt.png").stat().st_size > 0
