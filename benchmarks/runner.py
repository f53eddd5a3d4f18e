"""The benchmark runner: the command line, the timer, the status of every row, the files, the progress bar.

    rmt-fast-bench NAME [--out DIR] [--quick] [--budget-s S] [--device cpu|cuda] [the benchmark's options]
    rmt-fast-bench all  [--out DIR] [--quick]       # every benchmark but NOT_IN_ALL, each in DIR/<name>/

A benchmark is a module of ``rmt_fast.bench`` (the ``benchmarks/`` folder), listed in ``BENCHMARKS``, that
defines ``BENCHMARK = Benchmark(name, cases, measure, summarize=..., plot=..., markdown=..., options=...)``:

* ``cases(ctx) -> [dict]``: the sweep; a case's keys become its row's first columns;
* ``measure(ctx, case, state) -> dict``: one case's measured columns (raise to fail the case; ``state`` is a
  dict per series, e.g. the model built for the series' first case);
* ``summarize(ctx, rows) -> (summary, record)``: the console summary and the JSON beside the rows; ``plot(ctx,
  rows, record)`` a matplotlib figure; ``markdown(ctx, rows, record)`` a Markdown table.

The runner builds ``ctx`` (:class:`Context`: ``out_dir``, ``quick``, ``budget_s``, ``device``, ``options``,
``timer``, ``peak`` memory), runs every case under tqdm and writes ``DIR/<name>.csv``, ``.json`` (``{"env",
"summary", **record}``), ``.png`` and ``.md``. A benchmark whose work is not one sweep gives ``run(ctx) ->
summary`` instead and calls ``ctx.sweep`` and ``ctx.write_*`` itself. ``needs_cuda=True`` skips it without CUDA.

Every case gives one row with ``status`` one of :data:`STATUS`: ``ok``; ``oom`` (CUDA memory is freed and the
sweep goes on); ``error`` (the note holds the exception); ``over_budget`` (the ``--budget-s`` budget was spent
before the case, or the measurement raised :class:`OverBudget`, which may carry the measured row);
``unavailable`` (:class:`Unavailable`: a missing library, an unsupported case); ``skipped`` (an earlier case of
its series failed). A series is the cases sharing the values of ``Benchmark.series``; after a failure
``after_failure="stop"`` ends the series, ``"record"`` gives each later case a ``skipped`` row, ``"continue"``
runs them all. A series' ``state`` is let go when the next series starts; with ``keep_states=True`` every
series keeps its own for the whole sweep, so that ``cases`` may interleave the series (e.g. every method at
one length before any at the next: a ``--budget-s`` that runs out then leaves side-by-side rows).

One timer, :class:`Timer` (``ctx.timer``): median, p20 and p80, in seconds. On CUDA a sample is CUDA-event
time (``clock="device"``); ``clock="wall"`` is ``perf_counter`` between two synchronisations, ``clock="host"``
``perf_counter`` around the calls with no synchronisation inside. On the CPU every clock is ``perf_counter``
(process CPU time beside it, ``cpu_s``). ``Timer.kernel`` is ``triton.testing.do_bench`` with
``return_mode="median"``, ``Timer.graphed`` the same under a CUDA graph (device time alone), ``Timer.eager`` the
wall time of back-to-back eager calls (host time included; host time = eager - graphed). The environment record
(:func:`rmt_fast.bench.common.env_info`) goes into every JSON file; model shapes come from
:mod:`rmt_fast.bench.presets`.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import math
import statistics
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .common import PeakMemory, env_info, save_plot, write_csv, write_json

STATUS = ("ok", "oom", "over_budget", "error", "unavailable", "skipped")
FAILED = ("oom", "over_budget", "error")

BENCHMARKS: dict[str, str] = {
    "flops": "rmt_fast.bench.flops",
    "latency": "rmt_fast.bench.latency",
    "profile": "rmt_fast.bench.profile",
    "kernels": "rmt_fast.bench.kernels",
    "compare": "rmt_fast.bench.compare_cpu",
    "train-memory": "rmt_fast.bench.train_memory",
    "cuda-graph": "rmt_fast.bench.cuda_graph",
    "input-checks": "rmt_fast.bench.input_checks",
    "host-overhead": "rmt_fast.bench.host_overhead",
    "tune": "rmt_fast.bench.tune",
    "train": "rmt_fast.bench.train",
    "armt": "rmt_fast.bench.armt",
    "eval-stream": "rmt_fast.bench.eval_stream",
    "segment-breakdown": "rmt_fast.bench.segment_breakdown",
}
# Run only when asked for by name: too long for `all` on a 2-core CPU (compare ~10 min, train-memory ~4 min,
# eval-stream ~2 min), or GPU-only (cuda-graph, tune), or long on a GPU (train: bert-base and a 1B decoder), or
# compiling for minutes (segment-breakdown).
NOT_IN_ALL: frozenset[str] = frozenset(
    {"train", "tune", "compare", "train-memory", "cuda-graph", "armt", "eval-stream", "segment-breakdown"}
)


class OverBudget(Exception):
    """Raised by a measurement that would run (or ran) past its budget: the row's status is ``over_budget``;
    ``row``: what was measured before the budget was found spent (kept in the row)."""

    def __init__(self, why: str, row: dict | None = None):
        super().__init__(why)
        self.row = row or {}


class Unavailable(Exception):
    """Raised by a measurement that cannot run here (a missing library, an unsupported case)."""


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory error (CUDA or host)."""
    import torch

    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def free_memory(cuda: bool) -> None:
    gc.collect()
    if cuda:
        import torch

        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ timing
@dataclass(frozen=True)
class Timing:
    """Seconds per call: the median and the 20th / 80th percentiles over ``samples`` samples."""

    median_s: float
    p20_s: float
    p80_s: float
    samples: int
    cpu_s: float | None = None  # median process CPU time per call (CPU clocks)

    @property
    def ms(self) -> float:
        return 1e3 * self.median_s


def _quantile(sorted_xs: list[float], q: float) -> float:
    pos = q * (len(sorted_xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def timing_of(samples: list[float], cpu: list[float] | None = None) -> Timing:
    xs = sorted(samples)
    return Timing(
        statistics.median(xs), _quantile(xs, 0.2), _quantile(xs, 0.8), len(xs), statistics.median(cpu) if cpu else None
    )


class Timer:
    """The one timer of the benchmarks (see the module docstring)."""

    def __init__(self, device):
        import torch

        self.torch = torch
        self.cuda = getattr(device, "type", str(device)) == "cuda"

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def __call__(
        self, fn: Callable[[], Any], *, repeats: int = 3, warmup: int = 1, inner: int = 1, clock: str = "device"
    ) -> Timing:
        """``warmup`` untimed calls, then ``repeats`` samples of ``inner`` back-to-back calls each."""
        if clock not in ("device", "wall", "host"):
            raise ValueError(f"Timer: clock must be 'device', 'wall' or 'host', got {clock!r}")
        for _ in range(warmup):
            fn()
        self.sync()
        samples, cpu = [], []
        for _ in range(repeats):
            if self.cuda and clock == "device":
                start, end = (self.torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
                for _ in range(inner):
                    fn()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end) / 1e3 / inner)
                continue
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(inner):
                fn()
            if clock == "wall":
                self.sync()
            samples.append((time.perf_counter() - t0) / inner)
            cpu.append((time.process_time() - c0) / inner)
            self.sync()
        return timing_of(samples, cpu)

    def kernel(self, fn: Callable[[], Any], *, warmup_ms: float = 25, rep_ms: float = 100) -> Timing:
        """GPU: ``triton.testing.do_bench`` (device time of back-to-back calls, L2 flushed between them). A backward
        step should return its gradients (``torch.autograd.grad``, as ``common.attention_step`` does) rather than
        accumulate them into ``.grad``."""
        from triton.testing import do_bench

        med, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8], return_mode="median")
        return Timing(med / 1e3, p20 / 1e3, p80 / 1e3, 0)

    def eager(self, fn: Callable[[], Any], *, target_ms: float = 5) -> Timing:
        """Wall time of one call among back-to-back eager calls (host time included): 3 samples of n calls, n sized
        so that a sample takes about ``target_ms``. With :meth:`graphed` (device time) it splits a call's time:
        host time = eager - graphed."""
        one = self(fn, repeats=1, warmup=1, clock="wall").ms
        n = int(min(200, max(3, target_ms / max(one, 1e-3))))
        return self(fn, repeats=3, warmup=0, inner=n, clock="wall")

    def graphed(self, fn: Callable[[], Any], *, rep_ms: float = 20) -> Timing:
        """GPU: device time of one call replayed from a CUDA graph (host time excluded)."""
        from triton.testing import do_bench_cudagraph

        med, p20, p80 = do_bench_cudagraph(fn, rep=rep_ms, quantiles=[0.5, 0.2, 0.8], return_mode="median")
        return Timing(med / 1e3, p20 / 1e3, p80 / 1e3, 0)


# ------------------------------------------------------------------------------------------------ the API
@dataclass(frozen=True)
class Option:
    """A benchmark's own command-line option: the arguments of ``argparse.ArgumentParser.add_argument``."""

    flags: tuple[str, ...]
    kwargs: dict

    def __init__(self, *flags: str, **kwargs):
        object.__setattr__(self, "flags", flags)
        object.__setattr__(self, "kwargs", kwargs)


def names(text: str) -> list[str]:
    """An option type: comma-separated names."""
    return [x.strip() for x in text.split(",") if x.strip()]


def ints(text: str) -> list[int]:
    """An option type: comma-separated ints."""
    try:
        return [int(x) for x in names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None


@dataclass(frozen=True)
class Benchmark:
    """What a benchmark declares (see the module docstring)."""

    name: str
    cases: Callable[[Context], Iterable[dict]] | None = None
    measure: Callable[[Context, dict, dict], dict] | None = None
    summarize: Callable[[Context, list[dict]], tuple[dict, dict]] | None = None
    plot: Callable[[Context, list[dict], dict], Any] | None = None
    markdown: Callable[[Context, list[dict], dict], str] | None = None
    run: Callable[[Context], dict] | None = None
    options: tuple[Option, ...] = ()
    series: tuple[str, ...] = ()
    after_failure: str = "stop"
    keep_states: bool = False  # True: each series keeps its state all sweep long (interleaved cases)
    needs_cuda: bool = False
    budget_s: float | None = None  # the default of --budget-s (None: no budget)
    cpu_threads: int | None = None  # on the CPU: torch threads while it runs (1: robust to other load)


@dataclass
class Context:
    """What a benchmark's functions get: where to write, how long, on what, and the shared tools."""

    name: str
    out_dir: Path
    quick: bool = False
    budget_s: float | None = None
    device: Any = None
    options: argparse.Namespace = field(default_factory=argparse.Namespace)
    clock: Callable[[], float] = time.perf_counter

    def __post_init__(self):
        import torch

        if self.device is None:
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(self.device)
        self.out_dir = Path(self.out_dir)
        self.timer = Timer(self.device)
        self.peak = PeakMemory(self.cuda)
        self.started = self.clock()

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def deadline(self) -> float:
        return math.inf if self.budget_s is None else self.started + self.budget_s

    def option(self, name: str, default=None):
        return getattr(self.options, name, default)

    def path(self, filename: str) -> Path:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        return self.out_dir / filename

    # ------------------------------------------------------------------------------------------- writing
    def write_csv(self, rows: list[dict], filename: str | None = None) -> Path:
        return write_csv(self.path(filename or f"{self.name}.csv"), rows)

    def write_json(self, record: dict, filename: str | None = None) -> Path:
        return write_json(self.path(filename or f"{self.name}.json"), {"env": env_info(), **record})

    def write_text(self, text: str, filename: str) -> Path:
        path = self.path(filename)
        path.write_text(text, encoding="utf-8")
        return path

    def save_plot(self, fig, filename: str | None = None) -> Path | None:
        return None if fig is None else save_plot(fig, self.path(filename or f"{self.name}.png"))

    # --------------------------------------------------------------------------------------------- sweeps
    def sweep(
        self,
        cases: Iterable[dict],
        measure: Callable[[Context, dict, dict], dict],
        *,
        series: tuple[str, ...] = (),
        after_failure: str = "stop",
        desc: str | None = None,
        sink: Callable[[list[dict]], Any] | None = None,
        keep_states: bool = False,
    ) -> list[dict]:
        """Run ``measure(ctx, case, state)`` on every case under tqdm; one row per case (see the module
        docstring for the status words). ``sink(rows)`` after each case (e.g. rewrite the CSV, so that a run
        stopped from outside keeps what it measured). ``keep_states``: a series' state outlives the start of
        another series (the cases may interleave the series)."""
        from tqdm.auto import tqdm

        if after_failure not in ("stop", "record", "continue"):
            raise ValueError(f"after_failure must be 'stop', 'record' or 'continue', got {after_failure!r}")
        cases = list(cases)
        rows: list[dict] = []
        failed: dict[tuple, str] = {}
        states: dict[tuple, dict] = {}
        with tqdm(total=len(cases), desc=desc or self.name, unit="case", disable=None) as bar:
            for case in cases:
                key = tuple(case.get(k) for k in series)
                bar.update(1)
                if states and key not in states and not keep_states:  # a new series: the last one's state goes
                    states.clear()
                    free_memory(self.cuda)
                if self.clock() > self.deadline:
                    rows.append(
                        {
                            **case,
                            "status": "over_budget",
                            "note": f"not run: the budget of {self.budget_s:g} s is spent",
                        }
                    )
                    continue
                if key in failed and series:
                    if after_failure == "record":
                        rows.append({**case, "status": "skipped", "note": failed[key]})
                    continue
                if series:
                    bar.set_postfix_str(" ".join(str(k) for k in key)[:40])
                row = {**case, **self._measure_one(measure, case, states.setdefault(key, {}))}
                rows.append(row)
                if row["status"] in FAILED and after_failure != "continue":
                    where = ", ".join(f"{k}={case[k]}" for k in case if k not in series)[:80]
                    failed[key] = f"not run: {row['status']} at {where}"
                if sink is not None:
                    sink(rows)
        return rows

    def _measure_one(self, measure, case: dict, state: dict) -> dict:
        try:
            got = dict(measure(self, case, state) or {})
        except OverBudget as exc:
            return {**exc.row, "status": "over_budget", "note": str(exc)}
        except Unavailable as exc:
            return {"status": "unavailable", "note": str(exc)}
        except Exception as exc:  # a case that fails is a row, not a crash
            status = "oom" if is_oom(exc) else "error"
            free_memory(self.cuda)
            return {"status": status, "note": f"{type(exc).__name__}: {str(exc)[:200]}"}
        got.setdefault("status", "ok")
        got.setdefault("note", "")
        return got


# ------------------------------------------------------------------------------------------------ running
def run_benchmark(bench: Benchmark, ctx: Context) -> dict:
    """Run a declared benchmark in ``ctx`` and write its files; returns the summary."""
    if bench.needs_cuda and not ctx.cuda:
        print(f"no GPU: the {bench.name} benchmark needs CUDA")
        return {"skipped": "no CUDA"}
    import torch

    threads = torch.get_num_threads()
    if bench.cpu_threads and not ctx.cuda:
        torch.set_num_threads(bench.cpu_threads)
    try:
        return _run(bench, ctx)
    finally:
        torch.set_num_threads(threads)


def _run(bench: Benchmark, ctx: Context) -> dict:
    if bench.run is not None:
        return bench.run(ctx) or {}
    rows = ctx.sweep(
        bench.cases(ctx),
        bench.measure,
        series=bench.series,
        after_failure=bench.after_failure,
        sink=ctx.write_csv,
        keep_states=bench.keep_states,
    )
    summary, record = bench.summarize(ctx, rows) if bench.summarize else ({}, {})
    ctx.write_csv(rows)
    ctx.write_json({"summary": summary, **record})
    if bench.plot is not None:
        ctx.save_plot(bench.plot(ctx, rows, record))
    if bench.markdown is not None:
        ctx.write_text(bench.markdown(ctx, rows, record), f"{bench.name}.md")
    return summary


def _context(
    bench: Benchmark,
    out_dir,
    quick: bool,
    options: argparse.Namespace,
    budget_s: float | None,
    device,
    clock: Callable[[], float] = time.perf_counter,
) -> Context:
    budget = budget_s if budget_s is not None else bench.budget_s
    return Context(bench.name, Path(out_dir), quick, budget, device, options, clock)


def run(
    target,
    out_dir,
    quick: bool = False,
    *,
    budget_s: float | None = None,
    device=None,
    clock: Callable[[], float] = time.perf_counter,
    **options,
) -> dict:
    """Run a benchmark from Python (tests, notebooks): ``target`` is a :class:`Benchmark` or its module;
    ``options`` are its declared options by their ``dest`` names (the others keep their defaults)."""
    bench = getattr(target, "BENCHMARK", target)
    namespace = _parser(bench).parse_args([])
    unknown = sorted(set(options) - set(vars(namespace)))
    if unknown:
        raise TypeError(f"{bench.name}: unknown options {unknown}; expected some of {sorted(vars(namespace))}")
    vars(namespace).update(options)
    return run_benchmark(bench, _context(bench, out_dir, quick, namespace, budget_s, device, clock))


def _parser(bench: Benchmark) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"rmt-fast-bench {bench.name}", add_help=False)
    for opt in bench.options:
        p.add_argument(*opt.flags, **opt.kwargs)
    return p


def load(name: str) -> Benchmark:
    return importlib.import_module(BENCHMARKS[name]).BENCHMARK


def run_one(
    name: str,
    out_dir: Path,
    quick: bool,
    extra: list[str] | None = None,
    *,
    budget_s: float | None = None,
    device: str | None = None,
) -> dict:
    """Run benchmark ``name``; returns {'name', 'status', 'seconds', 'summary'}. Never raises, but for bad
    options (``extra``: the benchmark's own options, parsed against its ``Benchmark.options``)."""
    try:
        bench = load(name)
    except Exception as exc:  # e.g. an import error: this benchmark's status, the others still run
        traceback.print_exc()
        return {"name": name, "status": "error", "seconds": 0.0, "summary": {"error": f"{type(exc).__name__}: {exc}"}}
    options, unknown = _parser(bench).parse_known_args(extra or [])
    if unknown:
        raise SystemExit(f"rmt-fast-bench {name}: unrecognized arguments: {' '.join(unknown)}")
    print(f"[{name}] running -> {out_dir}")
    t0 = time.perf_counter()
    try:
        summary = run_benchmark(bench, _context(bench, out_dir, quick, options, budget_s, device))
        status = "failed checks" if summary.get("crosscheck_ok") is False or summary.get("ok") is False else "ok"
    except Exception as exc:  # keep going with the other benchmarks under `all`
        traceback.print_exc()
        summary, status = {"error": f"{type(exc).__name__}: {exc}"}, "error"
    return {"name": name, "status": status, "seconds": time.perf_counter() - t0, "summary": summary}


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    text = "{...}" if isinstance(value, dict) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def print_summary(results: list[dict]) -> None:
    """Plain-text table: benchmark, status, seconds, and the scalar entries of each summary (one level of a nested
    dict too, as ``key[sub]``)."""
    print(f"\n{'benchmark':10s} {'status':18s} {'seconds':>8s}  key results\n" + "-" * 78)
    for res in results:
        flat = [(k, v) for k, v in res["summary"].items() if not isinstance(v, dict)]
        flat += [(f"{k}[{kk}]", vv) for k, v in res["summary"].items() if isinstance(v, dict) for kk, vv in v.items()]
        items = [f"{k}={_short(v)}" for k, v in flat if not isinstance(v, (dict, list))]
        print(f"{res['name']:10s} {res['status']:18s} {res['seconds']:8.1f}  " + (items[0] if items else ""))
        for item in items[1:]:
            print(f"{'':39s}{item}")


def main(argv: list[str] | None = None) -> int:
    from .common import timestamp

    parser = argparse.ArgumentParser(prog="rmt-fast-bench", description="Benchmarks for rmt-fast.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join([*BENCHMARKS, "all"]) + "}")
    for name in [*BENCHMARKS, "all"]:
        p = sub.add_parser(
            name,
            help=f"every benchmark except {', '.join(sorted(NOT_IN_ALL))}"
            if name == "all"
            else f"{name} benchmark (its own options: rmt-fast-bench {name} --options)",
        )
        p.add_argument("--out", type=Path, default=None, help="output folder (default: results/<timestamp>)")
        p.add_argument("--quick", action="store_true", help="smaller, faster configuration")
        p.add_argument("--budget-s", type=float, default=None, help="wall-clock budget; later cases: over_budget")
        p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
        p.add_argument("--options", action="store_true", help="list the benchmark's own options and exit")
    args, extra = parser.parse_known_args(argv)  # the benchmark's own options are parsed by run_one
    if args.options:
        if args.command != "all":
            _parser(load(args.command)).print_help()
        return 0
    if extra and args.command == "all":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    out = args.out if args.out is not None else Path("results") / timestamp()
    kw = dict(budget_s=args.budget_s, device=args.device)
    if args.command == "all":
        results = [run_one(n, out / n, args.quick, **kw) for n in BENCHMARKS if n not in NOT_IN_ALL]
    else:
        results = [run_one(args.command, out, args.quick, extra, **kw)]
    print_summary(results)
    return 1 if any(r["status"] in ("error", "failed checks") for r in results) else 0
