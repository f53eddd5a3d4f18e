"""FastRMT against ReferenceRMT on the CPU in one run: forward time (no_grad), forward + backward time and peak
memory (a fresh subprocess per point), as ratios reference / FastRMT. Settings: docs/benchmarks.md, section
``compare``.
"""

from __future__ import annotations

from . import presets
from .common import PeakMemory, machine_label, pyplot, run_point_in_subprocess
from .runner import Benchmark, Option

DEFAULTS = dict(model="gpt2-4l", segments=16, segment_size=128, mem=8, batch=2)
MODES = ("forward_no_grad", "forward_backward")
WRAPPERS = {"ref": "ReferenceRMT", "fast": "FastRMT"}


def build(wrapper: str, model: str, segment_size: int, mem: int, seed: int = 0, **_):
    backbone = presets.model(model, "lm", seed=seed, max_positions=segment_size + 2 * mem)
    return presets.rmt("fast" if wrapper == "fast" else "reference", backbone, model, mem, segment_size)


def inputs(model: str, batch: int, segments: int, segment_size: int, seed: int = 1, **_):
    import torch

    vocab = presets.preset(model).vocab
    return torch.randint(0, vocab, (batch, segments * segment_size), generator=torch.Generator().manual_seed(seed))


def step(rmt, ids, mode):
    import torch

    if mode == "forward_no_grad":
        with torch.no_grad():
            rmt(ids, labels=ids)
    else:
        rmt.zero_grad(set_to_none=True)
        rmt(ids, labels=ids).loss.backward()


def measure_peak(wrapper: str, mode: str, cfg: dict) -> dict:
    """Run in a fresh subprocess: MB of resident memory added at the peak of the process's first call."""
    rmt = build(wrapper, **cfg)
    ids = inputs(**cfg)
    peak = PeakMemory(cuda=False)
    token = peak.start()
    step(rmt, ids, mode)
    return {"peak_mb": peak.mb(token)}


def cases(ctx) -> list[dict]:
    import torch

    ctx.cfg = cfg = {**DEFAULTS, **({"segments": 4} if ctx.quick else {})}
    ctx.models = {w: build(w, **cfg) for w in WRAPPERS}
    with torch.no_grad():
        ctx.models["fast"].memory.copy_(ctx.models["ref"].memory)
    ctx.ids = inputs(**cfg)
    return [dict(wrapper=WRAPPERS[w], mode=mode) for mode in MODES for w in WRAPPERS]


def measure(ctx, case: dict, state: dict) -> dict:
    w = next(k for k, v in WRAPPERS.items() if v == case["wrapper"])
    repeats = 1 if ctx.quick else ctx.option("repeats")
    t = ctx.timer(lambda: step(ctx.models[w], ctx.ids, case["mode"]), repeats=repeats, warmup=1, clock="wall")
    peak = run_point_in_subprocess(measure_peak, wrapper=w, mode=case["mode"], cfg=ctx.cfg)["peak_mb"]
    return dict(seconds=t.median_s, p20_s=t.p20_s, p80_s=t.p80_s, peak_mb=round(float(peak), 1), repeats=repeats)


def summarize(ctx, rows: list[dict]) -> tuple[dict, dict]:
    ratios = {}
    for mode in MODES:
        ref = next(r for r in rows if r["mode"] == mode and r["wrapper"] == "ReferenceRMT")
        fast = next(r for r in rows if r["mode"] == mode and r["wrapper"] == "FastRMT")
        ratios[f"{mode}_time"] = ref["seconds"] / fast["seconds"]
        ratios[f"{mode}_peak_memory"] = ref["peak_mb"] / max(fast["peak_mb"], 1e-9)
    record = {"config": ctx.cfg, "rows": rows, "ratios_ref_over_fast": ratios}
    return {"ratios_ref_over_fast": {k: round(v, 3) for k, v in ratios.items()}}, record


def plot(ctx, rows, record):
    plt = pyplot()
    ratios, cfg = record["ratios_ref_over_fast"], ctx.cfg
    dims = presets.preset(cfg["model"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, unit in ((axes[0], "seconds", "time per call (s)"), (axes[1], "peak_mb", "peak memory (MB)")):
        for i, mode in enumerate(MODES):
            for j, wrapper in enumerate(("ReferenceRMT", "FastRMT")):
                r = next(r for r in rows if r["mode"] == mode and r["wrapper"] == wrapper)
                ax.bar(
                    i + (j - 0.5) * 0.38,
                    r[key],
                    width=0.38,
                    color=("tab:gray", "tab:blue")[j],
                    label=wrapper if i == 0 else None,
                )
            name = "time" if key == "seconds" else "peak_memory"
            ax.text(i, ax.get_ylim()[1] * 0.02, f"x{ratios[f'{mode}_{name}']:.2f}", ha="center", color="white")
        ax.set_xticks(range(len(MODES)), ["forward (no_grad)", "forward + backward"])
        ax.set_ylabel(unit)
        ax.legend()
    fig.suptitle(
        f"FastRMT vs ReferenceRMT: GPT-2 {dims.layers}L/{dims.hidden}d, {cfg['segments']}x"
        f"{cfg['segment_size']} tokens, m={cfg['mem']}, batch {cfg['batch']} ({machine_label()})",
        fontsize=9,
    )
    return fig


BENCHMARK = Benchmark(
    "compare_cpu",
    cases,
    measure,
    summarize=summarize,
    plot=plot,
    options=(Option("--repeats", type=int, default=3, help="timed calls per point"),),
)
