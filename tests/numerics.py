"""Error measures and the one tolerance check shared by the tests (no transformers import: the kernel tests use
it too).

Every numerical comparison in the tests is a relative error in float64,

    err = ||got - want|| / max(||want||, floor),

checked against a bound named by the precision under test (``TOL``, ``tol(dtype)``). ``want`` is the reference,
ideally in a higher precision than ``got``. ``floor`` is an absolute lower bound for the denominator: a quantity
that is zero (or tiny) in exact arithmetic, such as a gradient through a softmax-invariant bias, is pure rounding
noise, and relative to its own norm it is meaningless. A loss compared with ``floor=1.0`` is checked as
``|got - want| <= tol * max(1, |want|)``.

A tighter bound than the dtype's is written as a literal (the code under test is expected to be that close,
e.g. two float64 paths, or one op); a looser one is written as a multiple of ``tol(dtype)`` with a comment saying
why. Exact checks (``torch.equal``, bit-exact replays) are not tolerance checks and do not go through here.
"""

from __future__ import annotations

import math

import torch

#: Relative-error bound per precision under test: about a hundred ulps of float32 (eps 1.2e-7) for fp32, a few
#: ulps of the 10-bit fp16 mantissa (eps 9.8e-4) and of the 7-bit bf16 mantissa (eps 7.8e-3). Float64 paths are
#: held to 1e-10 (eps 2.2e-16; deep models and long recurrences accumulate far fewer than 1e6 ulps).
TOL: dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 1e-2,
}


def tol(dtype: torch.dtype = torch.float32) -> float:
    """The named relative-error bound for results computed in ``dtype`` (``TOL[dtype]``)."""
    try:
        return TOL[dtype]
    except KeyError:
        raise KeyError(f"no named tolerance for {dtype}; TOL has {sorted(map(str, TOL))}") from None


def grad_tol(dtype: torch.dtype) -> float:
    """The bound for attention gradients (dq, dk, dv) against a float64 reference: ``TOL[dtype]``, twice that in
    fp16, where dq and dk go through one more rounding (of dS to the input dtype) and sum fp16 products over every
    key or query block. (bf16's 1e-2 already covers it.)"""
    return 2 * TOL[dtype] if dtype == torch.float16 else tol(dtype)


def rel_err(x, ref, floor: float = 0.0) -> float:
    """||x - ref|| / max(||ref||, floor), both taken to float64 (the absolute error where the denominator is 0).
    NaN in either gives NaN (so ``rel_err(...) <= bound`` is False)."""
    x, ref = _f64(x), _f64(ref)
    denom = max(ref.norm().item(), floor)
    return (x - ref).norm().item() / (denom if denom > 0 else 1.0)


def _f64(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float64)
    return torch.as_tensor(x, dtype=torch.float64)


def _bound(tol_, dtype, got) -> float:
    if tol_ is not None:
        if dtype is not None:
            raise TypeError("pass tol or dtype, not both")
        return float(tol_)
    if dtype is None:
        if not (isinstance(got, torch.Tensor) and got.is_floating_point()):
            raise TypeError("a non-float got needs tol= or dtype=")
        dtype = got.dtype
    return tol(dtype)


def assert_close(
    got, want, *, tol: float | None = None, dtype: torch.dtype | None = None, floor: float = 0.0, name: str = "value"
) -> float:
    """Assert ``||got - want|| / max(||want||, floor) <= bound``, in float64; return the error.

    The bound is ``tol`` if given, else ``TOL[dtype]``, else ``TOL[got.dtype]``. ``got`` and ``want`` are tensors
    (or numbers) of one shape (no broadcasting). Fails, naming ``name``, the error and the bound, on a shape
    mismatch, on any NaN or infinity in either, and on a nonzero difference from a reference whose norm (and
    ``floor``) is 0."""
    bound = _bound(tol, dtype, got)
    g, w = _f64(got), _f64(want)
    assert g.shape == w.shape, f"{name}: shape {tuple(g.shape)} != reference shape {tuple(w.shape)}"
    bad = [label for label, t in (("result", g), ("reference", w)) if not torch.isfinite(t).all().item()]
    assert not bad, f"{name}: NaN or infinity in the {' and the '.join(bad)}"
    diff, ref_norm = (g - w).norm().item(), w.norm().item()
    denom = max(ref_norm, floor)
    err = diff / denom if denom > 0 else (0.0 if diff == 0 else math.inf)
    assert err <= bound, (
        f"{name}: relative error {err:.3g} > {bound:.3g} (||diff|| {diff:.3g}, ||ref|| {ref_norm:.3g}, floor {floor:g})"
    )
    return err


def assert_differs(got, want, *, by: float, name: str = "value") -> float:
    """Assert that ``got`` is more than ``by`` (relative, as in ``assert_close``) from ``want``: the guard that a
    perturbation reaches an output (so a closeness check elsewhere could fail). NaN fails here too."""
    g, w = _f64(got), _f64(want)
    assert g.shape == w.shape, f"{name}: shape {tuple(g.shape)} != reference shape {tuple(w.shape)}"
    assert torch.isfinite(g).all().item() and torch.isfinite(w).all().item(), f"{name}: NaN or infinity"
    err = rel_err(g, w)
    assert err > by, f"{name}: relative difference {err:.3g} <= {by:.3g} (expected to differ)"
    return err
