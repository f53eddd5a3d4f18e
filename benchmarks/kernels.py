"""Attention kernel throughput on the RMT segment mask (GPU only).

Without CUDA this benchmark prints "no GPU: the kernel benchmark needs CUDA" and returns
``{"skipped": "no CUDA"}``.

TODO (kernel issue): this GPU part was written alongside the latency/profile benchmarks and has not been
run on a GPU yet; whoever finishes ``kernels/rmt_attention.py`` should run it, check the numbers and tune
the shapes.

Methods, each on the same q, k, v (B, H, T, D) and the same decoder segment layout
``[10 read | T - 20 tokens | 10 write]``, causal, with per-row valid token counts (rows short by up to 25%):

* ``triton``: :func:`rmt_fast.kernels.rmt_attention.rmt_attention` (the mask is computed in the kernel);
* ``sdpa_flash_nomask``: SDPA with ``is_causal=True`` and no mask (flash kernel) - the upper bound, it ignores
  the padding;
* ``sdpa_dense_mask``: SDPA with the layout's mask materialized (``layout.dense_mask()``);
* ``flex``: FlexAttention (``torch.compile``'d) with a block mask built from the same layout;
* ``xformers``: ``memory_efficient_attention`` with a causal bias (no padding), when xformers is importable.

TFLOP/s use one FLOP count for every method: the causal attention products, 2 * 2 * B * H * T * T * D / 2
for the forward, 2.5 times that for forward + backward (the FlashAttention-2 convention). Timing:
``triton.testing.do_bench`` (median). Shapes: B in {1, 8, 32} at T = 532 (512 + 2 x 10), H = 12, D = 64,
plus long T (4096, 16384) at B = 1; fp16.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rmt_fast.bench.common import env_info, machine_label, save_plot, write_csv, write_json

MEM = 10


def _shapes(quick: bool) -> list[tuple[int, int]]:
    base = [(1, 532), (8, 532), (32, 532)]
    return base + ([(1, 4096)] if quick else [(1, 4096), (1, 16384)])


def _layout(B: int, T: int, device):
    import torch
    from rmt_fast.kernels.layout import SegmentLayout

    tokens = T - 2 * MEM
    g = torch.Generator().manual_seed(0)
    counts = torch.randint(int(tokens * 0.75), tokens + 1, (B,), generator=g)
    counts[0] = tokens
    return SegmentLayout(MEM, tokens, MEM, True, token_counts=counts.to(device=device, dtype=torch.int32))


def _methods(layout, T: int, H: int, device):
    """name -> (callable(q, k, v) -> out) or a string saying why it is unavailable."""
    import torch
    import torch.nn.functional as F

    out = {}
    try:
        from rmt_fast.kernels.rmt_attention import rmt_attention, rmt_attention_supported

        probe = torch.zeros(layout.batch_size, H, T, 64, device=device, dtype=torch.float16)
        reason = rmt_attention_supported(probe, probe, probe, layout)
        out["triton"] = reason or (lambda q, k, v: rmt_attention(q, k, v, layout))
    except Exception as exc:
        out["triton"] = f"{type(exc).__name__}: {exc}"
    out["sdpa_flash_nomask"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    dense = layout.dense_mask(device=device)
    out["sdpa_dense_mask"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        counts = layout.token_counts.long()
        read, write_start = layout.num_read, layout.write_start

        def mask_mod(b, h, q_idx, kv_idx):
            visible = (kv_idx < read + counts[b]) | (kv_idx >= write_start)
            return (kv_idx <= q_idx) & visible

        block = create_block_mask(mask_mod, layout.batch_size, None, T, T, device=device)
        flex = torch.compile(flex_attention, dynamic=False)
        out["flex"] = lambda q, k, v: flex(q, k, v, block_mask=block)
    except Exception as exc:
        out["flex"] = f"{type(exc).__name__}: {str(exc)[:100]}"
    try:
        import xformers.ops as xops

        bias = xops.LowerTriangularMask()
        out["xformers"] = lambda q, k, v: xops.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias
        )
    except Exception as exc:
        out["xformers"] = f"not importable ({type(exc).__name__})"
    return out


def _bench(fn, q, k, v, backward: bool) -> float:
    """Median milliseconds of one call (forward, or forward + backward)."""
    import torch
    from triton.testing import do_bench

    if not backward:
        with torch.no_grad():
            return do_bench(lambda: fn(q, k, v))
    qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
    probe = fn(qg, kg, vg)
    grad = torch.randn_like(probe)

    def step():
        fn(qg, kg, vg).backward(grad)

    return do_bench(step, grad_to_none=[qg, kg, vg])


def run(out_dir: Path, quick: bool = False) -> dict:
    import torch

    if not torch.cuda.is_available():
        print("no GPU: the kernel benchmark needs CUDA")
        return {"skipped": "no CUDA"}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    H, D, dtype = 12, 64, torch.float16
    rows = []
    for B, T in _shapes(quick):
        layout = _layout(B, T, device)
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(B, H, T, D, device=device, dtype=dtype, generator=g) for _ in range(3))
        flops_fwd = 2 * 2 * B * H * T * T * D / 2
        for name, fn in _methods(layout, T, H, device).items():
            for mode, backward, flops in (("fwd", False, flops_fwd), ("fwd+bwd", True, 2.5 * flops_fwd)):
                row = dict(method=name, mode=mode, B=B, T=T, H=H, D=D, dtype=str(dtype).replace("torch.", ""))
                if isinstance(fn, str):
                    rows.append({**row, "status": f"unavailable: {fn}"})
                    continue
                try:
                    ms = _bench(fn, q, k, v, backward)
                    rows.append({**row, "ms": ms, "tflops": flops / (ms * 1e-3) / 1e12, "status": "ok"})
                except Exception as exc:
                    if "out of memory" in str(exc).lower():
                        torch.cuda.empty_cache()
                    rows.append({**row, "status": f"error: {type(exc).__name__}: {str(exc)[:120]}"})
        del q, k, v
        torch.cuda.empty_cache()
    env = env_info()
    env["gpu"] = torch.cuda.get_device_name()
    try:
        import xformers

        env["xformers"] = xformers.__version__
    except Exception:
        env["xformers"] = None
    write_csv(out_dir / "kernels.csv", rows)
    write_json(out_dir / "kernels.json", {"env": env, "rows": rows})
    _plot(rows, out_dir / "kernels.png", env)
    summary = {}
    for r in rows:
        if r["status"] == "ok" and r["T"] == 532 and r["B"] == 8:
            summary[f"{r['method']} {r['mode']} TFLOP/s (B=8,T=532)"] = round(r["tflops"], 1)
    return summary


def _plot(rows, path, env):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys((r["B"], r["T"]) for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / max(len(methods), 1)
    for ax, mode in zip(axes, ("fwd", "fwd+bwd"), strict=True):
        for i, m in enumerate(methods):
            vals = []
            for B, T in shapes:
                r = next(
                    (
                        r
                        for r in rows
                        if r["method"] == m
                        and r["mode"] == mode
                        and (r["B"], r["T"]) == (B, T)
                        and r["status"] == "ok"
                    ),
                    None,
                )
                vals.append(r["tflops"] if r else 0.0)
            ax.bar(
                [x + (i - (len(methods) - 1) / 2) * width for x in range(len(shapes))], vals, width, label=m
            )
        ax.set_xticks(range(len(shapes)), [f"B={B}\nT={T}" for B, T in shapes])
        ax.set_ylabel("TFLOP/s (causal attention FLOPs)")
        ax.set_title(mode)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"RMT segment attention, H=12, D=64, fp16 - {machine_label()} (torch {env['torch']}, "
        f"triton {env['triton']}, xformers {env.get('xformers')})",
        fontsize=9,
    )
    save_plot(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("results/kernels"))
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    print(json.dumps(run(args.out, quick=args.quick), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
