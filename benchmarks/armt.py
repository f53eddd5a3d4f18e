"""ARMT latency and peak memory against length at batch 1: FastARMT's sequential and diagonal schedules, and
full attention on the backbone.

Methods (column ``method``):

* ``sequential``: ``FastARMT(diagonal=False)``, N x L steps of one (segment, layer) cell;
* ``diagonal``: ``FastARMT(diagonal=True)``, N + L - 1 steps of up to L cells;
* ``diagonal-graphed``: the diagonal steps under CUDA graphs. FastARMT does not capture its steps yet, so this
  row is ``skipped`` (with the reason) on every device;
* ``full``: the backbone alone over all tokens at once (``base_model(input_ids)``, SDPA), no memory.

Every call is inference (``torch.no_grad``) without labels and with ``return_logits=False``, so no method runs
the LM head: the timings compare the schedules and attention, not the head. ``seconds`` is the best of
``reps`` calls after a warm-up; ``peak_mb`` is CUDA's peak allocated memory, or on the CPU the growth of the
process's peak resident set during the call (a lower bound: memory the allocator already holds is not counted).

Settings: on CUDA, a Llama-3.2-1B-shaped decoder (hidden 2048, 16 layers, 32/8 heads, MLP 8192, vocabulary
128256, bf16) with segments of 1024 tokens and m = 128 and m = 16 memory tokens, 2k to 128k tokens. On the
CPU, a tiny Llama-family decoder in fp32 that runs in seconds: the issue's latency-bound shape (8 layers,
hidden 128, segments of 64, m = 8, up to 32 segments) as the length curve, and its compute-bound shape
(4 layers, hidden 256, 12 segments of 128) as one point; the summary gives both sequential/diagonal ratios.

The measuring logic is :func:`cases` (what to run) and :func:`measure` (one case -> one CSV row).

    rmt-fast-bench armt [--out DIR] [--quick]
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .common import PeakMemory, env_info, machine_label, save_plot, write_csv, write_json

METHODS = ("sequential", "diagonal", "diagonal-graphed", "full")
GRAPHED_SKIP = "FastARMT does not capture its steps in CUDA graphs (cuda_graph=True is not implemented)"


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    segment_size: int
    mem: int
    d_mem: int
    dtype: str


@dataclass(frozen=True)
class Case:
    shape: Shape
    method: str
    tokens: int
    reps: int


CPU_LATENCY = Shape("cpu-latency-bound", 8, 128, 2, 1, 512, 512, 64, 8, 64, "float32")
CPU_COMPUTE = Shape("cpu-compute-bound", 4, 256, 4, 2, 1024, 512, 128, 8, 64, "float32")
GPU_SHAPES = [Shape(f"llama-1b-m{m}", 16, 2048, 32, 8, 8192, 128256, 1024, m, 64, "bfloat16") for m in (128, 16)]
GPU_LENGTHS = [2048, 4096, 8192, 16384, 32768, 65536, 131072]


def cases(cuda: bool, quick: bool) -> list[Case]:
    """Every (shape, method, length) to measure, in order."""
    out = []
    if cuda:
        lengths = GPU_LENGTHS[:3] if quick else GPU_LENGTHS
        for shape in GPU_SHAPES[:1] if quick else GPU_SHAPES:
            out += [Case(shape, method, n, 2 if quick else 5) for n in lengths for method in METHODS]
        return out
    reps = 1 if quick else 3
    lengths = [256, 2048] if quick else [256, 512, 1024, 2048]  # 2048 = the target's 32 segments of 64
    out += [Case(CPU_LATENCY, method, n, reps) for n in lengths for method in METHODS]
    out += [Case(CPU_COMPUTE, method, 12 * 128, reps) for method in METHODS]
    return out


_MODELS: dict = {}


def _backbone(shape: Shape, device: str):
    """The shape's Llama-family decoder, random weights from its config (built once per shape)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    key = (shape, device)
    if key not in _MODELS:
        _MODELS.clear()  # one model resident at a time
        torch.manual_seed(0)
        config = LlamaConfig(num_hidden_layers=shape.layers, hidden_size=shape.hidden,
                             num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                             intermediate_size=shape.intermediate, vocab_size=shape.vocab,
                             max_position_embeddings=max(GPU_LENGTHS), attn_implementation="sdpa")  # fmt: skip
        _MODELS[key] = LlamaForCausalLM(config).to(device, getattr(torch, shape.dtype)).eval()
    return _MODELS[key]


def measure(case: Case, device: str) -> dict:
    """Run one case: its CSV row (``status`` ``ok``, ``skipped: ...`` or ``error: ...``)."""
    import torch

    shape = case.shape
    row = {"method": case.method, "tokens": case.tokens, "seconds": None, "peak_mb": None, "status": "ok",
           **{f"shape_{k}": v for k, v in asdict(shape).items()}, "segments": -(-case.tokens // shape.segment_size),
           "device": device, "threads": torch.get_num_threads()}  # fmt: skip
    if case.method == "diagonal-graphed":
        row["status"] = f"skipped: {GRAPHED_SKIP}"
        return row
    try:
        model = _backbone(shape, device)
        if case.method == "full":
            base = model.base_model

            def call(ids):
                return base(input_ids=ids, use_cache=False).last_hidden_state
        else:
            from rmt_fast import FastARMT

            armt = FastARMT(model, shape.mem, shape.segment_size, d_mem=shape.d_mem,
                            diagonal=case.method == "diagonal").to(device)  # fmt: skip

            def call(ids):
                return armt(ids, return_logits=False).memory_state.A
        cuda = device.startswith("cuda")
        ids = torch.randint(0, shape.vocab, (1, case.tokens), generator=torch.Generator().manual_seed(0)).to(device)
        peak = PeakMemory(cuda)
        with torch.no_grad():
            call(ids)  # warm-up
            best = float("inf")
            for i in range(case.reps):
                token = peak.start() if i == 0 else None
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                call(ids)
                if cuda:
                    torch.cuda.synchronize()
                best = min(best, time.perf_counter() - t0)
                if i == 0:
                    row["peak_mb"] = peak.mb(token)
        row["seconds"] = best
    except torch.OutOfMemoryError:
        row["status"] = "error: out of memory"
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception as exc:  # one failing point must not lose the others
        row["status"] = f"error: {type(exc).__name__}: {str(exc)[:200]}"
    return row


def _ratio(rows, shape: str, tokens: int | None = None) -> float | None:
    pick = {r["method"]: r["seconds"] for r in rows if r["shape_name"] == shape and r["status"] == "ok"
            and (tokens is None or r["tokens"] == tokens)}  # fmt: skip
    if pick.get("sequential") and pick.get("diagonal"):
        return pick["sequential"] / pick["diagonal"]
    return None


def summarize(rows: list[dict], cuda: bool) -> dict:
    if cuda:
        out = {}
        for shape in GPU_SHAPES:
            for n in (2048, 32768):
                out[f"{shape.name}_seq_over_diag_{n}"] = _ratio(rows, shape.name, n)
            full = {r["method"]: r["seconds"] for r in rows if r["shape_name"] == shape.name
                    and r["tokens"] == 131072 and r["status"] == "ok"}  # fmt: skip
            if full.get("full") and full.get("diagonal"):
                out[f"{shape.name}_full_over_diag_131072"] = full["full"] / full["diagonal"]
        return out
    return {"latency_bound_seq_over_diag": _ratio(rows, CPU_LATENCY.name, 2048),
            "latency_bound_target": 2.0,
            "compute_bound_seq_over_diag": _ratio(rows, CPU_COMPUTE.name),
            "compute_bound_target": 1.0}  # fmt: skip


def plot(rows: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape_name"] for r in rows))
    fig, axes = plt.subplots(2, len(shapes), figsize=(5 * len(shapes), 7), squeeze=False)
    for j, shape in enumerate(shapes):
        for method in METHODS:
            pts = [(r["tokens"], r["seconds"], r["peak_mb"]) for r in rows
                   if r["shape_name"] == shape and r["method"] == method and r["status"] == "ok"]  # fmt: skip
            if not pts:
                continue
            axes[0][j].plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=method)
            mem = [(p[0], p[2]) for p in pts if p[2] is not None]
            if mem:
                axes[1][j].plot([p[0] for p in mem], [p[1] for p in mem], "o-", label=method)
        for i, label in enumerate(("seconds (best of reps)", "peak memory, MiB")):
            ax = axes[i][j]
            ax.set_xscale("log", base=2)
            ax.set_xlabel("tokens (batch 1)")
            ax.set_ylabel(label)
            ax.set_title(shape)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(title)
    return save_plot(fig, path)


def run(out_dir: Path, quick: bool = False) -> dict:
    import torch

    try:
        from tqdm import tqdm
    except ImportError:  # progress is optional
        def tqdm(x, **_):
            return x

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    out_dir = Path(out_dir)
    rows = [measure(case, device) for case in tqdm(cases(cuda, quick), desc="armt")]
    _MODELS.clear()
    summary = summarize(rows, cuda)
    write_csv(out_dir / "armt.csv", rows)
    plot(rows, out_dir / "armt.png", f"ARMT at batch 1: {machine_label()}")
    write_json(out_dir / "armt.json", {"summary": summary, "env": env_info(), "rows": rows})
    for key, value in summary.items():
        print(f"  {key}: {round(value, 3) if isinstance(value, float) else value}")
    return summary
