"""ARMT's memory math (rmt_fast.armt.memory) against a hand-written float64 version: loops over heads and
memory tokens, the formulas of the published AssociativeLayerWrapper written out one by one."""

import pytest
import torch
from numerics import assert_close

from rmt_fast.armt.memory import MemoryShape, read, write


def _phi(x):  # DPFP, nu = 3, written out
    x = torch.cat([x.clamp(min=0), (-x).clamp(min=0)])
    n = x.shape[0]
    return torch.cat([torch.stack([x[i] * x[(i - j) % n] for i in range(n)]) for j in (1, 2, 3)])


def _key(vec, w, h, n_heads):
    d = w.shape[0] // n_heads
    f = _phi(w[h * d : (h + 1) * d] @ vec)
    return f / f.norm().clamp(min=1e-12)


def hand_read(x, A, z, wq, n_heads, use_denom):
    """x (B, S, D), A (B, H, dk, dv), z (B, H, dk)."""
    out = x.clone()
    b_, s_, d_ = x.shape
    dv = d_ // n_heads
    for b in range(b_):
        for s in range(s_):
            for h in range(n_heads):
                q = _key(x[b, s], wq, h, n_heads)
                num = q @ A[b, h]
                if use_denom:
                    num = num / (q @ z[b, h] + 1e-5)
                out[b, s, h * dv : (h + 1) * dv] = out[b, s, h * dv : (h + 1) * dv] + num
    return out


def hand_write(hm, A, z, wk, wv, wb, bb, n_heads, use_denom, correction, first):
    b_, m_, d_ = hm.shape
    dv = d_ // n_heads
    A_rows, z_rows = [], []
    for b in range(b_):
        A_heads, z_heads = [], []
        for h in range(n_heads):
            a, c = A[b, h].clone(), z[b, h].clone()
            for j in range(m_):
                vec = hm[b, j]
                k = _key(vec, wk, h, n_heads)
                v = (wv @ vec)[h * dv : (h + 1) * dv]
                beta = torch.sigmoid(wb[h] @ vec + bb[h])
                if first:
                    vbar, gamma = torch.zeros_like(v), 1.0
                else:
                    denom = k @ z[b, h] + 1e-5 if use_denom else 1.0
                    vbar = (k @ A[b, h]) / denom
                    gamma = 1.0
                    if use_denom and correction:
                        gamma = torch.clip(1 - denom / (k @ k), 0, 1).detach()
                a = a + beta * torch.outer(k, v - vbar)
                if use_denom:
                    c = c + gamma * k
            A_heads.append(a)
            z_heads.append(c)
        A_rows.append(torch.stack(A_heads))
        z_rows.append(torch.stack(z_heads))
    return torch.stack(A_rows), torch.stack(z_rows)


@pytest.mark.parametrize(
    "n_heads,use_denom,correction,first",
    [
        (1, True, True, False),
        (2, True, True, False),
        (2, True, False, False),
        (2, False, True, False),
        (2, True, True, True),
    ],
)
def test_read_and_write_match_hand_written(n_heads, use_denom, correction, first):
    g = torch.Generator().manual_seed(0)
    B, S, m, D, d_mem = 2, 3, 2, 8, 4
    shape = MemoryShape(D, d_mem, n_heads, use_denom, correction)
    dk, dv = shape.d_key, shape.d_value

    def rnd(*s, scale=1.0):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * scale).requires_grad_()

    x, hm = rnd(B, S, D), rnd(B, m, D)
    wq, wk, wv = rnd(d_mem, D), rnd(d_mem, D), rnd(D, D)
    wb, bb = rnd(n_heads, D), rnd(n_heads)
    A = rnd(B, n_heads, dk, dv, scale=0.3)
    z = (torch.rand(B, n_heads, dk, generator=g, dtype=torch.float64) * 0.5).requires_grad_()  # z >= 0
    leaves = [x, hm, wq, wk, wv, wb, bb, A, z]

    got_read = read(x, A, z, wq, shape)
    want_read = hand_read(x, A, z, wq, n_heads, use_denom)
    assert_close(got_read, want_read, tol=1e-12, name="read")
    got_A, got_z = write(hm, A, z, wk, wv, wb, bb, shape, first)
    want_A, want_z = hand_write(hm, A, z, wk, wv, wb, bb, n_heads, use_denom, correction, first)
    assert_close(got_A, want_A, tol=1e-12, name="A")
    if use_denom:
        assert_close(got_z, want_z, tol=1e-12, name="z")
    # every gradient (gamma is detached in both: its gradient reaches z only through the sum)
    r = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (want_read, want_A, want_z)]

    def grads(outs):
        total = sum((o * w).sum() for o, w in zip(outs, r))
        return torch.autograd.grad(total, leaves, allow_unused=True)

    for a, b in zip(grads((got_read, got_A, got_z)), grads((want_read, want_A, want_z))):
        if b is None:
            assert a is None or a.abs().max() == 0
        else:
            # an absolute floor: with 2 features per head DPFP can be one-hot, and its gradient exactly zero
            assert_close(a, b, dtype=torch.float64, floor=1.0, name="gradient")


def test_first_flag_per_cell_matches_separate_writes():
    """A tensor ``first`` (per cell) equals writing each cell with its own bool flag."""
    g = torch.Generator().manual_seed(1)
    shape = MemoryShape(8, 4, 2)
    G, B, m = 3, 2, 2
    hm = torch.randn(G, B, m, 8, generator=g, dtype=torch.float64)
    ws = [torch.randn(G, *s, generator=g, dtype=torch.float64) for s in ((4, 8), (8, 8), (2, 8), (2,))]
    A = torch.randn(G, B, 2, shape.d_key, shape.d_value, generator=g, dtype=torch.float64) * 0.3
    z = torch.rand(G, B, 2, shape.d_key, generator=g, dtype=torch.float64)
    flags = [False, True, False]
    got_A, got_z = write(hm, A, z, *ws, shape, torch.tensor(flags).view(-1, 1, 1, 1, 1))
    for i, f in enumerate(flags):
        a, c = write(hm[i], A[i], z[i], *(w[i] for w in ws), shape, f)
        assert_close(got_A[i], a, tol=1e-12, name=f"A[{i}]")
        assert_close(got_z[i], c, tol=1e-12, name=f"z[{i}]")
