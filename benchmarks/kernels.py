"""Attention kernel throughput on the RMT segment mask (GPU only): the Triton kernel against every stock backend
as the runtime calls it (SDPA choosing its kernel, SDPA with flash / efficient / cuDNN forced, FlexAttention with
the layout's mask_mod), SDPA flash without the padding mask (a bound) and xformers; fp16 / bf16, head dims 64 and
128, full and padded segments, forward and forward + backward, each timed under a CUDA graph (device time) and
eagerly (host time = eager - device); every row says what ``attn_backend="auto"`` picks, and the JSON checks the
kernel targets. Settings and the FLOP count: docs/benchmarks.md, section ``kernels``.
"""

from __future__ import annotations

from . import backends
from .common import attention_step, bench_layout, env_info, machine_label, package_version, pyplot
from .runner import Benchmark

MEM, H = 10, 12
DTYPES = ("float16", "bfloat16")
HEAD_DIMS = (64, 128)


def _shapes(quick: bool) -> list[tuple[int, int]]:
    if quick:
        return [(8, 532), (32, 532), (1, 4096)]
    return [(1, 532), (8, 532), (32, 532), (1, 4096), (1, 16384)]


def settings(quick: bool) -> list[dict]:
    """Every (dtype, head dim, layout, B, T) measured, in order."""
    return [
        dict(dtype=dt, D=d, layout=lay, B=b, T=t)
        for dt in DTYPES
        for d in HEAD_DIMS
        for lay in ("full", "padded")
        for b, t in _shapes(quick)
    ]


def _layout(B: int, T: int, device, padded: bool = True):
    return bench_layout(B, T, causal=True, padded=padded, device=device, seed=0, mem=MEM)


METHODS = (*backends.RACED, "sdpa_flash_nomask", "xformers")
STOCK = tuple(m for m in backends.RACED if m != "triton")  # the baseline of issue 24's targets


def _methods(layout, B: int, T: int, D: int, dtype, device, quick: bool = False):
    """name -> (callable(q, k, v) -> out), a string saying why it is unavailable, or None (not measured here:
    with ``quick``, FlexAttention, compiled per shape, is measured at float16, D <= 64 only)."""
    import torch
    import torch.nn.functional as F

    probe = torch.zeros(B, H, T, D, device=device, dtype=dtype)
    flex_here = not quick or (dtype == torch.float16 and D <= 64)
    out = backends.impls(layout, probe, probe, probe, tuple(b for b in backends.RACED if b != "flex" or flex_here))
    out["flex"] = out.get("flex")
    out["sdpa_flash_nomask"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if not layout.is_padded and D == 64:
        try:
            import xformers.ops as xops

            bias = xops.LowerTriangularMask()
            out["xformers"] = lambda q, k, v: xops.memory_efficient_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias
            )
        except Exception as exc:
            out["xformers"] = f"not importable ({type(exc).__name__})"
    return out


def _auto_choices(q, layout) -> dict:
    """What the dispatch table picks for this case: eager inference, eager training, graphed inference."""
    from rmt_fast.kernels import dispatch

    def pick(needs_grad, graphed):
        try:
            return dispatch.decide(q, q, layout, needs_grad=needs_grad, graphed=graphed).backend
        except Exception as exc:
            return f"error: {type(exc).__name__}"

    return {"fwd": pick(False, False), "fwd+bwd": pick(True, False), "graphed": pick(False, True)}


def targets(rows: list[dict]) -> list[dict]:
    """The issue's kernel targets, checked against the measured rows (a target without rows is "not measured")."""

    def ms(r_filter, column="ms"):
        return {
            (r["dtype"], r["D"], r["B"], r["T"], r["mode"]): r[column]
            for r in rows
            if r.get("status") == "ok" and r.get(column) is not None and r_filter(r)
        }

    def best_stock(layout):  # the issue 24 baseline: the fastest of SDPA (any kernel) and FlexAttention, device time
        best: dict = {}
        for method in STOCK:
            for key, value in ms(lambda r, m=method: r["method"] == m and r["layout"] == layout).items():
                best[key] = min(best.get(key, value), value)
        return best

    tri_full = ms(lambda r: r["method"] == "triton" and r["layout"] == "full")
    tri_pad = ms(lambda r: r["method"] == "triton" and r["layout"] == "padded")
    flash = ms(lambda r: r["method"] == "sdpa_flash_nomask" and r["layout"] == "full")
    dense = ms(lambda r: r["method"] == "sdpa" and r["layout"] == "padded")  # SDPA with the layout's dense mask
    checks = [
        (
            "forward >= 1.0x SDPA flash (B >= 8, T = 532, full)",
            tri_full,
            flash,
            1.0,
            lambda k: k[2] >= 8 and k[3] == 532 and k[4] == "fwd",
        ),
        (
            "forward + backward >= 0.9x SDPA flash (B >= 8, T = 532, full)",
            tri_full,
            flash,
            0.9,
            lambda k: k[2] >= 8 and k[3] == 532 and k[4] == "fwd+bwd",
        ),
        ("padded >= 2x SDPA with the dense mask", tri_pad, dense, 2.0, lambda k: True),
        (
            "forward >= 0.8x SDPA flash at T >= 4096 (full)",
            tri_full,
            flash,
            0.8,
            lambda k: k[3] >= 4096 and k[4] == "fwd",
        ),
        # issue 24: against the best stock backend at the same shape, device time (CUDA graph)
        ("device fwd+bwd >= 1.0x best stock (full)", tri_full, best_stock("full"), 1.0, lambda k: k[4] == "fwd+bwd"),
        ("device fwd+bwd >= 1.5x best stock (padded)", tri_pad, best_stock("padded"), 1.5, lambda k: k[4] == "fwd+bwd"),
        ("device fwd >= 1.0x best stock (full)", tri_full, best_stock("full"), 1.0, lambda k: k[4] == "fwd"),
        ("device fwd >= 2x best stock (padded)", tri_pad, best_stock("padded"), 2.0, lambda k: k[4] == "fwd"),
        # host time of the eager training call: Triton's at or below SDPA's (speedup = SDPA host / Triton host)
        *[
            (
                f"host fwd+bwd <= SDPA's ({lay})",
                ms(lambda r, lay=lay: r["method"] == "triton" and r["layout"] == lay, "host_ms"),
                ms(lambda r, lay=lay: r["method"] == "sdpa" and r["layout"] == lay, "host_ms"),
                1.0,
                lambda k: k[4] == "fwd+bwd",
            )
            for lay in ("full", "padded")
        ],
    ]
    out = []
    for name, tri, base, need, sel in checks:
        for key in sorted(k for k in tri if k in base and sel(k)):
            speed = base[key] / tri[key] if tri[key] > 0 else float("inf")
            dt, d, b, t, mode = key
            out.append(
                dict(
                    target=name,
                    dtype=dt,
                    D=d,
                    B=b,
                    T=t,
                    mode=mode,
                    speedup=round(speed, 3),
                    needed=need,
                    met=speed >= need,
                )
            )
    return out


MODES = (("fwd", 1.0), ("fwd+bwd", 2.5))  # name, FLOPs relative to the forward


def cases(ctx) -> list[dict]:
    from rmt_fast.kernels import dispatch

    ctx.table = dispatch.table_for_device(ctx.device)  # installs the table's launch configurations, if any
    return [
        dict(method=m, mode=mode, B=st["B"], T=st["T"], H=H, D=st["D"], dtype=st["dtype"], layout=st["layout"])
        for st in settings(ctx.quick)
        for m in METHODS
        for mode, _ in MODES
    ]


def measure(ctx, case: dict, state: dict) -> dict:
    """One method and mode on one setting; ``state`` (per setting) holds the tensors and the methods."""
    import torch

    if "methods" not in state:
        B, T, D, dtype = case["B"], case["T"], case["D"], getattr(torch, case["dtype"])
        layout = _layout(B, T, ctx.device, padded=case["layout"] == "padded")
        g = torch.Generator(device=ctx.device).manual_seed(0)
        state["qkv"] = [torch.randn(B, H, T, D, device=ctx.device, dtype=dtype, generator=g) for _ in range(3)]
        state["methods"] = _methods(layout, B, T, D, dtype, ctx.device, ctx.quick)
        state["auto"] = (
            _auto_choices(state["qkv"][0], layout)
            if not isinstance(state["methods"]["triton"], str)
            else dict.fromkeys(("fwd", "fwd+bwd", "graphed"), "sdpa (kernel unsupported)")
        )
    fn, auto = state["methods"].get(case["method"]), state["auto"]
    mode = case["mode"]
    row = dict(auto_choice=auto[mode], auto_choice_graphed=auto["graphed"] if mode == "fwd" else "")
    if fn is None:
        return {**row, "status": "skipped", "note": "not measured for this setting"}
    if isinstance(fn, str):
        return {**row, "status": "unavailable", "note": fn}
    scale = dict(MODES)[mode]
    try:
        step = attention_step(mode, fn, *state["qkv"])
        graphed = ctx.timer.graphed(step, rep_ms=10 if ctx.quick else 50)
        eager = ctx.timer.eager(step, target_ms=5 if ctx.quick else 25)
    except Exception as exc:
        failed = backends.failure(exc)
        if failed["status"] != "unavailable":
            raise  # the runner records it (oom, error)
        return {**row, **failed}
    B, T, D = case["B"], case["T"], case["D"]
    flops = scale * 2 * 2 * B * H * T * T * D / 2
    return {
        **row,
        "ms": graphed.ms,
        "p20_ms": 1e3 * graphed.p20_s,
        "p80_ms": 1e3 * graphed.p80_s,
        "eager_ms": eager.ms,
        "host_ms": eager.ms - graphed.ms,
        "tflops": flops / graphed.median_s / 1e12,
    }


def summarize(ctx, rows: list[dict]) -> tuple[dict, dict]:
    import torch

    rows[:] = [r for r in rows if r["status"] != "skipped"]  # methods that do not apply to a setting
    env = {
        **env_info(),
        "gpu": torch.cuda.get_device_name(),
        "xformers": package_version("xformers"),
        "dispatch_table": ctx.table.source if ctx.table is not None else None,
    }
    checked = targets(rows)
    summary = {"dispatch table": env["dispatch_table"] or "none (auto = SDPA)"}
    for r in rows:
        if (
            r["status"] == "ok"
            and r["T"] == 532
            and r["B"] == 8
            and r["method"] in ("triton", "sdpa_flash_nomask", "sdpa")
        ):
            key = f"{r['method']} {r['mode']} {r['dtype']} D{r['D']} {r['layout']} TFLOP/s (B=8,T=532)"
            summary[key] = round(r["tflops"], 1)
    summary["targets met"] = f"{sum(c['met'] for c in checked)}/{len(checked)}"
    return summary, {"env": env, "rows": rows, "targets": checked}


def plot(ctx, rows, record):
    env = record["env"]
    plt = pyplot()
    keys = list(dict.fromkeys((r["dtype"], r["D"], r["layout"], r["B"], r["T"]) for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    ok = {
        (r["method"], r["mode"], r["dtype"], r["D"], r["layout"], r["B"], r["T"]): r
        for r in rows
        if r["status"] == "ok"
    }
    fig, axes = plt.subplots(2, 1, figsize=(max(10, 0.55 * len(keys) + 2), 9))
    width = 0.8 / max(len(methods), 1)
    for ax, mode in zip(axes, ("fwd", "fwd+bwd"), strict=True):
        for i, m in enumerate(methods):
            vals = [ok[(m, mode, *key)]["tflops"] if (m, mode, *key) in ok else 0.0 for key in keys]
            ax.bar([x + (i - (len(methods) - 1) / 2) * width for x in range(len(keys))], vals, width, label=m)
        auto = {(r["dtype"], r["D"], r["layout"], r["B"], r["T"]): r["auto_choice"] for r in rows if r["mode"] == mode}
        short = {"float16": "fp16", "bfloat16": "bf16"}
        labels = [f"{short[k[0]]} D{k[1]}\n{k[2]}\nB={k[3]} T={k[4]}\nauto: {auto.get(k, '')}" for k in keys]
        ax.set_xticks(range(len(keys)), labels, fontsize=6)
        ax.set_ylabel("TFLOP/s (causal attention FLOPs)")
        ax.set_title(f"{mode} (auto: the dispatch table's eager choice)", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"RMT segment attention, H={H}, causal - {machine_label()} (torch {env['torch']}, triton {env['triton']}, "
        f"xformers {env.get('xformers')}; table: {env.get('dispatch_table') or 'none'})",
        fontsize=9,
    )
    return fig


BENCHMARK = Benchmark(
    "kernels",
    cases,
    measure,
    summarize=summarize,
    plot=plot,
    needs_cuda=True,
    series=("dtype", "D", "layout", "B", "T"),
    after_failure="continue",
)
