"""`rmt-fast-bench tune` without a GPU: the dry run (plan, candidates, an unmeasured example table), the
candidate filter, and the table built from (synthetic) measurement rows. The timing itself is GPU-only."""

from __future__ import annotations

import contextlib
import csv
import json
import warnings

import pytest
import torch

from rmt_fast.bench import cli, runner, tune, tune_plan
from rmt_fast.kernels import dispatch, launch_configs, sdpa_attention


def test_dry_run_through_the_cli_writes_the_plan_and_an_unmeasured_example(tmp_path, capsys, monkeypatch):
    assert cli.main(["tune", "--out", str(tmp_path), "--dry-run", "--quick", "--arch", "sm90"]) == 0
    assert "feasible" in capsys.readouterr().out
    with open(tmp_path / "tune_candidates.csv") as fh:
        cand = list(csv.DictReader(fh))
    assert {r["kind"] for r in cand} == {"fwd", "dq", "dkdv"} and {r["head_dim"] for r in cand} == {"64", "128"}
    assert any(r["heuristic"] == "True" for r in cand)
    plan = json.loads((tmp_path / "tune_plan.json").read_text())
    assert plan["arch"] == "sm90" and len(plan["cases"]) == len(tune_plan.cases(True)) == 16
    assert plan["hopper_paths"]["swept"] is False
    example = dispatch.load_table(tmp_path / "sm90.example.json")
    assert example.measured is False and example.arch == "sm90"
    assert all(e["backend"] == "sdpa" and e["ms"] == dict.fromkeys(dispatch.BACKENDS) for e in example.entries.values())
    assert len(example.entries) == 16 * 4  # graphed and eager, inference and training, per case
    assert not (tmp_path / "sm90.json").exists()  # never a table that looks measured
    monkeypatch.setenv(dispatch.ENV_TABLE, str(tmp_path / "sm90.example.json"))
    with pytest.warns(RuntimeWarning, match="unmeasured example"):  # and the runtime refuses the example
        assert dispatch._read_for_arch("sm90") is None


@pytest.fixture(autouse=True)
def _no_env_table(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_TABLE, raising=False)
    yield
    dispatch.reset_cache()


def test_without_cuda_tune_says_it_needs_one(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert runner.run(tune, tmp_path) == {"skipped": "no CUDA"}
    assert "needs CUDA" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_the_race_can_be_narrowed_and_bad_backend_lists_are_refused(tmp_path, capsys):
    from rmt_fast.bench import backends

    assert backends.selected(None) == backends.selected("") == dispatch.BACKENDS
    assert backends.selected("flex, sdpa,triton") == ("triton", "sdpa", "flex")  # the table's order
    for bad, word in (("sdpa,xformers", "unknown backend(s) xformers"), ("triton,flex", "must include sdpa")):
        with pytest.raises(SystemExit):
            cli.main(["tune", "--out", str(tmp_path), "--backends", bad])
        assert word in capsys.readouterr().err


def test_unknown_options_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        cli.main(["tune", "--out", str(tmp_path), "--budget", "x"])
    with pytest.raises(SystemExit):
        cli.main(["flops", "--out", str(tmp_path), "--dry-run"])


def test_candidate_filter():
    limit = tune_plan.ASSUMED_SMEM["sm90"]
    assert tune_plan.infeasible("fwd", (128, 64, 4, 3), 64, limit) is None
    assert "shared memory" in tune_plan.infeasible("fwd", (128, 128, 8, 3), 256, limit)
    assert "accumulators" in tune_plan.infeasible("dkdv", (64, 128, 4, 2), 128, limit)
    keep, rows = tune_plan.candidates("fwd", 128, quick=False, smem_limit=101376)
    assert keep and all(tune_plan.infeasible("fwd", c, 128, 101376) is None for c in keep[1:])
    assert len(rows) >= len(keep) and any(not r["feasible"] for r in rows)
    heuristic = tune_plan.heuristic_config("fwd", 128, "float16")
    assert heuristic is None or keep[0] == heuristic  # the kernel's default is always timed, first


def _rows(case, mode, triton, sdpa, graph=None, status="ok"):
    out = []
    for name, eager in (("triton", triton), ("sdpa", sdpa)):
        r = dict(
            phase="compare",
            mode=mode,
            candidate=name,
            status=status if name == "triton" else "ok",
            eager_ms=eager,
            **tune_plan.case_cols(case),
        )
        if graph is not None:
            r["graph_ms"] = graph[0] if name == "triton" else graph[1]
        out.append(r)
    return out


def test_table_from_measurements_picks_by_the_matching_measurement():
    a = tune_plan.Case("float16", 64, 8, 532, True, True)
    b = tune_plan.Case("bfloat16", 128, 32, 1044, False, False)
    rows = (
        _rows(a, "fwd", triton=0.30, sdpa=0.10, graph=(0.05, 0.10))  # eager: host-bound Triton loses
        + _rows(a, "fwd+bwd", triton=0.51, sdpa=0.52)  # within the margin: SDPA
        + _rows(b, "fwd", triton=0.2, sdpa=0.4, graph=(0.2, 0.1))
        + _rows(b, "fwd+bwd", triton=None, sdpa=0.9, status="error: OutOfResources")
    )
    configs = {("float16", 64): {"fwd": (128, 64, 4, 3)}}
    data = tune_plan.build_table("sm90", ["NVIDIA H200"], configs, rows, 0.03, {"git_sha": "abc"})
    table = dispatch.DispatchTable(data)
    ca, cb = a.shape_class, b.shape_class
    assert table.lookup("float16", 64, ca, needs_grad=False, graphed=True).backend == "triton"
    assert table.lookup("float16", 64, ca, needs_grad=False, graphed=False).backend == "sdpa"
    assert table.lookup("float16", 64, ca, needs_grad=True, graphed=False).backend == "sdpa"
    assert table.lookup("float16", 64, ca, False, True).configs == {"fwd": (128, 64, 4, 3)}
    assert table.lookup("bfloat16", 128, cb, False, False).backend == "triton"
    assert table.lookup("bfloat16", 128, cb, False, True).backend == "sdpa"
    assert table.lookup("bfloat16", 128, cb, True, False).backend == "sdpa"  # Triton failed: SDPA
    entry = table.entries[("float16", 64, ca.t, ca.bh, True, True, False, False, "graphed")]
    assert entry["ms"] == {"triton": 0.05, "sdpa": 0.1} and entry["B"] == 8
    assert len(table.entries) == 6


def test_table_from_a_race_names_the_fastest_stock_backend_and_round_trips(tmp_path):
    a = tune_plan.Case("float16", 64, 8, 532, True, True)
    times = {"triton": 0.30, "sdpa": 0.50, "sdpa_flash": None, "sdpa_efficient": 0.45, "sdpa_cudnn": 0.20, "flex": 0.25}
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        for name, ms in times.items():
            status = "ok" if ms is not None else "unavailable"
            graph = None if ms is None else (ms if mode == "fwd" else 3 * ms)
            rows.append(
                dict(
                    phase="compare",
                    mode=mode,
                    candidate=name,
                    status=status,
                    graph_ms=graph,
                    eager_ms=None if ms is None else 1.0 - ms,
                    **tune_plan.case_cols(a),
                )
            )
    data = tune_plan.build_table("sm90", ["NVIDIA H200"], {}, rows, 0.03, {"git_sha": "abc"})
    path = tmp_path / "sm90.json"
    tune.write_json(path, data)
    table = dispatch.load_table(path)
    assert table.data == data  # the written table reads back as it was built
    cls = a.shape_class
    assert table.lookup("float16", 64, cls, needs_grad=False, graphed=True).backend == "sdpa_cudnn"
    assert table.lookup("float16", 64, cls, needs_grad=True, graphed=True).backend == "sdpa_cudnn"
    assert table.lookup("float16", 64, cls, needs_grad=False, graphed=False).backend == "sdpa"  # eager: 1 - ms
    entry = table.entries[("float16", 64, cls.t, cls.bh, True, True, False, False, "graphed")]
    assert entry["ms"] == times and len(table.entries) == 4


def test_cases_put_the_targets_first():
    first = tune_plan.cases(False)[0]
    assert (first.T, first.B) == (532, 8)
    assert len(tune_plan.cases(False)) == 2 * 3 * 2 * 2 * 2 * 2  # T, B, D, dtype, causal, padded
    assert {(c.T, c.B, c.dtype) for c in tune_plan.cases(True)} == {(532, 8, "float16"), (532, 1, "float16")}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert {c.shape_class.bh for c in tune_plan.cases(False)} == {"BH<=24", "BH<=192", "BH>192"}
        assert {c.shape_class.t for c in tune_plan.cases(False)} == set(dispatch.T_BUCKETS[:2])


# ------------------------------------------------------------------ the GPU pipeline, on the CPU, in small
needs_interpreter = pytest.mark.skipif(
    __import__("os").environ.get("TRITON_INTERPRET") != "1", reason="runs the kernel in Triton's interpreter"
)


def _tiny(monkeypatch, timed):
    """Tiny shapes (fp32, D = 16, 2 heads, T = 24) and stand-in timers that run each call once (the
    interpreter cannot time anything): the code path of a GPU run, without its numbers."""
    cases = [tune_plan.Case("float32", 16, 2, 24, True, True), tune_plan.Case("float32", 16, 2, 24, False, False)]
    monkeypatch.setattr(tune_plan, "H", 2)  # the plan's constants: tune reads them there
    monkeypatch.setattr(tune_plan, "HEAD_DIMS", (16,))
    monkeypatch.setattr(tune_plan, "DTYPES", ("float32",))
    monkeypatch.setattr(tune_plan, "cases", lambda quick: cases)
    monkeypatch.setattr(tune_plan, "sweep_case", lambda d, quick: cases[0])
    grid = {k: dict(block_m=(16,), block_n=(16, 32), warps=(4,), stages=(1,)) for k in ("fwd", "dq", "dkdv")}
    monkeypatch.setattr(tune_plan, "QUICK_GRID", grid)

    def timer(fn, rep_ms):
        out = fn()
        timed.append(out)
        return 1.0 + 0.01 * len(timed)

    monkeypatch.setattr(tune, "graph_ms", timer)
    # the eager stand-in does not call again the step the graphed one has just run (the interpreter is slow)
    monkeypatch.setattr(tune, "eager_ms", lambda fn, target_ms: 2.0 + 0.01 * len(timed))
    return cases


@needs_interpreter
@pytest.mark.parametrize("workers", [0, 1])
def test_tune_pipeline_runs_end_to_end_in_the_interpreter(tmp_path, monkeypatch, workers):
    """Every backend and mode runs. workers=0: the SDPA kernel selection spied on (computed by the math kernel, as
    on a GPU each forced kernel would run); workers=1: the real CPU build, where the efficient and cuDNN kernels do
    not exist and FlexAttention has no backward: rows with the status word, not a crash."""
    timed, forced = [], []
    _tiny(monkeypatch, timed)
    if workers == 0:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        @contextlib.contextmanager
        def spy(kernels):
            forced.append(kernels[0])
            with sdpa_kernel([SDPBackend.MATH]):
                yield

        monkeypatch.setattr(sdpa_attention, "_force_kernel", spy)
    try:
        summary = tune.tune_on(
            torch.device("cpu"),
            tmp_path,
            True,
            arch="sm90",
            smem=101376,
            device_info={"gpu": "cpu stand-in"},
            budget_s=600,
            workers=workers,
            margin=0.03,
            rep_ms=1.0,
        )
    finally:
        launch_configs.set_launch_configs(None)
    assert summary["complete"] and summary["cases_measured"] == 2
    with open(tmp_path / "tune.csv") as fh:
        rows = list(csv.DictReader(fh))
    sweep = [r for r in rows if r["phase"] == "sweep"]
    race = [r for r in rows if r["phase"] == "compare"]
    assert all(r["status"] == "ok" for r in sweep), [r["note"] for r in sweep if r["status"] != "ok"]
    assert {r["mode"] for r in sweep} == {"fwd", "dq", "dkdv"}
    assert all(float(r["host_ms"]) == pytest.approx(float(r["eager_ms"]) - float(r["graph_ms"])) for r in sweep)
    assert sum(r["winner"] == "True" for r in sweep) == 3
    assert len(race) == 2 * 2 * len(dispatch.BACKENDS)  # cases x modes x backends
    modes = ("fwd", "fwd+bwd")
    assert {(r["candidate"], r["mode"]) for r in race} == {(b, m) for b in dispatch.BACKENDS for m in modes}
    cpu_cannot = {("flex", "fwd+bwd")} | (
        {("sdpa_efficient", m) for m in ("fwd", "fwd+bwd")} | {("sdpa_cudnn", m) for m in ("fwd", "fwd+bwd")}
        if workers
        else set()
    )
    for r in race:
        if (r["candidate"], r["mode"]) in cpu_cannot:
            assert r["status"] == "unavailable" and r["note"], r
        else:
            assert r["status"] == "ok", (r["candidate"], r["mode"], r["note"])
            assert float(r["host_ms"]) == pytest.approx(float(r["eager_ms"]) - float(r["graph_ms"]))
    if workers == 0:  # each forced kernel ran, per case and mode (the graphed stand-in calls the step once)
        for name in ("sdpa_flash", "sdpa_efficient", "sdpa_cudnn"):
            assert forced.count(sdpa_attention.SDPA_KERNELS[name]) == 2 * 2, name
    table = dispatch.load_table(tmp_path / "sm90.json")
    assert table.measured and table.format == dispatch.FORMAT
    assert set(table.configs) == {("float32", 16)} and len(table.configs[("float32", 16)]) == 3
    assert len(table.entries) == 2 * 4
    assert all(
        set(e["ms"]) == set(dispatch.BACKENDS) and e["backend"] in dispatch.BACKENDS for e in table.entries.values()
    )
    env = json.loads((tmp_path / "tune_env.json").read_text())
    assert env["gpu"] == "cpu stand-in" and env["git_sha"] and env["precompile"][0]["jobs"] == len(sweep)
    if workers:
        assert env["precompile"][0]["done"] == len(sweep) and env["precompile"][0]["errors"] == 0
        assert env["precompile"][1]["done"] == 2 and env["precompile"][1]["errors"] == 0
    assert (tmp_path / "tune.png").stat().st_size > 0
    # what was timed computed attention: forward outputs are finite (B, T, H, D) tensors
    fwd = [t for t in timed if isinstance(t, torch.Tensor)]
    assert fwd and all(t.shape == (2, 24, 2, 16) and torch.isfinite(t).all() for t in fwd)


@needs_interpreter
def test_tune_stops_at_the_budget_and_writes_what_it_has(tmp_path, monkeypatch):
    _tiny(monkeypatch, [])
    summary = tune.tune_on(
        torch.device("cpu"),
        tmp_path,
        True,
        arch="sm90",
        smem=101376,
        device_info={},
        budget_s=0.0,
        workers=0,
        margin=0.03,
        rep_ms=1.0,
    )
    assert summary["complete"] is False and summary["cases_measured"] == 0
    table = dispatch.load_table(tmp_path / "sm90.json")
    assert table.entries == {} and table.provenance["complete"] is False
    with open(tmp_path / "tune.csv") as fh:
        assert all(r["status"] == "over_budget" for r in csv.DictReader(fh))


@needs_interpreter
def test_precompiler_stops_at_its_deadline():
    import time

    pre = tune.Precompiler(1)
    try:  # a bound on work, not on seconds: no candidate is finished past the deadline, the pool is gone
        slow = dict(case=vars(tune_plan.Case("float32", 64, 4, 532, True, True)), modes=["fwd+bwd"], device="cpu")
        stats = pre.run([slow, slow], deadline=time.perf_counter() + 0.5, desc="test")
        assert stats["stopped_at_deadline"] and stats["done"] == 0 and stats["errors"] == 0 and pre.pool is None
        again = pre.run([slow], deadline=time.perf_counter() + 60, desc="test")  # no pool: nothing is tried
        assert again["done"] == 0 and not again["stopped_at_deadline"]
    finally:
        pre.close()


def test_a_failed_measurement_gets_the_runners_status_words():
    assert tune._error(torch.OutOfMemoryError("CUDA out of memory"))["status"] == "oom"
    failed = tune._error(ValueError("bad\nshape"))
    assert failed == {"status": "error", "note": "ValueError: bad shape"}
    refused = RuntimeError("No available kernel. Aborting execution.")  # a forced SDPA kernel that does not apply
    assert tune._error(refused)["status"] == "unavailable"
    assert tune._error(NotImplementedError("FlexAttention does not support backward on CPU"))["status"] == "unavailable"
    assert tune._error(ValueError("flex_rmt_attention: a decode step"))["status"] == "unavailable"


def test_a_warm_up_job_runs_the_backends_it_names():
    """What a compile worker runs for FlexAttention (queued on CUDA; here eagerly, forward only) and the like."""
    case = tune_plan.Case("float32", 16, 2, 24, True, True)
    job = dict(case=vars(case), modes=["fwd"], device="cpu", backends=["flex", "sdpa"])
    assert tune._warm_job(job) == "ok"
    assert "no backward on the CPU" in tune._warm_job({**job, "modes": ["fwd+bwd"]})  # the failure, as a note
    assert tune._flex_jobs(True, torch.device("cpu")) == []
    jobs = tune._flex_jobs(True, torch.device("cuda"))
    assert len(jobs) == len(tune_plan.cases(True)) and all(j["backends"] == ["flex"] for j in jobs)
