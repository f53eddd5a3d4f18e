"""Where the host time of one attention call goes, on ``host-overhead``'s stubs (the ``full`` case): the grad call
(the forward of inputs that require grad) and the step (forward + ``autograd.grad``) of the Triton path and of
SDPA's, and the pieces they are made of, each timed alone (the Triton backward's body: its node's ``apply``).

    python scripts/host_overhead_parts.py --rounds 30 --calls 2000

Each round times ``--calls`` back-to-back calls of every row in turn (interleaved, so that a load change on a
shared machine hits every row alike); per row the process CPU time per call, median and min over the rounds.
The pieces overlap their callers (a piece's time is also inside the rows that contain it); what they show is the
order of magnitude of each cost, not a sum. Prints a Markdown table; ``--out`` writes it with a JSON copy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the compiled path: plans cached
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from rmt_fast.bench import host_overhead as ho  # noqa: E402
from rmt_fast.kernels import launch_configs as lc  # noqa: E402
from rmt_fast.kernels import sdpa_attention  # noqa: E402
from rmt_fast.kernels import triton_attention as ra  # noqa: E402


class _Bare(torch.autograd.Function):
    """The least a Python autograd node costs through the C apply: q, k, v and one argument in, one fresh tensor
    out (``call`` allocates it), nothing saved."""

    @staticmethod
    def forward(ctx, q, k, v, call):
        return call()

    @staticmethod
    def backward(ctx, do):
        return None, None, None, None


class _Saving(_Bare):
    """:class:`_Bare` plus what the Triton Function keeps: five saved tensors and ``ctx.call``."""

    @staticmethod
    def forward(ctx, q, k, v, call):
        o, lse = call(), call()
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.call = call
        return o


class _Floor(_Saving):
    """:class:`_Saving` whose backward allocates the three gradients as the Triton backward does (and launches
    nothing): the least a step through a Python autograd Function with our buffers costs."""

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), None


def rows(mode: str) -> dict:
    q, k, v, layout = ho.cases("cpu")["full"]
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    g_out = torch.ones(q.shape[0], q.shape[2], q.shape[1], q.shape[3], dtype=q.dtype)
    for _ in range(2):  # builds the plan (and, in the triton stub, the fast launches)
        torch.autograd.grad(ra.rmt_attention(qg, kg, vg, layout, check=False), (qg, kg, vg), g_out)
    node = ra.rmt_attention(qg, kg, vg, layout, check=False).grad_fn
    plan = next(iter(lc.cache_snapshot().shape_plans.values()))
    starts = counts = q
    args = (q, k, v, plan.new_out(), plan.new_lse(), starts, counts, *q.stride(), *k.stride(), *v.stride())
    args += (*plan.fwd_rest, 0.0, 0)
    launch = plan.fwd
    fast = plan.fast.get("fwd")
    bare = ra._C_APPLY.__get__(None, _Bare)  # the C apply, bound as triton_attention binds its Function
    saving = ra._C_APPLY.__get__(None, _Saving)
    floor = ra._C_APPLY.__get__(None, _Floor)
    sdpa = F.scaled_dot_product_attention  # the stub inside the block
    out = {
        "Triton grad call (rmt_attention)": lambda: ra.rmt_attention(qg, kg, vg, layout, check=False),
        "Triton no_grad call": lambda: ra.rmt_attention(q, k, v, layout, check=False),
        "SDPA grad call (sdpa_rmt_attention)": lambda: sdpa_attention.sdpa_rmt_attention(qg, kg, vg, layout),
        "SDPA no_grad call": lambda: sdpa_attention.sdpa_rmt_attention(q, k, v, layout),
        "Triton step": lambda: torch.autograd.grad(
            ra.rmt_attention(qg, kg, vg, layout, check=False), (qg, kg, vg), g_out
        ),
        "SDPA step": lambda: torch.autograd.grad(
            sdpa_attention.sdpa_rmt_attention(qg, kg, vg, layout), (qg, kg, vg), g_out, allow_unused=True
        ),
        "floor step: C apply, 2 allocations, 5 saved; a backward allocating dQ, dK, dV": lambda: torch.autograd.grad(
            floor(qg, kg, vg, plan.new_out), (qg, kg, vg), g_out
        ),
        "piece: the Triton backward's body (its node's apply)": lambda: node.apply(g_out),
        "piece: allocation of delta (empty_like(lse))": lambda: torch.empty_like(args[4]),
        "piece: allocation of dQ (q.new_empty_strided)": lambda: q.new_empty_strided(q.shape, plan.bwd[1][2][0]),
        "piece: C apply, bare node + 1 allocation": lambda: bare(qg, kg, vg, plan.new_out),
        "piece: C apply, 2 allocations, 5 saved, ctx.call": lambda: saving(qg, kg, vg, plan.new_out),
        "piece: allocation of out (plan.new_out)": plan.new_out,
        "piece: allocation of lse (plan.new_lse)": plan.new_lse,
        "piece: torch.empty of out": lambda: torch.empty(plan.out_shape, dtype=plan.dtype, device=plan.device),
        "piece: shape key + plan look-up (_shape_plan, a hit)": lambda: ra._shape_plan(
            q, k, False, False, 16, 512, True, 0.125, False
        ),
        "piece: _forward (allocations + launch)": lambda: ra._forward(q, k, v, starts, counts, plan, 0.0, 0, None),
        "piece: the launch (_run)": lambda: ra._run(launch, plan.fwd_grid, args, None, plan, "fwd"),
        "piece: SDPA stub + transpose, grad (2 view nodes)": lambda: sdpa(qg, kg, vg, is_causal=True).transpose(1, 2),
        "piece: q.view(q.shape), grad (1 view node)": lambda: qg.view(qg.shape),
        "piece: q.transpose(1, 2), grad (1 view node)": lambda: qg.transpose(1, 2),
    }
    if fast is not None:
        out["piece: the fast launch alone (fast_launch.build's)"] = lambda: fast(args)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=None, help="folder for parts.md and parts.json")
    args = parser.parse_args()
    results = {}
    for mode in ("plain", "triton"):
        with ho.stubs(mode):
            fns = rows(mode)
            samples = ho.interleaved_cpu_us(fns, args.rounds, args.calls, 10, lambda name: "no_grad" in name)
        for name, s in samples.items():
            results[f"{mode}|{name}"] = {"median_us": round(statistics.median(s), 2), "min_us": round(min(s), 2)}
    lines = [
        f"{args.rounds} rounds x {args.calls} calls; CPU us per call, median (min)",
        "",
        "| row | plain stub | triton stub |",
        "|---|---:|---:|",
    ]
    names = list(dict.fromkeys(key.split("|", 1)[1] for key in results))
    for name in names:
        cells = []
        for mode in ("plain", "triton"):
            x = results.get(f"{mode}|{name}")
            cells.append("" if x is None else f"{x['median_us']:.2f} ({x['min_us']:.2f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "parts.md").write_text(text)
        (args.out / "parts.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
