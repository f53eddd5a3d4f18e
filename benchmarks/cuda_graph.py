"""Per-segment latency of graphed FastRMT against eager FastRMT, ReferenceRMT and torch.compile (GPU, bert-base
fp16); ``--million``: 1,048,576 tokens through graphed FastRMT (with and without ``compile_step``) and its
crossover with full attention (a tiny version on the CPU). Targets and settings: docs/benchmarks.md, section
``cuda-graph``.
"""

from __future__ import annotations

from . import presets
from .common import machine_label, plot_lines, pyplot
from .runner import Benchmark, Option

SEGMENT, MEM = 499, 10
MILLION = 1_048_576
TARGET_1M_S, TARGET_CROSSOVER = 1.0, 8192
KINDS = ("reference", "eager", "graphed", "compiled")
FAST_INFERENCE = "fast_inference"  # FastRMT(fast_inference=True), in the 1M-token run


# --------------------------------------------------------------------------------- graphed vs the others
def _build(kind: str, dtype):
    import torch

    model = presets.model("bert-base", "cls", num_labels=2).to("cuda", dtype).eval()
    if kind == "reference":
        return presets.rmt("reference", model, "bert-base", MEM, SEGMENT).to("cuda", dtype)
    rmt = presets.rmt("fast", model, "bert-base", MEM, SEGMENT, cuda_graph=kind == "graphed").to("cuda", dtype)
    if kind == "compiled":
        rmt.encoder_step = torch.compile(rmt.encoder_step, mode="reduce-overhead")
    return rmt


def measure(ctx, case: dict, state: dict) -> dict:
    """One wrapper at one batch size: seconds per forward (two warm-up calls: capture / compile happen there)."""
    import torch

    rmt = _build(case["method"], torch.float16)
    tokens = case.get("tokens") or case["segments"] * SEGMENT
    ids = torch.randint(1000, 28000, (case["batch"], tokens), device="cuda")

    def call():
        with torch.inference_mode():
            rmt(ids, return_logits=False)

    t = ctx.timer(call, repeats=1 if case.get("tokens") else 2 if ctx.quick else 5, warmup=2)
    if case.get("tokens"):
        return {"seconds": t.median_s}
    return {"ms_per_segment": 1e3 * t.median_s / case["segments"], "tokens_per_s": case["batch"] * tokens / t.median_s}


def run_graphs(ctx) -> dict:
    n_seg = 8 if ctx.quick else 32
    cases = [dict(method=kind, batch=b, segments=n_seg) for b in (1, 32) for kind in KINDS]
    cases.append(dict(method="graphed", batch=1, segments=-(-MILLION // SEGMENT), tokens=MILLION))
    rows = ctx.sweep(cases, measure, after_failure="continue")
    million = next((r["seconds"] for r in rows if r.get("tokens") == MILLION and r["status"] == "ok"), None)
    ratios = _ratios(rows)
    ctx.write_csv(rows)
    ctx.write_json({"rows": rows, "ratios": ratios, "seconds_1M_tokens": million})
    ctx.save_plot(_plot(rows))
    return {"ratios": ratios, "seconds_1M_tokens": million}


# ------------------------------------------------------------------------------------------ the 1M-token run
def _million_setup(ctx):
    """(preset, memory tokens, positions per segment, total tokens, crossover lengths, compile_step)."""
    if ctx.cuda:
        return (
            "bert-base",
            10,
            512,
            MILLION,
            [4096, 8192, 16384, 32768],
            {"mode": "max-autotune"} if not ctx.quick else True,
        )
    return "bert-micro", 4, 32, 4096, [256, 512, 1024], {"backend": "aot_eager"}


def measure_million(ctx, case: dict, state: dict) -> dict:
    """One length of one method; the method's model lives in ``state``. The first graphed case (``total``
    tokens) is preceded by the capture / compile / autotune run (``warmup_s``)."""
    import torch

    name, mem, positions, total, lengths, compile_step = ctx.million
    seg = presets.preset(name).segment_size(positions, mem)
    n, method = case["tokens"], case["method"]
    dtype = torch.float16 if ctx.cuda else torch.float32
    ids = presets.content_ids(1, max(total, *lengths), presets.preset(name).vocab, device=ctx.device)
    row = {}
    if "call" not in state:
        if method == "full (SDPA)":
            model = presets.model(name, "bare", max_positions=max(lengths)).to(ctx.device, dtype).eval()
            state["call"] = lambda n: lambda: model(input_ids=ids[:, :n])
        else:
            kw = {"compile_step": compile_step} if method in ("graphed+compiled", FAST_INFERENCE) else {}
            kw.update({"fast_inference": True} if method == FAST_INFERENCE else {"cuda_graph": True})
            backbone = presets.model(name, "bare", max_positions=positions)
            rmt = presets.rmt("fast", backbone, name, mem, seg, **kw).to(ctx.device, dtype).eval()
            state.update(rmt=rmt, call=lambda n: lambda: rmt(ids[:, :n], return_logits=False))
            with torch.inference_mode():
                row["warmup_s"] = ctx.timer(state["call"](8 * seg), repeats=1, warmup=1, clock="wall").median_s
                if method == FAST_INFERENCE:  # the path the flag took here (the CPU: eager, and why)
                    row["path"], row["note"] = rmt.inference_path()[0], rmt.inference_path()[1] or ""
    with torch.inference_mode():
        reps = (1 if ctx.quick else 2) if n == total else 3
        t = ctx.timer(state["call"](n), repeats=reps, warmup=1 if method == "full (SDPA)" else 0)
    row.update(segments=-(-n // seg), seconds=t.median_s)
    if n == total and "rmt" in state:
        rmt = state["rmt"]
        runner = rmt._fast.runner if method == FAST_INFERENCE else rmt._graphs
        row.update(ms_per_segment=1e3 * t.median_s / row["segments"], graphs_captured=runner.captures)
    return row


def run_million(ctx) -> dict:
    """1M tokens graphed (with and without compile_step) and the crossover against full attention."""
    ctx.million = name, mem, positions, total, lengths, compile_step = _million_setup(ctx)
    # the compiled method last: its compilation is the long part; the CSV is rewritten after each case, so a
    # device-check timeout keeps what was measured
    cases = [dict(method="graphed", tokens=n) for n in (total, *lengths)]
    cases += [dict(method="full (SDPA)", tokens=n) for n in lengths]
    cases += [dict(method="graphed+compiled", tokens=n) for n in (total, *lengths)]
    cases.append(dict(method=FAST_INFERENCE, tokens=total))  # the one switch: the same path as graphed+compiled
    rows = ctx.sweep(cases, measure_million, series=("method",), sink=lambda rows: ctx.write_csv(rows, "million.csv"))
    summary = _million_summary(rows, total, lengths, targets_apply=ctx.cuda)
    ctx.write_csv(rows, "million.csv")
    ctx.write_json(
        {
            "summary": summary,
            "rows": rows,
            "tokens": total,
            "dtype": "float16" if ctx.cuda else "float32",
            "compile_step": compile_step,
            "setup": {"model": name, "mem": mem, "positions": positions},
        },
        "million.json",
    )
    ctx.save_plot(_plot_million(rows, total), "million.png")
    return summary


def _million_summary(rows, total, lengths, targets_apply: bool = True) -> dict:
    """Seconds for ``total`` tokens and the crossover length per graphed method; the targets (GPU, bert-base)
    are checked only where they apply (``meets_*`` None otherwise)."""

    def sec(method, n):
        return next(
            (r["seconds"] for r in rows if r["method"] == method and r.get("tokens") == n and r["status"] == "ok"), None
        )

    out = {"tokens": total, f"seconds_{FAST_INFERENCE}": sec(FAST_INFERENCE, total)}
    for method in ("graphed", "graphed+compiled"):
        t = sec(method, total)
        out[f"seconds_{method}"] = t
        out[f"meets_1s_{method}"] = None if t is None or not targets_apply else t < TARGET_1M_S
        # the shortest length from which the RMT is faster at every longer length (full attention out of memory
        # or not run after an OOM counts as slower)
        cross = None
        for n in reversed(lengths):
            rmt, full = sec(method, n), sec("full (SDPA)", n)
            if rmt is None or (full is not None and rmt >= full):
                break
            cross = n
        out[f"crossover_tokens_{method}"] = cross
        meets = cross is not None and cross <= TARGET_CROSSOVER
        out[f"meets_crossover_{method}"] = meets if targets_apply else None
    return out


def _plot_million(rows, total):
    fig, ax = pyplot().subplots(figsize=(7, 4))
    plot_lines(
        ax,
        rows,
        "tokens",
        "seconds",
        "method",
        xlabel="tokens (batch 1)",
        ylabel="seconds per forward pass",
        title=f"RMT (graphed FastRMT) vs full attention, {total:,} tokens ({machine_label()})",
    )
    return fig


def _ratios(rows) -> dict:
    def ms(method, batch):
        r = next(
            (
                r
                for r in rows
                if r["method"] == method
                and r["batch"] == batch
                and r["status"] == "ok"
                and r.get("ms_per_segment") is not None
            ),
            None,
        )
        return None if r is None else r["ms_per_segment"]

    out = {}
    for b in (1, 32):
        g = ms("graphed", b)
        for base in ("reference", "eager", "compiled"):
            other = ms(base, b)
            if g and other:
                out[f"{base}_over_graphed_b{b}"] = round(other / g, 3)
    return out


def _plot(rows):
    fig, ax = pyplot().subplots(figsize=(7, 4))
    methods = ("reference", "eager", "compiled", "graphed")
    for j, batch in enumerate((1, 32)):
        vals = [
            next(
                (
                    r["ms_per_segment"]
                    for r in rows
                    if r["method"] == m and r["batch"] == batch and r.get("ms_per_segment") is not None
                ),
                0,
            )
            for m in methods
        ]
        ax.bar([i + (j - 0.5) * 0.4 for i in range(len(methods))], vals, width=0.4, label=f"batch {batch}")
    ax.set_xticks(range(len(methods)), ["ReferenceRMT", "FastRMT eager", "torch.compile", "FastRMT graphed"])
    ax.set_yscale("log")
    ax.set_ylabel("ms per segment (512 positions)")
    ax.set_title(f"bert-base RMT, fp16 inference ({machine_label()})", fontsize=9)
    ax.legend()
    return fig


def run(ctx) -> dict:
    if ctx.option("million"):
        return run_million(ctx)
    if not ctx.cuda:
        print("no GPU: the CUDA-graph benchmark needs CUDA")
        return {"skipped": "no CUDA"}
    return run_graphs(ctx)


BENCHMARK = Benchmark(
    "cuda_graph",
    run=run,
    options=(Option("--million", action="store_true", help="only the 1M-token run (a tiny version on the CPU)"),),
)
