"""Measured latency scaling: RMT (FastRMT, ReferenceRMT) against full attention over the whole input.

Backbone: a BERT encoder, as in the RMT paper's scaling experiment.

* GPU: bert-base (``BertConfig()`` defaults), fp16, m = 10 memory tokens and 499 content tokens per segment
  (512 model positions), RMT lengths doubling from 512 to 2**20 tokens; full attention doubling until it runs
  out of memory or over its time budget.
* CPU: a small BERT (2 layers, hidden 64, 2 heads, FFN 256) whose segment input is 128 positions (115
  content tokens + 10 memory + 3 special), so that the n^2 term of full attention dominates at a few
  thousand tokens on a laptop-class core; lengths doubling from 512.

Methods: ``FastRMT (auto)`` (the best backend: Triton on CUDA when supported, SDPA otherwise),
``FastRMT (SDPA)``, ``FastRMT (CUDA graph)`` (only on CUDA, and only once FastRMT accepts ``cuda_graph``),
``ReferenceRMT``, and full attention with the same backbone weights and ``max_position_embeddings`` raised to
the length, through SDPA, FlexAttention (eager and unfused on CPU: it materializes the score matrix) and
xformers (when importable). Full attention runs over the content tokens only (no [CLS]/[SEP]).

Each (method, length) is one row of ``latency.csv``; a method stops doubling at its first failure:
``oom`` (out of memory), ``over_budget`` (measured, or extrapolated from the last two lengths, above the
per-call time budget; or a peak above ``memory_budget_mb``; or the method's sweep budget spent).
Timing: inference (``torch.inference_mode`` where it works, else ``no_grad``), eval mode, no dropout;
CPU: median of ``time.perf_counter`` over a few repeats after a warm-up (a single timed call once a call
takes long; the model is warm by then); GPU: median of CUDA-event times after a warm-up.
Peak memory: ``torch.cuda.max_memory_allocated`` (reset before the timed call; includes the weights) on GPU;
on CPU the growth of the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) over the
resident set just before the timed call - memory the allocator already holds from earlier calls is not
counted again, so it is a lower bound.

The slope of log(time) against log(tokens) is fitted over the upper half of each method's successful
lengths: RMT should be ~1 (linear), full attention tends to 2 (quadratic). ``ok`` is False unless the RMT
slopes lie in [0.8, 1.2] and full attention (SDPA)'s exceeds 1.3; on CPU the check uses the slopes of the
process CPU time (one intra-op thread), which other load on a shared machine does not inflate, and the plot's
legend gives both.

    rmt-fast-bench latency --out results/latency [--quick]
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from rmt_fast.bench.common import PeakMemory, env_info, machine_label, save_plot, write_csv, write_json

RMT_SLOPE_RANGE = (0.8, 1.2)
FULL_SLOPE_MIN = 1.3
FLEX_NAME = "rmt_bench_flex"
XFORMERS_NAME = "rmt_bench_xformers"


@dataclass
class Setup:
    layers: int
    hidden: int
    heads: int
    ffn: int
    vocab: int
    mem: int
    positions: int  # model positions per RMT segment (content + mem + 3)
    dtype: str
    rmt_lengths: list[int]
    full_lengths: list[int]
    per_call_budget_s: float
    sweep_budget_s: float  # per method
    repeats: int
    cls_token_id: int = 101
    sep_token_id: int = 102
    pad_token_id: int = 0
    memory_budget_mb: float | None = None
    flex_per_call_budget_s: float | None = None  # eager FlexAttention on CPU is slow: a tighter budget
    methods: list[str] | None = None  # None: all
    cpu_threads: int | None = 1  # CPU runs: torch threads (1: robust to other load on a shared machine)
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
            layers=1,
            hidden=32,
            heads=2,
            ffn=64,
            vocab=256,
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
            layers=12,
            hidden=768,
            heads=12,
            ffn=3072,
            vocab=30522,
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
        layers=2,
        hidden=64,
        heads=2,
        ffn=256,
        vocab=1000,
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
        return replace(cpu, rmt_lengths=_doubling(512, 8192), full_lengths=_doubling(512, 8192),
                       per_call_budget_s=3.0, sweep_budget_s=8.0, repeats=1, flex_per_call_budget_s=0.5)
    return cpu


# ------------------------------------------------------------------------------------------------ models
def _bert_config(s: Setup, max_positions: int, attn: str):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=s.vocab,
        hidden_size=s.hidden,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        intermediate_size=s.ffn,
        max_position_embeddings=max(max_positions, s.positions),
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=s.pad_token_id,
        attn_implementation=attn,
    )


def _backbone(s: Setup, max_positions: int, seed: int = 0):
    import torch
    from transformers import BertModel

    torch.manual_seed(seed)  # every method gets the same weights (full attention: a longer position table)
    return BertModel(_bert_config(s, max_positions, "sdpa"), add_pooling_layer=False).eval()


def _accepts_cuda_graph() -> bool:
    from rmt_fast import FastRMT

    params = inspect.signature(FastRMT.__init__).parameters
    return "cuda_graph" in params


def _register_extra_attention():
    """FlexAttention and xformers as transformers attention implementations (no mask: full attention)."""
    import torch
    from torch.nn.attention.flex_attention import flex_attention
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    compiled = {}

    def flex_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        if attention_mask is not None:
            raise RuntimeError("the benchmark's flex attention takes no mask")
        fn = flex_attention
        if query.is_cuda:  # fused kernel; on CPU the eager (unfused) path
            if "fn" not in compiled:
                # one compilation per length: let dynamo keep them all (its default limit is 8)
                for knob in ("recompile_limit", "cache_size_limit"):
                    if hasattr(torch._dynamo.config, knob):
                        setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 64))
                compiled["fn"] = torch.compile(flex_attention, dynamic=False)
            fn = compiled["fn"]
        out = fn(query, key, value, scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    def xformers_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        import xformers.ops as xops

        if attention_mask is not None:
            raise RuntimeError("the benchmark's xformers attention takes no mask")
        out = xops.memory_efficient_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scale=scaling
        )
        return out, None

    def no_mask(*args, **kwargs):
        return None

    for name, fn in ((FLEX_NAME, flex_forward), (XFORMERS_NAME, xformers_forward)):
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, no_mask)


def _xformers_problem() -> str | None:
    try:
        import xformers.ops  # noqa: F401
    except Exception as exc:  # ImportError, or a broken build
        return f"xformers not importable ({type(exc).__name__}: {str(exc)[:80]})"
    return None


# ------------------------------------------------------------------------------------------------ timing
def _is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


class _Timer:
    def __init__(self, device):
        import torch

        self.torch = torch
        self.cuda = device.type == "cuda"
        self.peak = PeakMemory(self.cuda)

    def once(self, fn) -> float:
        c0 = time.process_time()
        try:
            return self._once(fn)
        finally:
            self.last_cpu = time.process_time() - c0

    def _once(self, fn) -> float:
        torch = self.torch
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def peak_start(self):
        return self.peak.start()

    def peak_mb(self, token) -> float | None:
        return self.peak.mb(token)


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
    make: object = None  # () -> (length -> callable)
    problem: str | None = None  # "skipped: ..." / "unavailable: ..."
    per_call_budget_s: float | None = None
    note: str = ""


def _methods(s: Setup, device, dtype) -> list[Method]:
    import torch

    from rmt_fast import FastRMT, ReferenceRMT

    cuda = device.type == "cuda"
    g = torch.Generator().manual_seed(1)
    ids_cache: dict[int, torch.Tensor] = {}

    def ids_of(n):  # content ids avoid pad/cls/sep (all < 103 here or given explicitly)
        if n not in ids_cache:
            low = max(s.cls_token_id, s.sep_token_id, s.pad_token_id) + 1
            ids_cache.clear()
            ids_cache[n] = torch.randint(low, s.vocab, (1, n), generator=g).to(device)
        return ids_cache[n]

    def rmt_maker(cls, **kwargs):
        def make():
            rmt = cls(
                _backbone(s, s.positions),
                s.mem,
                s.segment_size,
                cls_token_id=s.cls_token_id,
                sep_token_id=s.sep_token_id,
                pad_token_id=s.pad_token_id,
                **kwargs,
            )
            rmt = rmt.to(device=device, dtype=dtype).eval()
            return lambda n: lambda: rmt(ids_of(n), return_logits=False)

        return make

    full_max = max(s.full_lengths)

    def full_maker(attn):
        def make():
            model = _backbone(s, full_max).to(device=device, dtype=dtype).eval()
            model.set_attn_implementation(attn)
            return lambda n: lambda: model(input_ids=ids_of(n))

        return make

    auto_note = _auto_backend_note(s, device, dtype)
    methods = [
        Method("FastRMT (auto)", "rmt", rmt_maker(FastRMT, attn_backend="auto"), note=auto_note),
        Method("FastRMT (SDPA)", "rmt", rmt_maker(FastRMT, attn_backend="sdpa")),
    ]
    graph = Method("FastRMT (CUDA graph)", "rmt", rmt_maker(FastRMT, attn_backend="auto", cuda_graph=True))
    if not cuda:
        graph.problem = "skipped: needs CUDA"
    elif not _accepts_cuda_graph():
        graph.problem = "skipped: FastRMT has no cuda_graph option yet"
    methods += [graph, Method("ReferenceRMT", "rmt", rmt_maker(ReferenceRMT))]
    methods.append(Method("Full attention (SDPA)", "full", full_maker("sdpa")))
    flex = Method(
        "Full attention (FlexAttention)",
        "full",
        full_maker(FLEX_NAME),
        per_call_budget_s=None if cuda else s.flex_per_call_budget_s,
        note="torch.compile'd" if cuda else "eager (unfused: materializes the scores) on CPU",
    )
    try:
        _register_extra_attention()
        flex_problem = _flex_probe(device, dtype)
    except Exception as exc:
        flex_problem = f"{type(exc).__name__}: {str(exc)[:120]}"
    if flex_problem:
        flex.problem = f"unavailable: {flex_problem}"
    methods.append(flex)
    xf = Method("Full attention (xformers)", "full", full_maker(XFORMERS_NAME))
    xf_problem = _xformers_problem()
    if xf_problem:
        xf.problem = f"unavailable: {xf_problem}"
    methods.append(xf)
    if s.methods is not None:
        methods = [m for m in methods if m.name in s.methods]
    return methods


def _flex_probe(device, dtype) -> str | None:
    """None when flex_attention runs a small case on this device (compiled on CUDA, eager on CPU)."""
    import warnings

    import torch
    from torch.nn.attention.flex_attention import flex_attention

    q = torch.randn(1, 2, 128, 32, device=device, dtype=dtype)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            fn = torch.compile(flex_attention, dynamic=False) if device.type == "cuda" else flex_attention
            ref = torch.nn.functional.scaled_dot_product_attention(q, q, q)
            out = fn(q, q, q)
        if not torch.allclose(out.float(), ref.float(), atol=2e-2, rtol=2e-2):
            return "results differ from SDPA"
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
    return None


def _auto_backend_note(s: Setup, device, dtype) -> str:
    """Which backend attn_backend='auto' picks for a segment of this shape."""
    import torch
    from rmt_fast.kernels.layout import SegmentLayout

    from rmt_fast.attention import choose_backend

    d = s.hidden // s.heads
    q = torch.zeros(1, s.heads, s.positions, d, device=device, dtype=dtype)
    layout = SegmentLayout(
        0, s.positions, 0, False, token_counts=torch.full((1,), s.positions, dtype=torch.int32, device=device)
    )
    try:
        return f"auto -> {choose_backend('auto', q, q, q, layout, 0.0)}"
    except Exception as exc:
        return f"auto -> ? ({type(exc).__name__})"


# ------------------------------------------------------------------------------------------------ sweep
def _row(
    method: Method,
    n: int,
    status: str,
    seconds=None,
    peak_mb=None,
    repeats=0,
    note="",
    mode="",
    cpu_seconds=None,
):
    return dict(
        method=method.name,
        family=method.family,
        tokens=n,
        seconds=seconds,
        cpu_seconds=cpu_seconds,
        ms_per_token=None if seconds is None else 1e3 * seconds / n,
        tokens_per_s=None if seconds is None else n / seconds,
        peak_mb=None if peak_mb is None else round(peak_mb, 1),
        status=status,
        repeats=repeats,
        grad_mode=mode,
        note=note,
    )


def _sweep(method: Method, lengths: list[int], s: Setup, device, timer: _Timer, bar) -> list[dict]:
    import torch

    budget = method.per_call_budget_s or s.per_call_budget_s
    rows: list[dict] = []
    runner = method.make()
    sweep_t0 = time.perf_counter()
    times: list[float] = []
    for n in lengths:
        predicted = None
        if len(times) >= 2:
            predicted = times[-1] * min(max(times[-1] / max(times[-2], 1e-9), 1.5), 5.0)
        elif times:
            predicted = times[-1] * 2
        if predicted is not None and predicted > budget:
            rows.append(
                _row(
                    method,
                    n,
                    "over_budget",
                    note=f"extrapolated {predicted:.2f} s > per-call budget {budget} s",
                )
            )
            break
        spent = time.perf_counter() - sweep_t0
        if predicted is not None and spent + predicted * 2 > s.sweep_budget_s:
            rows.append(
                _row(
                    method, n, "over_budget", note=f"sweep budget {s.sweep_budget_s} s (spent {spent:.1f} s)"
                )
            )
            break
        call, state = _inference_ctx(runner(n))
        try:
            if predicted is None or predicted < 1.0:
                timer.once(call)  # warm-up (first length: lazy init; later: allocator at the new size)
            reps = s.repeats if (predicted is None or predicted < 0.5) else 1
            ts, cpu = [], []
            for i in range(reps):
                token = timer.peak_start() if i == reps - 1 else None
                ts.append(timer.once(call))
                cpu.append(timer.last_cpu)
            peak = timer.peak_mb(token)
        except Exception as exc:
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if _is_oom(exc):
                rows.append(_row(method, n, "oom", note=f"{type(exc).__name__}"))
            else:
                rows.append(_row(method, n, "error", note=f"{type(exc).__name__}: {str(exc)[:160]}"))
            break
        finally:
            bar.update(1)
        t = statistics.median(ts)
        extra = {"cpu_seconds": statistics.median(cpu)}
        times.append(t)
        over = None
        if t > budget:
            over = f"measured {t:.2f} s > per-call budget {budget} s"
        elif s.memory_budget_mb is not None and peak is not None and peak > s.memory_budget_mb:
            over = f"peak {peak:.1f} MB > memory budget {s.memory_budget_mb} MB"
        if over is not None:
            rows.append(_row(method, n, "over_budget", t, peak, reps, over, state["mode"], **extra))
            break
        rows.append(_row(method, n, "ok", t, peak, reps, method.note, state["mode"], **extra))
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


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


def run(
    out_dir: Path, quick: bool = False, *, tiny: bool = False, setup: Setup | None = None, **overrides
) -> dict:
    """Run the sweep. ``overrides`` replace Setup fields (per_call_budget_s, memory_budget_mb, methods...)."""
    import torch

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    s = setup or default_setup(cuda, quick=quick, tiny=tiny)
    if overrides:
        s = replace(s, **overrides)
    dtype = getattr(torch, s.dtype)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    if not cuda and s.cpu_threads:
        torch.set_num_threads(s.cpu_threads)
    try:
        return _run(s, out_dir, device, dtype, quick, tiny)
    finally:
        torch.set_num_threads(threads)


def _run(s: Setup, out_dir: Path, device, dtype, quick: bool, tiny: bool) -> dict:
    from tqdm.auto import tqdm

    cuda = device.type == "cuda"
    methods = _methods(s, device, dtype)
    timer = _Timer(device)
    rows: list[dict] = []
    total = sum(len(s.rmt_lengths if m.family == "rmt" else s.full_lengths) for m in methods if not m.problem)
    t0 = time.perf_counter()
    with tqdm(total=total, desc="latency", unit="call", disable=None) as bar:
        for m in methods:
            if m.problem:
                rows.append(_row(m, 0, m.problem.split(":")[0], note=m.problem))
                continue
            bar.set_postfix_str(m.name)
            lengths = s.rmt_lengths if m.family == "rmt" else s.full_lengths
            try:
                rows += _sweep(m, lengths, s, device, timer, bar)
            except Exception as exc:  # building the model failed: report, keep going
                rows.append(_row(m, lengths[0], "error", note=f"{type(exc).__name__}: {str(exc)[:160]}"))
    elapsed = time.perf_counter() - t0

    slopes = {m.name: fit_slope([r for r in rows if r["method"] == m.name]) for m in methods if not m.problem}
    cpu_slopes = {
        m.name: fit_slope([r for r in rows if r["method"] == m.name], "cpu_seconds")
        for m in methods
        if not m.problem
    }
    # The checks use wall-clock slopes on GPU. On CPU (one intra-op thread) they use the process-CPU-time
    # slopes: on a shared machine other load inflates single long wall-clock measurements, not the work done.
    check_slopes = slopes if cuda else cpu_slopes
    checks = {}
    for name, fit in check_slopes.items():
        fam = next(m.family for m in methods if m.name == name)
        if name in ("FastRMT (auto)", "ReferenceRMT"):
            checks[name] = fit is not None and RMT_SLOPE_RANGE[0] <= fit["slope"] <= RMT_SLOPE_RANGE[1]
        elif name == "Full attention (SDPA)":
            checks[name] = fit is not None and fit["slope"] > FULL_SLOPE_MIN
        elif fam == "rmt" and fit is not None:
            checks[name] = RMT_SLOPE_RANGE[0] <= fit["slope"] <= RMT_SLOPE_RANGE[1]
    ok = all(checks.values()) and bool(checks)
    write_csv(out_dir / "latency.csv", rows)
    config = {
        **asdict(s),
        "segment_size": s.segment_size,
        "device": str(device),
        "quick": quick,
        "tiny": tiny,
    }
    peak_note = (
        "torch.cuda.max_memory_allocated during the timed call (weights included)"
        if cuda
        else "growth of VmHWM over VmRSS during the last timed call (lower bound; blank when "
        "/proc/self/clear_refs is not writable)"
    )
    write_json(
        out_dir / "latency.json",
        {
            "env": env_info(),
            "config": config,
            "slopes": slopes,
            "checks": checks,
            "ok": ok,
            "cpu_time_slopes": cpu_slopes,
            "checks_use": "wall-clock slopes" if cuda else "process CPU time slopes (1 thread)",
            "slope_rule": "least squares of log(seconds) on log(tokens), upper half of successful lengths",
            "peak_memory": peak_note,
            "elapsed_s": elapsed,
        },
    )
    _plot(rows, slopes, None if cuda else cpu_slopes, s, device, out_dir / "latency.png")
    summary = {"ok": ok, "elapsed_s": round(elapsed, 1)}
    for name, fit in slopes.items():
        summary[f"slope[{name}]"] = None if fit is None else round(fit["slope"], 3)
        if not cuda and cpu_slopes.get(name):
            summary[f"cpu_time_slope[{name}]"] = round(cpu_slopes[name]["slope"], 3)
    for name in slopes:
        good = [r for r in rows if r["method"] == name and r["status"] == "ok"]
        if good:
            summary[f"max_tokens[{name}]"] = max(r["tokens"] for r in good)
    return summary


def _plot(rows, slopes, cpu_slopes, s: Setup, device, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    names = list(dict.fromkeys(r["method"] for r in rows if r["status"] == "ok"))
    styles = {"rmt": "-", "full": "--"}
    for i, name in enumerate(names):
        rs = sorted(
            (r for r in rows if r["method"] == name and r["status"] == "ok"), key=lambda r: r["tokens"]
        )
        xs, ys = [r["tokens"] for r in rs], [r["seconds"] for r in rs]
        fit = slopes.get(name)
        stop = next((r for r in rows if r["method"] == name and r["status"] in ("oom", "over_budget")), None)
        label = name + (f" (slope {fit['slope']:.2f}" if fit else "")
        cfit = (cpu_slopes or {}).get(name)
        if fit:
            label += f"; CPU time {cfit['slope']:.2f})" if cfit else ")"
        if stop is not None:
            label += f", {stop['status']} at {stop['tokens']:,}"
        color = f"C{i}"
        style = styles[rs[0]["family"]]
        ax1.plot(xs, ys, style, marker="o", ms=3, color=color, label=label)
        ax2.plot(xs, [r["ms_per_token"] * 1e3 for r in rs], style, marker="o", ms=3, color=color, label=name)
        if fit:
            fx = [fit["from_tokens"], fit["to_tokens"]]
            ax1.plot(
                fx,
                [math.exp(fit["intercept"]) * x ** fit["slope"] for x in fx],
                ":",
                color=color,
                lw=2.5,
                alpha=0.6,
            )
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("input length (tokens)")
        ax.grid(True, which="both", alpha=0.3)
    ax1.set_yscale("log")
    ax1.set_ylabel("forward latency (s)")
    ax1.set_title("time vs length (dotted: fit over the upper half)", fontsize=9)
    if names:
        ax1.legend(fontsize=7)
    ax2.set_yscale("log")
    ax2.set_ylabel("time per token (µs/token)")
    ax2.set_title("time per token", fontsize=9)
    if names:
        ax2.legend(fontsize=7)
    d = s.hidden // s.heads
    fig.suptitle(
        f"RMT vs full attention latency, BERT {s.layers}L/{s.hidden}d/{s.heads}h (head dim {d}), "
        f"{s.positions} positions per segment (m={s.mem}, {s.segment_size} content), {s.dtype}, batch 1"
        f"\n{machine_label()}",
        fontsize=9,
    )
    save_plot(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("results/latency"))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--tiny", action="store_true", help="a seconds-long smoke run")
    args = p.parse_args(argv)
    summary = run(args.out, quick=args.quick, tiny=args.tiny)
    print(json.dumps(summary, indent=2))
    return 0 if summary.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
