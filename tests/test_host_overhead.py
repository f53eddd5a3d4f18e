"""The Triton launch path's host side: the cached launch plans, the out-of-resources step-down, and the
host-overhead benchmark (it runs; its numbers are reported, not asserted)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
from rmt_fast.bench import host_overhead, runner  # noqa: E402
from rmt_fast.kernels import launch_configs as lc
from rmt_fast.kernels import triton_attention as ta
from rmt_fast.kernels.layout import SegmentLayout  # noqa: E402


@pytest.fixture
def compiled_path(monkeypatch):
    """The non-interpreter launch path (plans cached) with every kernel launch stubbed out."""
    monkeypatch.setattr(lc, "_INTERPRET", False)
    with host_overhead.stubs():
        yield
    lc.clear_launch_cache()


def _qkv(B=2, H=4, T=20, D=32):
    return (torch.randn(B, H, T, D) for _ in range(3))


def test_launch_plans_are_built_once_per_variant(compiled_path):
    q, k, v = _qkv()
    layout = SegmentLayout(2, 16, 2, True, token_counts=torch.tensor([3, 16]))
    ta.rmt_attention(q, k, v, layout, check=False)
    plans = dict(lc._PLANS)
    assert len(plans) == 1
    ta.rmt_attention(q, k, v, layout, check=False)
    ta.rmt_attention(q, k, v, SegmentLayout(2, 16, 2, True, token_counts=torch.tensor([9, 1])), check=False)
    assert lc._PLANS == plans and all(lc._PLANS[key] is plan for key, plan in plans.items())
    ta.rmt_attention(q, k, v, SegmentLayout(2, 16, 2, False), check=False)  # another variant
    assert len(lc._PLANS) == 2
    with lc.override_configs(fwd=(16, 16, 2, 1)):  # the override neither reads nor fills the cache
        ta.rmt_attention(q, k, v, SegmentLayout(2, 16, 2, True, token_starts=torch.tensor([1, 0]),
                                                 token_counts=torch.tensor([3, 16])), check=False)  # fmt: skip
    assert len(lc._PLANS) == 2
    lc.clear_launch_cache()
    assert not lc._PLANS and not lc._CONFIG_CACHE


def test_backward_plans_are_cached_too(compiled_path):
    q, k, v = (t.requires_grad_() for t in _qkv())
    layout = SegmentLayout(2, 16, 2, True)
    out = ta.rmt_attention(q, k, v, layout, check=False)
    out.sum().backward()  # stubbed kernels: the gradients are garbage, only the launches matter here
    assert {key[0] for key in lc._PLANS} == {"fwd", "pre", "dq", "dkdv"}


def test_out_of_resources_steps_down_and_is_remembered(compiled_path):
    launched = []

    class Tight:
        """Compiles only with BLOCK_M * BLOCK_N <= 32 * 32 and one stage."""

        def run(self, *args, grid, warmup, **kw):
            if kw["BLOCK_M"] * kw["BLOCK_N"] > 32 * 32 or kw["num_stages"] > 1:
                raise ta.triton.runtime.errors.OutOfResources(1, 0, "shared memory")
            launched.append((kw["BLOCK_M"], kw["BLOCK_N"], kw["num_stages"], grid))

    ta._rmt_attn_fwd_kernel = Tight()  # restored by the stubs context
    lc.set_launch_configs({("fwd", 32, torch.float32): (64, 64, 4, 3)})
    try:
        q, k, v = _qkv(T=100)
        layout = SegmentLayout(2, 96, 2, True)
        ta.rmt_attention(q, k, v, layout, check=False)
        assert launched[-1][:3] in {(32, 32, 1), (64, 16, 1), (16, 64, 1)}
        bm = launched[-1][0]
        assert launched[-1][3] == (-(-100 // bm), 2 * 4)
        assert lc._CONFIG_CACHE[("fwd", 32, torch.float32, q.device)].as_tuple()[:2] == launched[-1][:2]
        n = len(launched)
        ta.rmt_attention(q, k, v, layout, check=False)  # straight to the config that compiled
        assert len(launched) == n + 1 and launched[-1] == launched[n - 1]
        with pytest.raises(ta.triton.runtime.errors.OutOfResources):  # an override is used exactly
            with lc.override_configs(fwd=(64, 64, 4, 3)):
                ta.rmt_attention(q, k, v, layout, check=False)
    finally:
        lc.set_launch_configs(None)


def test_host_overhead_benchmark_runs(tmp_path):
    real_sdpa = F.scaled_dot_product_attention
    real_kernel = ta._rmt_attn_fwd_kernel
    summary = runner.run(host_overhead, tmp_path, quick=True)
    assert F.scaled_dot_product_attention is real_sdpa and ta._rmt_attn_fwd_kernel is real_kernel  # restored
    data = json.loads((tmp_path / "host_overhead.json").read_text())
    stub = [r for r in data["rows"] if r["mode"] == "stub"]
    assert {(r["case"], r["path"]) for r in stub} == {
        (c, p) for c in ("full", "counts", "runs")
        for p in ("triton", "sdpa", "triton_grad", "sdpa_grad", "validate_once_per_segment")
    }  # fmt: skip
    assert all(r["host_us"] > 0 for r in stub)
    assert len(data["summary"]) == 6 and summary["rows"] == len(data["rows"])
    assert "Triton - SDPA" in (tmp_path / "host_overhead.md").read_text()
