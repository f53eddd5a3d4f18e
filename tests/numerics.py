"""Error measures shared by the tests (no transformers import: the kernel tests use it too)."""

from __future__ import annotations


def rel_err(x, ref) -> float:
    """||x - ref|| / ||ref||, both taken to float64 (the absolute error where ref is all zeros)."""
    x, ref = x.detach().double(), ref.detach().double()
    denom = ref.norm().item()
    return (x - ref).norm().item() / (denom if denom > 0 else 1.0)
