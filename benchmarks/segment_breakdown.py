"""What one segment step runs: the kernels of one FastRMT encoder segment (bert-base's 12 layers), counted and
classified by kind (matmul, attention, norm & elementwise, copies & fills), with FLOPs, CPU time by kind and, on
a GPU, device time by kind; for the eager loop, the graphed step (``cuda_graph=True``) and graphed + compiled
(``compile_step``), and for older checkouts of the project (``--tree LABEL=PATH``: "then and now"). Each case
runs :mod:`rmt_fast.bench.breakdown_probe` in a fresh process. Settings and outputs: docs/benchmarks.md,
section ``segment-breakdown``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .common import machine_label, pyplot
from .runner import Benchmark, Option, Unavailable, names

KINDS = ("matmul", "attention", "norm & elementwise", "copies & fills")
VARIANTS = ("eager", "graphed", "graphed+compiled", "train", "train+compiled")
DEFAULT_VARIANTS = ("eager", "graphed", "graphed+compiled", "train")
MATMUL = (
    "addmm",
    "aten::mm",
    "bmm",
    "baddbmm",
    "linear",
    "matmul",
    "gemm",
    "cutlass",
    "xmma",
    "cublas",
    "sm90_",
    "sm80_",
    "ampere_",
    "_mkl",
    "mkldnn",
    "triton_tem",
)
ATTENTION = ("scaled_dot_product", "flash", "fmha", "attention", "_rmt_attn", "_rmt_dropout")
COPIES = (
    "copy",
    "cat",
    "clone",
    "index",
    "gather",
    "scatter",
    "embedding",
    "fill",
    "zero",
    "memcpy",
    "memset",
    "full",
    "ones",
    "stack",
)
# (layers, hidden, heads, ffn, vocab, positions, mem, dtype): bert-base's layer count on the CPU, so the
# kernel count per segment is bert-base's; bert-base itself on a GPU
CPU_MODEL = dict(layers=12, hidden=64, heads=2, ffn=256, vocab=1000, positions=64, mem=10, dtype="float32")
QUICK_CPU_MODEL = {**CPU_MODEL, "layers": 2}
GPU_MODEL = dict(layers=12, hidden=768, heads=12, ffn=3072, vocab=30522, positions=512, mem=10, dtype="float16")


def kind_of(name: str) -> str:
    """The kind of a top-level op, a generated kernel or a device kernel, from its name. Inductor's fused
    kernels (``cpp_fused_*``, ``triton_poi/per/red_*``) are norm & elementwise whatever ops they fuse (a name
    like ``cpp_fused__scaled_dot_product_..._arange_lt`` is the mask, not the attention); its matmul templates
    (``triton_tem_*``) are matmul."""
    n = name.lower()
    if n.startswith("triton_tem"):
        return "matmul"
    if "cpp_fused" in n or n.startswith(("triton_poi", "triton_per", "triton_red")):
        return "norm & elementwise"
    for kind, keys in (("attention", ATTENTION), ("matmul", MATMUL), ("copies & fills", COPIES)):
        if any(k in n for k in keys):
            return kind
    return "norm & elementwise"


def by_kind(counts: dict) -> dict:
    out = dict.fromkeys(KINDS, 0.0)
    for name, v in counts.items():
        out[kind_of(name)] += v
    return out


def parse_trees(values: list[str] | None) -> list[tuple[str, str | None]]:
    """``--tree LABEL=PATH`` (several, comma-separated) -> [(label, path)]; the current tree is ``now``."""
    out = [("now", None)]
    for item in values or []:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            raise ValueError(f"--tree: expected LABEL=PATH, got {item!r}")
        if not Path(path, "rmt_fast").is_dir():
            raise ValueError(f"--tree: {path} holds no rmt_fast/ folder (a checkout of the project)")
        out.append((label, path))
    return out


def cases(ctx) -> list[dict]:
    trees = parse_trees(ctx.option("tree"))
    variants = ctx.option("variants") or list(DEFAULT_VARIANTS)
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"--variants: unknown {unknown}; expected some of {list(VARIANTS)}")
    ctx.trees = dict(trees)
    return [dict(tree=label, variant=v) for label, _ in trees for v in variants]


def _model(ctx) -> dict:
    base = GPU_MODEL if ctx.cuda else (QUICK_CPU_MODEL if ctx.quick else CPU_MODEL)
    layers = ctx.option("layers")
    return {**base, "layers": layers} if layers else base


def run_probe(args: list[str], tree: str | None, timeout: float | None = None) -> dict:
    """Run the probe in a fresh process (the current tree's ``rmt_fast`` first on its path unless ``tree``)."""
    import rmt_fast

    here = Path(__file__).resolve().with_name("breakdown_probe.py")
    env = dict(os.environ)
    root = str(Path(rmt_fast.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, str(here), *args] + (["--tree", tree] if tree else [])
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"probe failed (rc {done.returncode}): {done.stderr.strip()[-600:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(ctx, case: dict, state: dict) -> dict:
    model = _model(ctx)
    args = ["--variant", case["variant"], "--device", ctx.device.type, "--segments", str(ctx.option("segments") or 2)]
    for key, value in model.items():
        args += [f"--{key}", str(value)]
    options = ctx.option("compile_options")
    if options and case["variant"].endswith("compiled"):
        args += ["--compile-options", options]
    res = run_probe(args, ctx.trees[case["tree"]], timeout=ctx.option("case_timeout_s"))
    if "unavailable" in res:
        raise Unavailable(res["unavailable"])
    ps = res["per_segment"]
    step, host = ps["ops_in"], ps["ops_out"]
    per_call = sum(res["per_call"]["ops_in"].values()) + sum(res["per_call"]["ops_out"].values())
    row = dict(
        commit=res["commit"],
        kernels_per_segment=round(sum(step.values()), 2),
        host_ops_per_segment=round(sum(host.values()), 2),
        per_call_ops=round(per_call, 2),
        flops_per_segment=res["flops_per_segment"],
    )
    kinds = by_kind(step)
    cpu_us = dict.fromkeys(KINDS, 0.0)
    for name, us in ps["op_us_in"].items():
        cpu_us[kind_of(name)] += us
    for k in KINDS:
        row[f"kernels: {k}"] = round(kinds[k], 2)
    for k in KINDS:
        row[f"cpu_ms: {k}"] = round(cpu_us[k] / 1e3, 4)
    if ctx.cuda:
        dev = ps.get("kernels", {})
        dev_kinds, dev_us = by_kind(dev), dict.fromkeys(KINDS, 0.0)
        for name, us in ps.get("kernel_us", {}).items():
            dev_us[kind_of(name)] += us
        row["device_kernels_per_segment"] = round(sum(dev.values()), 2)
        for k in KINDS:
            row[f"device kernels: {k}"] = round(dev_kinds[k], 2)
            row[f"device_ms: {k}"] = round(dev_us[k] / 1e3, 4)
    row["ops"] = json.dumps({k: v for k, v in sorted(step.items(), key=lambda kv: -kv[1])})
    row["host_ops"] = json.dumps(host)
    return row


def summarize(ctx, rows):
    summary = {f"{r['tree']}/{r['variant']} kernels/segment": r.get("kernels_per_segment") for r in rows}
    record = {
        "model": _model(ctx),
        "device": machine_label(),
        "trees": {k: v for k, v in ctx.trees.items()},
        "differences": differences(rows),
    }
    return summary, record


def differences(rows) -> dict:
    """Per variant: the ops whose count per segment differs between the first tree (``now``) and each other."""
    out = {}
    ok = [r for r in rows if r["status"] == "ok"]
    for r in ok:
        if r["tree"] == "now":
            continue
        now = next((x for x in ok if x["tree"] == "now" and x["variant"] == r["variant"]), None)
        if now is None:
            continue
        a, b = json.loads(r["ops"]), json.loads(now["ops"])
        diff = {k: round(b.get(k, 0) - a.get(k, 0), 2) for k in set(a) | set(b) if b.get(k, 0) != a.get(k, 0)}
        out[f"{r['variant']}: now - {r['tree']}"] = {
            "kernels": round(now["kernels_per_segment"] - r["kernels_per_segment"], 2),
            "ops": diff,
        }
    return out


def markdown(ctx, rows, record) -> str:
    m = record["model"]
    lines = [
        f"# One segment step, kernels by kind ({record['device']})",
        "",
        f"FastRMT encoder segment: BERT, {m['layers']} layers, hidden {m['hidden']}, {m['positions']} positions "
        f"(m = {m['mem']}), batch 1, {m['dtype']}, inference. *kernels* = top-level ops and generated kernels "
        "inside the step (what a CUDA graph captures; views and allocations left out), per segment; "
        "*host ops* = the runner's per-segment work outside the step; *per call* = work done once per "
        "call (input checks, the segment plan).",
        "",
        "| tree | commit | variant | kernels | " + " | ".join(KINDS) + " | host ops | per call | GFLOP |",
        "|---|---|---|---:|" + "---:|" * len(KINDS) + "---:|---:|---:|",
    ]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['tree']} | | {r['variant']} | {r['status']}: {r.get('note', '')[:80]} |")
            continue
        gflop = "" if r["flops_per_segment"] is None else f"{r['flops_per_segment'] / 1e9:.3f}"
        lines.append(
            f"| {r['tree']} | {r['commit']} | {r['variant']} | {r['kernels_per_segment']:g} | "
            + " | ".join(f"{r[f'kernels: {k}']:g}" for k in KINDS)
            + f" | {r['host_ops_per_segment']:g} | {r['per_call_ops']:g} | {gflop} |"
        )
    lines += ["", "Ops per segment inside the step:", ""]
    for r in rows:
        if r["status"] == "ok":
            ops = json.loads(r["ops"])
            lines.append(f"- {r['tree']} / {r['variant']}: " + ", ".join(f"{k} {v:g}" for k, v in ops.items()))
    if record["differences"]:
        lines += ["", "Then and now (now minus then, per segment):", ""]
        for key, d in record["differences"].items():
            ops = ", ".join(f"{k} {v:+g}" for k, v in sorted(d["ops"].items())) or "the same ops"
            lines.append(f"- {key}: {d['kernels']:+g} kernels ({ops})")
    return "\n".join(lines) + "\n"


def plot(ctx, rows, record):
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return None
    fig, ax = pyplot().subplots(figsize=(max(6, 1.2 * len(ok) + 2), 4))
    bottom = [0.0] * len(ok)
    for i, k in enumerate(KINDS):
        vals = [r[f"kernels: {k}"] for r in ok]
        ax.bar(range(len(ok)), vals, bottom=bottom, color=f"C{i}", label=k)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.set_xticks(range(len(ok)), [f"{r['tree']}\n{r['variant']}" for r in ok], fontsize=8)
    ax.set_ylabel("kernels per segment")
    ax.set_title(f"One segment step, {record['model']['layers']} layers ({record['device']})", fontsize=9)
    ax.legend(fontsize=7)
    return fig


BENCHMARK = Benchmark(
    "segment_breakdown",
    cases=cases,
    measure=measure,
    summarize=summarize,
    plot=plot,
    markdown=markdown,
    after_failure="continue",
    options=(
        Option("--tree", type=names, default=None, help="LABEL=PATH: also measure this checkout (comma-separated)"),
        Option(
            "--variants",
            type=names,
            default=None,
            help=f"some of {','.join(VARIANTS)} (default: {','.join(DEFAULT_VARIANTS)})",
        ),
        Option("--layers", type=int, default=None, help="backbone layers (default: 12, bert-base's; 2 with --quick)"),
        Option("--segments", type=int, default=None, help="segments of the shorter profiled call (default 2)"),
        Option("--compile-options", default=None, help="compile_step of graphed+compiled, as JSON"),
        Option("--case-timeout-s", type=float, default=None, help="per-case limit (the probe process)"),
    ),
)
