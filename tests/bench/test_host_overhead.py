"""The Triton launch path's host side: the cached launch plans, the out-of-resources step-down, and the
host-overhead benchmark (it runs; its numbers are reported, not asserted)."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
from rmt_fast.bench import host_overhead, runner  # noqa: E402
from rmt_fast.kernels import launch_configs as lc
from rmt_fast.kernels import triton_attention as ta
from rmt_fast.kernels.layout import SegmentLayout  # noqa: E402
from rmt_fast.kernels.sdpa_attention import sdpa_rmt_attention


@pytest.fixture
def compiled_path(monkeypatch):
    """The non-interpreter launch path (plans cached) with every kernel launch stubbed out."""
    with lc.interpreter_mode(False), host_overhead.stubs():
        yield
    lc.clear_launch_cache()


def _qkv(B=2, H=4, T=20, D=32):
    return (torch.randn(B, H, T, D) for _ in range(3))


def test_launch_plans_are_built_once_per_variant(compiled_path):
    q, k, v = _qkv()
    layout = SegmentLayout(2, 16, 2, True, token_counts=torch.tensor([3, 16]))
    ta.rmt_attention(q, k, v, layout, check=False)
    plans = lc.cache_snapshot().plans
    assert len(plans) == 1
    ta.rmt_attention(q, k, v, layout, check=False)
    ta.rmt_attention(q, k, v, SegmentLayout(2, 16, 2, True, token_counts=torch.tensor([9, 1])), check=False)
    now = lc.cache_snapshot().plans
    assert now == plans and all(now[key] is plan for key, plan in plans.items())
    ta.rmt_attention(q, k, v, SegmentLayout(2, 16, 2, False), check=False)  # another variant
    assert len(lc.cache_snapshot().plans) == 2
    with lc.override_configs(fwd=(16, 16, 2, 1)):  # the override neither reads nor fills the cache
        ta.rmt_attention(
            q,
            k,
            v,
            SegmentLayout(2, 16, 2, True, token_starts=torch.tensor([1, 0]), token_counts=torch.tensor([3, 16])),
            check=False,
        )
    assert len(lc.cache_snapshot().plans) == 2
    lc.clear_launch_cache()
    assert lc.cache_snapshot() == ({}, {}, {})


def test_backward_plans_are_cached_too(compiled_path):
    q, k, v = (t.requires_grad_() for t in _qkv())
    layout = SegmentLayout(2, 16, 2, True)
    out = ta.rmt_attention(q, k, v, layout, check=False)
    out.sum().backward()  # stubbed kernels: the gradients are garbage, only the launches matter here
    assert {key[0] for key in lc.cache_snapshot().plans} == {"fwd", "pre", "dq", "dkdv"}


def test_out_of_resources_steps_down_and_is_remembered(compiled_path):
    launched, tried = [], []

    class Tight:
        """Compiles only with BLOCK_M * BLOCK_N <= 32 * 32 and one stage."""

        def run(self, *args, grid, warmup, **kw):
            tried.append(kw["BLOCK_M"])
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
        assert lc.cached_config(("fwd", 32, torch.float32, q.device)).as_tuple()[:2] == launched[-1][:2]
        n, t = len(launched), len(tried)
        ta.rmt_attention(q, k, v, layout, check=False)  # straight to the config that compiled
        assert len(launched) == n + 1 and launched[-1] == launched[n - 1] and len(tried) == t + 1
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
    stub = [r for r in data["rows"] if r["mode"].startswith("stub")]
    paths = ["triton", "sdpa", "triton_grad", "sdpa_grad", "triton_step", "sdpa_step", "validate_once_per_segment"]
    paths += ["sdpa_mask_once_per_segment", "sdpa_real", "sdpa_real_grad", "sdpa_real_step"]
    paths += ["triton_tiny", "triton_tiny_grad", "triton_tiny_step"]
    if ta._OPS is not None:  # the custom ops are registered outside the interpreter only
        paths += ["triton_op_grad", "triton_op_step"]
    modes = ("stub", "stub_triton", "stub_triton_run")
    assert {(r["mode"], r["case"], r["path"]) for r in stub} == {
        (m, c, p) for m in modes for c in ("full", "counts", "runs") for p in paths
    }
    assert all(r["host_us"] > 0 and r["cpu_us"] >= 0 for r in stub)
    assert len(data["summary"]) == 27 and summary["rows"] == len(data["rows"])
    assert {s["call"] for s in data["summary"]} == {"no_grad", "grad", "step"}
    stub_summary = [s for s in data["summary"] if s["mode"].startswith("stub")]
    assert all(s["sdpa_real_us"] > 0 and isinstance(s["at_or_below_real_sdpa"], bool) for s in stub_summary)
    assert all(s["triton_tiny_us"] > 0 for s in stub_summary)
    assert isinstance(summary["grad_at_or_below_sdpa"], bool)
    assert isinstance(summary["grad_at_or_below_real_sdpa"], bool)
    table = (tmp_path / "host_overhead.md").read_text()
    assert "Triton - SDPA" in table and "| Triton us (tiny) | real SDPA us (tiny) | <= real SDPA |" in table


def test_sdpa_real_paths_time_the_real_op(monkeypatch):
    """The ``sdpa_real`` paths reach the real SDPA (the one in place before the stubs), at the tiny shape only,
    and its result is SDPA's, not a view of q; the other SDPA paths still get the stub; F's SDPA is restored."""
    real = F.scaled_dot_product_attention
    seen = []

    def spy(q, k, v, **kw):
        out = real(q, k, v, **kw)
        seen.append((q.shape[-1], out.untyped_storage().data_ptr() == q.untyped_storage().data_ptr()))
        return out

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    host_overhead.measure_stub(runner.Timer(torch.device("cpu")), n=2, repeats=2)
    assert F.scaled_dot_product_attention is spy
    # 3 cases x 3 paths (one SDPA call each; the step's backward calls none) x (1 warm-up + 2 rounds of 2 calls)
    assert len(seen) == 3 * 3 * 5
    assert all(d == host_overhead.TINY["D"] and not view for d, view in seen)
    tiny = host_overhead.cases("cpu", **host_overhead.TINY)
    with host_overhead.stubs(), host_overhead._sdpa_for("sdpa_real", real):
        out = host_overhead._tiny_paths(*tiny["runs"])["sdpa_real"]()
    assert F.scaled_dot_product_attention is spy
    torch.testing.assert_close(out, sdpa_rmt_attention(*tiny["runs"]), rtol=0, atol=0)


def test_the_same_shape_comparison_runs_the_triton_path_at_the_tiny_shape(monkeypatch):
    """``triton_tiny*`` call rmt_attention (its kernels stubbed) on the same tiny problem as the real SDPA op, a
    head dim the Triton path takes; the full-shape ``triton*`` paths on the case itself."""
    seen = []
    real = host_overhead.ra.rmt_attention

    def spy(q, k, v, layout, **kw):
        seen.append((tuple(q.shape), q.requires_grad))
        return real(q, k, v, layout, **kw)

    monkeypatch.setattr(host_overhead.ra, "rmt_attention", spy)
    tiny = host_overhead.cases("cpu", **host_overhead.TINY)["counts"]
    full = host_overhead.cases("cpu")["counts"]
    assert host_overhead.TINY["D"] >= ta._MIN_HEAD_DIM
    with host_overhead.stubs():
        for name, fn in host_overhead._tiny_paths(*tiny).items():
            if name.startswith("triton_tiny"):
                with torch.no_grad() if name == "triton_tiny" else contextlib.nullcontext():
                    fn()
        host_overhead._paths(*full)["triton_grad"]()
    assert seen == [(tuple(tiny[0].shape), False), (tuple(tiny[0].shape), True), (tuple(tiny[0].shape), True)] + [
        (tuple(full[0].shape), True)
    ]


def test_sdpa_per_layer_calls_get_the_segments_mask_built_once(monkeypatch):
    """The SDPA path's per-layer calls are timed as the runtime makes them: with the segment's mask built once
    beforehand (``ActiveSegment.dense_mask``, SDPA's additive form), so no per-layer call builds a mask; building it
    is its own path, ``sdpa_mask_once_per_segment``. The full case needs none."""
    built = []
    real_dense = SegmentLayout.dense_mask
    monkeypatch.setattr(SegmentLayout, "dense_mask", lambda self, **kw: built.append(1) or real_dense(self, **kw))
    masks = []
    real_sdpa = F.scaled_dot_product_attention
    with host_overhead.stubs():
        stub = F.scaled_dot_product_attention
        # not monkeypatch: its teardown would put back the stub, which ``stubs`` replaces with the real op on exit
        F.scaled_dot_product_attention = lambda *a, **kw: masks.append(kw["attn_mask"]) or stub(*a, **kw)
        try:
            _check_masks(masks, built)
        finally:
            F.scaled_dot_product_attention = stub
    assert F.scaled_dot_product_attention is real_sdpa


def _check_masks(masks: list, built: list) -> None:
    for case, (q, k, v, layout) in host_overhead.cases("cpu").items():
        built.clear()
        masks.clear()
        paths = host_overhead._paths(q, k, v, layout)
        assert len(built) == (0 if case == "full" else 1), case  # _paths builds it once
        for path in ("sdpa", "sdpa_grad", "sdpa_step"):
            with host_overhead._grad_ctx(path):
                paths[path]()
        assert len(built) == (0 if case == "full" else 1), case  # and no per-layer call builds another
        assert len(masks) == 3 and all(m is masks[0] for m in masks), case
        if case == "full":
            assert masks[0] is None and paths["sdpa_mask_once_per_segment"]() is None
            continue
        assert masks[0].dtype == q.dtype  # the additive form
        torch.testing.assert_close(paths["sdpa_mask_once_per_segment"](), masks[0], rtol=0, atol=0)
        assert len(built) == 2


def test_stub_timings_run_on_one_intra_op_thread():
    """Process CPU time charges every thread to the timed path: the stubs time with one intra-op thread and
    restore the count after."""
    before = torch.get_num_threads()
    seen = []

    class Timed:
        median_s = cpu_s = 1e-6

    def timer(fn, **kw):
        seen.append(torch.get_num_threads())
        return Timed()

    torch.set_num_threads(2)
    try:
        host_overhead.measure_stub(timer, n=1, repeats=1)
        host_overhead.interleaved_cpu_us({"x": lambda: seen.append(torch.get_num_threads())}, 1, 1, 0, lambda k: 1)
        assert seen and set(seen) == {1} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_summary_compares_with_both_sdpa_baselines():
    rows = [
        {"mode": "stub", "case": "full", "path": path, "host_us": 99.0, "cpu_us": us}
        for path, us in {
            "triton": 5.0,
            "sdpa": 3.0,
            "sdpa_real": 6.0,
            "triton_grad": 7.7,
            "sdpa_grad": 4.3,
            "sdpa_real_grad": 7.7,
            "triton_step": 39.8,
            "sdpa_step": 20.0,
            "sdpa_real_step": 32.6,
            "triton_tiny": 99.0,  # the same-shape comparison: the tiny Triton path against the real op
            "triton_tiny_grad": 7.7,
            "triton_tiny_step": 30.0,
        }.items()
    ]
    rows += [
        {"mode": "cuda", "case": "full", "path": path, "host_us": us, "device_us": 1.0}
        for path, us in {"triton_grad": 20.0, "sdpa_grad": 30.0}.items()
    ]
    by = {(s["mode"], s["call"]): s for s in host_overhead.summarize(rows)}
    assert [(s["sdpa_us"], s["at_or_below_sdpa"]) for s in by.values()] == [
        (3.0, False),
        (4.3, False),
        (20.0, False),
        (30.0, True),
    ]
    assert [(s["sdpa_real_us"], s["triton_tiny_us"], s["at_or_below_real_sdpa"]) for s in by.values()] == [
        (6.0, 99.0, False),  # the full-shape Triton time (5.0) is not the one compared
        (7.7, 7.7, True),  # equal counts as at or below
        (32.6, 30.0, True),  # 39.8 at the full shape
        (None, None, None),  # cuda: its SDPA is the real op, no sdpa_real path
    ]
    assert by[("stub", "step")]["diff_us"] == 19.8


class _Recorder:
    """A kernel stand-in that records each launch: (positional args, grid, keyword args)."""

    def __init__(self):
        self.launches = []

    def run(self, *args, grid, warmup, **kw):
        self.launches.append((args, grid, kw))


def _record(*names):
    recs = {name: _Recorder() for name in names}
    for name, rec in recs.items():
        setattr(ta, name, rec)  # restored by the stubs context
    return recs


def test_shape_plan_is_cached_per_shape_key_and_reads_strides_per_call(compiled_path):
    rec = _record("_rmt_attn_fwd_kernel")["_rmt_attn_fwd_kernel"]
    B, H, T, D = 2, 4, 20, 32
    layout = SegmentLayout(2, 16, 2, True)
    q, k, v = _qkv(B, H, T, D)
    ta.rmt_attention(q, k, v, layout, check=False)
    assert len(lc.cache_snapshot().shape_plans) == 1
    plan = next(iter(lc.cache_snapshot().shape_plans.values()))
    qt = torch.randn(B, T, H, D).transpose(1, 2)  # same shape, other strides: the same plan
    ta.rmt_attention(qt, k, v, layout, check=False)
    assert list(lc.cache_snapshot().shape_plans.values()) == [plan] and plan.bwd is None
    (a0, g0, kw0), (a1, g1, kw1) = rec.launches
    assert a0[7:11] == q.stride() and a1[7:11] == qt.stride() and a1[11:19] == (*k.stride(), *v.stride())
    assert kw0 == kw1 and g0 == g1 == (-(-T // kw0["BLOCK_M"]), B * H)
    out = a1[3]
    assert tuple(out.shape) == (B, T, H, D) and a1[19:23] == out.stride()
    assert a1[23:] == (H, 1, T, T, D, 2, 16, D**-0.5 * ta._LOG2E, 0.0, 0)
    ta.rmt_attention(q[:1], k[:1], v[:1], layout, check=False)  # another shape: another plan
    assert len(lc.cache_snapshot().shape_plans) == 2 and rec.launches[-1][1] == (-(-T // kw0["BLOCK_M"]), H)


@pytest.mark.parametrize("change", ["dropout", "causal", "counts", "starts", "scale", "tf32", "dtype", "num_read"])
def test_every_input_of_the_plan_is_in_its_key(compiled_path, change):
    rec = _record("_rmt_attn_fwd_kernel")["_rmt_attn_fwd_kernel"]
    q, k, v = _qkv()
    base = dict(num_read=2, num_tokens=16, num_write=2, causal=True)
    ta.rmt_attention(q, k, v, SegmentLayout(**base), check=False)
    counts, starts = torch.tensor([3, 16]), torch.tensor([1, 0])
    kw, layout = {}, dict(base)
    if change == "dropout":
        kw = dict(dropout_p=0.5, seed=7)
    elif change == "causal":
        layout["causal"] = False
    elif change == "counts":
        layout["token_counts"] = counts
    elif change == "starts":
        layout.update(token_counts=counts, token_starts=starts)
    elif change == "scale":
        kw = dict(scale=0.5)
    elif change == "tf32":
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = not tf32
    elif change == "dtype":
        q, k, v = q.half(), k.half(), v.half()
    elif change == "num_read":
        layout.update(num_read=1, num_write=3)
    try:
        ta.rmt_attention(q, k, v, SegmentLayout(**layout), check=False, **kw)
    finally:
        if change == "tf32":
            torch.backends.cuda.matmul.allow_tf32 = tf32
    assert len(lc.cache_snapshot().shape_plans) == 2
    (a0, _, k0), (a1, _, k1) = rec.launches
    assert (a0[23:], k0) != (a1[23:], k1)  # what the launch gets differs as the change requires
    if change in ("dropout", "causal", "counts", "starts"):
        flag = {"dropout": "DROPOUT", "causal": "CAUSAL", "counts": "PADDED", "starts": "HAS_STARTS"}[change]
        assert k0[flag] is False and k1[flag] is True or k0[flag] is True and k1[flag] is False
    if change == "tf32":
        assert {k0["DOT_PREC"], k1["DOT_PREC"]} == {"ieee", "tf32"}


def test_backward_launches_are_planned_once_per_shape(compiled_path):
    recs = _record("_rmt_attn_bwd_preprocess_kernel", "_rmt_attn_bwd_dq_kernel", "_rmt_attn_bwd_dkdv_kernel")
    B, Hq, Hkv, T, D = 2, 4, 2, 20, 32
    q = torch.randn(B, Hq, T, D, requires_grad=True)
    k, v = (torch.randn(B, Hkv, T, D, requires_grad=True) for _ in range(2))
    layout = SegmentLayout(2, 16, 2, True)
    for _ in range(2):
        out = ta.rmt_attention(q, k, v, layout, check=False)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    shape_plans = lc.cache_snapshot().shape_plans
    plan = next(iter(shape_plans.values()))
    assert plan.bwd is not None and len(shape_plans) == 1
    pre, dq_rec, dkdv_rec = recs.values()
    # the default dQ variant ("inline") stores delta itself: no preprocess launch
    assert lc.launch_config("dq", D, q.dtype).variant == "inline"
    assert [len(r.launches) for r in recs.values()] == [0, 2, 2]
    for r, block, heads in ((dq_rec, "BLOCK_M", Hq), (dkdv_rec, "BLOCK_N", Hkv)):
        assert r.launches[0][1] == r.launches[1][1] == (-(-T // r.launches[0][2][block]), B * heads)
    # the gradients' strides are the plan's, and are what the launches got
    (a, _, _), (b, _, _) = dq_rec.launches[1], dkdv_rec.launches[1]
    # dQ: 10 pointers (q k v do dq lse delta out starts counts), the strides of q k v do, then dq's, out's, the tail;
    # dK/dV: 12 pointers (... out dq starts counts), q k v do, then dk's, dv's, out's and dq's strides, the tail
    assert a[4] is not None and a[26:30] == dq.stride() == (T * Hq * D, D, Hq * D, 1)
    assert b[28:36] == (*dk.stride(), *dv.stride()) and dk.stride() == (T * Hkv * D, D, Hkv * D, 1)
    assert a[34:] == (Hq, Hq // Hkv, T, T, D, 2, 16, D**-0.5 * ta._LOG2E, D**-0.5, 0.0, 0)
    assert b[44:] == (Hq, Hkv, Hq // Hkv, T, T, D, 2, 16, D**-0.5 * ta._LOG2E, D**-0.5, 0.0, 0)
    assert tuple(dq.shape) == tuple(q.shape) and tuple(dk.shape) == tuple(k.shape)


def test_grad_call_uses_the_c_apply_and_falls_back_under_functorch(compiled_path, monkeypatch):
    q, k, v = (t.requires_grad_() for t in _qkv())
    layout = SegmentLayout(2, 16, 2, True)
    calls = []
    monkeypatch.setattr(ta._RmtAttentionFn, "apply", lambda *a: calls.append("python") or ta._APPLY(*a))
    out = ta.rmt_attention(q, k, v, layout, check=False)
    assert out.grad_fn is not None and type(out.grad_fn).__name__ == "_RmtAttentionFnBackward" and not calls
    monkeypatch.setattr(torch._C, "_are_functorch_transforms_active", lambda: True)
    ta.rmt_attention(q, k, v, layout, check=False)
    assert calls == ["python"]


def test_shape_plan_cache_is_bounded(compiled_path, monkeypatch):
    monkeypatch.setattr(lc, "MAX_SHAPE_PLANS", 3)
    k, v = (torch.randn(1, 2, 20, 16) for _ in range(2))
    layout = SegmentLayout(2, 16, 2, True)
    for tq in range(1, 8):  # a decode-like loop: a new query length each call
        ta.rmt_attention(torch.randn(1, 2, tq, 16), k, v, layout, check=False)
        assert 1 <= len(lc.cache_snapshot().shape_plans) <= 3


def _meta(x):
    """A launch argument with its tensors by (shape, strides, dtype, device): what the plan's allocators fix."""
    if isinstance(x, torch.Tensor):
        return ("tensor", tuple(x.shape), x.stride(), x.dtype, x.device)
    return x


@pytest.mark.parametrize("variants", [("fa2", "fa2"), ("inline", "fa2"), ("fa2", "inline"), ("fa2", "fused")])
@pytest.mark.parametrize("need", ["all", "q", "kv"])
def test_plan_allocated_buffers_are_what_empty_gives(compiled_path, monkeypatch, variants, need):
    """A cached plan allocates its buffers itself (empty_like of a template, new_empty_strided, empty_like of
    lse and dK); every launch gets the same arguments as through :func:`_empty` and a transpose, but for the
    buffers' addresses; and a plan built while ``_empty`` is patched allocates through it."""
    names = ("_rmt_attn_fwd_kernel", "_rmt_attn_bwd_preprocess_kernel", "_rmt_attn_bwd_dq_kernel")
    recs = _record(*names, "_rmt_attn_bwd_dkdv_kernel")
    B, Hq, Hkv, Tq, Tk, D = 2, 4, 2, 12, 20, 32
    q = torch.randn(B, Tq, Hq, D, dtype=torch.float16).transpose(1, 2).requires_grad_(need in ("all", "q"))
    k, v = (torch.randn(B, Hkv, Tk, D, dtype=torch.float16).requires_grad_(need != "q") for _ in range(2))
    layout = SegmentLayout(2, 16, 2, True, token_counts=torch.tensor([3, 16]))
    dq_cfg, dkdv_cfg = (16, 16, 4, 1, variants[0]), (16, 16, 4, 1, variants[1])
    lc.set_launch_configs({("dq", D, torch.float16): dq_cfg, ("dkdv", D, torch.float16): dkdv_cfg})
    allocated = []

    def counting_empty(shape, dtype, device):
        allocated.append(tuple(shape))
        return torch.empty(shape, dtype=dtype, device=device)

    try:
        launches = []
        for hooked in (False, True):
            lc.clear_launch_cache()
            if hooked:
                monkeypatch.setattr(ta, "_empty", counting_empty)
            for _ in range(2):  # the plan's first call, then a cached one
                out = ta.rmt_attention(q, k, v, layout, check=False)
                grads = torch.autograd.grad(out, [t for t in (q, k, v) if t.requires_grad], torch.ones_like(out))
                assert all(g.shape == t.shape for g, t in zip(grads, [t for t in (q, k, v) if t.requires_grad]))
            plan = next(iter(lc.cache_snapshot().shape_plans.values()))
            assert (plan.hook is not None) == hooked
            launches.append({n: [tuple(map(_meta, a)) + (g, kw) for a, g, kw in r.launches] for n, r in recs.items()})
            for r in recs.values():
                r.launches.clear()
        assert launches[0] == launches[1] and sum(map(len, launches[0].values())) >= 4
        assert allocated  # the hooked plan went through _empty
    finally:
        lc.set_launch_configs(None)
