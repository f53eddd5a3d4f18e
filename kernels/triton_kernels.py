"""The Triton jit kernels of RMT segment attention (FlashAttention-2 style): forward, the backward's
preprocess, dQ and dK/dV kernels, and the dropout keep-mask kernel, with their jit helpers.

The backward kernels carry the variants of :data:`rmt_fast.kernels.launch_configs.VARIANTS` as constexprs:
``DELTA_INLINE`` (delta = rowsum(O * dO) computed in the kernel, no preprocess launch) and, in the dK/dV kernel,
``FUSED_DQ`` (the whole backward in one launch).

The segment mask is computed inside the kernels from a handful of integers and a pointer to the per-row token
runs (see :mod:`rmt_fast.kernels.layout`). The launchers, the autograd Function and the public function are in
:mod:`rmt_fast.kernels.triton_attention`; the launch configurations in :mod:`rmt_fast.kernels.launch_configs`.
"""

import triton
import triton.language as tl


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
def _hidden_ranges(STARTS, ENDS, b, num_read, num_tokens, Tk, PADDED: tl.constexpr, HAS_STARTS: tl.constexpr):
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
    offs_m,
    offs_n,
    Tq,
    Tk,
    causal_shift,
    lo1,
    hi1,
    lo2,
    hi2,
    CAUSAL: tl.constexpr,
    PADDED: tl.constexpr,
    HAS_STARTS: tl.constexpr,
):
    """(BLOCK_M, BLOCK_N) bool: query offs_m may attend key offs_n (both in range, causal, not hidden)."""
    vis = (offs_m[:, None] < Tq) & (offs_n[None, :] < Tk)
    if CAUSAL:
        vis = vis & (offs_n[None, :] <= offs_m[:, None] + causal_shift)
    if PADDED:
        vis = vis & _key_visible(offs_n[None, :], lo1, hi1, lo2, hi2, HAS_STARTS)
    return vis


@triton.jit
def _block_needs_mask(
    start_n,
    m_first,
    Tk,
    causal_shift,
    lo1,
    hi1,
    lo2,
    hi2,
    CAUSAL: tl.constexpr,
    PADDED: tl.constexpr,
    HAS_STARTS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
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
    offs_m,
    offs_n,
    Tq,
    Tk,
    causal_shift,
    lo1,
    hi1,
    lo2,
    hi2,
    CAUSAL: tl.constexpr,
    PADDED: tl.constexpr,
    HAS_STARTS: tl.constexpr,
):
    """(BLOCK_N, BLOCK_M) bool: the transpose of :func:`_visible`, built directly in key-major orientation."""
    vis = (offs_n[:, None] < Tk) & (offs_m[None, :] < Tq)
    if CAUSAL:
        vis = vis & (offs_n[:, None] <= offs_m[None, :] + causal_shift)
    if PADDED:
        vis = vis & _key_visible(offs_n[:, None], lo1, hi1, lo2, hi2, HAS_STARTS)
    return vis


@triton.jit
def _fwd_inner(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    start,
    end,
    m_first,
    offs_m,
    offs_d,
    drop_row,
    Tq,
    Tk,
    D: tl.constexpr,
    causal_shift,
    lo1,
    hi1,
    lo2,
    hi2,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    qk_scale,
    dropout_p,
    seed,
    CAUSAL: tl.constexpr,
    PADDED: tl.constexpr,
    HAS_STARTS: tl.constexpr,
    DROPOUT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BOUNDARY_ONLY: tl.constexpr,
):
    d_ok = offs_d < D
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < Tk
        kt = tl.load(
            k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
            mask=n_ok[None, :] & d_ok[:, None],
            other=0.0,
        )
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
            mask=n_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["seed"])  # seeds vary per call: no recompiles
def _rmt_attn_fwd_kernel(
    Q,
    K,
    V,
    Out,
    LSE,
    STARTS,
    COUNTS,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_ob,
    stride_om,
    stride_oh,
    stride_od,
    Hq,
    G,
    Tq,
    Tk,
    D: tl.constexpr,
    num_read,
    num_tokens,
    qk_scale,
    dropout_p,
    seed,
    CAUSAL: tl.constexpr,
    PADDED: tl.constexpr,
    HAS_STARTS: tl.constexpr,
    DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BOUNDARY_ONLY: tl.constexpr,
    DROP_I64: tl.constexpr,
):
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
        mask=m_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
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
            acc,
            l_i,
            m_i,
            q,
            k_base,
            v_base,
            0,
            r1_end,
            pid_m * BLOCK_M,
            offs_m,
            offs_d,
            drop_row,
            Tq,
            Tk,
            D,
            causal_shift,
            lo1,
            hi1,
            lo2,
            hi2,
            stride_kn,
            stride_kd,
            stride_vn,
            stride_vd,
            qk_scale,
            dropout_p,
            seed,
            CAUSAL,
            PADDED,
            HAS_STARTS,
            DROPOUT,
            BLOCK_N,
            DOT_PREC,
            BOUNDARY_ONLY,
        )
    acc, l_i, m_i = _fwd_inner(
        acc,
        l_i,
        m_i,
        q,
        k_base,
        v_base,
        r2_start,
        r2_end,
        pid_m * BLOCK_M,
        offs_m,
        offs_d,
        drop_row,
        Tq,
        Tk,
        D,
        causal_shift,
        lo1,
        hi1,
        lo2,
        hi2,
        stride_kn,
        stride_kd,
        stride_vn,
        stride_vd,
        qk_scale,
        dropout_p,
        seed,
        CAUSAL,
        PADDED,
        HAS_STARTS,
        DROPOUT,
        BLOCK_N,
        DOT_PREC,
        BOUNDARY_ONLY,
    )
    acc, l_i, m_i = _fwd_inner(
        acc,
        l_i,
        m_i,
        q,
        k_base,
        v_base,
        r3_start,
        hi,
        pid_m * BLOCK_M,
        offs_m,
        offs_d,
        drop_row,
        Tq,
        Tk,
        D,
        causal_shift,
        lo1,
        hi1,
        lo2,
        hi2,
        stride_kn,
        stride_kd,
        stride_vn,
        stride_vd,
        qk_scale,
        dropout_p,
        seed,
        CAUSAL,
        PADDED,
        HAS_STARTS,
        DROPOUT,
        BLOCK_N,
        DOT_PREC,
        BOUNDARY_ONLY,
    )

    empty = l_i == 0.0  # a query that sees no key at all: output 0, lse +inf (=> zero gradients)
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    if DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    lse = tl.where(empty, float("inf"), m_i + tl.log2(l_safe))  # base-2, in units of qk_scale
    tl.store(LSE + pid_bh.to(tl.int64) * Tq + offs_m, lse, mask=m_ok)
    tl.store(
        Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
        out.to(Out.dtype.element_ty),
        mask=m_ok[:, None] & d_ok[None, :],
    )


@triton.jit
def _rmt_attn_bwd_preprocess_kernel(
    Out,
    DO,
    DELTA,
    stride_ob,
    stride_om,
    stride_oh,
    stride_od,
    stride_dob,
    stride_dom,
    stride_doh,
    stride_dod,
    Hq,
    Tq,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
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
        mask=mask,
        other=0.0,
    ).to(tl.float32)
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
        mask=mask,
        other=0.0,
    ).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * Tq + offs_m, tl.sum(o * do, 1), mask=m_ok)


@triton.jit
def _dq_inner(
    dq,
    q,
    do,
    lse,
    delta,
    k_base,
    v_base,
    start,
    end,
    m_first,
    offs_m,
    offs_d,
    drop_row,
    Tq,
    Tk,
    D: tl.constexpr,
    causal_shift,
    lo1,
    hi1,
    lo2,
    hi2,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    qk_scale,
    dropout_p,
    seed,
    CAUSAL: tl.constexpr,
    PADDED: tl.constexpr,
    HAS_STARTS: tl.constexpr,
    DROPOUT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BOUNDARY_ONLY: tl.constexpr,
):
    d_ok = offs_d < D
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < Tk
        k = tl.load(
            k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
            mask=n_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        vt = tl.load(
            v_base + offs_n[None, :] * stride_vn + offs_d[:, None] * stride_vd,
            mask=n_ok[None, :] & d_ok[:, None],
            other=0.0,
        )
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


@triton.jit
def _row_delta(o_base, do, offs_m, offs_d, md_ok, stride_om, stride_od):
    """delta = rowsum(O * dO) in fp32 for the rows ``offs_m``: the preprocess kernel's value, computed in place
    from the O tile and the dO tile already loaded (the variants that fold the preprocess in)."""
    o = tl.load(o_base + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od, mask=md_ok, other=0.0)
    return tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)


@triton.jit
def _dq_block(
    Q,
    K,
    V,
    DO,
    DQ,
    LSE,
    DELTA,
    Out,
    STARTS,
    COUNTS,
    pid_m,
    b,
    h,
    hk,
    bh,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_dob,
    stride_dom,
    stride_doh,
    stride_dod,
    stride_dqb,
    stride_dqh,
    stride_dqm,
    stride_dqd,
    stride_ob,
    stride_om,
    stride_oh,
    stride_od,
    Tq,
    Tk,
    D: tl.constexpr,
    num_read,
    num_tokens,
    qk_scale,
    sm_scale,
    dropout_p,
    seed,
    CAUSAL: tl.constexpr,
    PADDED: tl.constexpr,
    HAS_STARTS: tl.constexpr,
    DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BOUNDARY_ONLY: tl.constexpr,
    DROP_I64: tl.constexpr,
    DELTA_INLINE: tl.constexpr,
    STORE_DELTA: tl.constexpr,
):
    """dQ of query block ``pid_m`` of query head ``h`` (batch ``b``, K/V head ``hk``, ``bh`` = b * Hq + h, int32
    for the dropout offsets). DELTA_INLINE: delta from the O and dO tiles (and, with STORE_DELTA, stored to
    DELTA for a dK/dV kernel launched after); else read from DELTA."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Tq
    md_ok = m_ok[:, None] & (offs_d[None, :] < D)
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=md_ok,
        other=0.0,
    )
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
        mask=md_ok,
        other=0.0,
    ).to(q.dtype)
    row = bh.to(tl.int64) * Tq + offs_m
    lse = tl.load(LSE + row, mask=m_ok, other=float("inf"))
    if DELTA_INLINE:
        delta = _row_delta(Out + b * stride_ob + h * stride_oh, do, offs_m, offs_d, md_ok, stride_om, stride_od)
        if STORE_DELTA:
            tl.store(DELTA + row, delta, mask=m_ok)
    else:
        delta = tl.load(DELTA + row, mask=m_ok, other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh

    causal_shift = Tk - Tq
    lo1, hi1, lo2, hi2 = _hidden_ranges(STARTS, COUNTS, b, num_read, num_tokens, Tk, PADDED, HAS_STARTS)
    hi = Tk
    if CAUSAL:
        hi = tl.minimum(Tk, (pid_m + 1) * BLOCK_M + causal_shift)
    r1_end, r2_start, r2_end, r3_start = _key_block_ranges(lo1, hi1, lo2, hi2, hi, BLOCK_N)
    drop_row = _dropout_row_offsets(bh, offs_m[:, None], Tq, Tk, DROP_I64)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if HAS_STARTS:
        dq = _dq_inner(
            dq,
            q,
            do,
            lse,
            delta,
            k_base,
            v_base,
            0,
            r1_end,
            pid_m * BLOCK_M,
            offs_m,
            offs_d,
            drop_row,
            Tq,
            Tk,
            D,
            causal_shift,
            lo1,
            hi1,
            lo2,
            hi2,
            stride_kn,
            stride_kd,
            stride_vn,
            stride_vd,
            qk_scale,
            dropout_p,
            seed,
            CAUSAL,
            PADDED,
            HAS_STARTS,
            DROPOUT,
            BLOCK_N,
            DOT_PREC,
            BOUNDARY_ONLY,
        )
    dq = _dq_inner(
        dq,
        q,
        do,
        lse,
        delta,
        k_base,
        v_base,
        r2_start,
        r2_end,
        pid_m * BLOCK_M,
        offs_m,
        offs_d,
        drop_row,
        Tq,
        Tk,
        D,
        causal_shift,
        lo1,
        hi1,
        lo2,
        hi2,
        stride_kn,
        stride_kd,
        stride_vn,
        stride_vd,
        qk_scale,
        dropout_p,
        seed,
        CAUSAL,
        PADDED,
        HAS_STARTS,
        DROPOUT,
        BLOCK_N,
        DOT_PREC,
        BOUNDARY_ONLY,
    )
    dq = _dq_inner(
        dq,
        q,
        do,
        lse,
        delta,
        k_base,
        v_base,
        r3_start,
        hi,
        pid_m * BLOCK_M,
        offs_m,
        offs_d,
        drop_row,
        Tq,
        Tk,
        D,
        causal_shift,
        lo1,
        hi1,
        lo2,
        hi2,
        stride_kn,
        stride_kd,
        stride_vn,
        stride_vd,
        qk_scale,
        dropout_p,
        seed,
        CAUSAL,
        PADDED,
        HAS_STARTS,
        DROPOUT,
        BLOCK_N,
        DOT_PREC,
        BOUNDARY_ONLY,
    )
    dq = dq * sm_scale
    tl.store(
        DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
        dq.to(DQ.dtype.element_ty),
        mask=md_ok,
    )


@triton.jit(do_not_specialize=["seed"])  # seeds vary per call: no recompiles
def _rmt_attn_bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    DQ,
    LSE,
    DELTA,
    Out,
    STARTS,
    COUNTS,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_dob,
    stride_dom,
    stride_doh,
    stride_dod,
    stride_dqb,
    stride_dqh,
    stride_dqm,
    stride_dqd,
    stride_ob,
    stride_om,
    stride_oh,
    stride_od,
    Hq,
    G,
    Tq,
    Tk,
    D: tl.constexpr,
    num_read,
    num_tokens,
    qk_scale,
    sm_scale,
    dropout_p,
    seed,
    CAUSAL: tl.constexpr,
    PADDED: tl.constexpr,
    HAS_STARTS: tl.constexpr,
    DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BOUNDARY_ONLY: tl.constexpr,
    DROP_I64: tl.constexpr,
    DELTA_INLINE: tl.constexpr,
):
    """One query block of one query head. DELTA_INLINE (variant "inline"): delta computed here and stored."""
    qk_scale, sm_scale, dropout_p = _fp32(qk_scale), _fp32(sm_scale), _fp32(dropout_p)
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    _dq_block(
        Q,
        K,
        V,
        DO,
        DQ,
        LSE,
        DELTA,
        Out,
        STARTS,
        COUNTS,
        pid_m,
        b,
        h,
        h // G,
        pid_bh,
        stride_qb,
        stride_qh,
        stride_qm,
        stride_qd,
        stride_kb,
        stride_kh,
        stride_kn,
        stride_kd,
        stride_vb,
        stride_vh,
        stride_vn,
        stride_vd,
        stride_dob,
        stride_dom,
        stride_doh,
        stride_dod,
        stride_dqb,
        stride_dqh,
        stride_dqm,
        stride_dqd,
        stride_ob,
        stride_om,
        stride_oh,
        stride_od,
        Tq,
        Tk,
        D,
        num_read,
        num_tokens,
        qk_scale,
        sm_scale,
        dropout_p,
        seed,
        CAUSAL,
        PADDED,
        HAS_STARTS,
        DROPOUT,
        BLOCK_M,
        BLOCK_N,
        BLOCK_D,
        DOT_PREC,
        BOUNDARY_ONLY,
        DROP_I64,
        DELTA_INLINE,
        True,
    )


@triton.jit(do_not_specialize=["seed"])  # seeds vary per call: no recompiles
def _rmt_attn_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    DK,
    DV,
    LSE,
    DELTA,
    Out,
    DQ,
    STARTS,
    COUNTS,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_dob,
    stride_dom,
    stride_doh,
    stride_dod,
    stride_dkb,
    stride_dkh,
    stride_dkn,
    stride_dkd,
    stride_dvb,
    stride_dvh,
    stride_dvn,
    stride_dvd,
    stride_ob,
    stride_om,
    stride_oh,
    stride_od,
    stride_dqb,
    stride_dqh,
    stride_dqm,
    stride_dqd,
    Hq,
    Hkv,
    G,
    Tq,
    Tk,
    D: tl.constexpr,
    num_read,
    num_tokens,
    qk_scale,
    sm_scale,
    dropout_p,
    seed,
    CAUSAL: tl.constexpr,
    PADDED: tl.constexpr,
    HAS_STARTS: tl.constexpr,
    DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BOUNDARY_ONLY: tl.constexpr,
    DROP_I64: tl.constexpr,
    DELTA_INLINE: tl.constexpr,
    FUSED_DQ: tl.constexpr,
):
    """One key block of one K/V head; loops over the G query heads of its group and their query blocks.

    Works in the transposed (key, query) orientation: s_t[n, m] = k[n] . q[m]. DELTA_INLINE (variants "inline",
    "fused"): delta from each query block's O and dO tiles instead of DELTA. FUSED_DQ (variant "fused", the
    whole backward in one launch, same grid): program j then also computes dQ of the query blocks
    (query blocks - 1 - i) for i = j, j + programs, ... and the G query heads of its group (the reversed order
    pairs the lightest causal key block with the heaviest query block; the stride covers Tq <= Tk with any
    BLOCK_M).
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
        mask=nd_ok,
        other=0.0,
    )
    v = tl.load(
        V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
        mask=nd_ok,
        other=0.0,
    )

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
            q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=md_ok, other=0.0)
            do = tl.load(
                do_base + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=md_ok, other=0.0
            ).to(q.dtype)
            lse = tl.load(LSE + bh * Tq + offs_m, mask=m_ok, other=float("inf"))
            if DELTA_INLINE:
                delta = _row_delta(Out + b * stride_ob + h * stride_oh, do, offs_m, offs_d, md_ok, stride_om, stride_od)
            else:
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
                vis_t = _visible_t(offs_m, offs_n, Tq, Tk, causal_shift, lo1, hi1, lo2, hi2, CAUSAL, PADDED, HAS_STARTS)
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
        dk.to(DK.dtype.element_ty),
        mask=nd_ok,
    )
    tl.store(
        DV + b * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
        dv.to(DV.dtype.element_ty),
        mask=nd_ok,
    )
    if FUSED_DQ:
        num_m = tl.cdiv(Tq, BLOCK_M)
        for j in range(pid_n, num_m, tl.num_programs(0)):
            pid_m = num_m - 1 - j
            for g in range(0, G):
                h = hk * G + g
                bh32 = (pid_bh // Hkv) * Hq + (pid_bh % Hkv) * G + g
                _dq_block(
                    Q,
                    K,
                    V,
                    DO,
                    DQ,
                    LSE,
                    DELTA,
                    Out,
                    STARTS,
                    COUNTS,
                    pid_m,
                    b,
                    h,
                    hk,
                    bh32,
                    stride_qb,
                    stride_qh,
                    stride_qm,
                    stride_qd,
                    stride_kb,
                    stride_kh,
                    stride_kn,
                    stride_kd,
                    stride_vb,
                    stride_vh,
                    stride_vn,
                    stride_vd,
                    stride_dob,
                    stride_dom,
                    stride_doh,
                    stride_dod,
                    stride_dqb,
                    stride_dqh,
                    stride_dqm,
                    stride_dqd,
                    stride_ob,
                    stride_om,
                    stride_oh,
                    stride_od,
                    Tq,
                    Tk,
                    D,
                    num_read,
                    num_tokens,
                    qk_scale,
                    sm_scale,
                    dropout_p,
                    seed,
                    CAUSAL,
                    PADDED,
                    HAS_STARTS,
                    DROPOUT,
                    BLOCK_M,
                    BLOCK_N,
                    BLOCK_D,
                    DOT_PREC,
                    BOUNDARY_ONLY,
                    DROP_I64,
                    True,
                    False,
                )


@triton.jit(do_not_specialize=["seed"])  # seeds vary per call: no recompiles
def _rmt_dropout_mask_kernel(
    OUT, Tq, Tk, dropout_p, seed, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DROP_I64: tl.constexpr
):
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
