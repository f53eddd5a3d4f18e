"""benchmarks/eval_stream.py through the runner: the dry run (tiny), the planned settings, the document mix, the
static-batching counts and the targets."""

import argparse
import csv

from rmt_fast.bench import eval_stream, runner


def _ctx(tmp_path, quick=False, **opts):
    options = argparse.Namespace(**{"tiny": False, **opts})
    return runner.Context("eval-stream", tmp_path, quick=quick, device="cpu", options=options)


def test_settings_cpu_default_and_gpu_plan(tmp_path, monkeypatch):
    assert eval_stream.setting(_ctx(tmp_path)) == eval_stream.CPU
    assert {c["method"] for c in eval_stream.cases(_ctx(tmp_path))} == set(eval_stream.METHODS)
    ctx = _ctx(tmp_path)
    monkeypatch.setattr(runner.Context, "cuda", property(lambda self: True))  # the GPU plan, made here
    s = eval_stream.setting(ctx)
    assert (s.model, s.dtype, s.batch, s.segment + s.mem + 3) == ("bert-base", "float16", 16, 512)
    batches = {c["method"]: c["batch"] for c in eval_stream.cases(ctx)}
    assert batches["one-at-a-time"] == 1 and batches["stream"] == 16


def test_rounds_interleave_methods_and_merge_by_median(tmp_path):
    cpu = eval_stream.cases(_ctx(tmp_path))
    assert [c["method"] for c in cpu[: len(eval_stream.METHODS)]] == list(eval_stream.METHODS)
    assert [c["round"] for c in cpu] == sorted(c["round"] for c in cpu) and cpu[-1]["round"] == 2
    rows = [dict(method="stream", round=r, status="ok", docs_per_cpu_s=x, steps=7) for r, x in enumerate((3, 9, 4))]
    rows.append(dict(method="stream", round=3, status="error", docs_per_cpu_s=None))
    merged = eval_stream.per_method(rows)["stream"]
    assert (merged["docs_per_cpu_s"], merged["steps"], merged["rounds"]) == (4, 7, 3)


def test_document_lengths_are_seeded_and_long_tailed():
    s = eval_stream.CPU
    a, b = eval_stream.document_lengths(s), eval_stream.document_lengths(s)
    assert a == b and len(a) == s.documents
    segs = [-(-n // s.segment) for n in a]
    assert min(segs) >= 1 and max(segs) <= s.max_segments
    assert sum(n <= 4 for n in segs) > sum(n >= s.max_segments // 2 for n in segs) > 0  # log-uniform: long tail


def test_static_batches_and_their_steps():
    docs = [[0] * n for n in (5, 1, 9, 2)]
    assert eval_stream.static_batches(docs, 2, sort=False) == [[0, 1], [2, 3]]
    assert eval_stream.static_batches(docs, 2, sort=True) == [[2, 0], [3, 1]]
    assert eval_stream._static_counts([5, 1, 9, 2], [[0, 1], [2, 3]], 2) == (14, 28)


def test_targets_come_from_rows_of_the_run(tmp_path):
    rows = [
        dict(method="stream", status="ok", docs_per_cpu_s=10.0, utilisation=0.97, steps_over_ideal=1.02),
        dict(method="static-input-order", status="ok", docs_per_cpu_s=4.0),
        dict(method="static-sorted", status="ok", docs_per_cpu_s=5.0),
        dict(method="one-at-a-time", status="error"),
    ]
    got = eval_stream.targets(_ctx(tmp_path), rows)
    assert got["stream_over_best_static_docs_per_s"] == {"ratio": 2.0, "target": 0.95, "met": True}
    assert got["stream_over_one_at_a_time_docs_per_s"]["ratio"] is None
    assert got["stream_utilisation"]["met"] and got["stream_steps_over_ideal"]["met"]


def test_dry_run_writes_every_method(tmp_path):
    summary = runner.run(eval_stream, tmp_path, tiny=True, device="cpu")
    rows = list(csv.DictReader(open(tmp_path / "eval-stream.csv")))
    assert [r["method"] for r in rows] == list(eval_stream.METHODS)
    assert all(r["status"] == "ok" for r in rows), rows
    want = {"docs_per_s", "docs_per_cpu_s", "tokens_per_s", "utilisation", "steps", "ideal_steps", "peak_mb"}
    assert want <= set(rows[0])
    by = {r["method"]: r for r in rows}
    assert int(by["stream"]["steps"]) <= int(by["static-input-order"]["steps"])
    assert float(by["one-at-a-time"]["utilisation"]) == 1.0
    assert 0 < summary["stream_utilisation"] <= 1
    assert (tmp_path / "eval-stream.md").read_text().count("| stream | 4 |") == 1
    assert (tmp_path / "eval-stream.png").stat().st_size > 0 and (tmp_path / "eval-stream.json").is_file()
    assert "eval-stream" in runner.BENCHMARKS and "eval-stream" in runner.NOT_IN_ALL
