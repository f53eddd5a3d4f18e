"""The tolerance helper itself (tests/numerics.py): it passes within the bound, fails on a planted wrong value and
on NaN, and uses the floor for a zero reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from numerics import TOL, assert_close, assert_differs, rel_err, tol


def _ref(n=64, seed=0):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_named_tolerances():
    assert tol(torch.float32) == TOL[torch.float32] == 1e-5
    assert tol(torch.float16) == 1e-3 and tol(torch.bfloat16) == 1e-2
    assert tol(torch.float64) < tol(torch.float32) < tol(torch.float16) < tol(torch.bfloat16)
    assert tol() == tol(torch.float32)
    with pytest.raises(KeyError, match="no named tolerance"):
        tol(torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_passes_a_rounded_copy_with_the_dtype_bound(dtype):
    want = _ref()
    err = assert_close(want.to(dtype), want)  # bound from got's dtype
    assert 0 < err <= tol(dtype)
    assert assert_close(want.to(dtype), want, dtype=dtype) == err


def test_fails_on_a_planted_wrong_value():
    want = _ref()
    got = want.float().clone()
    got[3] += 1e-2 * want.norm()
    with pytest.raises(AssertionError, match=r"logits: relative error 0\.01 > 1e-05"):
        assert_close(got, want, name="logits")
    with pytest.raises(AssertionError, match="relative error"):
        assert_close(want * 1.002, want, dtype=torch.float16)  # 2e-3 > fp16's 1e-3
    assert_close(want * 1.002, want, tol=2.01e-3)


@pytest.mark.parametrize("where", ["got", "want"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_or_inf_anywhere_fails(where, bad):
    want = _ref()
    got = want.clone()
    (got if where == "got" else want)[5] = bad
    with pytest.raises(AssertionError, match="NaN or infinity"):
        assert_close(got, want, tol=1e30, floor=1e30)
    with pytest.raises(AssertionError, match="NaN or infinity"):
        assert_differs(got, want, by=0.0)
    both = torch.full((3,), math.nan)
    with pytest.raises(AssertionError, match="NaN"):
        assert_close(both, both.clone(), tol=1.0)  # NaN in both: never equal


def test_zero_reference_needs_the_floor():
    zero = torch.zeros(8, dtype=torch.float64)
    noise = torch.full((8,), 1e-9)  # float32: the bound is tol(float32)
    assert assert_close(zero.clone(), zero) == 0  # exactly zero passes without a floor
    with pytest.raises(AssertionError, match="relative error inf"):
        assert_close(noise, zero)
    err = assert_close(noise, zero, floor=1e-3, name="grad")  # ||noise|| / floor
    assert err == pytest.approx(noise.norm().item() / 1e-3)
    with pytest.raises(AssertionError, match="grad: relative error"):
        assert_close(noise, zero, floor=1e-6, name="grad")
    # the floor only raises the denominator: a large reference is still relative to its own norm
    want = _ref()
    assert assert_close(want * (1 + 1e-7), want, tol=1e-6, floor=1e-3) == pytest.approx(1e-7, rel=1e-6)


def test_loss_with_floor_one_is_abs_or_relative():
    assert_close(torch.tensor(0.5 + 5e-6), torch.tensor(0.5, dtype=torch.float64), floor=1.0)
    with pytest.raises(AssertionError):
        assert_close(torch.tensor(0.5 + 5e-6), torch.tensor(0.5, dtype=torch.float64))  # 1e-5 relative to 0.5
    assert_close(3.0 + 2e-5, 3.0, tol=1e-5, floor=1.0)  # numbers work too


def test_shape_mismatch_and_argument_errors():
    with pytest.raises(AssertionError, match="shape"):
        assert_close(torch.zeros(3), torch.zeros(()))  # no broadcasting
    with pytest.raises(TypeError, match="tol or dtype"):
        assert_close(torch.zeros(3), torch.zeros(3), tol=1e-5, dtype=torch.float32)
    with pytest.raises(TypeError, match="needs tol"):
        assert_close(torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long))


def test_assert_differs():
    want = _ref()
    assert assert_differs(want * 1.1, want, by=1e-3) == pytest.approx(0.1)
    with pytest.raises(AssertionError, match="expected to differ"):
        assert_differs(want.float(), want, by=1e-3)


def test_rel_err_kept():
    want = _ref()
    assert rel_err(want * 1.5, want) == pytest.approx(0.5)
    assert rel_err(torch.ones(4), torch.zeros(4)) == 2.0  # absolute where the reference is zero (as before)
    assert rel_err(torch.ones(4), torch.zeros(4), floor=4.0) == 0.5
    assert math.isnan(rel_err(torch.full((2,), math.nan), torch.ones(2)))


@settings(max_examples=60, deadline=None)
@given(scale=st.floats(1e-6, 1e6), rel=st.floats(0.0, 0.5), seed=st.integers(0, 2**16))
def test_bound_matches_the_norm_ratio(scale, rel, seed):
    """Scale-free: the error of want + rel * ||want|| * u (u a unit vector) is rel, and the check is its bound."""
    want = _ref(seed=seed) * scale
    u = _ref(seed=seed + 1)
    got = want + rel * want.norm() * u / u.norm()
    err = assert_close(got, want, tol=rel * (1 + 1e-9) + 1e-14)
    assert err == pytest.approx(rel, rel=1e-9, abs=1e-14)
    if rel > 1e-6:
        with pytest.raises(AssertionError):
            assert_close(got, want, tol=rel * (1 - 1e-6))
