"""Measured latency scaling: RMT (FastRMT, ReferenceRMT) against full attention over the whole input (SDPA,
FlexAttention, xformers), on a BERT encoder as in the RMT paper's scaling experiment: bert-base fp16 on a GPU, a
small BERT on the CPU. One row per (method, batch, length), interleaved: at each length every method and batch,
shortest lengths first, so that a ``--budget-s`` that runs out still leaves side-by-side rows. A method stops
doubling at its first ``oom`` or ``over_budget`` (measured or extrapolated). The log-log slopes are checked: RMT
~1, full attention > 1.3.
Settings, budgets and the slope rule: docs/benchmarks.md, section ``latency``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field, replace

from . import presets
from .common import machine_label, pyplot
from .runner import Benchmark, Option, OverBudget, ints, names

RMT_SLOPE_RANGE = (0.8, 1.2)
FULL_SLOPE_MIN = 1.3
FLEX_NAME = "rmt_bench_flex"
XFORMERS_NAME = "rmt_bench_xformers"


@dataclass
class Setup:
    model: str  # a BERT preset (rmt_fast.bench.presets)
    mem: int
    positions: int  # model positions per RMT segment (content + mem + 3)
    dtype: str
    rmt_lengths: list[int]
    full_lengths: list[int]
    per_call_budget_s: float
    sweep_budget_s: float  # per method and batch: the time spent in its own cases
    repeats: int
    batches: list[int] = field(default_factory=lambda: [1])
    memory_budget_mb: float | None = None
    flex_per_call_budget_s: float | None = None  # eager FlexAttention on CPU is slow: a tighter budget
    methods: list[str] | None = None  # None: all
    notes: list[str] = field(default_factory=list)

    @property
    def segment_size(self) -> int:
        return self.positions - self.mem - 3


def _doubling(start: int, stop: int) -> list[int]:
    out, n = [], start
    while n <= stop:
        out.append(n)
        n *= 2
    return out


def default_setup(cuda: bool, quick: bool = False, tiny: bool = False) -> Setup:
    if tiny:  # for tests: a second or two
        return Setup(
            "bert-micro",
            mem=4,
            positions=32,
            dtype="float32",
            rmt_lengths=[128, 256, 512],
            full_lengths=[128, 256, 512],
            per_call_budget_s=5.0,
            sweep_budget_s=10.0,
            repeats=1,
        )
    if cuda:
        return Setup(
            "bert-base",
            mem=10,
            positions=512,
            dtype="float16",
            rmt_lengths=_doubling(512, 2**16 if quick else 2**20),
            full_lengths=_doubling(512, 2**15 if quick else 2**20),
            per_call_budget_s=5.0 if quick else 30.0,
            sweep_budget_s=40.0 if quick else 150.0,
            repeats=3,
        )
    cpu = Setup(
        "bert-cpu",
        mem=10,
        positions=128,
        dtype="float32",
        rmt_lengths=_doubling(512, 2**16),
        full_lengths=_doubling(512, 2**15),
        per_call_budget_s=8.0,
        sweep_budget_s=22.0,
        repeats=3,
        flex_per_call_budget_s=2.0,
    )
    if quick:
        return replace(
            cpu,
            rmt_lengths=_doubling(512, 8192),
            full_lengths=_doubling(512, 8192),
            per_call_budget_s=3.0,
            sweep_budget_s=8.0,
            repeats=1,
            flex_per_call_budget_s=0.5,
        )
    return cpu


def _register_extra_attention():
    """FlexAttention and xformers as transformers attention implementations (no mask: full attention)."""
    import torch
    from torch.nn.attention.flex_attention import flex_attention
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    compiled = {}

    def flex_forward(module, query, key, value, attention_mask, scaling=None, **kwargs):
        if attention_mask is not None:
            raise RuntimeError("the benchmark's flex attention takes no mask")
        if query.is_cuda and "fn" not in compiled:  # fused kernel on CUDA; on CPU the eager (unfused) path
            # one compilation per length: let dynamo keep them all (its default limit is 8)
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            compiled["fn"] = torch.compile(flex_attention, dynamic=False)
        out = (compiled["fn"] if query.is_cuda else flex_attention)(query, key, value, scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    def xformers_forward(module, query, key, value, attention_mask, scaling=None, **kwargs):
        import xformers.ops as xops

        if attention_mask is not None:
            raise RuntimeError("the benchmark's xformers attention takes no mask")
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        return xops.memory_efficient_attention(q, k, v, scale=scaling), None

    for name, fn in ((FLEX_NAME, flex_forward), (XFORMERS_NAME, xformers_forward)):
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, lambda *args, **kwargs: None)


def _flex_problem(device, dtype) -> str | None:
    """None when flex_attention runs a small case on this device (compiled on CUDA, eager on CPU) and agrees
    with SDPA; else "unavailable: why"."""
    import warnings

    import torch
    from torch.nn.attention.flex_attention import flex_attention

    q = torch.randn(1, 2, 128, 32, device=device, dtype=dtype)
    try:
        _register_extra_attention()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            fn = torch.compile(flex_attention, dynamic=False) if device.type == "cuda" else flex_attention
            ref, out = torch.nn.functional.scaled_dot_product_attention(q, q, q), fn(q, q, q)
        if not torch.allclose(out.float(), ref.float(), atol=2e-2, rtol=2e-2):
            return "unavailable: results differ from SDPA"
    except Exception as exc:
        return f"unavailable: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
    return None


def _xformers_problem() -> str | None:
    try:
        import xformers.ops  # noqa: F401
    except Exception as exc:  # ImportError, or a broken build
        return f"unavailable: xformers not importable ({type(exc).__name__}: {str(exc)[:80]})"
    return None


def _inference_ctx(fn):
    """inference_mode when the method runs under it, else no_grad (decided by the first call)."""
    import torch

    state = {"mode": None}

    def call():
        if state["mode"] in (None, "inference_mode"):
            try:
                with torch.inference_mode():
                    fn()
                state["mode"] = "inference_mode"
                return
            except RuntimeError as exc:
                if state["mode"] is not None or "inference" not in str(exc).lower():
                    raise
        state["mode"] = "no_grad"
        with torch.no_grad():
            fn()

    return call, state


# ------------------------------------------------------------------------------------------------ methods
@dataclass
class Method:
    name: str
    family: str  # "rmt" or "full"
    make: object = None  # () -> ((tokens, batch) -> callable)
    problem: str | None = None  # "skipped: ..." / "unavailable: ..."
    per_call_budget_s: float | None = None
    note: str = ""


def _methods(s: Setup, device, dtype) -> list[Method]:
    cuda = device.type == "cuda"
    vocab = presets.preset(s.model).vocab
    ids = functools.lru_cache(maxsize=1)(lambda n, b: presets.content_ids(b, n, vocab, seed=1, device=device))

    def rmt_maker(wrapper, **kwargs):
        def make():
            backbone = presets.model(s.model, "bare", max_positions=s.positions)
            rmt = presets.rmt(wrapper, backbone, s.model, s.mem, s.segment_size, **kwargs)
            rmt = rmt.to(device=device, dtype=dtype).eval()
            return lambda n, b: lambda: rmt(ids(n, b), return_logits=False)

        return make

    def full_maker(attn):
        def make():  # the same weights, the position table extended to the longest length
            model = presets.model(s.model, "bare", max_positions=max(s.full_lengths))
            model = model.to(device=device, dtype=dtype).eval()
            model.set_attn_implementation(attn)
            return lambda n, b: lambda: model(input_ids=ids(n, b))

        return make

    methods = [
        Method(
            "FastRMT (auto)", "rmt", rmt_maker("fast", attn_backend="auto"), note=_auto_backend_note(s, device, dtype)
        ),
        Method("FastRMT (SDPA)", "rmt", rmt_maker("fast", attn_backend="sdpa")),
        Method(
            "FastRMT (CUDA graph)",
            "rmt",
            rmt_maker("fast", attn_backend="auto", cuda_graph=True),
            problem=None if cuda else "skipped: needs CUDA",
        ),
        Method("ReferenceRMT", "rmt", rmt_maker("reference")),
        Method("Full attention (SDPA)", "full", full_maker("sdpa")),
        Method(
            "Full attention (FlexAttention)",
            "full",
            full_maker(FLEX_NAME),
            _flex_problem(device, dtype),
            per_call_budget_s=None if cuda else s.flex_per_call_budget_s,
            note="torch.compile'd" if cuda else "eager (unfused: materializes the scores) on CPU",
        ),
        Method("Full attention (xformers)", "full", full_maker(XFORMERS_NAME), _xformers_problem()),
    ]
    return [m for m in methods if s.methods is None or m.name in s.methods]


def _auto_backend_note(s: Setup, device, dtype) -> str:
    """Which backend attn_backend='auto' picks for a segment of this shape."""
    import torch

    from rmt_fast.attention import choose_backend
    from rmt_fast.kernels.layout import SegmentLayout

    p = presets.preset(s.model)
    q = torch.zeros(1, p.heads, s.positions, p.hidden // p.heads, device=device, dtype=dtype)
    counts = torch.full((1,), s.positions, dtype=torch.int32, device=device)
    try:
        return f"auto -> {choose_backend('auto', q, q, q, SegmentLayout(0, s.positions, 0, False, counts), 0.0)}"
    except Exception as exc:
        return f"auto -> ? ({type(exc).__name__})"


# ------------------------------------------------------------------------------------------------ sweep
def _setup(ctx) -> Setup:
    s = default_setup(ctx.cuda, quick=ctx.quick, tiny=ctx.option("tiny", False))
    overrides = {k: ctx.option(k) for k in ("methods", "per_call_budget_s", "memory_budget_mb", "batches")}
    s = replace(s, **{k: v for k, v in overrides.items() if v is not None})
    low, high = ctx.option("min_tokens") or 0, ctx.option("max_tokens") or float("inf")
    return replace(
        s,
        rmt_lengths=[n for n in s.rmt_lengths if low <= n <= high],
        full_lengths=[n for n in s.full_lengths if low <= n <= high],
    )


def cases(ctx) -> list[dict]:
    """Every (method, batch, length), interleaved: at each length (shortest first) every batch and method, so
    that whatever the budget the methods have rows side by side. A method that cannot run here is one row
    (tokens 0) saying why, first."""
    import torch

    ctx.setup = s = _setup(ctx)
    ctx.methods = {m.name: m for m in _methods(s, ctx.device, getattr(torch, s.dtype))}
    ctx.runners = {}  # method name -> its (tokens, batch) -> callable, built once and shared by its batches
    runnable = [m for m in ctx.methods.values() if not m.problem]
    out = [
        dict(method=m.name, family=m.family, batch=s.batches[0], tokens=0) for m in ctx.methods.values() if m.problem
    ]
    for n in sorted(set(s.rmt_lengths) | set(s.full_lengths)):
        for b in s.batches:
            out += [
                dict(method=m.name, family=m.family, batch=b, tokens=n)
                for m in runnable
                if n in (s.rmt_lengths if m.family == "rmt" else s.full_lengths)
            ]
    return out


def series_name(row: dict, s: Setup) -> str:
    """A method at the first batch size is its name; at another, ``name [batch B]``."""
    return row["method"] if row["batch"] == s.batches[0] else f"{row['method']} [batch {row['batch']}]"


def measure(ctx, case: dict, state: dict) -> dict:
    """One (method, batch, length); ``state`` (the series', kept all sweep long) holds its earlier times (to
    extrapolate) and the seconds spent in its cases (its sweep budget)."""
    m = ctx.methods[case["method"]]
    if m.problem:
        return {"status": m.problem.split(":")[0], "note": m.problem}
    t0 = ctx.clock()
    state.setdefault("times", [])
    state.setdefault("spent", 0.0)
    try:
        return _measure(ctx, case, state, m, t0)
    finally:
        state["spent"] += ctx.clock() - t0


def _measure(ctx, case: dict, state: dict, m: Method, t0: float) -> dict:
    s, n, batch = ctx.setup, case["tokens"], case["batch"]
    budget = m.per_call_budget_s or s.per_call_budget_s
    if m.name not in ctx.runners:
        ctx.runners[m.name] = m.make()
    times = state["times"]
    predicted = None
    if len(times) >= 2:
        predicted = times[-1] * min(max(times[-1] / max(times[-2], 1e-9), 1.5), 5.0)
    elif times:
        predicted = times[-1] * 2
    if predicted is not None and predicted > budget:
        raise OverBudget(f"extrapolated {predicted:.2f} s > per-call budget {budget} s")
    spent = state["spent"] + ctx.clock() - t0  # this series' cases, this one so far included
    if predicted is not None and spent + predicted * 2 > s.sweep_budget_s:
        raise OverBudget(f"sweep budget {s.sweep_budget_s} s (spent {spent:.1f} s)")
    call, mode = _inference_ctx(ctx.runners[m.name](n, batch))
    if predicted is None or predicted < 1.0:
        call()  # warm-up (first length: lazy init; later: the allocator at the new size)
    reps = s.repeats if (predicted is None or predicted < 0.5) else 1
    token = ctx.peak.start()
    t = ctx.timer(call, repeats=reps, warmup=0)
    peak = ctx.peak.mb(token)
    times.append(t.median_s)
    row = dict(
        seconds=t.median_s,
        p20_s=t.p20_s,
        p80_s=t.p80_s,
        cpu_seconds=t.cpu_s,
        ms_per_token=1e3 * t.median_s / (batch * n),
        tokens_per_s=batch * n / t.median_s,
        peak_mb=None if peak is None else round(peak, 1),
        repeats=reps,
        grad_mode=mode["mode"],
        note=m.note,
    )
    if t.median_s > budget:  # measured, but over a budget: the numbers stay in the row, the series stops
        raise OverBudget(f"measured {t.median_s:.2f} s > per-call budget {budget} s", row)
    if s.memory_budget_mb is not None and peak is not None and peak > s.memory_budget_mb:
        raise OverBudget(f"peak {peak:.1f} MB > memory budget {s.memory_budget_mb} MB", row)
    return row


def fit_slope(rows: list[dict], key: str = "seconds") -> dict | None:
    """log(time) ~ slope * log(tokens) over the upper half of the successful lengths (>= 2 points)."""
    pts = sorted((r["tokens"], r[key]) for r in rows if r["status"] == "ok" and r.get(key))
    if len(pts) < 2:
        return None
    upper = pts[len(pts) // 2 :] if len(pts) >= 4 else pts[-2:] if len(pts) < 3 else pts[1:]
    xs = [math.log(n) for n, _ in upper]
    ys = [math.log(t) for _, t in upper]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=False)) / sxx
    return {
        "slope": slope,
        "intercept": my - slope * mx,
        "from_tokens": upper[0][0],
        "to_tokens": upper[-1][0],
        "points": len(upper),
    }


def summarize(ctx, rows: list[dict]) -> tuple[dict, dict]:
    s, methods, cuda = ctx.setup, ctx.methods, ctx.cuda
    series = list(dict.fromkeys(series_name(r, s) for r in rows if not methods[r["method"]].problem))
    slopes = {k: fit_slope([r for r in rows if series_name(r, s) == k]) for k in series}
    cpu_slopes = {k: fit_slope([r for r in rows if series_name(r, s) == k], "cpu_seconds") for k in series}
    # The checks use wall-clock slopes on GPU. On CPU (one intra-op thread) they use the process-CPU-time
    # slopes: on a shared machine other load inflates single long wall-clock measurements, not the work done.
    check_slopes = slopes if cuda else cpu_slopes
    checks = {}
    for name, fit in check_slopes.items():  # a series at another batch size is reported, not checked
        if name == "Full attention (SDPA)":
            checks[name] = fit is not None and fit["slope"] > FULL_SLOPE_MIN
        elif name in methods and methods[name].family == "rmt" and (fit or name in ("FastRMT (auto)", "ReferenceRMT")):
            checks[name] = fit is not None and RMT_SLOPE_RANGE[0] <= fit["slope"] <= RMT_SLOPE_RANGE[1]
    # a --tiny smoke run is too short for its slopes to mean anything: nothing is checked (ok is None)
    ok = None if ctx.option("tiny") else all(checks.values()) and bool(checks)
    p = presets.preset(s.model)
    config = {
        **asdict(s),
        "layers": p.layers,
        "hidden": p.hidden,
        "heads": p.heads,
        "ffn": p.ffn,
        "vocab": p.vocab,
        "cls_token_id": presets.CLS_ID,
        "sep_token_id": presets.SEP_ID,
        "pad_token_id": presets.PAD_ID,
        "cpu_threads": BENCHMARK.cpu_threads,
        "segment_size": s.segment_size,
        "device": str(ctx.device),
        "quick": ctx.quick,
        "tiny": bool(ctx.option("tiny", False)),
    }
    peak_note = (
        "torch.cuda.max_memory_allocated during the timed calls (weights included)"
        if cuda
        else "growth of VmHWM over VmRSS during the timed calls (lower bound; blank when /proc/self/clear_refs "
        "is not writable)"
    )
    elapsed = ctx.clock() - ctx.started
    record = {
        "config": config,
        "slopes": slopes,
        "checks": checks,
        "ok": ok,
        "cpu_time_slopes": cpu_slopes,
        "checks_use": "wall-clock slopes" if cuda else "process CPU time slopes (1 thread)",
        "slope_rule": "least squares of log(seconds) on log(tokens), upper half of successful lengths",
        "peak_memory": peak_note,
        "elapsed_s": elapsed,
    }
    summary = {"ok": ok, "elapsed_s": round(elapsed, 1)}
    for name, fit in slopes.items():
        summary[f"slope[{name}]"] = None if fit is None else round(fit["slope"], 3)
        if not cuda and cpu_slopes.get(name):
            summary[f"cpu_time_slope[{name}]"] = round(cpu_slopes[name]["slope"], 3)
        good = [r["tokens"] for r in rows if series_name(r, s) == name and r["status"] == "ok"]
        if good:
            summary[f"max_tokens[{name}]"] = max(good)
    return summary, record


def plot(ctx, rows, record):
    s, slopes, cpu_slopes = ctx.setup, record["slopes"], {} if ctx.cuda else record["cpu_time_slopes"]
    fig, (ax1, ax2) = pyplot().subplots(1, 2, figsize=(13, 5))
    names = list(dict.fromkeys(series_name(r, s) for r in rows if r["status"] == "ok"))
    for i, name in enumerate(names):
        mine = [r for r in rows if series_name(r, s) == name]
        rs = sorted((r for r in mine if r["status"] == "ok"), key=lambda r: r["tokens"])
        fit, cfit = slopes.get(name), cpu_slopes.get(name)
        stop = next((r for r in mine if r["status"] in ("oom", "over_budget")), None)
        label = (
            name
            + (f" (slope {fit['slope']:.2f}" + (f"; CPU time {cfit['slope']:.2f})" if cfit else ")") if fit else "")
            + (f", {stop['status']} at {stop['tokens']:,}" if stop else "")
        )
        style = dict(ls="-" if rs[0]["family"] == "rmt" else "--", marker="o", ms=3, color=f"C{i}")
        xs = [r["tokens"] for r in rs]
        ax1.plot(xs, [r["seconds"] for r in rs], label=label, **style)
        ax2.plot(xs, [r["ms_per_token"] * 1e3 for r in rs], label=name, **style)
        if fit:  # the fitted line over the points it was fitted on
            fx = [fit["from_tokens"], fit["to_tokens"]]
            ax1.plot(
                fx, [math.exp(fit["intercept"]) * x ** fit["slope"] for x in fx], ":", color=f"C{i}", lw=2.5, alpha=0.6
            )
    for ax, ylabel, title in (
        (ax1, "forward latency (s)", "time vs length (dotted: fit over the upper half)"),
        (ax2, "time per token (µs/token)", "time per token"),
    ):
        ax.set_xscale("log", base=2)
        ax.set(yscale="log", xlabel="input length (tokens)", ylabel=ylabel)
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        if names:
            ax.legend(fontsize=7)
    p = presets.preset(s.model)
    fig.suptitle(
        f"RMT vs full attention latency, BERT {p.layers}L/{p.hidden}d/{p.heads}h (head dim "
        f"{p.hidden // p.heads}), {s.positions} positions per segment (m={s.mem}, {s.segment_size} content), "
        f"{s.dtype}, batch {', '.join(map(str, s.batches))}\n{machine_label()}",
        fontsize=9,
    )
    return fig


BENCHMARK = Benchmark(
    "latency",
    cases,
    measure,
    summarize=summarize,
    plot=plot,
    series=("method", "batch"),
    keep_states=True,
    cpu_threads=1,
    options=(
        Option("--tiny", action="store_true", help="a seconds-long smoke run"),
        Option("--methods", type=names, default=None, help="comma-separated method names (default: all)"),
        Option("--per-call-budget-s", type=float, default=None, help="longest call before a method stops"),
        Option("--memory-budget-mb", type=float, default=None, help="highest peak before a method stops"),
        Option("--batches", type=ints, default=None, help="batch sizes, e.g. 1,16 (default: 1)"),
        Option("--min-tokens", type=int, default=None, help="drop the lengths below this"),
        Option("--max-tokens", type=int, default=None, help="drop the lengths above this"),
    ),
)
