"""Per-segment latency of graphed FastRMT against eager FastRMT, ReferenceRMT and torch.compile (GPU).

bert-base from its config, 512-position model input (499 content tokens + 10 memory + 3 specials), fp16,
inference. Reports ms per segment and tokens per second at batch 1 and batch 32, and the time to pass
1,048,576 tokens through graphed FastRMT. Baselines are measured in the same run. Without CUDA it says so.

    python -m rmt_fast.bench.cuda_graph --out results/cuda_graph [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import env_info, machine_label, save_plot, write_csv, write_json

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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results/cuda_graph")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    print(json.dumps(run(Path(args.out), quick=args.quick), indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
