"""Evaluating many documents of very different lengths with an encoder RMT (issue 27): the document stream
(segment-level continuous batching, :class:`rmt_fast.stream.DocumentStream`) against static batching (batches
of B in input order, and sorted by length) and one document at a time. Settings, columns and targets:
docs/benchmarks.md, section ``eval-stream``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from . import presets
from .common import machine_label, pyplot
from .runner import Benchmark, Option

METHODS = ("stream", "stream-input-order", "static-input-order", "static-sorted", "one-at-a-time")
CLS, SEP, PAD = 1, 2, 0  # the documents' special ids (content ids are drawn from 3 up)


@dataclass(frozen=True)
class Setting:
    name: str
    model: str  # an encoder preset (sequence classification, 2 labels)
    segment: int
    mem: int
    dtype: str
    batch: int
    documents: int
    max_segments: int  # document lengths: log-uniform from 1 to this many segments
    seed: int = 0


GPU = Setting("bert-base-fp16-B16", "bert-base", 499, 10, "float16", 16, 128, 64)
CPU = Setting("cpu-bert", "bert-cpu", 64, 8, "float32", 8, 96, 128)
CPU_QUICK = Setting("cpu-bert", "bert-cpu", 64, 8, "float32", 8, 64, 64)
TINY = Setting("tiny", "bert-test", 8, 2, "float32", 4, 12, 6)
# (key, numerator method, denominator, target, direction): docs/s ratios; "min" targets are lower bounds
GPU_TARGETS = (("stream_over_best_static_docs_per_s", 2.0), ("stream_over_one_at_a_time_docs_per_s", 10.0))
CPU_TARGETS = (("stream_over_best_static_docs_per_s", 0.95),)  # not slower than static by more than 5%
UTILISATION_TARGET, STEPS_TARGET = 0.95, 1.1


def setting(ctx) -> Setting:
    if ctx.option("tiny"):
        return TINY
    if ctx.cuda:
        return GPU
    return CPU_QUICK if ctx.quick else CPU


def document_lengths(s: Setting) -> list[int]:
    """Token counts, seeded: segments log-uniform in [1, max_segments], the short segment's size uniform."""
    import torch

    g = torch.Generator().manual_seed(s.seed)
    u = torch.rand(s.documents, generator=g, dtype=torch.float64)
    n = (u * math.log(s.max_segments + 1)).exp().floor().clamp(1, s.max_segments).long()
    short = torch.randint(1, s.segment + 1, (s.documents,), generator=g)
    return [int((k - 1) * s.segment + r) for k, r in zip(n.tolist(), short.tolist())]


def documents(s: Setting, vocab: int, device):
    import torch

    g = torch.Generator().manual_seed(s.seed + 1)
    return [torch.randint(3, vocab, (n,), generator=g).to(device) for n in document_lengths(s)]


def cases(ctx) -> list[dict]:
    """Every method once per round; rounds interleave the methods in time (on a shared CPU, the load drifts
    over minutes: the summary takes each method's median over rounds)."""
    s = setting(ctx)
    rounds = 1 if ctx.quick or ctx.option("tiny") or ctx.cuda else 3
    repeats = 2 if ctx.cuda and not ctx.quick else 1
    return [
        dict(setting=s.name, round=r, method=m, batch=1 if m == "one-at-a-time" else s.batch, repeats=repeats)
        for r in range(rounds)
        for m in METHODS
    ]


_STATE: dict = {}


def _wrapper(ctx, s: Setting):
    """One FastRMT for every method (CUDA: ``cuda_graph=True``, which FastRMT's own calls use where the
    batch is full and the stream's step always uses)."""
    import torch

    key = (s, str(ctx.device))
    if _STATE.get("key") != key:
        from rmt_fast import FastRMT

        _STATE.clear()
        model = presets.model(s.model, "cls", device=ctx.device, num_labels=2)
        rmt = (
            FastRMT(model, s.mem, s.segment, cls_token_id=CLS, sep_token_id=SEP, pad_token_id=PAD, cuda_graph=ctx.cuda)
            .to(ctx.device, getattr(torch, s.dtype))
            .eval()
        )
        _STATE.update(key=key, rmt=rmt, docs=documents(s, presets.preset(s.model).vocab, ctx.device))
    return _STATE["rmt"], _STATE["docs"]


def static_batches(docs: list, batch: int, sort: bool) -> list[list[int]]:
    order = sorted(range(len(docs)), key=lambda i: -len(docs[i])) if sort else list(range(len(docs)))
    return [order[i : i + batch] for i in range(0, len(order), batch)]


def _static_counts(lengths_seg: list[int], batches: list[list[int]], b: int) -> tuple[int, int]:
    """(steps, slot-steps) of static batching: each batch runs as many steps as its longest document."""
    steps = sum(max(lengths_seg[i] for i in idx) for idx in batches)
    return steps, steps * b


def measure(ctx, case: dict, state: dict) -> dict:
    import torch

    from rmt_fast.stream import DocumentStream

    s = setting(ctx)
    rmt, docs = _wrapper(ctx, s)
    method, b = case["method"], case["batch"]
    n_seg = [-(-len(d) // s.segment) for d in docs]
    useful, tokens = sum(n_seg), sum(len(d) for d in docs)
    stream = None
    if method.startswith("stream"):
        admission = "input" if method == "stream-input-order" else "longest_first"
        stream = DocumentStream(rmt, b, admission=admission, use_tqdm=False)

        def call():
            return stream.run(docs)
    else:
        batches = static_batches(docs, b, method == "static-sorted") if b > 1 else [[i] for i in range(len(docs))]

        def call():
            out = []
            for idx in batches:
                longest = max(len(docs[i]) for i in idx)
                ids = torch.full((len(idx), longest), PAD, dtype=torch.long, device=ctx.device)
                for row, i in enumerate(idx):
                    ids[row, : len(docs[i])] = docs[i]
                out.append(rmt(ids).logits)
            return out

    with torch.no_grad():
        t = ctx.timer(call, repeats=case["repeats"], warmup=1, clock="wall")
        token = ctx.peak.start()
        call()
        peak = ctx.peak.mb(token)
    if stream is not None:
        steps, slot_steps = stream.stats.steps, stream.stats.steps * b
    elif b > 1:
        steps, slot_steps = _static_counts(n_seg, batches, b)
    else:
        steps, slot_steps = useful, useful
    p = presets.preset(s.model)
    cpu = {} if t.cpu_s is None else {"cpu_s": t.cpu_s, "docs_per_cpu_s": len(docs) / t.cpu_s}
    return {
        "seconds": t.median_s,
        "p20_s": t.p20_s,
        "p80_s": t.p80_s,
        **cpu,
        "docs_per_s": len(docs) / t.median_s,
        "tokens_per_s": tokens / t.median_s,
        "steps": steps,
        "ideal_steps": -(-useful // b),
        "steps_over_ideal": steps / -(-useful // b),
        "utilisation": useful / slot_steps,
        "useful_segments": useful,
        "documents": len(docs),
        "tokens": tokens,
        "peak_mb": peak,
        "model": s.model,
        "layers": p.layers,
        "hidden": p.hidden,
        "segment": s.segment,
        "mem": s.mem,
        "dtype": s.dtype,
        "threads": torch.get_num_threads(),
    }


def per_method(rows: list[dict]) -> dict[str, dict]:
    """Each method's ok rows merged: the median over rounds of every numeric column (the first round's for the
    rest)."""
    import statistics

    out: dict[str, dict] = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method and r.get("status") == "ok"]
        if not mine:
            continue
        merged = dict(mine[0])
        for key, value in mine[0].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "round":
                values = [r[key] for r in mine if r.get(key) is not None]
                merged[key] = statistics.median(values) if values else None
        merged["rounds"] = len(mine)
        out[method] = merged
    return out


def targets(ctx, rows: list[dict]) -> dict:
    """The issue's targets from this run's rows (None where a row did not run). On the CPU the documents per
    second count process CPU time (``docs_per_cpu_s``): on a shared machine wall time measures the load."""
    ok = per_method(rows)
    rate = "docs_per_s" if ctx.cuda else "docs_per_cpu_s"
    stream = ok.get("stream")
    statics = [ok[m][rate] for m in ("static-input-order", "static-sorted") if m in ok]
    out = {}
    ratios = {
        "stream_over_best_static_docs_per_s": stream[rate] / max(statics) if stream and statics else None,
        "stream_over_one_at_a_time_docs_per_s": stream[rate] / ok["one-at-a-time"][rate]
        if stream and "one-at-a-time" in ok
        else None,
    }
    for key, target in GPU_TARGETS if ctx.cuda else CPU_TARGETS:
        r = ratios[key]
        out[key] = {"ratio": r, "target": target, "met": None if r is None else r >= target}
    if not ctx.cuda:
        r = ratios["stream_over_one_at_a_time_docs_per_s"]
        out["stream_over_one_at_a_time_docs_per_s"] = {"ratio": r, "target": None, "met": None}
    util = stream["utilisation"] if stream else None
    over = stream["steps_over_ideal"] if stream else None
    out["stream_utilisation"] = {
        "ratio": util,
        "target": UTILISATION_TARGET,
        "met": None if util is None else util >= UTILISATION_TARGET,
    }
    out["stream_steps_over_ideal"] = {
        "ratio": over,
        "target": STEPS_TARGET,
        "met": None if over is None else over <= STEPS_TARGET,
    }
    return out


def summarize(ctx, rows: list[dict]):
    _STATE.clear()
    got = targets(ctx, rows)
    return {k: v["ratio"] for k, v in got.items()}, {
        "targets": got,
        "setting": asdict(setting(ctx)),
        "document_lengths": document_lengths(setting(ctx)),
    }


def markdown(ctx, rows: list[dict], record: dict) -> str:
    s = record["setting"]
    lines = [
        f"# eval-stream: {machine_label()}",
        "",
        f"{s['documents']} documents, log-uniform 1 to {s['max_segments']} segments of {s['segment']} tokens "
        f"(seed {s['seed']}), {s['model']} {s['dtype']}, m = {s['mem']}, B = {s['batch']}; each method's median "
        "over the rounds (the CSV holds every round).",
        "",
        "| method | B | docs/s | docs/CPU-s | tokens/s | utilisation | steps | ideal steps | peak MB | status |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    merged = per_method(rows)
    failed = [r for r in rows if r.get("status") != "ok"]
    for r in [*merged.values(), *failed]:
        if r.get("status") != "ok":
            lines.append(f"| {r['method']} | {r['batch']} | | | | | | | | {r['status']}: {r.get('note', '')} |")
            continue
        peak = "" if r.get("peak_mb") is None else f"{r['peak_mb']:.0f}"
        per_cpu = "" if r.get("docs_per_cpu_s") is None else f"{r['docs_per_cpu_s']:.2f}"
        lines.append(
            f"| {r['method']} | {r['batch']} | {r['docs_per_s']:.2f} | {per_cpu} | {r['tokens_per_s']:.0f} | "
            f"{r['utilisation']:.1%} | {r['steps']} | {r['ideal_steps']} | {peak} | ok |"
        )
    lines += ["", "| target | value | target | met |", "| --- | ---: | ---: | --- |"]
    for key, v in record["targets"].items():
        value = "" if v["ratio"] is None else f"{v['ratio']:.3f}"
        lines.append(f"| {key} | {value} | {'' if v['target'] is None else v['target']} | {v['met']} |")
    return "\n".join(lines) + "\n"


def plot(ctx, rows: list[dict], record: dict):
    ok = list(per_method(rows).values())
    if not ok:
        return None
    fig, axes = pyplot().subplots(1, 2, figsize=(11, 4))
    names = [r["method"] for r in ok]
    rate = "docs_per_s" if ctx.cuda else "docs_per_cpu_s"
    axes[0].barh(names, [r[rate] for r in ok])
    axes[0].set_xlabel("documents / s" if ctx.cuda else "documents / CPU-second (1 thread)")
    axes[1].barh(names, [100 * r["utilisation"] for r in ok])
    axes[1].set_xlabel("slot utilisation, % (useful segment-steps / slot-steps)")
    for ax in axes:
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"eval-stream, {record['setting']['name']}: {machine_label()}")
    fig.tight_layout()
    return fig


BENCHMARK = Benchmark(
    "eval-stream",
    cases,
    measure,
    summarize=summarize,
    plot=plot,
    markdown=markdown,
    after_failure="continue",
    cpu_threads=1,
    options=(Option("--tiny", action="store_true", help="a seconds-long smoke run (the tests' tiny BERT)"),),
)
