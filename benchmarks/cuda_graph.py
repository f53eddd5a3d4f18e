"""Per-segment latency of graphed FastRMT against eager FastRMT, ReferenceRMT and torch.compile (GPU).

bert-base from its config, 512-position model input (499 content tokens + 10 memory + 3 specials), fp16,
inference. Reports ms per segment and tokens per second at batch 1 and batch 32, and the time to pass
1,048,576 tokens through graphed FastRMT. Baselines are measured in the same run. Without CUDA it says so.

``--million``: the 1M-token run on its own (``million.csv``, ``million.json``, ``million.png``): bert-base fp16
batch 1 (latency.py's GPU setup), 1,048,576 tokens through graphed FastRMT, with and without ``compile_step``
(inductor defaults with ``--quick``, else ``max-autotune``, inside the runner's CUDA graph), and graphed FastRMT
against full attention (the backbone with positions extended, SDPA) at 4,096 to 32,768 tokens. Targets: 1M
tokens in under 1.0 s (<= 0.47 ms per segment); graphed RMT faster than full attention from 8,192 tokens on.
On the CPU a tiny version (latency.py's tiny BERT, 4,096 tokens, ``compile_step`` through ``aot_eager``, no
capture) checks the pipeline.

    python -m rmt_fast.bench.cuda_graph --out results/cuda_graph [--quick] [--million]
    rmt-fast-bench cuda-graph --out results/cuda_graph [--quick] [--million]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from .common import env_info, machine_label, module_main, save_plot, write_csv, write_json

SEGMENT, MEM = 499, 10


def _build(kind: str, dtype):
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from rmt_fast import FastRMT, ReferenceRMT

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(num_labels=2)).to("cuda", dtype).eval()
    kw = dict(cls_token_id=101, sep_token_id=102)
    if kind == "reference":
        return ReferenceRMT(model, MEM, SEGMENT, **kw).to("cuda", dtype)
    rmt = FastRMT(model, MEM, SEGMENT, cuda_graph=kind == "graphed", **kw).to("cuda", dtype)
    if kind == "compiled":
        import torch

        rmt.encoder_step = torch.compile(rmt.encoder_step, mode="reduce-overhead")
    return rmt


# ------------------------------------------------------------------------------------------ the 1M-token run
MILLION = 1_048_576
TARGET_1M_S, TARGET_CROSSOVER = 1.0, 8192


def run_million(out_dir: Path, quick: bool = False) -> dict:
    """1M tokens graphed (with and without compile_step) and the crossover against full attention."""
    import torch

    from rmt_fast import FastRMT

    from .latency import _backbone, _is_oom, _Timer, default_setup

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float16 if cuda else torch.float32
    s = default_setup(cuda, tiny=not cuda)
    total = MILLION if cuda else 4096
    lengths = [4096, 8192, 16384, 32768] if cuda else [256, 512, 1024]
    compile_step = ({"mode": "max-autotune"} if not quick else True) if cuda else {"backend": "aot_eager"}
    timer = _Timer(device)
    low = max(s.cls_token_id, s.sep_token_id, s.pad_token_id) + 1
    ids = torch.randint(low, s.vocab, (1, max(total, *lengths)), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    seg = s.segment_size
    rows = []

    def timed(fn, reps):
        with torch.inference_mode():
            return statistics.median(timer.once(fn) for _ in range(reps))

    def graphed(name, kw):
        try:
            rmt = FastRMT(_backbone(s, s.positions), s.mem, seg, cls_token_id=s.cls_token_id,
                          sep_token_id=s.sep_token_id, pad_token_id=s.pad_token_id, cuda_graph=True,
                          **kw).to(device, dtype).eval()  # fmt: skip

            def call(n):
                return lambda: rmt(ids[:, :n], return_logits=False)

            t0 = time.perf_counter()
            timed(call(8 * seg), 2)  # capture / compile / autotune
            warm = time.perf_counter() - t0
            sec = timed(call(total), 1 if quick else 2)
            n_seg = -(-total // seg)
            rows.append(dict(method=name, tokens=total, segments=n_seg, seconds=sec, ms_per_segment=1e3 * sec / n_seg,
                             warmup_s=warm, graphs_captured=rmt._graphs.captures, status="ok"))  # fmt: skip
            for n in lengths:
                rows.append(dict(method=name, tokens=n, segments=-(-n // seg), seconds=timed(call(n), 3), status="ok"))
        except Exception as exc:  # an unavailable path is a row, not a crash
            rows.append(dict(method=name, status=f"error: {type(exc).__name__}: {str(exc)[:200]}"))

    def full():
        model = _backbone(s, max(lengths)).to(device, dtype).eval()
        for n in lengths:
            try:
                timed(lambda n=n: model(input_ids=ids[:, :n]), 1)  # warm-up
                sec = timed(lambda n=n: model(input_ids=ids[:, :n]), 3)
                rows.append(dict(method="full (SDPA)", tokens=n, seconds=sec, status="ok"))
            except Exception as exc:
                status = "oom" if _is_oom(exc) else f"error: {type(exc).__name__}: {str(exc)[:200]}"
                rows.append(dict(method="full (SDPA)", tokens=n, status=status))
                break

    # the compiled method last: its compilation is the long part; rows are written after each method, so a
    # device-check timeout keeps what was measured
    jobs = (lambda: graphed("graphed", {}), full, lambda: graphed("graphed+compiled", {"compile_step": compile_step}))
    for job in jobs:
        job()
        if cuda:
            torch.cuda.empty_cache()
        write_csv(out_dir / "million.csv", rows)
    summary = _million_summary(rows, total, lengths, targets_apply=cuda)  # million.csv: written after each job
    write_json(out_dir / "million.json", {"summary": summary, "rows": rows, "tokens": total, "dtype": str(dtype),
                                          "compile_step": compile_step, "setup": s.__dict__,
                                          "env": env_info()})  # fmt: skip
    _plot_million(rows, total, out_dir / "million.png")
    return summary


def _million_summary(rows, total, lengths, targets_apply: bool = True) -> dict:
    """Seconds for ``total`` tokens and the crossover length per graphed method; the targets (GPU, bert-base)
    are checked only where they apply (``meets_*`` None otherwise)."""
    def sec(method, n):
        return next((r["seconds"] for r in rows if r["method"] == method and r.get("tokens") == n
                     and r["status"] == "ok"), None)  # fmt: skip

    out = {"tokens": total}
    for method in ("graphed", "graphed+compiled"):
        t = sec(method, total)
        out[f"seconds_{method}"] = t
        out[f"meets_1s_{method}"] = None if t is None or not targets_apply else t < TARGET_1M_S
        # the shortest length from which the RMT is faster at every longer length (full attention out of memory
        # or not run after an OOM counts as slower)
        cross = None
        for n in reversed(lengths):
            rmt, full = sec(method, n), sec("full (SDPA)", n)
            if rmt is None or (full is not None and rmt >= full):
                break
            cross = n
        out[f"crossover_tokens_{method}"] = cross
        meets = cross is not None and cross <= TARGET_CROSSOVER
        out[f"meets_crossover_{method}"] = meets if targets_apply else None
    return out


def _plot_million(rows, total, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for method in ("graphed", "graphed+compiled", "full (SDPA)"):
        pts = sorted((r["tokens"], r["seconds"]) for r in rows if r["method"] == method and r["status"] == "ok")
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens (batch 1)")
    ax.set_ylabel("seconds per forward pass")
    ax.set_title(f"RMT (graphed FastRMT) vs full attention, {total:,} tokens ({machine_label()})", fontsize=9)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    save_plot(fig, path)


def _time(fn, reps: int) -> float:
    import torch

    fn()
    fn()  # warm-up: capture / compile / autotune happen here
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps / 1e3


def run(out_dir: Path, quick: bool = False) -> dict:
    import torch
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        print("no GPU: the CUDA-graph benchmark needs CUDA")
        return {"skipped": "no CUDA"}
    dtype = torch.float16
    n_seg = 8 if quick else 32
    rows = []
    jobs = [(kind, b) for b in (1, 32) for kind in ("reference", "eager", "graphed", "compiled")]
    for kind, batch in tqdm(jobs, desc="cuda_graph"):
        ids = torch.randint(1000, 28000, (batch, n_seg * SEGMENT), device="cuda")
        try:
            rmt = _build(kind, dtype)

            def call(rmt=rmt, ids=ids):
                with torch.inference_mode():
                    rmt(ids)

            sec = _time(call, 2 if quick else 5)
            rows.append(dict(method=kind, batch=batch, segments=n_seg, ms_per_segment=1e3 * sec / n_seg,
                             tokens_per_s=batch * n_seg * SEGMENT / sec, status="ok"))  # fmt: skip
        except Exception as exc:  # an unavailable path is a row, not a crash
            rows.append(dict(method=kind, batch=batch, segments=n_seg, status=f"error: {type(exc).__name__}: "
                             f"{str(exc)[:160]}"))  # fmt: skip
        finally:
            torch.cuda.empty_cache()
    million = None
    try:
        rmt = _build("graphed", dtype)
        ids = torch.randint(1000, 28000, (1, 1_048_576), device="cuda")

        def long_call():
            with torch.inference_mode():
                rmt(ids, return_logits=False)

        million = _time(long_call, 1)
        rows.append(dict(method="graphed", batch=1, segments=-(-1_048_576 // SEGMENT), tokens=1_048_576,
                         seconds=million, status="ok"))  # fmt: skip
    except Exception as exc:
        rows.append(dict(method="graphed", batch=1, tokens=1_048_576, status=f"error: {exc}"[:200]))
    ratios = _ratios(rows)
    write_csv(out_dir / "cuda_graph.csv", rows)
    write_json(out_dir / "cuda_graph.json", {"rows": rows, "ratios": ratios, "seconds_1M_tokens": million,
                                             "env": env_info()})  # fmt: skip
    _plot(rows, out_dir / "cuda_graph.png")
    return {"ratios": ratios, "seconds_1M_tokens": million}


def _ratios(rows) -> dict:
    def ms(method, batch):
        r = next((r for r in rows if r["method"] == method and r["batch"] == batch and r["status"] == "ok"
                  and "ms_per_segment" in r), None)  # fmt: skip
        return None if r is None else r["ms_per_segment"]

    out = {}
    for b in (1, 32):
        g = ms("graphed", b)
        for base in ("reference", "eager", "compiled"):
            other = ms(base, b)
            if g and other:
                out[f"{base}_over_graphed_b{b}"] = round(other / g, 3)
    return out


def _plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    methods = ("reference", "eager", "compiled", "graphed")
    for j, batch in enumerate((1, 32)):
        vals = [next((r["ms_per_segment"] for r in rows if r["method"] == m and r["batch"] == batch
                      and "ms_per_segment" in r), 0) for m in methods]  # fmt: skip
        ax.bar([i + (j - 0.5) * 0.4 for i in range(len(methods))], vals, width=0.4, label=f"batch {batch}")
    ax.set_xticks(range(len(methods)), ["ReferenceRMT", "FastRMT eager", "torch.compile", "FastRMT graphed"])
    ax.set_yscale("log")
    ax.set_ylabel("ms per segment (512 positions)")
    ax.set_title(f"bert-base RMT, fp16 inference ({machine_label()})", fontsize=9)
    ax.legend()
    save_plot(fig, path)


def main(argv=None) -> int:
    return module_main(sys.modules[__name__], argv, default_out="results/cuda_graph")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--million", action="store_true", help="only the 1M-token run (a tiny version on the CPU)")


def run_args(out_dir: Path, quick: bool, args: argparse.Namespace) -> dict:
    return run_million(out_dir, quick) if args.million else run(out_dir, quick)


if __name__ == "__main__":
    sys.exit(main())
