"""FastRMT against ReferenceRMT on the CPU, in one run: forward time (no_grad), forward+backward time and peak
memory, for each and as ratios (reference / FastRMT, so > 1 means FastRMT is better).

Default: GPT-2 with 4 layers, hidden 256, 4 heads (GPT-2 vocabulary), 16 segments of 128 tokens, m = 8,
batch 2. Peak memory is the growth of the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs) during the first call of a fresh subprocess per (wrapper, mode), with glibc's mmap
threshold at 64 KiB (``common.run_point_in_subprocess``, the method of ``train_memory``), so the peak follows
live tensors and no allocator cache from an earlier call hides growth.

    python -m rmt_fast.bench.compare_cpu --out results/compare_cpu
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from .common import PeakMemory, env_info, machine_label, run_point_in_subprocess, save_plot, write_csv, write_json

DEFAULTS = dict(layers=4, hidden=256, heads=4, segments=16, segment_size=128, mem=8, batch=2)
MODES = ("forward_no_grad", "forward_backward")


def build(wrapper: str, layers, hidden, heads, segment_size, mem, seed=0, **_):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from rmt_fast import FastRMT, ReferenceRMT

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=layers, n_embd=hidden, n_head=heads, n_positions=segment_size + 2 * mem,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    cls = FastRMT if wrapper == "fast" else ReferenceRMT
    return cls(GPT2LMHeadModel(cfg), mem, segment_size)


def inputs(batch, segments, segment_size, seed=1, **_):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50257, (batch, segments * segment_size), generator=g)


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


def _peak_in_subprocess(wrapper, mode, cfg) -> float:
    point = run_point_in_subprocess("rmt_fast.bench.compare_cpu",
                                    ["--measure-peak", wrapper, mode, "--cfg", json.dumps(cfg)])
    return float(point["peak_mb"])


def run(out_dir: Path, quick: bool = False, repeats: int = 3, **overrides) -> dict:
    import torch
    from tqdm import tqdm

    cfg = {**DEFAULTS, **overrides}
    if quick:
        cfg.update(segments=4)
        repeats = 1
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    models = {w: build(w, **cfg) for w in ("fast", "ref")}
    with torch.no_grad():
        models["fast"].memory.copy_(models["ref"].memory)
    ids = inputs(**cfg)
    jobs = [(w, mode) for mode in MODES for w in ("ref", "fast")]
    for wrapper, mode in tqdm(jobs, desc="compare_cpu"):
        rmt = models[wrapper]
        step(rmt, ids, mode)  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            step(rmt, ids, mode)
            times.append(time.perf_counter() - t0)
        peak = _peak_in_subprocess(wrapper, mode, cfg)
        rows.append(dict(wrapper="FastRMT" if wrapper == "fast" else "ReferenceRMT", mode=mode,
                         seconds=statistics.median(times), peak_mb=round(peak, 1), repeats=repeats))  # fmt: skip
    ratios = {}
    for mode in MODES:
        ref = next(r for r in rows if r["mode"] == mode and r["wrapper"] == "ReferenceRMT")
        fast = next(r for r in rows if r["mode"] == mode and r["wrapper"] == "FastRMT")
        ratios[f"{mode}_time"] = ref["seconds"] / fast["seconds"]
        ratios[f"{mode}_peak_memory"] = ref["peak_mb"] / max(fast["peak_mb"], 1e-9)
    write_csv(out_dir / "compare_cpu.csv", rows)
    summary = {"config": cfg, "rows": rows, "ratios_ref_over_fast": ratios, "env": env_info()}
    write_json(out_dir / "compare_cpu.json", summary)
    _plot(rows, ratios, cfg, out_dir / "compare_cpu.png")
    return {"ratios_ref_over_fast": {k: round(v, 3) for k, v in ratios.items()}}


def _plot(rows, ratios, cfg, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, unit in ((axes[0], "seconds", "time per call (s)"), (axes[1], "peak_mb", "peak memory (MB)")):
        for i, mode in enumerate(MODES):
            for j, wrapper in enumerate(("ReferenceRMT", "FastRMT")):
                r = next(r for r in rows if r["mode"] == mode and r["wrapper"] == wrapper)
                ax.bar(i + (j - 0.5) * 0.38, r[key], width=0.38, color=("tab:gray", "tab:blue")[j],
                       label=wrapper if i == 0 else None)  # fmt: skip
            name = "time" if key == "seconds" else "peak_memory"
            ax.text(i, ax.get_ylim()[1] * 0.02, f"x{ratios[f'{mode}_{name}']:.2f}", ha="center", color="white")
        ax.set_xticks(range(len(MODES)), ["forward (no_grad)", "forward + backward"])
        ax.set_ylabel(unit)
        ax.legend()
    fig.suptitle(f"FastRMT vs ReferenceRMT: GPT-2 {cfg['layers']}L/{cfg['hidden']}d, {cfg['segments']}x"
                 f"{cfg['segment_size']} tokens, m={cfg['mem']}, batch {cfg['batch']} ({machine_label()})",
                 fontsize=9)  # fmt: skip
    save_plot(fig, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results/compare_cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--measure-peak", nargs=2, metavar=("WRAPPER", "MODE"), help=argparse.SUPPRESS)
    p.add_argument("--cfg", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure_peak:
        print(json.dumps(measure_peak(*args.measure_peak, json.loads(args.cfg))))
        return 0
    summary = run(Path(args.out), quick=args.quick, repeats=args.repeats)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
