"""`rmt-fast-bench tune`: tune the Triton kernel's launch configurations (phase 1), race it against every stock
backend (SDPA choosing, SDPA flash / efficient / cuDNN forced, FlexAttention) on the RMT shapes (phase 2: forward
and forward + backward, each timed under a CUDA graph (device time) and eagerly (host time = eager - device)) and
write the dispatch table that ``attn_backend="auto"`` reads (GPU only; ``--dry-run`` anywhere: the plan, no
timing). A hard ``--budget-s`` (compilation included; ``--workers`` processes compile ahead of the timing).
What is swept and the outputs: docs/benchmarks.md, section ``tune``; the plan itself:
:mod:`rmt_fast.bench.tune_plan`.
"""

from __future__ import annotations

import inspect
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

from rmt_fast.kernels import dispatch, launch_configs

from . import backends, tune_plan
from .common import attention_step, bench_layout, env_info, machine_label, pyplot, save_plot, write_csv, write_json
from .runner import Benchmark, Option, Timer

DEFAULT_BUDGET_S = 240.0
SWEEP_SHARE = 0.45  # phase 1 may use this fraction of the budget


# ============================================================================================= measuring
def _layout(c: tune_plan.Case, device):
    return bench_layout(
        c.B, c.T, causal=c.causal, padded=c.padded, device=device, seed=c.B * 1000 + c.T, mem=tune_plan.MEM
    )


def _tensors(c: tune_plan.Case, device, seed: int = 0):
    """q, k, v as (B, H, T, D) views of (B, T, H, D) storage (the projections' layout), the output grad."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    dtype = getattr(torch, c.dtype)
    shape = (c.B, c.T, tune_plan.H, c.head_dim)
    q, k, v, do = (torch.randn(shape, device=device, dtype=dtype, generator=g) for _ in range(4))
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), do


def _triton_impl(layout):
    from rmt_fast.kernels.triton_attention import rmt_attention

    return lambda q, k, v: rmt_attention(q, k, v, layout, check=False)


def graph_ms(fn, rep_ms: float) -> float:
    """Device time of one call, replayed from a CUDA graph (host time excluded): the runner's timer, median."""
    return Timer("cuda").graphed(fn, rep_ms=rep_ms).ms


def eager_ms(fn, target_ms: float) -> float:
    """Wall time of one call among back-to-back eager calls (host time included): the runner's timer, median of 3
    samples of n calls, n sized so that a sample takes about ``target_ms``."""
    return Timer("cuda").eager(fn, target_ms=target_ms).ms


def split_ms(fn, rep_ms: float) -> dict:
    """``graph_ms`` (device time), ``eager_ms`` (host included) and ``host_ms`` = eager - device, of one call."""
    graph = graph_ms(fn, rep_ms)
    eager = eager_ms(fn, rep_ms / 2)
    return {"graph_ms": graph, "eager_ms": eager, "host_ms": eager - graph}


def _error(exc: BaseException) -> dict:
    """A failed measurement's status (``unavailable`` where the backend refused the case, else the runner's words
    and OOM rule) and note."""
    return backends.failure(exc)


# --------------------------------------------------------------------------------- parallel compilation
def _warm_job(job: dict) -> str:
    """Worker: run one variant once so Triton compiles it into the on-disk cache the timing process reads."""
    import torch

    try:
        c = tune_plan.Case(**job["case"])
        q, k, v, do = _tensors(c, torch.device(job.get("device", "cuda")))
        layout = _layout(c, q.device)
        if job.get("configs"):  # phase 2: the tuned configs of this dtype and head dim, as the runtime installs
            dtype = getattr(torch, c.dtype)
            configs = job["configs"].items()
            launch_configs.set_launch_configs({(kd, c.head_dim, dtype): tuple(cfg) for kd, cfg in configs})
        override = {job["kind"]: tuple(job["config"])} if job.get("config") else {}
        fns = backends.impls(layout, q, k, v, tuple(job.get("backends", ("triton",))))
        with launch_configs.override_configs(**override):
            for fn in fns.values():
                for mode in job["modes"]:
                    if not isinstance(fn, str):
                        attention_step(mode, fn, q, k, v, do)()
        _sync(q.device)
        return "ok"
    except Exception as exc:  # the timing process meets (and records) the same error
        return _error(exc)["note"]


class Precompiler:
    """A pool of spawned worker processes that compile variants ahead of the timing (0 workers: none)."""

    def __init__(self, workers: int):
        self.pool = None
        if workers > 0:
            import multiprocessing as mp

            self.pool = mp.get_context("spawn").Pool(workers)

    def start(self, jobs: list[dict]):
        """Queue ``jobs`` behind those already queued and return at once; :meth:`wait` collects them."""
        it = self.pool.imap_unordered(_warm_job, jobs) if self.pool is not None and jobs else None
        return jobs, it, time.perf_counter()

    def run(self, jobs: list[dict], deadline: float, desc: str) -> dict:
        return self.wait(self.start(jobs), deadline, desc)

    def wait(self, started, deadline: float, desc: str) -> dict:
        jobs, it, t0 = started
        stats = {"jobs": len(jobs), "done": 0, "errors": 0, "seconds": 0.0, "stopped_at_deadline": False}
        if self.pool is None or it is None:
            return stats
        import multiprocessing as mp

        from tqdm.auto import tqdm

        with tqdm(total=len(jobs), desc=desc, unit="variant", disable=None) as bar:
            for _ in jobs:
                left = deadline - time.perf_counter()
                try:
                    if left <= 0:
                        raise TimeoutError
                    status = it.next(timeout=left)
                except (TimeoutError, mp.TimeoutError):
                    stats["stopped_at_deadline"] = True
                    self.close()  # a worker stuck compiling must not hold the run past its budget
                    break
                except Exception:  # a broken pool: the timing process compiles for itself
                    stats["errors"] += 1
                    break
                stats["done"] += 1
                stats["errors"] += int(status != "ok")
                bar.update()
        stats["seconds"] = round(time.perf_counter() - t0, 2)
        return stats

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None


# ======================================================================================== the two phases
def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sweep(
    quick: bool, smem_limit: int, deadline: float, rep_ms: float, pre: Precompiler, device, then: list[dict] = ()
):
    """Phase 1: ({(dtype, head_dim): {kind: config}}, the candidate rows, the precompile stats, the started
    ``then`` jobs: queued behind phase 1's own, compiled while phase 1 times)."""
    from tqdm.auto import tqdm

    plan = []
    for d in tune_plan.HEAD_DIMS:
        for kind in dispatch.KINDS:
            cands, _ = tune_plan.candidates(kind, d, quick, smem_limit)
            plan += [(d, kind, cfg) for cfg in cands]
    modes = {"fwd": ["fwd"], "dq": ["dq"], "dkdv": ["dkdv"]}
    jobs = [
        dict(
            case=asdict(tune_plan.sweep_case(d, quick)),
            kind=kind,
            config=list(cfg),
            modes=modes[kind],
            device=str(device),
        )
        for d, kind, cfg in plan
    ]
    started = pre.start(jobs)
    later = pre.start(list(then))
    pre_stats = pre.wait(started, deadline, "tune: compiling candidates")
    rows, best = [], {}
    for d, kind, cfg in tqdm(plan, desc="tune: configs", unit="config", disable=None):
        case = tune_plan.sweep_case(d, quick)
        row = dict(
            phase="sweep",
            mode=kind,
            candidate="triton",
            config=tune_plan.cfg_text(cfg),
            heuristic=cfg == tune_plan.heuristic_config(kind, d, case.dtype),
            **tune_plan.case_cols(case),
        )
        if time.perf_counter() > deadline:
            rows.append({**row, "status": "over_budget", "note": "not run: the budget is spent"})
            continue
        try:
            q, k, v, do = _tensors(case, device)
            fn = attention_step(kind, _triton_impl(_layout(case, device)), q, k, v, do)
            with launch_configs.override_configs(**{kind: cfg}):
                row.update(split_ms(fn, rep_ms))
            row.update(status="ok", note="")
            if row["graph_ms"] < best.get((d, kind), (math.inf, None))[0]:
                best[(d, kind)] = (row["graph_ms"], cfg)
        except Exception as exc:
            row.update(_error(exc))
            _sync(device)
        rows.append(row)
    configs = {}
    for (d, kind), (_, cfg) in best.items():
        for dt in tune_plan.DTYPES:
            configs.setdefault((dt, d), {})[kind] = tuple(cfg)
    winners = {(d, kind, tune_plan.cfg_text(cfg)) for (d, kind), (_, cfg) in best.items()}
    for r in rows:
        r["winner"] = (r["head_dim"], r["mode"], r["config"]) in winners
    return configs, rows, pre_stats, later


def _flex_jobs(quick: bool, device, race: tuple[str, ...] = backends.RACED) -> list[dict]:
    """FlexAttention is compiled per shape (dynamic=False): a warm-up job per case, at its own shape, fills
    Inductor's on-disk cache (on CUDA only: elsewhere it runs eagerly, nothing to compile). Queued before phase 1
    runs, so they compile while it times."""
    if device.type != "cuda" or "flex" not in race:
        return []
    return [
        dict(case=asdict(c), modes=["fwd", "fwd+bwd"], device=str(device), backends=["flex"])
        for c in tune_plan.cases(quick)
    ]


def _compare(
    quick: bool,
    configs: dict,
    deadline: float,
    rep_ms: float,
    pre: Precompiler,
    device,
    flex=None,
    race: tuple[str, ...] = backends.RACED,
):
    """Phase 2: every backend of ``race`` (Triton with the tuned configs installed) on every case,
    forward and forward + backward, each timed graphed and eager. ``flex``: the started FlexAttention warm-up
    jobs (:func:`_flex_jobs`), waited for before the timing."""
    import torch
    from tqdm.auto import tqdm

    launch_configs.set_launch_configs(
        {(kind, d, getattr(torch, dt)): cfg for (dt, d), kinds in configs.items() for kind, cfg in kinds.items()}
    )
    variants = sorted({(c.dtype, c.head_dim, c.causal, c.padded) for c in tune_plan.cases(quick)})
    warm_t = min(c.T for c in tune_plan.cases(quick))
    jobs = [
        dict(
            case=asdict(tune_plan.Case(dt, d, 2, warm_t, causal, padded)),
            modes=["fwd", "fwd+bwd"],
            device=str(device),
            configs={kind: list(cfg) for kind, cfg in configs.get((dt, d), {}).items()},
        )
        for dt, d, causal, padded in variants
    ]
    pre_stats = pre.run(jobs, deadline, "tune: compiling variants")
    pre_stats["flex"] = pre.wait(flex if flex is not None else pre.start([]), deadline, "tune: compiling flex")
    rows = []
    for c in tqdm(tune_plan.cases(quick), desc="tune: racing the backends", unit="case", disable=None):
        if time.perf_counter() > deadline:
            break
        try:
            q, k, v, do = _tensors(c, device)
            layout = _layout(c, device)
            fns = backends.impls(layout, q, k, v, race)
        except Exception as exc:  # e.g. out of memory for the largest shapes
            rows.append(dict(phase="compare", mode="fwd", candidate="sdpa", **tune_plan.case_cols(c), **_error(exc)))
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        for mode in ("fwd", "fwd+bwd"):
            for name in race:
                row = dict(
                    phase="compare", mode=mode, candidate=name, config="", heuristic="", **tune_plan.case_cols(c)
                )
                if name == "triton":
                    kinds = configs.get((c.dtype, c.head_dim), {})
                    row["config"] = " / ".join(f"{k}={tune_plan.cfg_text(v)}" for k, v in kinds.items()) or "heuristic"
                fn = fns[name]
                if isinstance(fn, str):
                    rows.append({**row, "status": "unavailable", "note": fn})
                    continue
                try:
                    row.update(split_ms(attention_step(mode, fn, q, k, v, do), rep_ms))
                    row.update(status="ok", note="")
                except Exception as exc:
                    row.update(_error(exc))
                    _sync(device)
                rows.append(row)
        del q, k, v, do, layout, fns
    return rows, pre_stats


# ================================================================================================ outputs
def hopper_paths() -> dict:
    """What the installed Triton offers for Hopper (recorded; the kernel has no variant using them)."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return {"triton": None}
    ws = False
    try:
        ws = "warp_specialize" in inspect.signature(tl.range.__init__).parameters
    except (TypeError, ValueError):
        pass
    return {
        "triton": triton.__version__,
        "tl.make_tensor_descriptor": hasattr(tl, "make_tensor_descriptor"),
        "tl.range(warp_specialize=...)": ws,
        "swept": False,
        "why": "triton_kernels.py has no tensor-descriptor (TMA) or warp-specialized kernel variant to switch to",
    }


def _plot(rows: list[dict], title: str):
    """Per case and measurement: the best stock backend's time over Triton's (above 1: Triton is faster)."""
    plt = pyplot()
    panels = [
        ("fwd", "graph_ms", "forward, CUDA graph (device time)"),
        ("fwd", "eager_ms", "forward, eager"),
        ("fwd+bwd", "graph_ms", "forward + backward, CUDA graph (device time)"),
        ("fwd+bwd", "eager_ms", "forward + backward, eager"),
    ]
    labels = list(dict.fromkeys(r["label"] for r in rows if r.get("label")))
    ok = {(r["label"], r["mode"], r["candidate"]): r for r in rows if r["status"] == "ok"}
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8, 0.22 * len(labels) + 2), 12), sharex=True)
    for ax, (mode, col, name) in zip(axes, panels):
        ratios = []
        for lab in labels:
            t = (ok.get((lab, mode, "triton")) or {}).get(col)
            stock = [r.get(col) for n in backends.RACED if n != "triton" and (r := ok.get((lab, mode, n)))]
            s = min((x for x in stock if x), default=None)
            ratios.append(s / t if t and s else math.nan)
        colors = ["tab:green" if x >= 1 else "tab:red" for x in ratios]
        ax.bar(range(len(labels)), [0 if math.isnan(x) else x for x in ratios], color=colors)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_ylabel("best stock ms / Triton ms", fontsize=8)
        ax.set_title(name, fontsize=9)
    axes[-1].set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
    fig.suptitle(title, fontsize=9)
    return fig


def _provenance(env: dict, args: dict, complete: bool) -> dict:
    keep = ("device_name", "torch", "cuda", "triton", "git_sha", "timestamp", "python")
    return {"tool": "rmt-fast-bench tune", **{k: env.get(k) for k in keep}, **args, "complete": complete}


def dry_run(out_dir: Path, quick: bool, arch: str | None = None, margin: float = dispatch.DEFAULT_MARGIN) -> dict:
    """The plan without timing (any machine): candidates, cases and an unmeasured example table."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    smem = None
    if arch is None:
        try:
            import torch

            if torch.cuda.is_available():
                arch = dispatch.arch_of(0)
                smem = torch.cuda.get_device_properties(0).shared_memory_per_block_optin
        except Exception:
            arch = None
    arch = arch or "sm90"
    smem = smem or tune_plan.ASSUMED_SMEM.get(arch, 101376)
    cand_rows, configs = [], {}
    for d in tune_plan.HEAD_DIMS:
        for kind in dispatch.KINDS:
            keep, rows = tune_plan.candidates(kind, d, quick, smem)
            cand_rows += rows
            if keep:
                for dt in tune_plan.DTYPES:
                    configs.setdefault((dt, d), {})[kind] = keep[0]  # the heuristic (or the first feasible)
    write_csv(out_dir / "tune_candidates.csv", cand_rows)
    plan = [dict(label=c.label(), **tune_plan.case_cols(c)) for c in tune_plan.cases(quick)]
    example_rows = []
    for p in plan:  # no numbers: an example of the format, every entry SDPA
        for mode in ("fwd", "fwd+bwd"):
            for name in backends.RACED:
                example_rows.append(dict(phase="compare", mode=mode, candidate=name, status="ok", **p))
    env = env_info()
    prov = {
        "tool": "rmt-fast-bench tune --dry-run",
        "git_sha": env["git_sha"],
        "timestamp": env["timestamp"],
        "note": "example of the format: nothing was measured; the runtime refuses unmeasured tables",
    }
    table = tune_plan.build_table(arch, [], configs, example_rows, margin, prov, measured=False)
    write_json(out_dir / f"{arch}.example.json", table)
    n_feasible = sum(r["feasible"] for r in cand_rows)
    write_json(
        out_dir / "tune_plan.json",
        {
            "arch": arch,
            "smem_limit": smem,
            "quick": quick,
            "candidates_feasible": n_feasible,
            "candidates_total": len(cand_rows),
            "cases": plan,
            "hopper_paths": hopper_paths(),
            "env": env,
        },
    )
    print(
        f"tune --dry-run ({arch}, shared memory limit {smem} B): {n_feasible} feasible of {len(cand_rows)} "
        f"candidate configs, {len(plan)} cases -> {out_dir}"
    )
    return {
        "dry_run": True,
        "arch": arch,
        "candidates_feasible": n_feasible,
        "cases": len(plan),
        "table": str(out_dir / f"{arch}.example.json"),
    }


def run(ctx) -> dict:
    import torch

    margin = ctx.option("margin")
    if ctx.option("dry_run"):
        return dry_run(ctx.out_dir, ctx.quick, ctx.option("arch"), margin)
    if not ctx.cuda:
        print("no GPU: `rmt-fast-bench tune` needs CUDA (use --dry-run to see the plan)")
        return {"skipped": "no CUDA"}
    arch = dispatch.arch_of(0)
    props = torch.cuda.get_device_properties(0)
    smem = getattr(props, "shared_memory_per_block_optin", None) or tune_plan.ASSUMED_SMEM.get(arch, 101376)
    workers = ctx.option("workers")
    if workers is None:
        workers = max(0, min(12, (os.cpu_count() or 2) - 2))
    device_info = dict(gpu=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)))
    return tune_on(
        torch.device("cuda", 0),
        ctx.out_dir,
        ctx.quick,
        arch=arch,
        smem=smem,
        device_info=device_info,
        budget_s=ctx.budget_s,
        workers=workers,
        margin=margin,
        rep_ms=ctx.option("rep_ms"),
        race=ctx.option("backends") or backends.RACED,
    )


def tune_on(
    device,
    out_dir: Path,
    quick: bool,
    *,
    arch: str,
    smem: int,
    device_info: dict,
    budget_s: float,
    workers: int,
    margin: float,
    rep_ms: float,
    race: tuple[str, ...] = backends.RACED,
) -> dict:
    """Both phases on ``device`` and the outputs (``run`` calls it on CUDA; a CPU test, in the interpreter with
    stand-in timers)."""
    t_start = time.perf_counter()
    deadline = t_start + budget_s
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pre = Precompiler(workers)
    try:
        sweep_deadline = t_start + SWEEP_SHARE * budget_s
        configs, sweep_rows, pre1, flex = _sweep(
            quick, smem, sweep_deadline, rep_ms, pre, device, then=_flex_jobs(quick, device, race)
        )
        t_sweep = time.perf_counter() - t_start
        compare_rows, pre2 = _compare(quick, configs, deadline, rep_ms, pre, device, flex, race)
    finally:
        pre.close()
    n_cases = len(tune_plan.cases(quick))
    measured_cases = len(
        {
            (r["dtype"], r["head_dim"], r["B"], r["T"], r["causal"], r["padded"])
            for r in compare_rows
            if r["status"] == "ok"
        }
    )
    complete = measured_cases == n_cases and not any(r["status"] == "over_budget" for r in sweep_rows)
    for r in compare_rows:
        r["label"] = tune_plan.Case(r["dtype"], r["head_dim"], r["B"], r["T"], r["causal"], r["padded"]).label()
    env = env_info()
    env.update(
        **device_info,
        arch=arch,
        smem_limit=smem,
        hopper_paths=hopper_paths(),
        budget_s=budget_s,
        quick=quick,
        workers=workers,
        backends=list(race),
        margin=margin,
        rep_ms=rep_ms,
        seconds=round(time.perf_counter() - t_start, 1),
        sweep_seconds=round(t_sweep, 1),
        precompile=[pre1, pre2],
        complete=complete,
        cases_measured=measured_cases,
        cases_planned=n_cases,
    )
    prov = _provenance(
        env,
        dict(
            budget_s=budget_s,
            quick=quick,
            margin=margin,
            configs_tuned_on=tune_plan.sweep_case(64, quick).label().replace("D64 ", ""),
        ),
        complete,
    )
    table = tune_plan.build_table(arch, [env.get("gpu") or env["device_name"]], configs, compare_rows, margin, prov)
    dispatch.DispatchTable(table)  # validate what is written
    write_csv(out_dir / "tune.csv", sweep_rows + compare_rows)
    write_json(out_dir / f"{arch}.json", table)
    write_json(out_dir / "tune_env.json", env)
    title = (
        f"Triton RMT attention vs the best stock backend, H={tune_plan.H} - {machine_label()} "
        f"(torch {env['torch']}, triton {env['triton']})"
    )
    save_plot(_plot(compare_rows, title), out_dir / "tune.png")
    summary = {
        "arch": arch,
        "seconds": env["seconds"],
        "complete": complete,
        "cases_measured": measured_cases,
        "cases_planned": n_cases,
        "table": str(out_dir / f"{arch}.json"),
    }
    for _, _, needs_grad, mode in tune_plan.MEASUREMENTS:
        sel = [e for e in table["entries"] if e["mode"] == mode and e["needs_grad"] == needs_grad]
        name = f"{mode} {'training' if needs_grad else 'inference'}"
        won = {b: sum(e["backend"] == b for e in sel) for b in backends.RACED}
        summary[f"winners ({name})"] = ", ".join(f"{b} {n}" for b, n in won.items() if n) + f" of {len(sel)}"
    return summary


BENCHMARK = Benchmark(
    "tune",
    run=run,
    budget_s=DEFAULT_BUDGET_S,
    options=(
        Option("--dry-run", action="store_true", help="enumerate candidates and cases, write an example table"),
        Option("--workers", type=int, default=None, help="compile processes (default: CPUs - 2, at most 12)"),
        Option(
            "--margin",
            type=float,
            default=dispatch.DEFAULT_MARGIN,
            help="Triton wins an entry only when faster than SDPA by this fraction",
        ),
        Option("--arch", default=None, help="--dry-run only: the architecture to plan for (default: sm90)"),
        Option("--rep-ms", type=float, default=10.0, help="timing repetition target per measurement"),
        Option(
            "--backends",
            type=backends.selected,
            default=None,
            help=f"comma-separated backends to race (default: all of {','.join(backends.RACED)}; sdpa is required)",
        ),
    ),
)
