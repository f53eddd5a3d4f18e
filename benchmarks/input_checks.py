"""What the input value checks (issue 12) cost: time per forward call, and host synchronisations per call.

FastRMT decoder (GPT-2 from its config), inference (``torch.no_grad``), every checked argument given
(``input_ids``, ``attention_mask``, ``labels``, ``memory_state``), at a few (batch, length) sizes. Per size:

* ``check_us``: ``_check_inputs`` with the value checks (one fused reduction, one host read) minus the same
  call with ``check_inputs=False`` (shape/dtype/device checks only), in µs per call;
* ``forward_ms``: one forward call with the checks on (loss streamed, ``return_logits=False``);
* ``overhead_pct``: check_us as a share of the forward call;
* ``host_reads_per_call``: how many times the checks read a device value to the host. On CUDA these are the
  synchronisations counted by ``torch.cuda.set_sync_debug_mode("warn")`` (checks on minus checks off, for the
  check alone and for a whole forward call); on the CPU, calls of ``Tensor.tolist/item/__bool__...`` (there is
  no device to wait for there, but the count is the same code path).

CPU: a tiny default (2 layers, 128 hidden, vocab 8192) that finishes in seconds. GPU: GPT-2 small (12 layers,
768 hidden, vocab 50257) in bf16. Writes input_checks.csv, input_checks.json and input_checks.png.

    python -m rmt_fast.bench.input_checks --out results/input_checks [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

from .common import env_info, machine_label, save_plot, write_csv, write_json

CPU_CFG = dict(layers=2, hidden=128, heads=4, vocab=8192, segment_size=256, mem=8,
               sizes=[(1, 256), (2, 1024), (4, 2048)], check_reps=200, forward_reps=1)  # fmt: skip
GPU_CFG = dict(layers=12, hidden=768, heads=12, vocab=50257, segment_size=496, mem=8,
               sizes=[(1, 992), (8, 3968), (32, 7936)], check_reps=500, forward_reps=10)  # fmt: skip


def _config(cuda: bool, quick: bool) -> dict:
    cfg = dict(GPU_CFG if cuda else CPU_CFG)
    if quick:
        cfg.update(sizes=cfg["sizes"][:2], check_reps=cfg["check_reps"] // 2,
                   forward_reps=max(cfg["forward_reps"] // 2, 1))  # fmt: skip
    return cfg


def _build(cfg: dict, device: str, dtype):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from rmt_fast import FastRMT

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=cfg["layers"], n_embd=cfg["hidden"], n_head=cfg["heads"],
                                       vocab_size=cfg["vocab"], n_positions=cfg["segment_size"] + 2 * cfg["mem"],
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                       eos_token_id=0))  # fmt: skip
    rmt = FastRMT(model, cfg["mem"], cfg["segment_size"]).to(device, dtype).eval()
    return rmt


def _sync(device: str):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _seconds_per_call(fn, reps: int, device: str) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(3):  # best of three rounds: the least disturbed by other work on the machine
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        _sync(device)
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def count_host_reads(fn, device: str) -> int:
    """CUDA: synchronising operations while fn runs (sync debug mode). CPU: Tensor methods that read a value."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchronizing" in str(w.message) for w in caught)
    names = ("tolist", "item", "__bool__", "__int__", "__float__", "cpu", "numpy")
    originals = {name: getattr(torch.Tensor, name) for name in names}
    count = [0]

    def wrap(original):
        def wrapper(t, *args, **kwargs):
            count[0] += 1
            return original(t, *args, **kwargs)

        return wrapper

    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, wrap(original))
        fn()
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    return count[0]


def measure(rmt, batch: int, length: int, cfg: dict, device: str) -> dict:
    import torch

    ids = torch.randint(0, cfg["vocab"], (batch, length), device=device)
    mask = torch.ones_like(ids)
    memory = rmt.memory.detach().expand(batch, -1, -1).contiguous()

    def check():
        rmt._check_inputs(ids, mask, ids, None, memory)

    def forward():
        rmt(ids, attention_mask=mask, labels=ids, memory_state=memory, return_logits=False)

    st = rmt.settings
    with torch.no_grad():
        st.check_inputs = True
        check_on = _seconds_per_call(check, cfg["check_reps"], device)
        reads_check_on = count_host_reads(check, device)
        forward_on = _seconds_per_call(forward, cfg["forward_reps"], device)
        reads_forward_on = count_host_reads(forward, device)
        st.check_inputs = False
        check_off = _seconds_per_call(check, cfg["check_reps"], device)
        reads_check_off = count_host_reads(check, device)
        reads_forward_off = count_host_reads(forward, device)
        st.check_inputs = True
    check_us = max(check_on - check_off, 0.0) * 1e6
    return dict(
        batch=batch, length=length, tokens=batch * length, segments=-(-length // cfg["segment_size"]),
        check_us=check_us, check_on_us=check_on * 1e6, check_off_us=check_off * 1e6,
        forward_ms=forward_on * 1e3, overhead_pct=100 * check_us / (forward_on * 1e6),
        host_reads_per_call=reads_check_on - reads_check_off,
        forward_host_reads_on=reads_forward_on, forward_host_reads_off=reads_forward_off,
    )  # fmt: skip


def _plot(rows: list[dict], path: Path, label: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = [r["tokens"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(tokens, [r["check_us"] for r in rows], "o-")
    a.set(xscale="log", xlabel="tokens per call (batch x length)", ylabel="µs per call",
          title="value checks, per forward call")  # fmt: skip
    b.plot(tokens, [r["overhead_pct"] for r in rows], "o-")
    b.set(xscale="log", xlabel="tokens per call (batch x length)", ylabel="% of a forward call",
          title="value checks / forward (no_grad)")  # fmt: skip
    fig.suptitle(f"Input value checks ({label})")
    save_plot(fig, path)


def run(out_dir: Path, quick: bool = False) -> dict:
    import torch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    cfg = _config(cuda, quick)
    rmt = _build(cfg, device, dtype)
    with torch.no_grad():  # first-call costs (lazy initialisation in torch and transformers) stay out of the rows
        b, t = cfg["sizes"][0]
        rmt(torch.zeros(b, t, dtype=torch.long, device=device), return_logits=False)
    rows = [measure(rmt, b, t, cfg, device) for b, t in cfg["sizes"]]
    # What one read of a small tensor counts as (sync debug mode may report a copy as more than one event).
    one_read = count_host_reads(lambda: torch.zeros(3, device=device).tolist(), device)
    for r in rows:
        print(f"  batch {r['batch']:3d} x {r['length']:6d}: checks {r['check_us']:8.1f} µs/call, forward "
              f"{r['forward_ms']:9.2f} ms ({r['overhead_pct']:.3f}%), host reads/call {r['host_reads_per_call']}")
    write_csv(out_dir / "input_checks.csv", rows)
    _plot(rows, out_dir / "input_checks.png", machine_label())
    summary = {
        "device": machine_label(),
        "dtype": str(dtype).replace("torch.", ""),
        "max_check_us": max(r["check_us"] for r in rows),
        "max_overhead_pct": max(r["overhead_pct"] for r in rows),
        "host_reads_per_call": sorted({r["host_reads_per_call"] for r in rows}),
        "one_small_read_counts_as": one_read,
        "ok": all(r["host_reads_per_call"] == one_read for r in rows),
    }
    write_json(out_dir / "input_checks.json", {"summary": summary, "config": cfg, "rows": rows, "env": env_info()})
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/input_checks"))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.out, args.quick), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
