"""RMT segment attention as a FlashAttention-2 style Triton kernel.

The segment mask (``[read | tokens | write]`` slots, causal or bidirectional, a per-row count of valid token
slots) is computed inside the kernels from a handful of integers and a pointer to ``token_counts``: nothing
dense is built, nothing is copied, and no value is read back to the host.

* q (B, Hq, Tq, D), k and v (B, Hkv, Tk, D) are read in place through their four strides (typically the
  transposed views ``x.view(B, T, H, D).transpose(1, 2)`` of projection outputs);
* the output is written directly in the (B, Tq, Hq, D) layout that HF attention functions return;
* grouped-query attention picks the K/V head ``hq // G`` by index (no ``repeat_kv``); the dk/dv program of a
  K/V head loops over the G query heads of its group, so no atomics are used and results are deterministic;
* key blocks that no query of a tile can see (above the causal diagonal, or entirely inside the padded tail
  of the token region of that batch row) are skipped;
* attention dropout uses Triton's Philox generator keyed by ``seed`` and the element offset
  ``((b * Hq + h) * Tq + i) * Tk + j``; the backward pass regenerates the same keep-mask.

Interface for callers (the runtime's dispatch, tuners):

* ``rmt_attention(q, k, v, layout, *, scale=None, dropout_p=0.0, seed=None, out=None, check=True)``;
  ``check=False`` skips all validation, for a caller that already called ``rmt_attention_supported`` for this
  segment (it returns None or a reason; the reason is what ``check=True`` would raise).
* Launch configurations (``LaunchConfig(BLOCK_M, BLOCK_N, num_warps, num_stages)``; a 4-tuple is accepted
  wherever one is expected), per kernel kind ``"fwd"``, ``"dq"`` (backward dQ) and ``"dkdv"`` (backward dK/dV),
  resolved in this order at each launch:

  1. ``with override_configs(fwd=..., dq=..., dkdv=...):`` the given config, used exactly (no out-of-resources
     step-down; the error propagates), not cached: for a tuner's sweep;
  2. the cache of resolved configs, keyed (kind, head_dim, dtype, device index): one dict look-up;
  3. on a cache miss ``launch_config(kind, head_dim, dtype)``: the table installed by
     ``set_launch_configs({(kind, head_dim, dtype): (BLOCK_M, BLOCK_N, num_warps, num_stages), ...})`` (a
     measured dispatch table), else the built-in heuristic. A caller that replaces or extends
     ``launch_config`` calls ``clear_launch_cache()`` afterwards (``set_launch_configs`` does it itself).

  A launch that fails to compile for lack of shared memory / registers steps down (``LaunchConfig.smaller``)
  and the cache remembers the config that compiled. In Triton's interpreter the cache is bypassed.

File order: jit kernels, launch configuration, launchers, the autograd Function, the public functions.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import triton
import triton.language as tl
from torch import Tensor

from .layout import SegmentLayout

_LOG2E = 1.4426950408889634
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MIN_HEAD_DIM = 16
_MAX_HEAD_DIM = 256
_MAX_GRID_Y = 65535  # (batch, head) pairs run on the second grid axis


# ============================================================================================ jit kernels
@triton.jit
def _fp32(x):
    """A float scalar argument as fp32: torch.compile (inductor) passes Python floats as fp64, which would turn
    the fp32 accumulators fp64 inside the loops (a compile error: loop-carried type change)."""
    return tl.cast(x, tl.float32)


@triton.jit
def _keep_mask(seed, offsets, dropout_p):
    """True where an attention probability survives dropout (probability 1 - dropout_p)."""
    return tl.rand(seed, offsets) >= dropout_p


@triton.jit
def _dropout_row_offsets(bh, rows, Tq, Tk, DROP_I64: tl.constexpr):
    """Philox offsets (bh * Tq + i) * Tk of the elements (bh, i, 0), i in ``rows`` (any shape); add j.

    Offsets below 2**31 give the same random numbers in int32 as in int64 (the high counter word is 0), so
    the int32 form (cheaper) is used whenever B * Hq * Tq * Tk fits.
    """
    if DROP_I64:
        return (bh.to(tl.int64) * Tq + rows) * Tk
    else:
        return (bh * Tq + rows) * Tk


@triton.jit
def _hidden_ranges(
    STARTS, ENDS, b, num_read, num_tokens, Tk, PADDED: tl.constexpr, HAS_STARTS: tl.constexpr
):  # fmt: skip
    """[lo1, hi1) and [lo2, hi2): the invisible key positions of batch row b.

    Its visible token run is [start, end) (start 0 without STARTS), both clamped to [0, num_tokens]: the token
    slots before it, [num_read, num_read + start), and after it, [num_read + end, num_read + num_tokens), are
    hidden. An empty run gives one merged range (and an empty second one), so fully hidden key blocks are
    recognised as such. Without STARTS the first range is [0, 0) (so :func:`_key_block_ranges` gives an empty
    first range, which the kernels then skip); without PADDED nothing is hidden.
    """
    if PADDED:
        end = tl.load(ENDS + b).to(tl.int32)
        end = tl.minimum(tl.maximum(end, 0), num_tokens)
        lo2 = num_read + end
        hi2 = num_read + num_tokens
        if HAS_STARTS:
            start = tl.load(STARTS + b).to(tl.int32)
            start = tl.minimum(tl.maximum(start, 0), num_tokens)
            empty = end <= start
            lo1 = num_read + tl.zeros_like(start)
            hi1 = tl.where(empty, hi2, num_read + start)
            lo2 = tl.where(empty, hi2, lo2)
        else:
            lo1 = 0
            hi1 = 0
    else:
        lo1 = 0
        hi1 = 0
        lo2 = Tk
        hi2 = Tk
    return lo1, hi1, lo2, hi2


@triton.jit
def _key_block_ranges(lo1, hi1, lo2, hi2, hi, BLOCK_N: tl.constexpr):
    """Key blocks [0, r1_end), [r2_start, r2_end), [r3_start, hi) cover every block below ``hi`` that holds a
    visible key, in order and without overlap; the blocks between lie entirely in a hidden range."""
    r1_end = tl.minimum(hi, tl.cdiv(lo1, BLOCK_N) * BLOCK_N)
    r2_start = tl.maximum(r1_end, (hi1 // BLOCK_N) * BLOCK_N)
    r2_end = tl.minimum(hi, tl.maximum(r2_start, tl.cdiv(lo2, BLOCK_N) * BLOCK_N))
    r3_start = tl.maximum(r2_end, (hi2 // BLOCK_N) * BLOCK_N)
    return r1_end, r2_start, r2_end, r3_start


@triton.jit
def _key_visible(offs, lo1, hi1, lo2, hi2, HAS_STARTS: tl.constexpr):
    """Keys ``offs`` (any shape) outside both hidden ranges."""
    vis = (offs < lo2) | (offs >= hi2)
    if HAS_STARTS:
        vis = vis & ((offs < lo1) | (offs >= hi1))
    return vis


@triton.jit
def _visible(
    offs_m, offs_n, Tq, Tk, causal_shift, lo1, hi1, lo2, hi2,
    CAUSAL: tl.constexpr, PADDED: tl.constexpr, HAS_STARTS: tl.constexpr,
):  # fmt: skip
    """(BLOCK_M, BLOCK_N) bool: query offs_m may attend key offs_n (both in range, causal, not hidden)."""
    vis = (offs_m[:, None] < Tq) & (offs_n[None, :] < Tk)
    if CAUSAL:
        vis = vis & (offs_n[None, :] <= offs_m[:, None] + causal_shift)
    if PADDED:
        vis = vis & _key_visible(offs_n[None, :], lo1, hi1, lo2, hi2, HAS_STARTS)
    return vis


@triton.jit
def _block_needs_mask(
    start_n, m_first, Tk, causal_shift, lo1, hi1, lo2, hi2,
    CAUSAL: tl.constexpr, PADDED: tl.constexpr, HAS_STARTS: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Whether some (query tile starting at m_first, key block at start_n) pair is invisible.

    Rows past Tq need no mask: their q / dO tiles load as zeros and their results are never stored.
    """
    needs = start_n + BLOCK_N > Tk
    if CAUSAL:
        needs = needs | (start_n + BLOCK_N - 1 > m_first + causal_shift)
    if PADDED:
        needs = needs | ((start_n + BLOCK_N > lo2) & (start_n < hi2))
        if HAS_STARTS:
            needs = needs | ((start_n + BLOCK_N > lo1) & (start_n < hi1))
    return needs


@triton.jit
def _visible_t(
    offs_m, offs_n, Tq, Tk, causal_shift, lo1, hi1, lo2, hi2,
    CAUSAL: tl.constexpr, PADDED: tl.constexpr, HAS_STARTS: tl.constexpr,
):  # fmt: skip
    """(BLOCK_N, BLOCK_M) bool: the transpose of :func:`_visible`, built directly in key-major orientation."""
    vis = (offs_n[:, None] < Tk) & (offs_m[None, :] < Tq)
    if CAUSAL:
        vis = vis & (offs_n[:, None] <= offs_m[None, :] + causal_shift)
    if PADDED:
        vis = vis & _key_visible(offs_n[:, None], lo1, hi1, lo2, hi2, HAS_STARTS)
    return vis


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q, k_base, v_base, start, end,
    m_first, offs_m, offs_d, drop_row, Tq, Tk, D: tl.constexpr, causal_shift, lo1, hi1, lo2, hi2,
    stride_kn, stride_kd, stride_vn, stride_vd, qk_scale, dropout_p, seed,
    CAUSAL: tl.constexpr, PADDED: tl.constexpr, HAS_STARTS: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr, BOUNDARY_ONLY: tl.constexpr,
):  # fmt: skip
    d_ok = offs_d < D
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < Tk
        kt = tl.load(
            k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
            mask=n_ok[None, :] & d_ok[:, None], other=0.0,
        )  # fmt: skip
        s = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale
        if BOUNDARY_ONLY:
            needs = _block_needs_mask(
                start_n, m_first, Tk, causal_shift, lo1, hi1, lo2, hi2, CAUSAL, PADDED, HAS_STARTS, BLOCK_N
            )
            if needs:
                vis = _visible(offs_m, offs_n, Tq, Tk, causal_shift, lo1, hi1, lo2, hi2, CAUSAL, PADDED, HAS_STARTS)
                s = tl.where(vis, s, float("-inf"))
        else:
            vis = _visible(offs_m, offs_n, Tq, Tk, causal_shift, lo1, hi1, lo2, hi2, CAUSAL, PADDED, HAS_STARTS)
            s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            keep = _keep_mask(seed, drop_row + offs_n[None, :], dropout_p)
            p = tl.where(keep, p, 0.0)
        v = tl.load(
            v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
            mask=n_ok[:, None] & d_ok[None, :], other=0.0,
        )  # fmt: skip
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["seed"])  # seeds vary per call: no recompiles
def _rmt_attn_fwd_kernel(
    Q, K, V, Out, LSE, STARTS, COUNTS,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_om, stride_oh, stride_od,
    Hq, G, Tq, Tk, D: tl.constexpr, num_read, num_tokens, qk_scale, dropout_p, seed,
    CAUSAL: tl.constexpr, PADDED: tl.constexpr, HAS_STARTS: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
    BOUNDARY_ONLY: tl.constexpr, DROP_I64: tl.constexpr,
):  # fmt: skip
    # The heaviest (last, for causal) query tiles are scheduled first.
    qk_scale, dropout_p = _fp32(qk_scale), _fp32(dropout_p)
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    hk = h // G

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Tq
    d_ok = offs_d < D
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=m_ok[:, None] & d_ok[None, :], other=0.0,
    )  # fmt: skip
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh

    causal_shift = Tk - Tq
    lo1, hi1, lo2, hi2 = _hidden_ranges(STARTS, COUNTS, b, num_read, num_tokens, Tk, PADDED, HAS_STARTS)
    hi = Tk
    if CAUSAL:
        hi = tl.minimum(Tk, (pid_m + 1) * BLOCK_M + causal_shift)
    r1_end, r2_start, r2_end, r3_start = _key_block_ranges(lo1, hi1, lo2, hi2, hi, BLOCK_N)
    drop_row = _dropout_row_offsets(pid_bh, offs_m[:, None], Tq, Tk, DROP_I64)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: a fully masked block gives exp2(-inf) = 0
    if HAS_STARTS:  # without starts r1_end == 0: the first range is empty
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, 0, r1_end, pid_m * BLOCK_M,
            offs_m, offs_d, drop_row, Tq, Tk, D, causal_shift, lo1, hi1, lo2, hi2,
            stride_kn, stride_kd, stride_vn, stride_vd, qk_scale, dropout_p, seed,
            CAUSAL, PADDED, HAS_STARTS, DROPOUT, BLOCK_N, DOT_PREC, BOUNDARY_ONLY,
        )  # fmt: skip
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, r2_start, r2_end, pid_m * BLOCK_M,
        offs_m, offs_d, drop_row, Tq, Tk, D, causal_shift, lo1, hi1, lo2, hi2,
        stride_kn, stride_kd, stride_vn, stride_vd, qk_scale, dropout_p, seed,
        CAUSAL, PADDED, HAS_STARTS, DROPOUT, BLOCK_N, DOT_PREC, BOUNDARY_ONLY,
    )  # fmt: skip
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, r3_start, hi, pid_m * BLOCK_M,
        offs_m, offs_d, drop_row, Tq, Tk, D, causal_shift, lo1, hi1, lo2, hi2,
        stride_kn, stride_kd, stride_vn, stride_vd, qk_scale, dropout_p, seed,
        CAUSAL, PADDED, HAS_STARTS, DROPOUT, BLOCK_N, DOT_PREC, BOUNDARY_ONLY,
    )  # fmt: skip

    empty = l_i == 0.0  # a query that sees no key at all: output 0, lse +inf (=> zero gradients)
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    if DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    lse = tl.where(empty, float("inf"), m_i + tl.log2(l_safe))  # base-2, in units of qk_scale
    tl.store(LSE + pid_bh.to(tl.int64) * Tq + offs_m, lse, mask=m_ok)
    tl.store(
        Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
        out.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :],
    )  # fmt: skip


@triton.jit
def _rmt_attn_bwd_preprocess_kernel(
    Out, DO, DELTA,
    stride_ob, stride_om, stride_oh, stride_od,
    stride_dob, stride_dom, stride_doh, stride_dod,
    Hq, Tq, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """delta[b, h, i] = sum_d O[b, i, h, d] * dO[b, i, h, d] in fp32."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Tq
    mask = m_ok[:, None] & (offs_d[None, :] < D)
    o = tl.load(
        Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
        mask=mask, other=0.0,
    ).to(tl.float32)  # fmt: skip
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
        mask=mask, other=0.0,
    ).to(tl.float32)  # fmt: skip
    tl.store(DELTA + pid_bh.to(tl.int64) * Tq + offs_m, tl.sum(o * do, 1), mask=m_ok)


@triton.jit
def _dq_inner(
    dq, q, do, lse, delta, k_base, v_base, start, end,
    m_first, offs_m, offs_d, drop_row, Tq, Tk, D: tl.constexpr, causal_shift, lo1, hi1, lo2, hi2,
    stride_kn, stride_kd, stride_vn, stride_vd, qk_scale, dropout_p, seed,
    CAUSAL: tl.constexpr, PADDED: tl.constexpr, HAS_STARTS: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr, BOUNDARY_ONLY: tl.constexpr,
):  # fmt: skip
    d_ok = offs_d < D
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < Tk
        k = tl.load(
            k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
            mask=n_ok[:, None] & d_ok[None, :], other=0.0,
        )  # fmt: skip
        vt = tl.load(
            v_base + offs_n[None, :] * stride_vn + offs_d[:, None] * stride_vd,
            mask=n_ok[None, :] & d_ok[:, None], other=0.0,
        )  # fmt: skip
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        p = tl.exp2(s - lse[:, None])
        if BOUNDARY_ONLY:
            needs = _block_needs_mask(
                start_n, m_first, Tk, causal_shift, lo1, hi1, lo2, hi2, CAUSAL, PADDED, HAS_STARTS, BLOCK_N
            )
            if needs:
                vis = _visible(offs_m, offs_n, Tq, Tk, causal_shift, lo1, hi1, lo2, hi2, CAUSAL, PADDED, HAS_STARTS)
                p = tl.where(vis, p, 0.0)
        else:
            vis = _visible(offs_m, offs_n, Tq, Tk, causal_shift, lo1, hi1, lo2, hi2, CAUSAL, PADDED, HAS_STARTS)
            p = tl.where(vis, p, 0.0)
        dp = tl.dot(do, vt, input_precision=DOT_PREC)
        if DROPOUT:
            keep = _keep_mask(seed, drop_row + offs_n[None, :], dropout_p)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    return dq


@triton.jit(do_not_specialize=["seed"])  # seeds vary per call: no recompiles
def _rmt_attn_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, STARTS, COUNTS,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_dom, stride_doh, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    Hq, G, Tq, Tk, D: tl.constexpr, num_read, num_tokens, qk_scale, sm_scale, dropout_p, seed,
    CAUSAL: tl.constexpr, PADDED: tl.constexpr, HAS_STARTS: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
    BOUNDARY_ONLY: tl.constexpr, DROP_I64: tl.constexpr,
):  # fmt: skip
    qk_scale, sm_scale, dropout_p = _fp32(qk_scale), _fp32(sm_scale), _fp32(dropout_p)
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    hk = h // G

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Tq
    md_ok = m_ok[:, None] & (offs_d[None, :] < D)
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=md_ok, other=0.0,
    )  # fmt: skip
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
        mask=md_ok, other=0.0,
    ).to(q.dtype)  # fmt: skip
    row = pid_bh.to(tl.int64) * Tq + offs_m
    lse = tl.load(LSE + row, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + row, mask=m_ok, other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh

    causal_shift = Tk - Tq
    lo1, hi1, lo2, hi2 = _hidden_ranges(STARTS, COUNTS, b, num_read, num_tokens, Tk, PADDED, HAS_STARTS)
    hi = Tk
    if CAUSAL:
        hi = tl.minimum(Tk, (pid_m + 1) * BLOCK_M + causal_shift)
    r1_end, r2_start, r2_end, r3_start = _key_block_ranges(lo1, hi1, lo2, hi2, hi, BLOCK_N)
    drop_row = _dropout_row_offsets(pid_bh, offs_m[:, None], Tq, Tk, DROP_I64)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if HAS_STARTS:
        dq = _dq_inner(
            dq, q, do, lse, delta, k_base, v_base, 0, r1_end, pid_m * BLOCK_M,
            offs_m, offs_d, drop_row, Tq, Tk, D, causal_shift, lo1, hi1, lo2, hi2,
            stride_kn, stride_kd, stride_vn, stride_vd, qk_scale, dropout_p, seed,
            CAUSAL, PADDED, HAS_STARTS, DROPOUT, BLOCK_N, DOT_PREC, BOUNDARY_ONLY,
        )  # fmt: skip
    dq = _dq_inner(
        dq, q, do, lse, delta, k_base, v_base, r2_start, r2_end, pid_m * BLOCK_M,
        offs_m, offs_d, drop_row, Tq, Tk, D, causal_shift, lo1, hi1, lo2, hi2,
        stride_kn, stride_kd, stride_vn, stride_vd, qk_scale, dropout_p, seed,
        CAUSAL, PADDED, HAS_STARTS, DROPOUT, BLOCK_N, DOT_PREC, BOUNDARY_ONLY,
    )  # fmt: skip
    dq = _dq_inner(
        dq, q, do, lse, delta, k_base, v_base, r3_start, hi, pid_m * BLOCK_M,
        offs_m, offs_d, drop_row, Tq, Tk, D, causal_shift, lo1, hi1, lo2, hi2,
        stride_kn, stride_kd, stride_vn, stride_vd, qk_scale, dropout_p, seed,
        CAUSAL, PADDED, HAS_STARTS, DROPOUT, BLOCK_N, DOT_PREC, BOUNDARY_ONLY,
    )  # fmt: skip
    dq = dq * sm_scale
    tl.store(
        DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
        dq.to(DQ.dtype.element_ty), mask=md_ok,
    )  # fmt: skip


@triton.jit(do_not_specialize=["seed"])  # seeds vary per call: no recompiles
def _rmt_attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, STARTS, COUNTS,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_dom, stride_doh, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    Hq, Hkv, G, Tq, Tk, D: tl.constexpr, num_read, num_tokens, qk_scale, sm_scale, dropout_p, seed,
    CAUSAL: tl.constexpr, PADDED: tl.constexpr, HAS_STARTS: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
    BOUNDARY_ONLY: tl.constexpr, DROP_I64: tl.constexpr,
):  # fmt: skip
    """One key block of one K/V head; loops over the G query heads of its group and their query blocks.

    Works in the transposed (key, query) orientation: s_t[n, m] = k[n] . q[m].
    """
    qk_scale, sm_scale, dropout_p = _fp32(qk_scale), _fp32(sm_scale), _fp32(dropout_p)
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    hk = (pid_bh % Hkv).to(tl.int64)

    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < Tk
    d_ok = offs_d < D
    nd_ok = n_ok[:, None] & d_ok[None, :]
    k = tl.load(
        K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
        mask=nd_ok, other=0.0,
    )  # fmt: skip
    v = tl.load(
        V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
        mask=nd_ok, other=0.0,
    )  # fmt: skip

    causal_shift = Tk - Tq
    lo1, hi1, lo2, hi2 = _hidden_ranges(STARTS, COUNTS, b, num_read, num_tokens, Tk, PADDED, HAS_STARTS)
    lo = 0
    if CAUSAL:
        # the first query (absolute index i + causal_shift) that can see key start_n
        lo = (tl.maximum(start_n - causal_shift, 0) // BLOCK_M) * BLOCK_M
    hi = Tq
    if PADDED:
        # every key of the block is hidden: run no query block, dk = dv = 0
        hidden = (start_n >= lo2) & (start_n + BLOCK_N <= hi2)
        if HAS_STARTS:
            hidden = hidden | ((start_n >= lo1) & (start_n + BLOCK_N <= hi1))
        hi = tl.where(hidden, lo, Tq)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    inv_keep = 1.0 / (1.0 - dropout_p)
    for g in range(0, G):
        h = hk * G + g
        bh = b * Hq + h
        bh32 = (pid_bh // Hkv) * Hq + (pid_bh % Hkv) * G + g  # == bh, in int32 for the dropout offsets
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_ok = offs_m < Tq
            md_ok = m_ok[:, None] & d_ok[None, :]
            q = tl.load(
                q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=md_ok, other=0.0
            )
            do = tl.load(
                do_base + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=md_ok, other=0.0
            ).to(q.dtype)
            lse = tl.load(LSE + bh * Tq + offs_m, mask=m_ok, other=float("inf"))
            delta = tl.load(DELTA + bh * Tq + offs_m, mask=m_ok, other=0.0)
            st = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale  # (BLOCK_N, BLOCK_M)
            pt = tl.exp2(st - lse[None, :])
            if BOUNDARY_ONLY:
                needs = _block_needs_mask(
                    start_n, start_m, Tk, causal_shift, lo1, hi1, lo2, hi2, CAUSAL, PADDED, HAS_STARTS, BLOCK_N
                )
                if needs:
                    vis_t = _visible_t(
                        offs_m, offs_n, Tq, Tk, causal_shift, lo1, hi1, lo2, hi2, CAUSAL, PADDED, HAS_STARTS
                    )
                    pt = tl.where(vis_t, pt, 0.0)
            else:
                vis_t = _visible_t(
                    offs_m, offs_n, Tq, Tk, causal_shift, lo1, hi1, lo2, hi2, CAUSAL, PADDED, HAS_STARTS
                )
                pt = tl.where(vis_t, pt, 0.0)
            dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_M)
            if DROPOUT:
                drop_col = _dropout_row_offsets(bh32, offs_m[None, :], Tq, Tk, DROP_I64)  # (1, BLOCK_M)
                keep_t = _keep_mask(seed, drop_col + offs_n[:, None], dropout_p)
                pdt = tl.where(keep_t, pt * inv_keep, 0.0)
                dpt = tl.where(keep_t, dpt * inv_keep, 0.0)
            else:
                pdt = pt
            dv += tl.dot(pdt.to(do.dtype), do, input_precision=DOT_PREC)
            dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dst.to(q.dtype), q, input_precision=DOT_PREC)
    dk = dk * sm_scale
    tl.store(
        DK + b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
        dk.to(DK.dtype.element_ty), mask=nd_ok,
    )  # fmt: skip
    tl.store(
        DV + b * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
        dv.to(DV.dtype.element_ty), mask=nd_ok,
    )  # fmt: skip


@triton.jit(do_not_specialize=["seed"])  # seeds vary per call: no recompiles
def _rmt_dropout_mask_kernel(
    OUT, Tq, Tk, dropout_p, seed, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DROP_I64: tl.constexpr
):  # fmt: skip
    """The keep-mask the attention kernels use, materialised as (B, Hq, Tq, Tk) bool (a debug helper)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    drop_row = _dropout_row_offsets(pid_bh, offs_m[:, None], Tq, Tk, DROP_I64)
    for start_n in range(0, Tk, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offsets = drop_row + offs_n[None, :]
        keep = _keep_mask(seed, offsets, dropout_p)
        tl.store(OUT + offsets, keep.to(tl.int8), mask=(offs_m[:, None] < Tq) & (offs_n[None, :] < Tk))


# ==================================================================================== launch configuration
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # triton reads it once, at decoration time too


def _interpreting() -> bool:
    return _INTERPRET


def _next_pow2(x: int) -> int:
    return 1 << (max(int(x), 1) - 1).bit_length()


class LaunchConfig:
    """One kernel's launch configuration: BLOCK_M (query tile), BLOCK_N (key tile), num_warps, num_stages.

    Immutable by convention; ``kwargs`` is built once (the launch passes it as is: no dict per call).
    """

    __slots__ = ("block_m", "block_n", "num_warps", "num_stages", "kwargs")

    def __init__(self, block_m: int, block_n: int, num_warps: int, num_stages: int):
        for name, value in (("BLOCK_M", block_m), ("BLOCK_N", block_n), ("num_warps", num_warps),
                            ("num_stages", num_stages)):  # fmt: skip
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LaunchConfig: {name} must be a positive int, got {value!r}")
        for name, value in (("BLOCK_M", block_m), ("BLOCK_N", block_n)):
            if value < 16 or value & (value - 1):
                raise ValueError(f"LaunchConfig: {name} must be a power of two >= 16, got {value}")
        self.block_m, self.block_n, self.num_warps, self.num_stages = block_m, block_n, num_warps, num_stages
        self.kwargs = {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": num_warps, "num_stages": num_stages}

    @classmethod
    def of(cls, cfg) -> LaunchConfig:
        """A LaunchConfig from a LaunchConfig or a (BLOCK_M, BLOCK_N, num_warps, num_stages) tuple."""
        if isinstance(cfg, LaunchConfig):
            return cfg
        if isinstance(cfg, (tuple, list)) and len(cfg) == 4:
            return cls(*cfg)
        raise ValueError(f"a launch config must be (BLOCK_M, BLOCK_N, num_warps, num_stages), got {cfg!r}")

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.block_m, self.block_n, self.num_warps, self.num_stages)

    def __eq__(self, other) -> bool:
        return isinstance(other, LaunchConfig) and self.as_tuple() == other.as_tuple()

    def __hash__(self) -> int:
        return hash(self.as_tuple())

    def smaller(self) -> LaunchConfig | None:
        """A cheaper configuration to retry with when a launch runs out of shared memory / registers."""
        if self.num_stages > 1:
            return LaunchConfig(self.block_m, self.block_n, self.num_warps, self.num_stages - 1)
        if max(self.block_m, self.block_n) > 16:
            if self.block_m >= self.block_n:
                return LaunchConfig(self.block_m // 2, self.block_n, self.num_warps, 2)
            return LaunchConfig(self.block_m, self.block_n // 2, self.num_warps, 2)
        return None

    def __repr__(self) -> str:
        return (
            f"LaunchConfig(BLOCK_M={self.block_m}, BLOCK_N={self.block_n}, "
            f"num_warps={self.num_warps}, num_stages={self.num_stages})"
        )


KINDS = ("fwd", "dq", "dkdv")

# Interpreter (CPU test) block sizes (BLOCK_M, BLOCK_N): powers of two >= 16; tests change them.
_INTERPRET_BLOCKS = (16, 16)

# Build the mask only for key blocks that straddle a boundary (Tk, the causal diagonal, the padded tail);
# interior blocks skip the element-wise mask. False masks every block (for A/B timing on a GPU).
_MASK_BOUNDARY_ONLY = True


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and padded head dim (<= 64, <= 128, <= 256).
# 2-byte dtypes: FlashAttention-2 Triton recipes for Ampere/Hopper, checked offline to compile for sm_80 and
# sm_90 without register spills (bf16, causal + padded); not timed on hardware. fp32 runs its dots on FMA
# units (exact IEEE) or TF32, so it gets small tiles and 8 warps.
_CONFIGS = {
    ("fwd", False): ((128, 64, 4, 3), (128, 64, 8, 3), (64, 32, 8, 2)),
    ("dq", False): ((128, 32, 4, 3), (64, 64, 8, 2), (32, 32, 8, 2)),
    ("dkdv", False): ((32, 128, 8, 3), (64, 64, 8, 2), (32, 32, 8, 2)),
    ("fwd", True): ((64, 32, 8, 2), (32, 32, 8, 2), (32, 16, 8, 2)),
    ("dq", True): ((64, 16, 8, 2), (32, 16, 8, 2), (16, 16, 8, 2)),
    ("dkdv", True): ((16, 64, 8, 2), (32, 32, 8, 2), (16, 16, 8, 2)),
}


def _heuristic_config(kind: str, head_dim: int, dtype: torch.dtype) -> LaunchConfig:
    """Per-kernel launch configuration from the head dim and dtype: a table look-up, no autotuning, no sync.

    kind: "fwd", "dq" or "dkdv"; BLOCK_M always tiles queries and BLOCK_N keys.
    """
    if _interpreting():
        return LaunchConfig(*_INTERPRET_BLOCKS, 4, 1)
    d = _next_pow2(head_dim)
    table = _CONFIGS[(kind, dtype == torch.float32)]
    return LaunchConfig(*table[0 if d <= 64 else 1 if d <= 128 else 2])


# Configurations supplied by set_launch_configs: (kind, head_dim, dtype) -> LaunchConfig.
_TABLE: dict[tuple, LaunchConfig] = {}
# Active override_configs block: kind -> LaunchConfig (None outside any block).
_OVERRIDE: dict[str, LaunchConfig] | None = None
# (kind, head_dim, dtype, device index) -> the configuration resolved (and, after an out-of-resources retry,
# stepped down) for it: one dict look-up per launch after the first.
_CONFIG_CACHE: dict[tuple, LaunchConfig] = {}


def launch_config(kind: str, head_dim: int, dtype: torch.dtype) -> LaunchConfig:
    """The configuration a launch of kernel ``kind`` ("fwd", "dq", "dkdv") uses for this head dim and dtype:
    the :func:`set_launch_configs` table entry if there is one, else the built-in heuristic table.

    This is the look-up hook: it runs once per (kind, head_dim, dtype, device) and its answer is cached; a
    caller that replaces or extends it must call :func:`clear_launch_cache` afterwards.
    """
    cfg = _TABLE.get((kind, head_dim, dtype))
    return cfg if cfg is not None else _heuristic_config(kind, head_dim, dtype)


def set_launch_configs(table: dict | None) -> None:
    """Replace the measured configuration table: ``{(kind, head_dim, dtype): (BLOCK_M, BLOCK_N, num_warps,
    num_stages) or LaunchConfig}``; entries not in it use the heuristic. ``None`` or ``{}`` clears it.
    Validates every entry before changing anything."""
    new = {}
    for key, cfg in (table or {}).items():
        if not (isinstance(key, tuple) and len(key) == 3 and key[0] in KINDS and isinstance(key[1], int)
                and isinstance(key[2], torch.dtype)):  # fmt: skip
            raise ValueError(f"set_launch_configs: keys must be (kind in {KINDS}, head_dim: int, dtype), got {key!r}")
        new[key] = LaunchConfig.of(cfg)
    _TABLE.clear()
    _TABLE.update(new)
    clear_launch_cache()


def clear_launch_cache() -> None:
    """Forget the resolved configurations (the next launch of each kind asks :func:`launch_config` again)."""
    _CONFIG_CACHE.clear()
    _PLANS.clear()


@contextlib.contextmanager
def override_configs(fwd=None, dq=None, dkdv=None) -> Iterator[None]:
    """Inside the block, every launch of a given kernel uses the given configuration (a LaunchConfig or a
    (BLOCK_M, BLOCK_N, num_warps, num_stages) tuple) instead of :func:`launch_config` (None: unchanged).

    For a tuner's sweep: the configuration is used exactly, without the out-of-resources step-down (the
    ``triton.runtime.errors.OutOfResources`` error propagates) and without touching the cache. Blocks nest;
    the state is process-global (not per thread).
    """
    global _OVERRIDE
    given = {k: LaunchConfig.of(c) for k, c in (("fwd", fwd), ("dq", dq), ("dkdv", dkdv)) if c is not None}
    previous = _OVERRIDE
    _OVERRIDE = {**(previous or {}), **given}
    try:
        yield
    finally:
        _OVERRIDE = previous


class _Launch:
    """A ready launch of one kernel variant: the kernel's bound ``run``, its keyword arguments (constexprs and
    launch config) as one dict built once, and the block sizes for the grid. Built on the first call of a
    variant and cached: a call after that does one dict look-up, builds no dict and binds nothing."""

    __slots__ = ("kernel", "run", "kwargs", "block_m", "block_n", "cfg", "fixed")

    def __init__(self, kernel, cfg: LaunchConfig, consts: dict, fixed: bool):
        self.kernel, self.run = kernel, kernel.run
        self.kwargs = {**consts, **cfg.kwargs}
        self.block_m, self.block_n, self.cfg, self.fixed = cfg.block_m, cfg.block_n, cfg, fixed


# Kernel variant key -> _Launch. Cleared with the config cache (clear_launch_cache, set_launch_configs).
_PLANS: dict[tuple, _Launch] = {}
_KERNEL_NAMES = {"fwd": "_rmt_attn_fwd_kernel", "dq": "_rmt_attn_bwd_dq_kernel",
                 "dkdv": "_rmt_attn_bwd_dkdv_kernel", "pre": "_rmt_attn_bwd_preprocess_kernel"}  # fmt: skip


def _plan(kind: str, D: int, dtype, device, causal: bool, padded: bool, has_starts: bool, dropout: bool,
          i64: bool) -> _Launch:  # fmt: skip
    """The launch of kernel ``kind`` for this variant (see :class:`_Launch`)."""
    key = _variant_key(kind, D, dtype, device, causal, padded, has_starts, dropout, i64)
    if _OVERRIDE is None and not _INTERPRET:
        plan = _PLANS.get(key)
        if plan is not None:
            return plan
    return _new_plan(key)


def _new_plan(key: tuple, cfg: LaunchConfig | None = None) -> _Launch:
    kind, D, dtype, device, causal, padded, has_starts, dropout, i64, ieee, boundary_only = key
    kernel = globals()[_KERNEL_NAMES[kind]]  # looked up now: tests and benchmarks swap kernels
    block_d = max(16, _next_pow2(D))
    if kind == "pre":
        plan = _Launch(kernel, LaunchConfig(16 if _INTERPRET else 64, 16, 4, 1), {"BLOCK_D": block_d}, True)
        del plan.kwargs["BLOCK_N"]  # the preprocess kernel tiles queries only
        if not _INTERPRET:
            _PLANS[key] = plan
        return plan
    consts = {
        "CAUSAL": causal, "PADDED": padded, "HAS_STARTS": has_starts, "DROPOUT": dropout, "DROP_I64": i64,
        "BLOCK_D": block_d, "DOT_PREC": "ieee" if ieee else "tf32", "BOUNDARY_ONLY": boundary_only,
    }  # fmt: skip
    if cfg is None and _OVERRIDE is not None and kind in _OVERRIDE:
        return _Launch(kernel, _OVERRIDE[kind], consts, True)  # used exactly, not cached
    cfg_key = (kind, D, dtype, device)
    if cfg is None:
        cfg = None if _INTERPRET else _CONFIG_CACHE.get(cfg_key)
    if cfg is None:
        cfg = launch_config(kind, D, dtype)
    plan = _Launch(kernel, cfg, consts, False)
    if not _INTERPRET and _OVERRIDE is None:
        _CONFIG_CACHE[cfg_key] = cfg
        _PLANS[key] = plan
    return plan


def _run(plan: _Launch, key_args: tuple, n0: int, by_n: bool, grid1: int, args: tuple, wrap=None) -> None:
    """Launch ``plan`` on the grid (cdiv(n0, BLOCK_N if by_n else BLOCK_M), grid1). A launch that fails to
    compile for lack of shared memory or registers steps the configuration down (and the cache remembers it),
    unless the configuration was fixed by :func:`override_configs`. ``wrap`` (``torch.library.wrap_triton``,
    inside the custom ops) makes the launch visible to torch.compile; the compiler then compiles the kernel."""
    block = plan.block_n if by_n else plan.block_m
    if wrap is not None:
        wrap(plan.kernel)[(-(-n0 // block), grid1)](*args, **plan.kwargs)
        return
    try:
        plan.run(*args, grid=(-(-n0 // block), grid1), warmup=False, **plan.kwargs)
    except triton.runtime.errors.OutOfResources as exc:
        if plan.fixed:
            raise
        _run_stepping_down(exc, plan, key_args, n0, by_n, grid1, args)


def _run_stepping_down(exc, plan: _Launch, key_args: tuple, n0: int, by_n: bool, grid1: int, args: tuple) -> None:
    cfg = plan.cfg
    _PLANS.clear()
    kind, D, dtype, device = key_args[:4]
    while True:
        cfg = cfg.smaller()
        if cfg is None:
            raise exc
        _CONFIG_CACHE[(kind, D, dtype, device)] = cfg
        plan = _new_plan(_variant_key(*key_args), cfg)
        block = plan.block_n if by_n else plan.block_m
        try:
            plan.run(*args, grid=(-(-n0 // block), grid1), warmup=False, **plan.kwargs)
            return
        except triton.runtime.errors.OutOfResources as again:
            exc = again


def _variant_key(kind, D, dtype, device, causal, padded, has_starts, dropout, i64) -> tuple:
    # fp32 inputs follow torch's matmul policy: exact IEEE dots unless the user allowed TF32.
    ieee = dtype is torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    return (kind, D, dtype, device, causal, padded, has_starts, dropout, i64, ieee, _MASK_BOUNDARY_ONLY)


# Test hook: force 64-bit dropout offsets even when B * Hq * Tq * Tk < 2**31.
_FORCE_DROPOUT_I64 = False


def _needs_i64(B: int, Hq: int, Tq: int, Tk: int) -> bool:
    return _FORCE_DROPOUT_I64 or B * Hq * Tq * Tk >= 2**31


def _empty(shape, dtype, device) -> Tensor:
    """Every buffer the kernels fully overwrite is allocated here (tests monkeypatch it to poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


# ============================================================================================== launchers
def _runs_arg(layout: SegmentLayout, dummy: Tensor) -> tuple[Tensor, Tensor, bool, bool]:
    """(starts, ends, PADDED, HAS_STARTS); tensors the kernel never reads are replaced by any device pointer."""
    counts = layout.token_counts
    if counts is None:
        return dummy, dummy, False, False
    starts = layout.token_starts
    if starts is None:
        return dummy, counts, True, False
    return starts, counts, True, True


def _forward(q, k, v, starts, counts, padded, has_starts, num_read, num_tokens, causal, scale, dropout_p, seed,
             out, wrap=None):  # fmt: skip
    """Launch the forward kernel: (out (B, Tq, Hq, D), lse (B, Hq, Tq) fp32). Primitive arguments only (the
    custom op for torch.compile calls it too); ``starts`` / ``counts`` are any tensor when unused."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    device = q.device
    if out is None:
        out = _empty((B, Tq, Hq, D), q.dtype, device)
    lse = _empty((B, Hq, Tq), torch.float32, device)
    key_args = ("fwd", D, q.dtype, device, causal, padded, has_starts, dropout_p > 0.0, _needs_i64(B, Hq, Tq, Tk))
    plan = _plan(*key_args)
    args = (
        q, k, v, out, lse, starts, counts,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        Hq, Hq // Hkv, Tq, Tk, D, num_read, num_tokens, scale * _LOG2E, dropout_p, seed,
    )  # fmt: skip
    _run(plan, key_args, Tq, False, B * Hq, args, wrap)
    return out, lse


def _backward(q, k, v, out, lse, do, starts, counts, padded, has_starts, num_read, num_tokens, causal, scale,
              dropout_p, seed, need_dq, need_dkv, wrap=None):  # fmt: skip
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    device = q.device

    delta = _empty((B, Hq, Tq), torch.float32, device)
    pre = _plan("pre", D, q.dtype, device, False, False, False, False, False)
    _run(pre, None, Tq, False, B * Hq, (out, do, delta, *out.stride(), *do.stride(), Hq, Tq, D), wrap)

    variant = (D, q.dtype, device, causal, padded, has_starts, dropout_p > 0.0, _needs_i64(B, Hq, Tq, Tk))
    common = (Tq, Tk, D, num_read, num_tokens, scale * _LOG2E, scale, dropout_p, seed)
    dq = dk = dv = None
    if need_dq:
        # Gradients in the (B, T, H, D) memory layout of the typical projection outputs, seen as (B, H, T, D).
        dq = _empty((B, Tq, Hq, D), q.dtype, device).transpose(1, 2)
        args = (
            q, k, v, do, dq, lse, delta, starts, counts,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
            Hq, G, *common,
        )  # fmt: skip
        key_args = ("dq", *variant)
        _run(_plan(*key_args), key_args, Tq, False, B * Hq, args, wrap)
    if need_dkv:
        dk = _empty((B, Tk, Hkv, D), k.dtype, device).transpose(1, 2)
        dv = _empty((B, Tk, Hkv, D), v.dtype, device).transpose(1, 2)
        args = (
            q, k, v, do, dk, dv, lse, delta, starts, counts,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
            Hq, Hkv, G, *common,
        )  # fmt: skip
        key_args = ("dkdv", *variant)
        _run(_plan(*key_args), key_args, Tk, True, B * Hkv, args, wrap)
    return dq, dk, dv


# ================================================================================= autograd Function
class _RmtAttentionFn(torch.autograd.Function):
    """``meta`` = (padded, has_starts, num_read, num_tokens, causal, scale, dropout_p, seed): one argument, as
    every argument of ``apply`` costs host time."""

    @staticmethod
    def forward(ctx, q, k, v, out, starts, counts, meta):
        o, lse = _forward(q, k, v, starts, counts, *meta, out)
        if out is not None:
            ctx.mark_dirty(out)
        ctx.save_for_backward(q, k, v, o, lse, starts, counts)
        ctx.meta = meta
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, starts, counts = ctx.saved_tensors
        need = ctx.needs_input_grad
        dq, dk, dv = _backward(q, k, v, o, lse, do, starts, counts, *ctx.meta, need[0], need[1] or need[2])
        return dq, dk if need[1] else None, dv if need[2] else None, None, None, None, None


# ============================================================================ torch.compile: custom ops
def _register_ops():
    """The forward and backward as ``torch.library.triton_op`` custom ops (``rmt_fast::attn_fwd``,
    ``rmt_fast::attn_bwd``) with autograd registered: torch.compile sees the kernel launches (``wrap_triton``)
    and compiles the kernels itself; the fake implementation is the same Python run on fake tensors. Used only
    while compiling (:func:`rmt_attention` checks ``torch.compiler.is_compiling()``): in eager mode the custom
    op's dispatch would only add host time. Not registered in Triton's interpreter (``wrap_triton`` takes
    compiled kernels only)."""
    from torch.library import triton_op, wrap_triton

    @triton_op("rmt_fast::attn_fwd", mutates_args=())
    def attn_fwd(q: Tensor, k: Tensor, v: Tensor, starts: Tensor, counts: Tensor, padded: bool, has_starts: bool,
                 num_read: int, num_tokens: int, causal: bool, scale: float, dropout_p: float,
                 seed: int) -> tuple[Tensor, Tensor]:  # fmt: skip
        return _forward(q, k, v, starts, counts, padded, has_starts, num_read, num_tokens, causal, scale, dropout_p,
                        seed, None, wrap_triton)  # fmt: skip

    @triton_op("rmt_fast::attn_bwd", mutates_args=())
    def attn_bwd(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, do: Tensor, starts: Tensor,
                 counts: Tensor, padded: bool, has_starts: bool, num_read: int, num_tokens: int, causal: bool,
                 scale: float, dropout_p: float, seed: int) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        return _backward(q, k, v, out, lse, do, starts, counts, padded, has_starts, num_read, num_tokens, causal,
                         scale, dropout_p, seed, True, True, wrap_triton)  # fmt: skip

    def setup_context(ctx, inputs, output):
        q, k, v, starts, counts = inputs[:5]
        ctx.save_for_backward(q, k, v, output[0], output[1], starts, counts)
        ctx.meta = inputs[5:]

    def backward(ctx, dout, dlse):
        q, k, v, out, lse, starts, counts = ctx.saved_tensors
        dq, dk, dv = attn_bwd(q, k, v, out, lse, dout, starts, counts, *ctx.meta)
        return (dq, dk, dv) + (None,) * 10

    attn_fwd.register_autograd(backward, setup_context=setup_context)
    return attn_fwd, attn_bwd


_OPS = None
if not _INTERPRET and hasattr(torch.library, "triton_op"):
    _OPS = _register_ops()


def _compiled_attention(q, k, v, out, starts, counts, meta) -> Tensor:
    o = _OPS[0](q, k, v, starts, counts, *meta)[0]
    if out is not None:
        out.copy_(o)
        return out
    return o


# ==================================================================================== public functions
def _problem(q, k, v, layout, dropout_p) -> tuple[type, str] | None:
    """(exception type, message) for a case the kernel cannot run, else None."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            return TypeError, f"{name} must be a torch.Tensor, got {type(t).__name__}"
        if t.ndim != 4:
            dims = "B, Hq, Tq, D" if name == "q" else "B, Hkv, Tk, D"
            return ValueError, f"{name} must be 4-D ({dims}), got shape {tuple(t.shape)}"
    if not isinstance(layout, SegmentLayout):
        return TypeError, f"layout must be a SegmentLayout, got {type(layout).__name__}"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in _SUPPORTED_DTYPES:
            return (
                TypeError,
                f"{name} has dtype {t.dtype}; the triton backend supports float16, bfloat16, float32",
            )
    if not (q.dtype == k.dtype == v.dtype):
        return TypeError, f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
    if not (q.device == k.device == v.device):
        return ValueError, f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}"
    B, Hq, Tq, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        return ValueError, f"batch sizes differ: q {B}, k {k.shape[0]}, v {v.shape[0]}"
    if k.shape != v.shape:
        return ValueError, f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        return ValueError, f"q heads ({Hq}) must be a multiple of k/v heads ({Hkv})"
    if k.shape[-1] != D:
        return ValueError, f"head dims differ: q {D}, k/v {k.shape[-1]}"
    if not (_MIN_HEAD_DIM <= D <= _MAX_HEAD_DIM):
        return (
            ValueError,
            f"head dim {D} is outside the triton backend's range [{_MIN_HEAD_DIM}, {_MAX_HEAD_DIM}]",
        )
    Tk = k.shape[-2]
    if Tk != layout.seq_len:
        return ValueError, f"k has {Tk} positions but the segment layout has seq_len {layout.seq_len}"
    if Tq > Tk:
        return ValueError, f"q has {Tq} positions, more than k ({Tk})"
    if B == 0 or Hq == 0 or Tq == 0:
        return ValueError, f"empty input: q has shape {tuple(q.shape)}"
    if B * Hq > _MAX_GRID_Y:
        return ValueError, f"batch * query heads = {B * Hq} exceeds the launch grid limit {_MAX_GRID_Y}"
    if layout.token_mask is not None:
        return ValueError, (
            "the triton kernel runs one contiguous visible token run per row (token_starts/token_counts); this "
            "segment's token_mask has holes (a hidden token between visible ones), which only SDPA supports"
        )
    if layout.token_counts is not None:
        c = layout.token_counts
        if c.device != q.device:
            return ValueError, f"layout.token_counts is on {c.device} but q is on {q.device}"
        if c.shape[0] != B:
            return ValueError, f"layout.token_counts has length {c.shape[0]} but the batch size is {B}"
        # token_starts shares the shape and device of token_counts (SegmentLayout checks it)
        for name, t in (("token_counts", c), ("token_starts", layout.token_starts)):
            if t is not None and B > 1 and t.stride(0) != 1:
                return ValueError, f"layout.{name} must be contiguous (the kernel reads it by row index)"
    if not (0.0 <= float(dropout_p) < 1.0):
        return ValueError, f"dropout_p must be in [0, 1), got {dropout_p}"
    if q.device.type == "cpu":  # last, so that its cost on the CPU is the full validation's (benchmarks)
        if not _interpreting():
            return ValueError, "CPU tensors need TRITON_INTERPRET=1 (the triton backend runs on CUDA)"
    elif q.device.type != "cuda":
        return ValueError, f"the triton backend runs on CUDA, got device {q.device}"
    return None


def rmt_attention_supported(
    q: Tensor, k: Tensor, v: Tensor, layout: SegmentLayout, dropout_p: float = 0.0
) -> str | None:
    """None when :func:`rmt_attention` can run this case, else a short reason (route the call to SDPA)."""
    problem = _problem(q, k, v, layout, dropout_p)
    return None if problem is None else problem[1]


def rmt_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: SegmentLayout,
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
    seed: int | None = None,
    out: Tensor | None = None,
    check: bool = True,
) -> Tensor:
    """RMT segment attention: q (B, Hq, Tq, D), k and v (B, Hkv, Tk, D) -> (B, Tq, Hq, D).

    Any strides are accepted (no copies are made). ``Tq < Tk`` places the queries at the end of the
    segment (a decode step). ``scale`` defaults to D ** -0.5. ``dropout_p > 0`` applies inverted attention
    dropout from the Philox stream of ``seed`` (drawn from torch's CPU generator when None); see
    :func:`rmt_attention_dropout_mask`. ``out`` (B, Tq, Hq, D), when given, receives the result and is
    returned. Differentiable with respect to q, k and v.

    Padding comes from ``layout.token_counts`` only (clamped to [0, num_tokens] in the kernel); a
    ``token_mask`` layout is refused (use :func:`rmt_attention_supported` to route it to SDPA). A query that
    sees no key at all (possible only without read/write slots) gets a zero output and zero gradients,
    where the dense reference gives NaN.

    ``check=False`` skips every validation (of q, k, v, layout, dropout_p and out): for a caller that already
    got None from :func:`rmt_attention_supported` for this segment's shapes, dtypes, device and layout.
    """
    if check:
        problem = _problem(q, k, v, layout, dropout_p)
        if problem is not None:
            exc, msg = problem
            raise exc(msg)
        if out is not None:
            B, Hq, Tq, D = q.shape
            if not isinstance(out, Tensor) or tuple(out.shape) != (B, Tq, Hq, D):
                raise ValueError(f"out must have shape {(B, Tq, Hq, D)}, got {getattr(out, 'shape', type(out))}")
            if out.dtype != q.dtype or out.device != q.device:
                raise ValueError(f"out must be {q.dtype} on {q.device}, got {out.dtype} on {out.device}")
            if out.requires_grad:
                raise ValueError("out must not require grad")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    dropout_p = float(dropout_p)
    if dropout_p > 0.0:
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, (1,)).item())  # CPU generator: no device sync
        seed = int(seed)
    else:
        seed = 0
    starts, counts, padded, has_starts = _runs_arg(layout, q)
    if _OPS is not None and torch.compiler.is_compiling():
        meta = (padded, has_starts, layout.num_read, layout.num_tokens, layout.causal, scale, dropout_p, seed)
        return _compiled_attention(q, k, v, out, starts, counts, meta)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        meta = (padded, has_starts, layout.num_read, layout.num_tokens, layout.causal, scale, dropout_p, seed)
        return _RmtAttentionFn.apply(q, k, v, out, starts, counts, meta)
    return _forward(q, k, v, starts, counts, padded, has_starts, layout.num_read, layout.num_tokens, layout.causal,
                    scale, dropout_p, seed, out)[0]  # fmt: skip


def rmt_attention_dropout_mask(B: int, Hq: int, Tq: int, Tk: int, p: float, seed: int, device) -> Tensor:
    """(B, Hq, Tq, Tk) bool keep-mask that :func:`rmt_attention` applies for ``dropout_p=p`` and ``seed``."""
    device = torch.device(device)
    keep = torch.empty((B, Hq, Tq, Tk), dtype=torch.int8, device=device)
    if keep.numel() == 0:
        return keep.bool()
    block = 16 if _interpreting() else 32
    _rmt_dropout_mask_kernel[(triton.cdiv(Tq, block), B * Hq)](
        keep, Tq, Tk, float(p), int(seed), BLOCK_M=block, BLOCK_N=block, DROP_I64=_needs_i64(B, Hq, Tq, Tk),
    )  # fmt: skip
    return keep.bool()


__all__ = [
    "rmt_attention", "rmt_attention_supported", "rmt_attention_dropout_mask",
    "LaunchConfig", "launch_config", "set_launch_configs", "clear_launch_cache", "override_configs", "KINDS",
]  # fmt: skip
