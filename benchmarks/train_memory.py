"""Peak training memory against the number of segments (1 to 64), with and without per-segment checkpointing,
and the exact bytes of activations saved for backward; on the CPU each point runs in a fresh subprocess.
Settings: docs/benchmarks.md, section ``train-memory``.
"""

from __future__ import annotations

from . import presets
from .common import PeakMemory, machine_label, plot_lines, pyplot, run_point_in_subprocess
from .runner import Benchmark, Timer

CPU_CFG = dict(model="gpt2-4l-8k", segment_size=128, mem=8, batch=1)
GPU_CFG = dict(model="gpt2-small-8k", segment_size=496, mem=8, batch=4)


def measure_point(n_segments: int, checkpointing: bool, cfg: dict, device: str) -> dict:
    """One training step at ``n_segments``: peak memory, time, and the exact bytes saved for backward."""
    import torch

    backbone = presets.model(cfg["model"], "lm", max_positions=cfg["segment_size"] + 2 * cfg["mem"], dropout=None)
    rmt = presets.rmt(
        "fast", backbone, cfg["model"], cfg["mem"], cfg["segment_size"], gradient_checkpointing=checkpointing
    ).to(device)
    vocab = presets.preset(cfg["model"]).vocab
    ids = torch.randint(0, vocab, (cfg["batch"], n_segments * cfg["segment_size"]), device=device)

    def step():
        rmt.zero_grad(set_to_none=False)
        rmt(ids, labels=ids, return_logits=False).loss.backward()

    cuda = device == "cuda"
    if cuda:
        step()  # warm-up; max_memory_allocated is exact
    # CPU: the measured step is the process's first, so no allocator cache from an earlier step hides growth.
    peak = PeakMemory(cuda=cuda)
    token = peak.start()
    seconds = Timer(torch.device(device))(step, repeats=1, warmup=0, clock="wall").median_s
    peak_mb = peak.mb(token)

    # Exact: bytes of activations saved for backward (parameters excluded) at the end of the forward pass.
    params = {p.data_ptr() for p in rmt.parameters()}
    saved = []

    def pack(t):
        if t.data_ptr() not in params:
            saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = rmt(ids, labels=ids, return_logits=False).loss
    loss.backward()
    return {
        "tokens": ids.numel() // cfg["batch"],
        "saved_activations_mb": sum(saved) / 2**20,
        "peak_mb": peak_mb,
        "seconds": seconds,
    }


def cases(ctx) -> list[dict]:
    ctx.cfg = dict(GPU_CFG if ctx.cuda else CPU_CFG)
    counts = [1, 2, 4, 8] if ctx.quick else [1, 2, 4, 8, 16, 32, 64]
    return [dict(segments=n, checkpointing=ckpt) for n in counts for ckpt in (False, True)]


def measure(ctx, case: dict, state: dict) -> dict:
    args = dict(n_segments=case["segments"], checkpointing=case["checkpointing"], cfg=ctx.cfg)
    if ctx.cuda:
        return measure_point(device="cuda", **args)
    return run_point_in_subprocess(measure_point, device="cpu", **args)  # a fresh process per point


def _points(rows, ckpt, key):
    return sorted(
        (r["segments"], r[key])
        for r in rows
        if r["status"] == "ok" and r["checkpointing"] == ckpt and r.get(key) is not None
    )


def summarize(ctx, rows: list[dict]) -> tuple[dict, dict]:
    growth = {}
    for key in ("saved_activations_mb", "peak_mb"):
        for ckpt in (False, True):
            pts = _points(rows, ckpt, key)
            if len(pts) >= 2:
                (n0, m0), (n1, m1) = pts[0], pts[-1]
                growth[f"{key}/{'checkpointing' if ckpt else 'plain'}"] = round((m1 - m0) / (n1 - n0), 3)
    record = {"config": ctx.cfg, "device": ctx.device.type, "rows": rows, "mb_per_extra_segment": growth}
    return {"mb_per_extra_segment": growth}, record


def plot(ctx, rows, record):
    cfg, dims = ctx.cfg, presets.preset(ctx.cfg["model"])
    fig, axes = pyplot().subplots(1, 2, figsize=(11, 4.2))
    labels = {False: "full BPTT, activations kept", True: "per-segment checkpointing"}
    for ax, key, ylabel in (
        (axes[0], "saved_activations_mb", "activations saved for backward (MB, exact)"),
        (axes[1], "peak_mb", "peak memory added by one step (MB)"),
    ):
        plot_lines(
            ax,
            rows,
            "segments",
            key,
            "checkpointing",
            labels=labels,
            ylabel=ylabel,
            xlabel=f"segments ({cfg['segment_size']} tokens each)",
        )
    fig.suptitle(
        f"FastRMT training memory: GPT-2 {dims.layers}L/{dims.hidden}d, m={cfg['mem']}, "
        f"batch {cfg['batch']} ({machine_label()})",
        fontsize=9,
    )
    return fig


BENCHMARK = Benchmark("train_memory", cases, measure, summarize=summarize, plot=plot)
