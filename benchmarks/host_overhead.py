"""Host (CPU) time per attention call, the Triton path against the SDPA path, eager: ``stub`` (any machine; the
kernel launches and SDPA's compute replaced by no-ops, so what is left is our wrappers' Python) and ``cuda``
(with a GPU, the real calls; host and device time apart). Target: Triton's host time at most SDPA's + 10 us.
Cases and outputs: docs/benchmarks.md, section ``host-overhead``.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from rmt_fast.kernels import launch_configs
from rmt_fast.kernels import triton_attention as ra
from rmt_fast.kernels.layout import SegmentLayout
from rmt_fast.kernels.sdpa_attention import sdpa_rmt_attention

from .common import machine_label
from .runner import Benchmark, Timer

TARGET_US = 10.0
KERNELS = ("_rmt_attn_fwd_kernel", "_rmt_attn_bwd_preprocess_kernel", "_rmt_attn_bwd_dq_kernel",
           "_rmt_attn_bwd_dkdv_kernel")  # fmt: skip


class _StubKernel:
    """Stands in for a jit kernel: accepts a launch, does nothing."""

    def __init__(self, real):
        self.real = real
        self.arg_names = getattr(real, "arg_names", None)

    def run(self, *args, grid, warmup, **kwargs):
        return None

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **kwargs):
        return None


@contextlib.contextmanager
def stubs():
    """Kernel launches and SDPA's compute replaced by no-ops (restored on exit)."""
    saved = {name: getattr(ra, name) for name in KERNELS}
    real_sdpa = F.scaled_dot_product_attention

    def sdpa_stub(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        # a view: no compute, but an autograd node when q requires grad, as the real op records one
        return q.view(q.shape)

    try:
        for name, kernel in saved.items():
            setattr(ra, name, _StubKernel(kernel))
        F.scaled_dot_product_attention = sdpa_stub
        launch_configs.clear_launch_cache()
        yield
    finally:
        for name, kernel in saved.items():
            setattr(ra, name, kernel)
        F.scaled_dot_product_attention = real_sdpa
        launch_configs.clear_launch_cache()


def cases(device, B=2, H=12, m=16, size=512, D=64, dtype=torch.float16) -> dict:
    g = torch.Generator().manual_seed(0)
    T = 2 * m + size
    q, k, v = (torch.randn(B, T, H, D, generator=g).to(dtype).to(device).transpose(1, 2) for _ in range(3))
    counts = torch.full((B,), size - 100, dtype=torch.int32, device=device)
    starts = torch.tensor([37, 0][:B] + [0] * max(0, B - 2), dtype=torch.int32, device=device)
    return {
        "full": (q, k, v, SegmentLayout(m, size, m, True)),
        "counts": (q, k, v, SegmentLayout(m, size, m, True, token_counts=counts)),
        "runs": (q, k, v, SegmentLayout(m, size, m, True, token_counts=counts.clone(), token_starts=starts)),
    }


def _paths(q, k, v, layout) -> dict:
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    return {
        "triton": lambda: ra.rmt_attention(q, k, v, layout, check=False),
        "sdpa": lambda: sdpa_rmt_attention(q, k, v, layout),
        "triton_grad": lambda: ra.rmt_attention(qg, kg, vg, layout, check=False),
        "sdpa_grad": lambda: sdpa_rmt_attention(qg, kg, vg, layout),
        "validate_once_per_segment": lambda: ra.rmt_attention_supported(q, k, v, layout),
    }


def _grad_ctx(path: str):
    return contextlib.nullcontext() if path.endswith("_grad") else torch.no_grad()


def measure_stub(timer: Timer, n: int, repeats: int) -> list[dict]:
    rows = []
    with stubs():
        for case, (q, k, v, layout) in cases("cpu").items():
            for path, fn in _paths(q, k, v, layout).items():
                with _grad_ctx(path):
                    us = 1e6 * timer(fn, repeats=repeats, inner=n, clock="host").median_s
                rows.append({"mode": "stub", "case": case, "path": path, "host_us": round(us, 2)})
    return rows


def measure_cuda(timer: Timer, n: int, repeats: int) -> list[dict]:
    rows = []
    for case, (q, k, v, layout) in cases("cuda").items():
        for path, fn in _paths(q, k, v, layout).items():
            if path.startswith("validate"):
                continue
            with _grad_ctx(path):
                host = 1e6 * timer(fn, repeats=repeats, inner=n, clock="host").median_s
                device = 1e6 * timer(fn, repeats=1, warmup=0, inner=n, clock="device").median_s
            rows.append({"mode": "cuda", "case": case, "path": path, "host_us": round(host, 2),
                         "device_us": round(device, 2)})  # fmt: skip
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Triton minus SDPA host time per (mode, case, grad or not), against the target."""
    by = {(r["mode"], r["case"], r["path"]): r["host_us"] for r in rows}
    out = []
    for (mode, case, path), triton_us in by.items():
        if not path.startswith("triton"):
            continue
        sdpa_us = by[(mode, case, path.replace("triton", "sdpa"))]
        diff = triton_us - sdpa_us
        out.append({"mode": mode, "case": case, "grad": path.endswith("_grad"), "triton_us": triton_us,
                    "sdpa_us": sdpa_us, "diff_us": round(diff, 2), "target_us": TARGET_US,
                    "meets_target": diff <= TARGET_US})  # fmt: skip
    return out


def run(ctx) -> dict:
    n, repeats = (50, 3) if ctx.quick else (500, 7)
    rows = measure_stub(Timer(torch.device("cpu")), n, repeats)
    if ctx.cuda:
        rows += measure_cuda(Timer(torch.device("cuda")), n if ctx.quick else 200, repeats)
    summary = summarize(rows)
    ctx.write_json({"rows": rows, "summary": summary})
    lines = [f"# Host time per attention call ({machine_label()})", "",
             "| mode | case | grad | Triton us | SDPA us | Triton - SDPA | target <= 10 us |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for s in summary:
        lines.append(f"| {s['mode']} | {s['case']} | {s['grad']} | {s['triton_us']:.1f} | {s['sdpa_us']:.1f} | "
                     f"{s['diff_us']:+.1f} | {'yes' if s['meets_target'] else 'NO'} |")  # fmt: skip
    lines += ["", "| mode | case | path | host us | device us |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['case']} | {r['path']} | {r['host_us']:.1f} | {r.get('device_us', '')} |")
    ctx.write_text("\n".join(lines) + "\n", "host_overhead.md")
    print("\n".join(lines))
    return {"rows": len(rows), "all_meet_target": all(s["meets_target"] for s in summary),
            "worst_diff_us": max(s["diff_us"] for s in summary)}  # fmt: skip


BENCHMARK = Benchmark("host_overhead", run=run)
