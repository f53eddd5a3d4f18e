"""What the input value checks cost: time per forward call (checks on minus off) and host reads per call
(CUDA: synchronisations in sync debug mode; CPU: tensor reads), FastRMT on GPT-2 at a few (batch, length)
sizes. Settings: docs/benchmarks.md, section ``input-checks``.
"""

from __future__ import annotations

import warnings

from . import presets
from .common import machine_label, plot_lines, pyplot
from .runner import Benchmark, Timer

CPU_CFG = dict(
    model="gpt2-checks", segment_size=256, mem=8, sizes=[(1, 256), (2, 1024), (4, 2048)], check_reps=200, forward_reps=1
)
GPU_CFG = dict(
    model="gpt2-small",
    segment_size=496,
    mem=8,
    sizes=[(1, 992), (8, 3968), (32, 7936)],
    check_reps=500,
    forward_reps=10,
)


def _config(cuda: bool, quick: bool) -> dict:
    cfg = dict(GPU_CFG if cuda else CPU_CFG)
    p = presets.preset(cfg["model"])
    cfg.update(layers=p.layers, hidden=p.hidden, heads=p.heads, vocab=p.vocab)
    if quick:
        cfg.update(
            sizes=cfg["sizes"][:2], check_reps=cfg["check_reps"] // 2, forward_reps=max(cfg["forward_reps"] // 2, 1)
        )
    return cfg


def _build(cfg: dict, device, dtype):
    backbone = presets.model(
        cfg["model"], "lm", max_positions=cfg["segment_size"] + 2 * cfg["mem"], bos_token_id=0, eos_token_id=0
    )
    return presets.rmt("fast", backbone, cfg["model"], cfg["mem"], cfg["segment_size"]).to(device, dtype).eval()


def count_host_reads(fn, device: str) -> int:
    """CUDA: synchronising operations while fn runs (sync debug mode). CPU: Tensor methods that read a value."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchronizing" in str(w.message) for w in caught)
    names = ("tolist", "item", "__bool__", "__int__", "__float__", "cpu", "numpy")
    originals = {name: getattr(torch.Tensor, name) for name in names}
    count = [0]

    def wrap(original):
        def wrapper(t, *args, **kwargs):
            count[0] += 1
            return original(t, *args, **kwargs)

        return wrapper

    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, wrap(original))
        fn()
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    return count[0]


def measure(rmt, batch: int, length: int, cfg: dict, device: str) -> dict:
    import torch

    ids = torch.randint(0, cfg["vocab"], (batch, length), device=device)
    mask = torch.ones_like(ids)
    memory = rmt.memory.detach().expand(batch, -1, -1).contiguous()

    def check():
        rmt._check_inputs(ids, mask, ids, None, memory)

    def forward():
        rmt(ids, attention_mask=mask, labels=ids, memory_state=memory, return_logits=False)

    timer = Timer(torch.device(device))

    def per_call(fn, reps: int) -> float:
        return timer(fn, repeats=3, warmup=1, inner=reps, clock="wall").median_s

    st = rmt.settings
    with torch.no_grad():
        st.check_inputs = True
        check_on = per_call(check, cfg["check_reps"])
        reads_check_on = count_host_reads(check, device)
        forward_on = per_call(forward, cfg["forward_reps"])
        reads_forward_on = count_host_reads(forward, device)
        st.check_inputs = False
        check_off = per_call(check, cfg["check_reps"])
        reads_check_off = count_host_reads(check, device)
        reads_forward_off = count_host_reads(forward, device)
        st.check_inputs = True
    check_us = max(check_on - check_off, 0.0) * 1e6
    return dict(
        batch=batch,
        length=length,
        tokens=batch * length,
        segments=-(-length // cfg["segment_size"]),
        check_us=check_us,
        check_on_us=check_on * 1e6,
        check_off_us=check_off * 1e6,
        forward_ms=forward_on * 1e3,
        overhead_pct=100 * check_us / (forward_on * 1e6),
        host_reads_per_call=reads_check_on - reads_check_off,
        forward_host_reads_on=reads_forward_on,
        forward_host_reads_off=reads_forward_off,
    )


def plot(ctx, rows: list[dict], record: dict):
    fig, (a, b) = pyplot().subplots(1, 2, figsize=(10, 4))
    for ax, y, ylabel, title in (
        (a, "check_us", "µs per call", "value checks, per forward call"),
        (b, "overhead_pct", "% of a forward call", "value checks / forward (no_grad)"),
    ):
        plot_lines(
            ax,
            rows,
            "tokens",
            y,
            xlog=10,
            ylog=False,
            xlabel="tokens per call (batch x length)",
            ylabel=ylabel,
            title=title,
        )
    fig.suptitle(f"Input value checks ({machine_label()})")
    return fig


def cases(ctx) -> list[dict]:
    import torch

    ctx.cfg = cfg = _config(ctx.cuda, ctx.quick)
    ctx.dtype = torch.bfloat16 if ctx.cuda else torch.float32
    ctx.rmt = rmt = _build(cfg, ctx.device, ctx.dtype)
    with torch.no_grad():  # first-call costs (lazy initialisation in torch and transformers) stay out of the rows
        b, t = cfg["sizes"][0]
        rmt(torch.zeros(b, t, dtype=torch.long, device=ctx.device), return_logits=False)
    return [dict(batch=b, length=t) for b, t in cfg["sizes"]]


def measure_case(ctx, case: dict, state: dict) -> dict:
    row = measure(ctx.rmt, case["batch"], case["length"], ctx.cfg, ctx.device.type)
    print(
        f"  batch {row['batch']:3d} x {row['length']:6d}: checks {row['check_us']:8.1f} µs/call, forward "
        f"{row['forward_ms']:9.2f} ms ({row['overhead_pct']:.3f}%), host reads/call {row['host_reads_per_call']}"
    )
    return row


def summarize(ctx, rows: list[dict]) -> tuple[dict, dict]:
    import torch

    # What one read of a small tensor counts as (sync debug mode may report a copy as more than one event).
    one_read = count_host_reads(lambda: torch.zeros(3, device=ctx.device).tolist(), ctx.device.type)
    ok = [r for r in rows if r["status"] == "ok"]
    summary = {
        "device": machine_label(),
        "dtype": str(ctx.dtype).replace("torch.", ""),
        "max_check_us": max((r["check_us"] for r in ok), default=None),
        "max_overhead_pct": max((r["overhead_pct"] for r in ok), default=None),
        "host_reads_per_call": sorted({r["host_reads_per_call"] for r in ok}),
        "one_small_read_counts_as": one_read,
        "ok": bool(ok) and len(ok) == len(rows) and all(r["host_reads_per_call"] == one_read for r in ok),
    }
    return summary, {"config": ctx.cfg, "rows": rows}


BENCHMARK = Benchmark("input_checks", cases, measure_case, summarize=summarize, plot=plot)
