"""Training throughput and peak memory against the number of segments: ReferenceRMT, FastRMT (plain,
checkpointed, compiled) and full attention; forward, backward and an AdamW step, bf16 autocast on CUDA. Settings
``a`` (bert-base, the paper's), ``b`` (a 1.2B Llama-style decoder) and ``tiny`` (the CPU default); the JSON
holds the target ratios. Settings and targets: docs/benchmarks.md, section ``train``.
"""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass, field

from . import presets
from .common import machine_label, plot_lines, pyplot
from .runner import Benchmark, Option, ints, names

METHODS = ("reference", "fast", "fast-ckpt", "full", "fast-compiled")  # the order they run in
FAST_METHODS = ("fast", "fast-ckpt", "fast-compiled")
SPEEDUP_TARGET, MEMORY_TARGET = 1.5, 0.5
CKPT_TARGET_BYTES = 80e9
DEFAULT_BUDGET_S = {True: 70.0, False: 1800.0}  # quick / full, on CUDA (quick: the device check, ~100 s)


@dataclass
class Setting:
    name: str
    model: str  # a preset (rmt_fast.bench.presets): a BERT for an encoder setting, a Llama for a decoder one
    mem: int
    segment: int  # content tokens per segment
    batch: int
    segments: list[int]
    quick_segments: list[int]
    target_segments: int | None = None  # the ratio point
    ckpt_segments: list[int] = field(default_factory=list)  # extra points for fast-ckpt
    quick_methods: tuple[str, ...] = METHODS
    compile_step: object = True

    @property
    def kind(self) -> str:
        return "encoder" if presets.preset(self.model).is_encoder else "decoder"

    @property
    def positions(self) -> int:
        """Model positions per RMT segment."""
        return self.segment + (self.mem + 3 if self.kind == "encoder" else 2 * self.mem)

    def record(self) -> dict:
        p = presets.preset(self.model)
        return {
            **vars(self),
            "kind": self.kind,
            "layers": p.layers,
            "hidden": p.hidden,
            "heads": p.heads,
            "kv_heads": p.kv_heads or p.heads,
            "ffn": p.ffn,
            "vocab": p.vocab,
        }


QUICK = ("reference", "fast", "fast-ckpt", "full", "fast-compiled")  # fast-compiled last: it compiles longest
SETTINGS: dict[str, Setting] = {
    "a": Setting(
        "a", "bert-base", 10, 499, 32, [1, 2, 4, 7, 8, 16, 32], [1, 7], target_segments=7, quick_methods=QUICK
    ),
    "b": Setting(
        "b",
        "llama-1.2b",
        16,
        1024,
        4,
        [1, 2, 4, 8, 16, 32],
        [8],
        target_segments=8,
        ckpt_segments=[64],
        quick_methods=QUICK,
    ),
    "tiny-encoder": Setting(
        "tiny-encoder", "bert-train-tiny", 4, 32, 2, [1, 2, 4], [1, 2], compile_step={"backend": "aot_eager"}
    ),
    "tiny-decoder": Setting(
        "tiny-decoder", "llama-train-tiny", 4, 32, 2, [1, 2, 4], [1, 2], compile_step={"backend": "aot_eager"}
    ),
}
ALIASES = {"tiny": ["tiny-encoder", "tiny-decoder"]}


# ------------------------------------------------------------------------------------------------- models
def _build(s: Setting, method: str, device, max_segments: int):
    """(module to optimize, step call: (ids, labels) -> loss); the backbone in fp32, training mode."""
    task = "cls" if s.kind == "encoder" else "lm"
    extra = {"num_labels": 2} if task == "cls" else {}
    if method == "full":  # the same backbone over the whole input: its positions extended
        model = presets.model(s.model, task, device=device, max_positions=max_segments * s.segment, **extra).train()
        return model, lambda ids, labels: model(input_ids=ids, labels=labels).loss
    model = presets.model(s.model, task, device=device, max_positions=s.positions, **extra).train()
    kw = (
        {}
        if method == "reference"
        else dict(
            attn_backend="auto",
            gradient_checkpointing=method == "fast-ckpt",
            compile_step=s.compile_step if method == "fast-compiled" else False,
        )
    )
    rmt = presets.rmt("reference" if method == "reference" else "fast", model, s.model, s.mem, s.segment, **kw)
    rmt = rmt.to(device)
    return rmt, lambda ids, labels: rmt(ids, labels=labels, return_logits=False).loss


def _inputs(s: Setting, n: int, device):
    import torch

    vocab = presets.preset(s.model).vocab
    ids = presets.content_ids(s.batch, n * s.segment, vocab, seed=n, device=device)
    labels = (
        torch.randint(0, 2, (s.batch,), generator=torch.Generator().manual_seed(n)).to(device)
        if s.kind == "encoder"
        else ids
    )
    return ids, labels


# ------------------------------------------------------------------------------------------------ measuring
def measure(ctx, case: dict, state: dict) -> dict:
    """One point: two warm-up training steps (the second catches one-time recompiles, e.g. transformers setting
    ``config.problem_type`` on its first call), then ``reps`` timed steps (forward, backward, AdamW); the
    method's model and optimizer live in ``state`` for the method's points."""
    import torch

    s, method, n, cuda = SETTINGS[case["setting"]], case["method"], case["segments"], ctx.cuda
    hook = ctx.option("fail_hook")
    if hook is not None:
        hook(s.name, method, n)
    if "opt" not in state:
        if method == "fast-compiled":
            torch._dynamo.reset()  # frees earlier compiled graphs: each setting starts below the recompile limit
        state["module"], state["loss_fn"] = _build(s, method, ctx.device, ctx.max_points[(s.name, method)])
        state["opt"] = torch.optim.AdamW(state["module"].parameters(), lr=1e-6, foreach=cuda)
    opt, loss_fn = state["opt"], state["loss_fn"]
    ids, labels = _inputs(s, n, ctx.device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    losses = []

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_fn(ids, labels)
        loss.backward()
        opt.step()
        losses.append(loss.detach())

    warm = ctx.timer(lambda: (step(), step()), repeats=1, warmup=0, clock="wall")
    base_mb = torch.cuda.memory_allocated() / 2**20 if cuda else None
    token = ctx.peak.start()
    reps = ctx.reps if n in ctx.plan_segments[s.name] else 1  # the long checkpointed points: one step
    t = ctx.timer(step, repeats=reps, warmup=0)
    peak_mb = ctx.peak.mb(token)
    values = torch.stack(losses).float().cpu()
    if not torch.isfinite(values).all():
        raise FloatingPointError(f"loss not finite: {values.tolist()}")
    row = dict(
        step_ms=1e3 * t.median_s,
        p20_step_ms=1e3 * t.p20_s,
        p80_step_ms=1e3 * t.p80_s,
        tokens_per_s=case["tokens"] / t.median_s,
        peak_mb=peak_mb,
        base_mb=base_mb,
        act_peak_mb=None if base_mb is None or peak_mb is None else peak_mb - base_mb,
        warmup_s=warm.median_s,
        loss=float(values[-1]),
    )
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}


# ------------------------------------------------------------------------------------------------ summary
def _ok(rows, setting, method, n):
    return next(
        (
            r
            for r in rows
            if r["setting"] == setting and r["method"] == method and r["segments"] == n and r["status"] == "ok"
        ),
        None,
    )


def targets(rows, settings: list[Setting]) -> dict:
    """The issue's ratios: each FastRMT variant against ReferenceRMT at the setting's target segment count (with
    its own tokens/s, step time and peak memory, also where the reference did not run, e.g. out of memory), the
    fastest FastRMT variant there (``recommended``), and the checkpointed long point."""
    out = {}
    for s in settings:
        if s.target_segments is not None:
            n = s.target_segments
            ref = _ok(rows, s.name, "reference", n)
            entry = {}
            for m in FAST_METHODS:
                r = _ok(rows, s.name, m, n)
                if r is None:
                    entry[m] = None
                    continue
                peak = r["peak_mb"]
                entry[m] = dict(
                    tokens_per_s=round(r["tokens_per_s"], 1),
                    step_ms=r.get("step_ms"),
                    peak_gb=None if peak is None else round(peak * 2**20 / 1e9, 2),
                )
                if ref is None:
                    entry[m].update(
                        speedup=None, peak_ratio=None, activation_peak_ratio=None, meets_speedup=None, meets_memory=None
                    )
                    continue
                speed = r["tokens_per_s"] / ref["tokens_per_s"]
                mem = r["peak_mb"] / ref["peak_mb"] if r["peak_mb"] and ref["peak_mb"] else None
                act = (
                    r["act_peak_mb"] / ref["act_peak_mb"]
                    if r["act_peak_mb"] is not None and ref["act_peak_mb"]
                    else None
                )
                entry[m].update(
                    speedup=round(speed, 3),
                    peak_ratio=None if mem is None else round(mem, 3),
                    activation_peak_ratio=None if act is None else round(act, 3),
                    meets_speedup=speed >= SPEEDUP_TARGET,
                    meets_memory=None if mem is None else mem <= MEMORY_TARGET,
                )
            measured = {m: e["tokens_per_s"] for m, e in entry.items() if e is not None}
            entry["recommended"] = max(measured, key=measured.get) if measured else None
            out[f"{s.name}@{n}"] = entry
        for n in s.ckpt_segments:
            r = next(
                (r for r in rows if r["setting"] == s.name and r["method"] == "fast-ckpt" and r["segments"] == n), None
            )
            if r is not None:
                peak = r["peak_mb"]
                out[f"{s.name}@{n} fast-ckpt"] = dict(
                    status=r["status"],
                    peak_gb=None if peak is None else round(peak * 2**20 / 1e9, 2),
                    fits_80GB=r["status"] == "ok" and peak is not None and peak * 2**20 <= CKPT_TARGET_BYTES,
                    tokens_per_s=r.get("tokens_per_s"),
                )
    return out


def _plot(rows, settings: list[Setting]):
    fig, axes = pyplot().subplots(len(settings), 2, figsize=(11, 3.6 * len(settings)), squeeze=False)
    for (ax_t, ax_m), s in zip(axes, settings):
        dims, mine = presets.preset(s.model), [r for r in rows if r["setting"] == s.name]
        title = (
            f"({s.name}) {s.kind}, {dims.layers}L/{dims.hidden}d, {s.segment}+{s.mem} mem per segment, batch {s.batch}"
        )
        for ax, y, ylabel in (
            (ax_t, "tokens_per_s", "tokens/s (training step)"),
            (ax_m, "peak_mb", "peak memory (MB)"),
        ):
            plot_lines(ax, mine, "segments", y, "method", ylog=False, xlabel="segments", ylabel=ylabel, title=title)
    fig.suptitle(f"RMT training: forward + backward + AdamW ({machine_label()})", fontsize=10)
    return fig


# ------------------------------------------------------------------------------------------------ entry points
def resolve_settings(wanted: list[str] | None, cuda: bool) -> list[Setting]:
    wanted = wanted or (["a", "b"] if cuda else ["tiny"])
    out = []
    for name in wanted:
        for key in ALIASES.get(name, [name]):
            if key not in SETTINGS:
                raise ValueError(f"--setting: unknown setting {name!r}; expected one of a, b, tiny")
            out.append(SETTINGS[key])
    return out


def run(ctx) -> dict:
    """Sweep and write train.csv, train.json and train.png; returns the summary. Bad options raise ValueError
    before anything runs."""
    cuda, quick = ctx.cuda, ctx.quick
    chosen = resolve_settings(ctx.option("setting"), cuda)
    methods, segments, reps = ctx.option("methods"), ctx.option("segments"), ctx.option("reps")
    if methods is not None:
        unknown = sorted(set(methods) - set(METHODS))
        if unknown:
            raise ValueError(f"--methods: unknown {unknown}; expected some of {list(METHODS)}")
    if segments is not None and (not segments or any(not isinstance(n, int) or n < 1 for n in segments)):
        raise ValueError(f"--segments: expected positive ints, got {segments}")
    if ctx.budget_s is None:
        ctx.budget_s = DEFAULT_BUDGET_S[quick] if cuda else 120.0
    ctx.reps = reps if reps is not None else ((2 if quick else 3) if cuda else 1)  # CPU: a smoke run, one step
    plan, cases = [], []
    ctx.max_points, ctx.plan_segments = {}, {}
    for s in chosen:
        ms = [
            m
            for m in METHODS
            if (methods is None and (not quick or m in s.quick_methods)) or (methods is not None and m in methods)
        ]
        segs = segments if segments is not None else (s.quick_segments if quick else s.segments)
        plan.append((s, ms, segs))
        ctx.plan_segments[s.name] = segs
        for m in ms:
            points = list(segs) + ([n for n in s.ckpt_segments if n not in segs] if m == "fast-ckpt" else [])
            ctx.max_points[(s.name, m)] = max(points)
            cases += [
                dict(setting=s.name, method=m, segments=n, batch=s.batch, tokens=s.batch * n * s.segment)
                for n in points
            ]
    rows = ctx.sweep(cases, measure, series=("setting", "method"), after_failure="record", sink=ctx.write_csv)
    count = {st: sum(r["status"] == st for r in rows) for st in ("ok", "oom", "over_budget", "error", "skipped")}
    summary = {
        "device": machine_label(),
        "seconds": round(ctx.clock() - ctx.started, 1),
        "budget_s": ctx.budget_s,
        "points": len(rows),
        **{f"{st}_points": c for st, c in count.items()},
        "targets": targets(rows, chosen),
        "ok": count["error"] == 0,
    }
    ctx.write_csv(rows)
    ctx.write_json(
        {
            "summary": summary,
            "settings": [s.record() for s, _, _ in plan],
            "methods": {s.name: ms for s, ms, _ in plan},
            "reps": ctx.reps,
            "precision": "bf16 autocast, fp32 weights" if cuda else "fp32",
            "rows": rows,
        }
    )
    ctx.save_plot(_plot(rows, chosen))
    return summary


BENCHMARK = Benchmark(
    "train",
    run=run,
    options=(
        Option(
            "--setting",
            type=names,
            default=None,
            help="a, b, tiny (comma-separated; default: a,b on CUDA, tiny on the CPU)",
        ),
        Option("--segments", type=ints, default=None, help="segment counts, e.g. 1,2,4,8"),
        Option("--methods", type=names, default=None, help=f"some of {','.join(METHODS)}"),
        Option("--reps", type=int, default=None, help="measured steps per point (after two warm-up steps)"),
        Option("--fail-hook", default=None, help=argparse.SUPPRESS),  # tests: (setting, method, n) -> raise
    ),
)
