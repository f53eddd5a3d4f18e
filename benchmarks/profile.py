"""Where the time goes: FastRMT against ReferenceRMT under ``torch.profiler`` on the same input (BERT and GPT-2,
4 segments, batch 1): aten operators and device kernels per segment, and CPU / device time per category
(attention, matmul, norms, copies & cat, mask, other, python overhead), each ``aten::`` event's self time going
to the category of its outermost ``aten::`` ancestor and its Python stack. The categories' rules and the
outputs: docs/benchmarks.md, section ``profile``.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

from . import presets
from .common import machine_label, pyplot
from .runner import Benchmark, Option

CATEGORIES = ("attention", "matmul", "norms", "copies & cat", "mask", "other", "python overhead")
ATTENTION_OPS = (
    "scaled_dot_product",
    "flash_attention",
    "efficient_attention",
    "_fused_attention",
    "_flash_attention",
    "_efficient_attention",
)
MATMUL_OPS = {"aten::addmm", "aten::mm", "aten::linear", "aten::bmm", "aten::matmul", "aten::baddbmm"}
NORM_OPS = {"aten::layer_norm", "aten::native_layer_norm", "aten::rms_norm", "aten::_fused_rms_norm"}
COPY_OPS = {
    f"aten::{name}"
    for name in (
        "copy_",
        "cat",
        "stack",
        "contiguous",
        "clone",
        "index",
        "index_select",
        "gather",
        "scatter",
        "scatter_",
        "index_put",
        "index_put_",
        "_index_put_impl_",
        "to",
        "_to_copy",
        "slice_scatter",
        "select_scatter",
        "masked_scatter",
        "index_copy",
    )
}
MASK_FILES = ("transformers/masking_utils.py", "kernels/layout.py")
ATTENTION_FRAMES = (
    "attention_forward",
    "sdpa_rmt_attention",
    "triton_attention.py",
    "sdpa_attention.py",
    "flex_attention.py",
)
ATTENTION_SCOPE = "rmt_fast::attention"  # record_function around rmt_fast.attention.run_backend while profiling
TRITON_ATTENTION_KERNELS = ("_rmt_attn", "_rmt_dropout")  # name prefixes of the kernels in kernels/triton_kernels.py


@dataclass
class ProfileSetup:
    backbones: tuple[str, ...]  # "bert", "gpt2"
    models: dict  # backbone -> preset (rmt_fast.bench.presets)
    positions: int
    mem: int
    segments: int
    dtype: str
    timing_calls: int = 3  # calls averaged in the timing profile


def default_setup(cuda: bool, quick: bool = False, tiny: bool = False) -> ProfileSetup:
    both = ("bert",) if quick else ("bert", "gpt2")
    if cuda:
        return ProfileSetup(both, {"bert": "bert-base", "gpt2": "gpt2-small"}, 512, 10, 4, "float16")
    if tiny:
        return ProfileSetup(("bert",), {"bert": "bert-micro"}, 32, 4, 2, "float32")
    return ProfileSetup(both, {"bert": "bert-cpu", "gpt2": "gpt2-cpu"}, 128, 10, 4, "float32")


# ------------------------------------------------------------------------------------------------ models
def _build(backbone: str, s: ProfileSetup, wrapper: str, device, dtype):
    name = s.models[backbone]
    p = presets.preset(name)
    model = presets.model(name, "bare" if backbone == "bert" else "lm", bos_token_id=None, eos_token_id=None)
    size = p.segment_size(s.positions, s.mem)
    rmt = presets.rmt(wrapper, model, name, s.mem, size).to(device=device, dtype=dtype).eval()
    return rmt, presets.content_ids(1, size * s.segments, p.vocab, seed=1, device=device)


# ------------------------------------------------------------------------------------------------ analysis
def _category_of_op(name: str) -> str:
    if any(a in name for a in ATTENTION_OPS):
        return "attention"
    if name in MATMUL_OPS:
        return "matmul"
    if name in NORM_OPS:
        return "norms"
    if name in COPY_OPS:
        return "copies & cat"
    return "other"


def _classify(evt) -> tuple[str, bool]:
    """(category, is_top_level) of an aten event, from its ancestry (Python frames included)."""
    top, in_attention_frame, in_scope, in_mask = evt, False, False, False
    p = evt.cpu_parent
    while p is not None:
        name = p.name
        if name.startswith("aten::"):
            top = p
        elif name == ATTENTION_SCOPE:
            in_scope = True
        elif any(f in name for f in MASK_FILES):
            in_mask = True
        elif any(f in name for f in ATTENTION_FRAMES):
            in_attention_frame = True
        p = p.cpu_parent
    is_top = top is evt
    if in_mask:
        return "mask", is_top
    if in_scope:
        return "attention", is_top
    cat = _category_of_op(top.name)
    if in_attention_frame and top.name in (
        "aten::softmax",
        "aten::_softmax",
        "aten::bmm",
        "aten::matmul",
        "aten::baddbmm",
    ):
        cat = "attention"
    return cat, is_top


def _on_device(evt) -> bool:
    return str(getattr(evt, "device_type", "CPU")).endswith("CUDA")


def _aten_events(events) -> list:
    out = [
        e
        for e in events
        if e.name.startswith("aten::") and not getattr(e, "is_python_function", False) and not _on_device(e)
    ]
    return sorted(out, key=lambda e: (e.time_range.start, -e.time_range.end))


def _triton_kernels(events) -> tuple[float, int]:
    """(device ms, count) of the Triton attention kernels among the device events."""
    mine = [e for e in events if _on_device(e) and e.name.startswith(TRITON_ATTENTION_KERNELS)]
    return sum(e.time_range.elapsed_us() for e in mine) / 1e3, len(mine)


def _scope_outside_aten_ms(events) -> float:
    """CPU ms inside the attention scopes but outside aten operators (the Triton launcher's Python, mostly)."""
    total = sum(e.time_range.elapsed_us() for e in events if e.name == ATTENTION_SCOPE and not _on_device(e))
    for e in _aten_events(events):
        p, inside = e.cpu_parent, False
        while p is not None:
            if p.name.startswith("aten::"):
                inside = False
                break
            inside = inside or p.name == ATTENTION_SCOPE
            p = p.cpu_parent
        if inside:  # a top-level aten operator inside a scope: its time is already in a category
            total -= e.cpu_time_total
    return max(total, 0.0) / 1e3


def analyse(stack_events, timing_events, wall_ms: float, n_segments: int, calls: int, cuda: bool) -> dict:
    """Categories come from the with_stack profile; times (per call) from the lighter timing profile when its
    operator sequence matches, else from the with_stack profile itself."""
    labelled = [(e, *_classify(e)) for e in _aten_events(stack_events)]
    timed = _aten_events(timing_events) if timing_events is not None else []
    per_call = len(labelled)
    matched = (
        bool(timed)
        and len(timed) == calls * per_call
        and all(t.name == labelled[i % per_call][0].name for i, t in enumerate(timed))
    )
    if matched:
        pairs = [(t, labelled[i % per_call][1], labelled[i % per_call][2]) for i, t in enumerate(timed)]
        div = calls
    else:
        pairs, div = labelled, 1
    cpu_ms, dev_ms, ops, kernels = (dict.fromkeys(CATEGORIES, 0.0) for _ in range(4))
    top_cpu_total = 0.0
    for e, cat, is_top in pairs:
        cpu_ms[cat] += e.self_cpu_time_total / 1e3 / div
        if is_top:
            top_cpu_total += e.cpu_time_total / 1e3 / div
        if cuda:
            own = getattr(e, "kernels", []) or []
            # the Triton kernels are counted below, from the device events
            triton = [k for k in own if k.name.startswith(TRITON_ATTENTION_KERNELS)]
            dev_ms[cat] += (getattr(e, "self_device_time_total", 0.0) - sum(k.duration for k in triton)) / 1e3 / div
            kernels[cat] += len(own) - len(triton)
    for _, cat, is_top in labelled:
        ops[cat] += int(is_top)
    source = timing_events if matched else stack_events
    if cuda:
        t_ms, t_n = _triton_kernels(source)
        dev_ms["attention"] += t_ms / div
        kernels["attention"] += t_n
    if cuda and matched:
        kernels = {k: v / calls for k, v in kernels.items()}
    launcher_ms = _scope_outside_aten_ms(source) / div
    cpu_ms["attention"] += launcher_ms
    cpu_ms["python overhead"] = max(wall_ms - top_cpu_total - launcher_ms, 0.0)
    top_level = sum(ops.values())
    out = {
        "wall_ms_profiled": wall_ms,
        "op_cpu_ms": top_cpu_total,
        "ops_per_segment": top_level / n_segments,
        "all_ops_per_segment": per_call / n_segments,
        "cpu_ms": cpu_ms,
        "ops_per_segment_by_category": {k: v / n_segments for k, v in ops.items()},
        "times_from": "timing profile (no stacks)" if matched else "with_stack profile",
    }
    if cuda:
        out["device_ms"] = dev_ms
        out["kernels_per_segment_by_category"] = {k: v / n_segments for k, v in kernels.items()}
        out["kernels_per_segment"] = sum(kernels.values()) / n_segments
    return out


@contextlib.contextmanager
def attention_scope():
    """While profiling: every call of FastRMT's attention backend runs inside ``record_function(ATTENTION_SCOPE)``
    (the unprofiled timings run without it)."""
    from torch.profiler import record_function

    from rmt_fast import attention as seam

    original = seam.run_backend

    def scoped(*args, **kwargs):
        with record_function(ATTENTION_SCOPE):
            return original(*args, **kwargs)

    seam.run_backend = scoped
    try:
        yield
    finally:
        seam.run_backend = original


def _profile_one(ctx, backbone, s: ProfileSetup, wrapper, dtype, trace: str) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    rmt, ids = _build(backbone, s, wrapper, ctx.device, dtype)

    def call():
        rmt(ids, return_logits=False)

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.cuda else [])
    calls = s.timing_calls
    with torch.no_grad():
        unprofiled = ctx.timer(call, repeats=5, warmup=2, clock="wall")
        # Pass 1: Python stacks, for the categories (mask building) and the Chrome trace.
        with attention_scope(), profile(activities=acts, with_stack=True) as prof_stack:
            call()
            ctx.timer.sync()
        # Pass 2: no stacks (far less profiler overhead), for the times.
        with attention_scope(), profile(activities=acts) as prof_time:
            wall = ctx.timer(call, repeats=1, warmup=0, inner=calls, clock="wall").ms
    prof_stack.export_chrome_trace(str(ctx.path(trace)))
    res = analyse(prof_stack.events(), prof_time.events(), wall, s.segments, calls, ctx.cuda)
    res["wall_ms_unprofiled"] = unprofiled.ms
    return res


def run(ctx) -> dict:
    import torch

    s = default_setup(ctx.cuda, ctx.quick, ctx.option("tiny", False))
    results = {}
    for backbone in s.backbones:
        for wrapper, label in (("reference", "ReferenceRMT"), ("fast", "FastRMT")):
            trace = f"profile_{wrapper}{'' if backbone == 'bert' else '_' + backbone}.json"
            results[(backbone, label)] = _profile_one(ctx, backbone, s, wrapper, getattr(torch, s.dtype), trace)
    cuda = ctx.cuda
    rows = []
    for (backbone, label), r in results.items():
        for cat in CATEGORIES:
            top = cat != "python overhead"
            row = dict(
                backbone=backbone,
                wrapper=label,
                category=cat,
                cpu_ms=round(r["cpu_ms"][cat], 3),
                ops_per_segment_in_category=round(r["ops_per_segment_by_category"].get(cat, 0), 2) if top else "",
                ops_per_segment=round(r["ops_per_segment"], 1),
                wall_ms_profiled=round(r["wall_ms_profiled"], 3),
                wall_ms_unprofiled=round(r["wall_ms_unprofiled"], 3),
            )
            if cuda:
                row.update(
                    device_ms=round(r["device_ms"][cat], 3),
                    kernels_per_segment_in_category=round(r["kernels_per_segment_by_category"].get(cat, 0), 2)
                    if top
                    else "",
                    kernels_per_segment=round(r["kernels_per_segment"], 1),
                )
            rows.append(row)
    ctx.write_csv(rows)
    ctx.write_text(_markdown(results, s, cuda), "profile.md")
    ctx.write_json({"setup": asdict(s), "results": {f"{b}/{w}": r for (b, w), r in results.items()}})
    ctx.save_plot(_plot(results, s, cuda))
    summary = {}
    for (backbone, label), r in results.items():
        key = f"{backbone}/{label}"
        summary[f"{key} ops/segment"] = round(r["ops_per_segment"], 1)
        if cuda:
            summary[f"{key} kernels/segment"] = round(r["kernels_per_segment"], 1)
        summary[f"{key} wall ms"] = round(r["wall_ms_unprofiled"], 2)
    return summary


# ------------------------------------------------------------------------------------------------ report
def _markdown(results: dict, s: ProfileSetup, cuda: bool) -> str:
    lines = [
        f"# FastRMT vs ReferenceRMT profile ({machine_label()})",
        "",
        f"{s.segments} segments of {s.positions} model positions (m = {s.mem}), batch 1, {s.dtype}, "
        "inference (no_grad). Times in ms for one forward; categories as defined in "
        "`benchmarks/profile.py`. CPU times per category are the operators' self times from a profile "
        "without "
        "Python stacks (averaged over a few calls); categories and op counts come from a with_stack profile "
        "of the same call. *python overhead* = profiled wall time minus the CPU time inside top-level aten "
        "operators (it includes the profiler's own bookkeeping).",
        "",
    ]
    for backbone in s.backbones:
        ref, fast = results[(backbone, "ReferenceRMT")], results[(backbone, "FastRMT")]
        lines += [f"## {backbone}", ""]
        head = "| | ReferenceRMT | FastRMT | ratio ref/fast |"
        lines += [head, "|---|---:|---:|---:|"]

        def line(name, key, fmt="{:.2f}", cat=None, lines=lines, ref=ref, fast=fast):
            a, b = (r[key] if cat is None else r[key][cat] for r in (ref, fast))
            ratio = f"{a / b:.2f}" if b else "-"
            lines.append(f"| {name} | {fmt.format(a)} | {fmt.format(b)} | {ratio} |")

        line("wall ms (unprofiled, median of 5)", "wall_ms_unprofiled")
        line("wall ms (profiled)", "wall_ms_profiled")
        line("aten ops dispatched per segment", "ops_per_segment", "{:.1f}")
        line("aten ops incl. nested per segment", "all_ops_per_segment", "{:.1f}")
        if cuda:
            line("device kernels per segment", "kernels_per_segment", "{:.1f}")
        per_category = (
            ("CPU ms", "cpu_ms", "{:.2f}", CATEGORIES, False),
            ("device ms", "device_ms", "{:.2f}", CATEGORIES[:-1], True),
            ("ops dispatched per segment", "ops_per_segment_by_category", "{:.1f}", CATEGORIES[:-1], False),
            ("kernels per segment", "kernels_per_segment_by_category", "{:.1f}", CATEGORIES[:-1], True),
        )
        for label, key, fmt, cats, gpu_only in per_category:
            for cat in cats if cuda or not gpu_only else ():
                line(f"{label}: {cat}", key, fmt, cat)
        lines += ["", _sentences(backbone, ref, fast, cuda), ""]
    return "\n".join(lines) + "\n"


def _sentences(backbone: str, ref: dict, fast: dict, cuda: bool) -> str:
    total_ref = sum(ref["cpu_ms"].values())
    order = sorted(ref["cpu_ms"].items(), key=lambda kv: -kv[1])
    parts = ", ".join(f"{k} {v:.1f} ms ({100 * v / total_ref:.0f}%)" for k, v in order[:3])
    saved = {k: ref["cpu_ms"][k] - fast["cpu_ms"][k] for k in CATEGORIES}
    best = sorted(saved.items(), key=lambda kv: -kv[1])
    gained = ", ".join(f"{k} -{v:.1f} ms" for k, v in best[:3] if v > 0)
    speed = ref["wall_ms_unprofiled"] / max(fast["wall_ms_unprofiled"], 1e-9)
    text = (
        f"{backbone}: the reference's profiled time goes mostly to {parts}. FastRMT dispatches "
        f"{fast['ops_per_segment']:.0f} aten ops per segment instead of {ref['ops_per_segment']:.0f} "
        f"(per segment: {ref['ops_per_segment_by_category']['copies & cat']:.1f} -> "
        f"{fast['ops_per_segment_by_category']['copies & cat']:.1f} copy/cat ops, "
        f"{ref['ops_per_segment_by_category']['mask']:.1f} -> "
        f"{fast['ops_per_segment_by_category']['mask']:.1f} "
        "mask-building ops); the largest CPU-time savings "
        f"are {gained or 'none'}; unprofiled it is x{speed:.2f} "
        f"{'faster' if speed >= 1 else 'slower'} than the reference."
    )
    if cuda:
        text += (
            f" On the device it launches {fast['kernels_per_segment']:.0f} kernels per segment instead of "
            f"{ref['kernels_per_segment']:.0f}."
        )
    return text


def _plot(results: dict, s: ProfileSetup, cuda: bool):
    plt = pyplot()
    panels = [("cpu_ms", "CPU time (ms)")] + ([("device_ms", "device time (ms)")] if cuda else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels) + 2, 4.5), squeeze=False)
    keys = list(results)
    labels = [f"{b}\n{w}" for b, w in keys]
    for ax, (field, unit) in zip(axes[0], panels, strict=True):
        bottom = [0.0] * len(keys)
        cats = CATEGORIES if field == "cpu_ms" else CATEGORIES[:-1]
        for i, cat in enumerate(cats):
            vals = [results[k][field][cat] for k in keys]
            ax.bar(range(len(keys)), vals, bottom=bottom, color=f"C{i}", label=cat)
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
        for x, k in enumerate(keys):
            r = results[k]
            per = r["kernels_per_segment"] if field == "device_ms" else r["ops_per_segment"]
            what = "kernels" if field == "device_ms" else "ops"
            ax.text(x, bottom[x], f"{per:.0f} {what}/seg", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(keys)), labels, fontsize=8)
        ax.set_ylabel(unit)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"Profiled forward, {s.segments} segments x {s.positions} positions, {s.dtype} ({machine_label()})",
        fontsize=9,
    )
    return fig


BENCHMARK = Benchmark(
    "profile", run=run, cpu_threads=1, options=(Option("--tiny", action="store_true", help="a seconds-long smoke run"),)
)
