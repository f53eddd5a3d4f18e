"""Compile the Triton RMT attention kernels for a GPU target without a GPU: Triton's front end and the ptxas that
ships in triton's wheel. Catches what the CPU interpreter cannot: type errors only the compiler sees (an fp64
scalar turning the accumulator into fp64, as inductor's float arguments did on the first H200 run), arguments a
kernel does not have, shared-memory or register overflows at the launch configurations.

    python tests/kernel_compile.py [--arch 90] [--floats fp32|fp64] [--full]

Run it without TRITON_INTERPRET (tests/kernels/test_kernel_compile.py runs it in a subprocess). Prints one line per
failure and a last line "compiled N variants for sm_XX"; exit status 1 on any failure.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler.compiler import ASTSource  # noqa: E402

from rmt_fast.kernels import launch_configs as lc  # noqa: E402
from rmt_fast.kernels import triton_attention as ta  # noqa: E402

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_TENSOR_ARGS = ("Q", "K", "V", "Out", "DO", "DQ", "DK", "DV")
_FP32_ARGS = ("LSE", "DELTA")
_INT_ARGS = ("STARTS", "COUNTS")
_FLOAT_SCALARS = ("qk_scale", "sm_scale", "dropout_p")


def _signature(fn, dtype: str, floats: str, constexprs: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _TENSOR_ARGS:
            sig[name] = f"*{dtype}"
        elif name in _FP32_ARGS:
            sig[name] = "*fp32"
        elif name in _INT_ARGS:
            sig[name] = "*i32"
        elif name in _FLOAT_SCALARS:
            sig[name] = floats
        else:
            sig[name] = "i32"
    return sig


def compile_variant(kind: str, dtype: str, flags: dict, arch: int, floats: str, head_dim: int = 64, cfg=None):
    """Compile one kernel variant for ``sm_<arch>`` (``cfg``: a LaunchConfig or tuple; default the heuristic's);
    returns Triton's compiled kernel (``asm["ptx"]``, ``asm["cubin"]``, ``metadata.shared``)."""
    fn = {"fwd": ta._rmt_attn_fwd_kernel, "dq": ta._rmt_attn_bwd_dq_kernel, "dkdv": ta._rmt_attn_bwd_dkdv_kernel}[kind]
    cfg = lc.heuristic_config(kind, head_dim, _DTYPES[dtype]) if cfg is None else lc.LaunchConfig.of(cfg)
    consts = dict(
        flags,
        D=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        DOT_PREC="ieee" if dtype == "fp32" else "tf32",
        BOUNDARY_ONLY=True,
        DROP_I64=False,
        **lc.variant_constexprs(kind, cfg.variant),
    )
    consts = {k: v for k, v in consts.items() if k in fn.arg_names}
    missing = [p.name for p in fn.params if p.is_constexpr and p.name not in consts]
    if missing:
        raise TypeError(f"{kind}: constexpr arguments with no value here: {missing}")
    src = ASTSource(fn, _signature(fn, dtype, floats, consts), consts)
    return triton.compile(
        src, target=GPUTarget("cuda", arch, 32), options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    )


def variants(full: bool, dtypes: tuple[str, ...] | None = None):
    dtypes = dtypes or (("fp16", "bf16", "fp32") if full else ("fp16", "fp32"))
    for kind, dtype in itertools.product(("fwd", "dq", "dkdv"), dtypes):
        for causal, padded, starts, dropout in itertools.product((False, True), repeat=4):
            if starts and not padded:
                continue
            if not full and dropout and not (causal and padded and starts):
                continue
            yield kind, dtype, dict(CAUSAL=causal, PADDED=padded, HAS_STARTS=starts, DROPOUT=dropout)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90)
    p.add_argument(
        "--floats",
        choices=("fp32", "fp64"),
        default="fp32",
        help="type of the float scalar arguments (fp64: what inductor passes)",
    )
    p.add_argument("--full", action="store_true", help="bf16 too, and dropout with every mask mode")
    p.add_argument("--only", default=None, help="compile only these kernels, e.g. fwd,dq")
    p.add_argument("--dtypes", default=None, help="only these tensor dtypes, e.g. fp16,bf16")
    args = p.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    t0, n, failures = time.perf_counter(), 0, 0
    dtypes = tuple(args.dtypes.split(",")) if args.dtypes else None
    for kind, dtype, flags in variants(args.full, dtypes):
        if only and kind not in only:
            continue
        try:
            compile_variant(kind, dtype, flags, args.arch, args.floats)
            n += 1
        except Exception as exc:  # report every failing variant, then fail
            failures += 1
            print(f"FAIL {kind} {dtype} {flags} floats={args.floats}: {type(exc).__name__}: {str(exc)[-800:]}")
    print(
        f"compiled {n} variants for sm_{args.arch} ({args.floats} scalars) in {time.perf_counter() - t0:.1f}s, "
        f"{failures} failed"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
