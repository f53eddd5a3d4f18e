"""Peak training memory against the number of segments, with and without per-segment checkpointing.

Backpropagating through N segments keeps N segments' activations; with ``gradient_checkpointing=True``
FastRMT keeps each segment's input memory only and recomputes the segment in backward, so activation memory
grows by N x m x d plus one segment. This measures one training step (forward + backward, decoder loss,
``return_logits=False``) for N = 1, 2, 4, ..., 64.

CPU: each point runs in a fresh subprocess (glibc's mmap threshold set to 64 KiB, so freed tensors leave the
resident set) and reports the growth of the peak resident set during its first training step; the exact
bytes of activations saved for backward are reported beside it.
GPU: ``torch.cuda.max_memory_allocated`` in process.

    python -m rmt_fast.bench.train_memory --out results/train_memory [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .common import PeakMemory, env_info, machine_label, run_point_in_subprocess, save_plot, write_csv, write_json

CPU_CFG = dict(layers=4, hidden=256, heads=4, vocab=8192, segment_size=128, mem=8, batch=1)
GPU_CFG = dict(layers=12, hidden=768, heads=12, vocab=50257, segment_size=496, mem=8, batch=4)


def measure(n_segments: int, checkpointing: bool, cfg: dict, device: str) -> dict:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from rmt_fast import FastRMT

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=cfg["layers"], n_embd=cfg["hidden"], n_head=cfg["heads"],
                                       vocab_size=cfg["vocab"], n_positions=cfg["segment_size"] + 2 * cfg["mem"]))
    rmt = FastRMT(model, cfg["mem"], cfg["segment_size"], gradient_checkpointing=checkpointing).to(device)
    ids = torch.randint(0, cfg["vocab"], (cfg["batch"], n_segments * cfg["segment_size"]), device=device)

    def step():
        rmt.zero_grad(set_to_none=False)
        rmt(ids, labels=ids, return_logits=False).loss.backward()

    cuda = device == "cuda"
    if cuda:
        step()  # warm-up; max_memory_allocated is exact
    # CPU: the measured step is the process's first, so no allocator cache from an earlier step hides growth.
    peak = PeakMemory(cuda=cuda)
    token = peak.start()
    t0 = time.perf_counter()
    step()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
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
    return {"segments": n_segments, "tokens": ids.numel() // cfg["batch"], "checkpointing": checkpointing,
            "saved_activations_mb": sum(saved) / 2**20, "peak_mb": peak_mb, "seconds": seconds}  # fmt: skip


def run(out_dir: Path, quick: bool = False) -> dict:
    import torch
    from tqdm import tqdm

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = dict(GPU_CFG if device == "cuda" else CPU_CFG)
    counts = [1, 2, 4, 8] if quick else [1, 2, 4, 8, 16, 32, 64]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in tqdm(counts, desc="train_memory"):
        for ckpt in (False, True):
            if device == "cuda":
                try:
                    rows.append({**measure(n, ckpt, cfg, device), "status": "ok"})
                except torch.OutOfMemoryError:
                    rows.append({"segments": n, "checkpointing": ckpt, "status": "oom"})
                torch.cuda.empty_cache()
                continue
            try:  # a fresh process per point (see run_point_in_subprocess)
                point = run_point_in_subprocess("rmt_fast.bench.train_memory",
                                                ["--point", str(n), str(int(ckpt)), "--cfg", json.dumps(cfg)])
                rows.append({**point, "status": "ok"})
            except RuntimeError as exc:
                rows.append({"segments": n, "checkpointing": ckpt, "status": f"error: {str(exc)[-200:]}"})
    write_csv(out_dir / "train_memory.csv", rows)
    growth = _growth_per_segment(rows)
    write_json(out_dir / "train_memory.json", {"config": cfg, "device": device, "rows": rows,
                                               "mb_per_extra_segment": growth, "env": env_info()})  # fmt: skip
    _plot(rows, cfg, out_dir / "train_memory.png")
    return {"mb_per_extra_segment": growth}


def _points(rows, ckpt, key):
    return sorted((r["segments"], r[key]) for r in rows
                  if r["status"] == "ok" and r["checkpointing"] == ckpt and r.get(key) is not None)


def _growth_per_segment(rows) -> dict:
    out = {}
    for key in ("saved_activations_mb", "peak_mb"):
        for ckpt in (False, True):
            pts = _points(rows, ckpt, key)
            if len(pts) >= 2:
                (n0, m0), (n1, m1) = pts[0], pts[-1]
                out[f"{key}/{'checkpointing' if ckpt else 'plain'}"] = round((m1 - m0) / (n1 - n0), 3)
    return out


def _plot(rows, cfg, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = (("saved_activations_mb", "activations saved for backward (MB, exact)"),
              ("peak_mb", "peak memory added by one step (MB)"))  # fmt: skip
    for ax, (key, ylabel) in zip(axes, panels):
        for ckpt, label in ((False, "full BPTT, activations kept"), (True, "per-segment checkpointing")):
            pts = _points(rows, ckpt, key)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(f"segments ({cfg['segment_size']} tokens each)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"FastRMT training memory: GPT-2 {cfg['layers']}L/{cfg['hidden']}d, m={cfg['mem']}, "
                 f"batch {cfg['batch']} ({machine_label()})", fontsize=9)  # fmt: skip
    save_plot(fig, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results/train_memory")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--point", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--cfg", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.point:
        import torch

        torch.set_num_threads(1)
        print(json.dumps(measure(int(args.point[0]), bool(int(args.point[1])), json.loads(args.cfg), "cpu")))
        return 0
    print(json.dumps(run(Path(args.out), quick=args.quick), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
