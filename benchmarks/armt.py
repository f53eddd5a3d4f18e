"""ARMT latency and peak memory against length at batch 1: FastARMT's sequential and diagonal schedules, eager and
under CUDA graphs (``cuda_graph=True``; on the CPU the graph runner's static-buffer logic runs without capture),
against full attention on the backbone; the summary holds the targets' ratios, each from rows of the same run.
Settings and targets: docs/benchmarks.md, section ``armt``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from . import presets
from .common import machine_label, plot_lines, pyplot
from .runner import Benchmark, Option

METHODS = ("sequential", "sequential-graphed", "diagonal", "diagonal-graphed", "full")
CPU_GRAPHED_NOTE = "no CUDA: the graph runner's static buffers without capture"


@dataclass(frozen=True)
class Setting:
    name: str
    model: str  # a Llama-family preset
    segment: int
    mem: int
    d_mem: int
    dtype: str
    lengths: tuple[int, ...]


GPU_LENGTHS = (2048, 4096, 8192, 16384, 32768, 65536, 131072)
GPU = tuple(Setting(f"llama-1b-m{m}", "llama-1.2b", 1024, m, 64, "bfloat16", GPU_LENGTHS) for m in (128, 16))
GPU_QUICK = (Setting("llama-1b-m128", "llama-1.2b", 1024, 128, 64, "bfloat16", (2048, 32768, 131072)),)
CPU_LATENCY = Setting("cpu-latency-bound", "armt-cpu-latency", 64, 8, 64, "float32", (256, 512, 1024, 2048))
CPU_COMPUTE = Setting("cpu-compute-bound", "armt-cpu-compute", 128, 8, 64, "float32", (12 * 128,))
TINY = Setting("tiny", "llama-test", 8, 2, 8, "float32", (24, 48))

# (key, setting name, numerator method, denominator method, tokens, target)
CPU_TARGETS = (
    ("latency_bound_seq_over_diag", CPU_LATENCY.name, "sequential", "diagonal", 2048, 2.0),
    ("compute_bound_seq_over_diag", CPU_COMPUTE.name, "sequential", "diagonal", 12 * 128, 1.0),
)


def gpu_targets(settings) -> tuple:
    """The ratios; the graphed ones are issue 25's seconds at the 1.2B shape (sequential graphed <= 0.6 s at
    32,768 tokens, diagonal graphed <= 0.15 s at 32,768 and <= 0.55 s at 131,072) over the eager times of the
    2026-12-04 H200 run (1.214, 0.241, 0.873 s), so each is measured against eager rows of the same run."""
    out = []
    for s in settings:
        out += [
            (f"{s.name}_seq_over_diag_32768", s.name, "sequential", "diagonal", 32768, 2.0),
            (f"{s.name}_seq_over_diag_2seg", s.name, "sequential", "diagonal", 2 * s.segment, 1.0),
            (f"{s.name}_full_over_diag_131072", s.name, "full", "diagonal", 131072, 3.0),
            (f"{s.name}_seq_over_seq_graphed_32768", s.name, "sequential", "sequential-graphed", 32768, 2.0),
            (f"{s.name}_diag_over_diag_graphed_32768", s.name, "diagonal", "diagonal-graphed", 32768, 1.6),
            (f"{s.name}_diag_over_diag_graphed_131072", s.name, "diagonal", "diagonal-graphed", 131072, 1.6),
        ]
    return tuple(out)


# issue 25's absolute goals for the graphed rows at the 1.2B shape (seconds; GPU only): reported beside the ratios
GPU_GOALS = (("sequential-graphed", 32768, 0.6), ("diagonal-graphed", 32768, 0.15), ("diagonal-graphed", 131072, 0.55))


def settings(ctx) -> tuple[Setting, ...]:
    if ctx.option("tiny"):
        return (TINY,)
    if ctx.cuda:
        return GPU_QUICK if ctx.quick else GPU
    if ctx.quick:
        return (Setting(CPU_LATENCY.name, *list(asdict(CPU_LATENCY).values())[1:-1], (256, 2048)), CPU_COMPUTE)
    return (CPU_LATENCY, CPU_COMPUTE)


def cases(ctx) -> list[dict]:
    """Every (setting, method, length), a series per (setting, method), lengths rising."""
    cap = ctx.option("max_tokens")
    repeats = 2 if ctx.quick or ctx.cuda else 3
    return [
        dict(setting=s.name, method=method, tokens=n, repeats=repeats)
        for s in settings(ctx)
        for method in METHODS
        for n in s.lengths
        if cap is None or n <= cap
    ]


_MODEL: dict = {}


def _backbone(s: Setting, device, positions: int):
    """The setting's decoder (random weights from its preset's config); one model resident at a time."""
    import torch

    key = (s.model, s.dtype, str(device))
    if key not in _MODEL:
        _MODEL.clear()
        model = presets.model(s.model, "lm", device=device, max_positions=positions)
        _MODEL[key] = model.to(getattr(torch, s.dtype)).eval()
    return _MODEL[key]


def measure(ctx, case: dict, state: dict) -> dict:
    import torch

    if not ctx.cuda and ctx.option("threads"):
        torch.set_num_threads(ctx.option("threads"))  # the runner restores the count after the sweep
    s = next(x for x in settings(ctx) if x.name == case["setting"])
    n = case["tokens"]
    p = presets.preset(s.model)
    info = {
        "model": s.model,
        "layers": p.layers,
        "hidden": p.hidden,
        "segment": s.segment,
        "mem": s.mem,
        "d_mem": s.d_mem,
        "dtype": s.dtype,
        "segments": -(-n // s.segment),
        "threads": torch.get_num_threads(),
    }
    model = _backbone(s, ctx.device, max(max(x.lengths) for x in settings(ctx) if x.model == s.model))
    if case["method"] == "full":
        base = model.base_model

        def call():
            return base(input_ids=ids, use_cache=False).last_hidden_state
    else:
        if "armt" not in state:
            from rmt_fast import FastARMT

            state["armt"] = FastARMT(
                model,
                s.mem,
                s.segment,
                d_mem=s.d_mem,
                diagonal=case["method"].startswith("diagonal"),
                cuda_graph=case["method"].endswith("-graphed"),
            ).to(ctx.device)
        armt = state["armt"]
        if case["method"].endswith("-graphed"):
            info["note"] = "" if ctx.cuda else CPU_GRAPHED_NOTE

        def call():
            return armt(ids, return_logits=False).memory_state.A

    ids = torch.randint(0, p.vocab, (1, n), generator=torch.Generator().manual_seed(n)).to(ctx.device)
    with torch.no_grad():
        t = ctx.timer(call, repeats=case["repeats"], warmup=1, clock="wall")
        token = ctx.peak.start()
        call()
        peak = ctx.peak.mb(token)
    return {"seconds": t.median_s, "p20_s": t.p20_s, "p80_s": t.p80_s, "cpu_s": t.cpu_s, "peak_mb": peak, **info}


def ratios(rows: list[dict], targets) -> dict:
    """``{key: {"ratio", "target", "met"}}``: numerator / denominator seconds of two rows of this run."""
    ok = {(r["setting"], r["method"], r["tokens"]): r["seconds"] for r in rows if r["status"] == "ok"}
    out = {}
    for key, setting, num, den, n, target in targets:
        a, b = ok.get((setting, num, n)), ok.get((setting, den, n))
        ratio = a / b if a and b else None
        out[key] = {"ratio": ratio, "target": target, "met": None if ratio is None else ratio >= target}
    return out


def summarize(ctx, rows: list[dict]):
    _MODEL.clear()
    chosen = settings(ctx)
    targets = () if ctx.option("tiny") else gpu_targets(chosen) if ctx.cuda else CPU_TARGETS
    got = ratios(rows, targets)
    summary = {k: v["ratio"] for k, v in got.items()}
    record = {"targets": got, "settings": [asdict(s) for s in chosen]}
    if ctx.cuda and not ctx.option("tiny"):
        record["goals_s"] = goals(rows, [s.name for s in chosen if s.model == "llama-1.2b"])
    return summary, record


def goals(rows: list[dict], names) -> dict:
    """``{"<setting>_<method>_<tokens>": {"seconds", "goal_s", "met"}}`` for issue 25's graphed goals."""
    ok = {(r["setting"], r["method"], r["tokens"]): r["seconds"] for r in rows if r["status"] == "ok"}
    out = {}
    for name in names:
        for method, n, goal in GPU_GOALS:
            t = ok.get((name, method, n))
            out[f"{name}_{method}_{n}"] = {"seconds": t, "goal_s": goal, "met": None if t is None else t <= goal}
    return out


def plot(ctx, rows: list[dict], record: dict):
    names = list(dict.fromkeys(r["setting"] for r in rows))
    fig, axes = pyplot().subplots(2, len(names), figsize=(5 * len(names), 7), squeeze=False)
    for j, name in enumerate(names):
        mine = [r for r in rows if r["setting"] == name]
        for i, (y, label) in enumerate((("seconds", "seconds (median)"), ("peak_mb", "peak memory, MiB"))):
            plot_lines(
                axes[i][j], mine, "tokens", y, "method", ylog=False, xlabel="tokens (batch 1)", ylabel=label, title=name
            )
    fig.suptitle(f"ARMT at batch 1: {machine_label()}")
    return fig


BENCHMARK = Benchmark(
    "armt",
    cases,
    measure,
    summarize=summarize,
    plot=plot,
    series=("setting", "method"),
    after_failure="record",
    cpu_threads=1,
    options=(
        Option("--tiny", action="store_true", help="a seconds-long smoke run (a 2-layer test model)"),
        Option("--max-tokens", type=int, default=None, help="drop the lengths above this"),
        Option("--threads", type=int, default=None, help="CPU: torch threads (default: 1)"),
    ),
)
