"""Helpers for the ARMT tests: wrapper pairs over identical backbones with random memory weights, and the
comparison of two ARMT runs (logits, loss, final A and z, every gradient)."""

from __future__ import annotations

import copy

import models
import torch
from models import DECODERS, VOCAB
from numerics import TOL, assert_close

from rmt_fast import FastARMT, ReferenceARMT

# The checks below hold fp32 runs to TOL[torch.float32]. d_mem = 32 (dk = 96 features per head at 2 heads):
# with few DPFP features (d_mem = 8) the memory's (q A) / (q . z + 1e-5) divides tiny numbers where q and z barely
# overlap, and even the plain fp32 reference is ~1e-3 from float64 in some gradients; at d_mem = 32 fp32 runs are
# ~1e-6 from float64. The float64 tests cover d_mem = 8.


def randomize_memory(armt, seed=0, scale=0.3):
    """Random memory projections (a fresh W_mv is zero, which would hide every memory bug)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in armt.assoc.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def build(cls, name, m=3, size=8, seed=0, **kw):
    torch.manual_seed(seed)
    armt = cls(DECODERS[name](), m, size, **{"d_mem": 32, **kw})
    randomize_memory(armt, seed)
    return armt


def pair(name, m=3, size=8, seed=0, ref_cls=ReferenceARMT, ref_kw=None, fast_kw=None, **kw):
    """(reference, fast) wrappers over copies of one backbone with the same memory weights."""
    torch.manual_seed(seed)
    base = DECODERS[name]()
    kw = {"d_mem": 32, **kw}
    ref = ref_cls(copy.deepcopy(base), m, size, **kw, **(ref_kw or {}))
    randomize_memory(ref, seed)
    fast = FastARMT(copy.deepcopy(base), m, size, **kw, **(fast_kw or {}))
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def ids(b, t, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (b, t), generator=g)


def run(armt, inputs, grad=True):
    armt.zero_grad(set_to_none=True)
    out = armt(**inputs)
    if grad:
        objective = out.loss if out.loss is not None else out.logits.float().square().mean()
        state = out.memory_state
        objective = objective + state.A.float().square().mean() + state.z.float().square().mean()
        objective.backward()
    return out


def assert_same_run(a, b, tol=TOL[torch.float32]):
    assert b.logits.shape == a.logits.shape
    assert_close(b.logits, a.logits, tol=tol, name="logits")
    assert_close(b.memory_state.A, a.memory_state.A, tol=tol, name="A")
    assert_close(b.memory_state.z, a.memory_state.z, tol=tol, name="z")
    if a.loss is not None:
        assert_close(b.loss, a.loss, tol=tol, floor=1.0, name="loss")  # |b - a| <= tol * max(1, |a|)


def assert_equivalent(ref, fast, inputs, tol=TOL[torch.float32], grad=True):
    a, b = run(ref, inputs, grad), run(fast, inputs, grad)
    assert_same_run(a, b, tol)
    if grad:
        models.assert_grads_equal(ref, fast, tol)
        assert any(p.grad is not None and p.grad.abs().max() > 0 for p in fast.assoc.parameters())
    return a, b
