"""What ``rmt-fast-bench tune`` measures, and the table it writes (no timing here): the candidate launch
configurations per kernel and head dim (a grid of tiles x kernel variants filtered by an estimate of shared memory
and registers, plus the kernel's heuristic), the measured shapes (:class:`Case`), and the dispatch table built
from phase 2's rows.
The measuring is in :mod:`rmt_fast.bench.tune`.
"""

from __future__ import annotations

import functools
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

from rmt_fast.kernels import dispatch, launch_configs
from rmt_fast.kernels.launch_configs import next_pow2

H, MEM = 12, 10
DTYPES = ("float16", "bfloat16")
HEAD_DIMS = (64, 128)
ASSUMED_SMEM = {"sm80": 166912, "sm86": 101376, "sm89": 101376, "sm90": 232448}  # opt-in bytes per block

GRID = {
    "fwd": dict(block_m=(64, 128), block_n=(32, 64, 128), warps=(4, 8), stages=(2, 3)),
    "dq": dict(block_m=(64, 128), block_n=(32, 64), warps=(4, 8), stages=(2, 3, 4)),
    "dkdv": dict(block_m=(32, 64), block_n=(64, 128), warps=(4, 8), stages=(2, 3, 4)),
}
# Kernel variants swept per kind (launch_configs.VARIANTS): every grid point is timed with each; the default
# variant ("fa2") is written as a 4-tuple, the others as (BLOCK_M, BLOCK_N, num_warps, num_stages, variant).
VARIANT_GRID = {"fwd": ("fa2",), "dq": ("fa2", "inline"), "dkdv": ("fa2", "inline", "fused")}
QUICK_VARIANT_GRID = {"fwd": ("fa2",), "dq": ("fa2", "inline"), "dkdv": ("fa2", "fused")}
QUICK_GRID = {
    "fwd": dict(block_m=(64, 128), block_n=(64,), warps=(4, 8), stages=(2, 3)),
    "dq": dict(block_m=(64, 128), block_n=(32,), warps=(4, 8), stages=(2,)),
    "dkdv": dict(block_m=(32, 64), block_n=(64, 128), warps=(8,), stages=(2,)),
}


# ============================================================================================ the plan
@dataclass(frozen=True)
class Case:
    """One measured shape: the tensors (B, H, T, D), dtype, layout kind."""

    dtype: str
    head_dim: int
    B: int
    T: int
    causal: bool
    padded: bool

    @property
    def shape_class(self) -> dispatch.ShapeClass:
        return dispatch.ShapeClass.of(self.T, self.T, self.B * H, self.causal, self.padded)

    def label(self) -> str:
        short = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}.get(self.dtype, self.dtype)
        return (
            f"{short} D{self.head_dim} B{self.B} T{self.T} "
            f"{'causal' if self.causal else 'bidir'} {'padded' if self.padded else 'full'}"
        )


def infeasible(kind: str, cfg: tuple, head_dim: int, smem_limit: int, itemsize: int = 2) -> str | None:
    """Why a candidate cannot run well (an estimate: shared memory for the pipelined tiles, fp32 accumulator
    registers per thread), or None. Triton's own out-of-resources error still decides at compile time."""
    bm, bn, warps, stages = cfg[:4]
    d = max(16, next_pow2(head_dim))
    if kind == "fwd":
        smem = itemsize * (bm * d + stages * 2 * bn * d)
        acc = (bm * d + bm * bn) * 4
    elif kind == "dq":
        smem = itemsize * (2 * bm * d + stages * 2 * bn * d)
        acc = (bm * d + 2 * bm * bn) * 4
    else:
        smem = itemsize * (2 * bn * d + stages * 2 * bm * d)
        acc = (2 * bn * d + 2 * bn * bm) * 4
    if smem > smem_limit:
        return f"shared memory ~{smem} B > {smem_limit} B"
    per_thread = acc / (32 * warps)
    if per_thread > 768:
        return f"fp32 accumulators ~{per_thread:.0f} B per thread (> 192 registers)"
    return None


def heuristic_config(kind: str, head_dim: int, dtype_name: str) -> tuple | None:
    """The kernel's own default for this kernel, head dim and dtype (None without triton): (BLOCK_M, BLOCK_N,
    num_warps, num_stages), with its variant as a fifth item where it is not the default one (dQ: "inline")."""
    import torch

    return launch_configs.heuristic_config(kind, head_dim, getattr(torch, dtype_name)).as_tuple()  # the built-in


STATIC_REPORT = dispatch.TUNED_DIR / "static" / "sm90.json"  # scripts/kernel_report.py: compiled offline


@functools.lru_cache(maxsize=4)
def _static_records(path: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return {
        (r["kind"], r["head_dim"], tuple(r["config"])): r
        for r in data.get("records", [])
        if r["dtype"] == "fp16" and r.get("layout") == "causal+counts"
    }


def static_problem(kind: str, cfg: tuple, head_dim: int, smem_limit: int) -> str | None:
    """The committed static report's verdict on this fp16 config in the layout tune sweeps (None: no problem, or
    not in the report): register spills everywhere; no wgmma only on Hopper-class shared memory (sm_90)."""
    rec = _static_records(str(STATIC_REPORT)).get((kind, head_dim, tuple(cfg)))
    if not rec:
        return None
    found = [p for p in rec["problems"] if smem_limit >= ASSUMED_SMEM["sm90"] or not p.startswith("no wgmma")]
    return f"static report (sm_90): {'; '.join(found)}" if found else None


def candidates(
    kind: str, head_dim: int, quick: bool, smem_limit: int, static: bool = True
) -> tuple[list[tuple], list[dict]]:
    """(the configs to time, heuristic first; a row per grid point with its feasibility). ``static``: also drop
    the configs the committed static report (:data:`STATIC_REPORT`) flags."""
    grid = (QUICK_GRID if quick else GRID)[kind]
    heuristic = heuristic_config(kind, head_dim, "float16")
    base = list(itertools.product(grid["block_m"], grid["block_n"], grid["warps"], grid["stages"]))
    variants = (QUICK_VARIANT_GRID if quick else VARIANT_GRID).get(kind, ("fa2",))
    points = [p if v == launch_configs.DEFAULT_VARIANT else (*p, v) for v in variants for p in base]
    if heuristic is not None and heuristic not in points:
        points.insert(0, heuristic)
    keep, rows = [], []
    for cfg in points:
        reason = None if cfg == heuristic else infeasible(kind, cfg, head_dim, smem_limit)
        if reason is None and static and cfg != heuristic:
            reason = static_problem(kind, cfg, head_dim, smem_limit)
        rows.append(
            dict(
                kind=kind,
                head_dim=head_dim,
                config=cfg_text(cfg),
                heuristic=cfg == heuristic,
                feasible=reason is None,
                reason=reason or "",
            )
        )
        if reason is None:
            keep.append(cfg)
    if heuristic in keep:
        keep.remove(heuristic)
        keep.insert(0, heuristic)
    return keep, rows


def sweep_case(head_dim: int, quick: bool) -> Case:
    return Case("float16", head_dim, 8, 532 if quick else 1044, True, True)


def cases(quick: bool) -> list[Case]:
    """Every measured shape, most important first (a budget cut loses the tail): T = 532, 1044; B = 8, 32, 1; both
    head dims and dtypes; causal and bidirectional; padded and full. ``quick`` (the device check's): T = 532,
    B = 8, 1, float16 only (16 cases: each races every backend in two modes, graphed and eager)."""
    ts = (532,) if quick else (532, 1044)
    bs = (8, 1) if quick else (8, 32, 1)
    dts = DTYPES[:1] if quick else DTYPES
    return [
        Case(dt, d, b, t, c, p)
        for t in ts
        for b in bs
        for d in HEAD_DIMS
        for dt in dts
        for c in (True, False)
        for p in (True, False)
    ]


def cfg_text(cfg) -> str:
    bm, bn, w, s = cfg[:4]
    variant = f" {cfg[4]}" if len(cfg) > 4 else ""
    return f"{bm}x{bn} w{w} s{s}{variant}"


# ================================================================================================ table
# (row mode, time column, needs_grad, table mode): the four entries each case gives
MEASUREMENTS = (
    ("fwd", "graph_ms", False, "graphed"),
    ("fwd", "eager_ms", False, "eager"),
    ("fwd+bwd", "graph_ms", True, "graphed"),
    ("fwd+bwd", "eager_ms", True, "eager"),
)


def build_table(
    arch: str,
    devices: list[str],
    configs: dict,
    compare_rows: list[dict],
    margin: float,
    provenance: dict,
    measured: bool = True,
) -> dict:
    """The dispatch table (file format of :mod:`rmt_fast.kernels.dispatch`) from phase 2's rows: one entry per
    shape class x measurement where SDPA has a number, naming the winner of the race by :func:`dispatch.choose`,
    with every raced backend's time in ``ms`` (None where it failed or could not run); an unmeasured example:
    every case, as SDPA, no numbers."""
    times: dict[tuple, dict[str, float | None]] = {}
    shape: dict[tuple, dict] = {}
    for r in compare_rows:
        for mode_name, column, needs_grad, mode in MEASUREMENTS:
            if r["mode"] != mode_name:
                continue
            key = (r["dtype"], r["head_dim"], r["t_bucket"], r["bh_bucket"], r["causal"], r["padded"], needs_grad, mode)
            value = r.get(column)
            times.setdefault(key, {})[r["candidate"]] = _round(value) if r["status"] == "ok" else None
            shape[key] = dict(B=r["B"], H=r["H"], T=r["T"])
    entries = []
    for key, got in times.items():
        if measured and got.get(dispatch.DEFAULT_BACKEND) is None:
            continue  # no SDPA number: nothing to compare against
        dt, d, t, bh, causal, padded, needs_grad, mode = key
        entries.append(
            dict(
                dtype=dt,
                head_dim=d,
                t_bucket=t,
                bh_bucket=bh,
                causal=causal,
                padded=padded,
                needs_grad=needs_grad,
                mode=mode,
                backend=dispatch.choose(got, margin),
                ms=got,
                **shape[key],
            )
        )
    cfg_list = [
        dict(dtype=dt, head_dim=d, **{k: list(v) for k, v in kinds.items()})
        for (dt, d), kinds in sorted(configs.items())
    ]
    return dict(
        format=dispatch.FORMAT,
        arch=arch,
        measured=measured,
        devices=devices,
        margin=margin,
        provenance=provenance,
        configs=cfg_list,
        entries=entries,
    )


def _round(x):
    return None if x is None or x == "" else round(float(x), 6)


def case_cols(c: Case) -> dict:
    cls = c.shape_class
    return dict(
        dtype=c.dtype,
        head_dim=c.head_dim,
        B=c.B,
        H=H,
        T=c.T,
        causal=c.causal,
        padded=c.padded,
        t_bucket=cls.t,
        bh_bucket=cls.bh,
    )
