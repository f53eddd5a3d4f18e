"""The fast launch (kernels/fast_launch.py) makes exactly the low-level launch call that Triton's own
``JITFunction.run`` makes for the same arguments, and hands every call it cannot vouch for back to ``run``.

Triton's real ``run`` runs here on the CPU: the kernels are fresh ``JITFunction``s of the real kernels' Python
(``host_overhead.jit_copy``), a fake driver answers device 0 / stream 0 / sm_90, and the fake compiled kernel's
low-level launcher records its arguments."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")
from triton import knobs  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from rmt_fast.bench import host_overhead  # noqa: E402
from rmt_fast.kernels import fast_launch  # noqa: E402
from rmt_fast.kernels import launch_configs as lc  # noqa: E402
from rmt_fast.kernels import triton_attention as ta  # noqa: E402
from rmt_fast.kernels.layout import SegmentLayout  # noqa: E402

pytestmark = pytest.mark.skipif(not fast_launch.ENABLED, reason="a Triton version whose run was not read")


def _canon(x):
    """A launcher argument in a comparable form: a tensor by (pointer, dtype), a LazyDict by its content."""
    if isinstance(x, torch.Tensor):
        return ("tensor", x.data_ptr(), x.dtype)
    if type(x).__name__ == "LazyDict":
        return ("LazyDict", dict(x.data), list(x.extras))
    return x


def _idle(hook) -> bool:
    return hook is None or (type(hook).__name__ == "HookChain" and not hook.calls)


class Recorder:
    """The low-level launcher: records each call's arguments (:func:`_canon`). Where both launch hooks are idle
    (None, or Triton 3.9's default: an empty hook chain, which calls nothing), the launch metadata (read by hooks
    only) and the hooks are recorded as None: what a call with idle hooks does does not depend on them."""

    def __init__(self):
        self.calls = []

    def __call__(self, *args):
        if _idle(args[7]) and _idle(args[8]):
            args = (*args[:6], None, None, None, *args[9:])
        self.calls.append(tuple(_canon(a) for a in args))

    def take(self) -> list:
        calls, self.calls = self.calls, []
        return calls


@pytest.fixture
def rig(monkeypatch):
    """Compiled-path caching, Triton's run counted, stub kernels recording their low-level launches, buffers
    the launchers allocate kept per shape (so that two calls launch on the same pointers)."""
    runs = []
    real_run = JITFunction.run

    def counting_run(self, *args, **kwargs):
        runs.append(self.fn.__name__)
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(JITFunction, "run", counting_run)  # before any plan: _Launch.jit compares with it
    buffers = {}

    def empty(shape, dtype, device):
        key = (tuple(shape), dtype)
        if key not in buffers:
            buffers[key] = torch.zeros(shape, dtype=dtype, device=device)
        return buffers[key]

    monkeypatch.setattr(ta, "_empty", empty)
    rec = Recorder()
    with lc.interpreter_mode(False), host_overhead.stubs("triton", launcher=rec):
        yield rec, runs


def _view(shape, dtype, order: str, offset: int, pad: int) -> torch.Tensor:
    """A (B, H, T, D) tensor over a buffer laid out as ``order`` ("bhtd" or "bthd"), starting ``offset`` elements
    in (breaking 16-byte alignment when odd) and with ``pad`` extra elements per row of D (odd strides)."""
    B, H, T, D = shape
    outer = (B, H, T) if order == "bhtd" else (B, T, H)
    full = torch.zeros(offset + B * H * T * (D + pad), dtype=dtype)
    x = full[offset:].view(*outer, D + pad)[..., :D]
    return x if order == "bhtd" else x.transpose(1, 2)


_GRADS = {}


def _step(q, k, v, layout, seed, dropout_p):
    out = ta.rmt_attention(q, k, v, layout, check=False, seed=seed, dropout_p=dropout_p)
    g = _GRADS.setdefault((out.shape, out.dtype), torch.ones_like(out))  # one dO per shape: the same pointer
    torch.autograd.grad(out, (q, k, v), g)


layouts = st.fixed_dictionaries(
    {
        "orders": st.tuples(*[st.sampled_from(["bhtd", "bthd"])] * 3),
        "offsets": st.tuples(*[st.sampled_from([0, 0, 1, 8])] * 3),
        "pads": st.tuples(*[st.sampled_from([0, 0, 1, 15])] * 3),
        "seed": st.sampled_from([0, 1, 16, 12345, 2**31 - 1, 2**31, 2**40]),
    }
)
cases = st.fixed_dictionaries(
    {
        "B": st.integers(1, 2),
        "H": st.sampled_from([1, 2, 3]),
        "D": st.sampled_from([16, 32]),
        "T": st.integers(1, 40),
        "dtype": st.sampled_from([torch.float16, torch.float32]),
        "runs": st.sampled_from(["none", "counts", "starts"]),
        "dropout": st.booleans(),
        "first": layouts,
        "change": st.sampled_from(["none", "orders", "offsets", "pads", "seed"]),
        "which": st.integers(0, 2),
        "order": st.sampled_from(["bhtd", "bthd"]),
        "offset": st.sampled_from([0, 1, 8]),
        "pad": st.sampled_from([0, 1, 15]),
        "seed": st.sampled_from([3, 2**31 - 1, 2**31, 2**40]),
    }
)


def _then(case) -> dict:
    """The second call's layout: the first one with one thing changed (or none)."""
    then = dict(case["first"])
    change = case["change"]
    if change == "seed":
        then["seed"] = case["seed"]
    elif change != "none":
        values = list(then[change])
        values[case["which"]] = case[change[:-1]]
        then[change] = tuple(values)
    return then


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)  # the test clears what it relies on
@given(case=cases)
def test_fast_launch_makes_the_call_triton_run_makes(rig, case):
    """A first call (through run) builds the fast launches; a second call, of the same shapes but other strides,
    alignments and seed, launches through them where its arguments specialise alike and through run where
    not: the low-level calls equal those of the same call made through run alone."""
    rec, runs = rig
    B, H, D, T = case["B"], case["H"], case["D"], case["T"]
    m = 1 if T > 2 else 0
    counts = torch.tensor([T - 2 * m, max(T - 2 * m - 3, 0)][:B], dtype=torch.int32)
    starts = torch.tensor([min(1, T - 2 * m), 0][:B], dtype=torch.int32)
    layout = SegmentLayout(
        m,
        T - 2 * m,
        m,
        True,
        token_counts=None if case["runs"] == "none" else counts,
        token_starts=starts if case["runs"] == "starts" else None,
    )
    dropout_p = 0.25 if case["dropout"] else 0.0
    qkv, case["then"] = {}, _then(case)
    for name in ("first", "then"):
        c = case[name]
        qkv[name] = [
            _view((B, H, T, D), case["dtype"], o, off, pad).requires_grad_()
            for o, off, pad in zip(c["orders"], c["offsets"], c["pads"])
        ]
    lc.clear_launch_cache()
    _step(*qkv["first"], layout, case["first"]["seed"], dropout_p)  # through run; builds the fast launches
    plan = next(iter(lc.cache_snapshot().shape_plans.values()))
    assert set(plan.fast) >= {"fwd", "dq", "dkdv"} and all(f is not None for f in plan.fast.values())
    assert plan.groups == {}  # a group is made from launches that were all fast
    rec.take()
    runs.clear()
    _step(*qkv["then"], layout, case["then"]["seed"], dropout_p)
    fast, fast_runs = rec.take(), list(runs)
    same = case["then"] == case["first"] and (case["dropout"] or case["first"]["seed"] == case["then"]["seed"])
    if same:
        assert fast_runs == [], "the same specialisation should launch through the fast path only"
    _step(*qkv["then"], layout, case["then"]["seed"], dropout_p)  # through the groups the last call made
    grouped, grouped_runs = rec.take(), list(runs)
    aligned = all(off * qkv["first"][0].element_size() % 16 == 0 for off in case["first"]["offsets"])
    if same and aligned:  # a group holds aligned calls only (one OR of the pointers checks them)
        assert set(plan.groups) == {"fwd", (True, True)} and grouped_runs == fast_runs == []
    _through_run(plan)  # and again, through Triton's run alone (same kernels, same buffers)
    runs.clear()
    _step(*qkv["then"], layout, case["then"]["seed"], dropout_p)
    assert len(runs) == len(fast) >= 3
    assert rec.take() == fast == grouped


def _through_run(plan) -> None:
    """Forget ``plan``'s fast launches and groups: its next launches go through Triton's run."""
    plan.fast.clear()
    plan.groups.clear()


def _setup(rig, dtype=torch.float16, seed=7):
    rec, runs = rig
    q, k, v = (torch.randn(2, 2, 40, 32, dtype=dtype).requires_grad_() for _ in range(3))
    layout = SegmentLayout(2, 36, 2, True)
    lc.clear_launch_cache()
    _step(q, k, v, layout, seed, 0.0)
    rec.take()
    runs.clear()
    return rec, runs, (q, k, v, layout)


def _grouped_setup(rig):
    """``_setup`` and a second step: every launch fast, so the plan holds its forward and backward groups."""
    rec, runs, (q, k, v, layout) = _setup(rig)
    _step(q, k, v, layout, 7, 0.0)
    plan = next(iter(lc.cache_snapshot().shape_plans.values()))
    assert set(plan.groups) == {"fwd", (True, True)} and runs == []
    rec.take()
    return rec, runs, (q, k, v, layout), plan


def _bwd_runs(runs) -> list:
    return sorted(name for name in runs if "bwd" in name)


def _fast_then_run(rec, runs, call):
    """(calls launched by ``call``, the Triton runs among them)."""
    call()
    return rec.take(), [runs.pop() for _ in range(len(runs))]


def test_a_changed_specialisation_falls_back_to_run_and_matches(rig):
    rec, runs, (q, k, v, layout) = _setup(rig)
    cases = {
        "misaligned q": (_view(q.shape, q.dtype, "bhtd", 1, 0), k, v),
        "odd strides": (q, _view(k.shape, k.dtype, "bthd", 0, 1), v),
        "stride 1 becomes 16": (
            q,
            k,
            _view(v.shape, v.dtype, "bhtd", 0, 0).transpose(2, 3).contiguous().transpose(2, 3),
        ),
    }
    for name, qkv in cases.items():

        def call(qkv=qkv):
            return ta.rmt_attention(*(t.detach() for t in qkv), layout, check=False)

        calls, ran = _fast_then_run(rec, runs, call)
        assert ran == ["_rmt_attn_fwd_kernel"], name  # not the fast launch of the other specialisation
        plan = next(iter(lc.cache_snapshot().shape_plans.values()))
        _through_run(plan)
        again, _ = _fast_then_run(rec, runs, call)
        assert calls == again, name
        _fast_then_run(rec, runs, lambda: ta.rmt_attention(q.detach(), k.detach(), v.detach(), layout, check=False))
    # the dtype of a tensor the plan's key does not hold: token_counts int32, then int64
    for dtype, through_run in ((torch.int32, True), (torch.int32, False), (torch.int64, True), (torch.int64, False)):
        padded = SegmentLayout(2, 36, 2, True, token_counts=torch.tensor([5, 36], dtype=dtype))
        _, ran = _fast_then_run(rec, runs, lambda padded=padded: ta.rmt_attention(q, k, v, padded, check=False))
        assert ran == (["_rmt_attn_fwd_kernel"] if through_run else []), dtype
    # the seed's range only: 2**31 takes an i64 argument, 12345 and 1 specialise as 7 did (do_not_specialize).
    # The fast launch rebuilt at 2**31 refuses 7; the group made at 12345 (an i32 seed) still takes it.
    steps = [(7, True), (12345, False), (1, False), (2**31, True), (7, False), (2**31 - 1, False)]
    steps += [(2**31, False), ("forget groups", None), (7, True)]
    # the i32 range's lower end: a group made at 7 takes -2**31, not -2**31 - 1 (an i64 argument)
    steps += [(7, False), (-(2**31), False), (-(2**31) - 1, True)]
    for seed, through_run in steps:
        if seed == "forget groups":
            next(iter(lc.cache_snapshot().shape_plans.values())).groups.clear()
            continue
        _, ran = _fast_then_run(
            rec, runs, lambda seed=seed: ta.rmt_attention(q, k, v, layout, check=False, seed=seed, dropout_p=0.5)
        )
        assert ran == (["_rmt_attn_fwd_kernel"] if through_run else []), seed


def test_no_group_is_made_at_a_misaligned_call(rig):
    """The signature holds one flag for the alignment of all pointers: a group made where q is misaligned would
    take a call where k is instead, whose launch specialises otherwise. No group is made there."""
    rec, runs, (q, k, v, layout) = _setup(rig)
    q_off = _view(q.shape, q.dtype, "bhtd", 1, 0).requires_grad_()
    for _ in range(3):  # through run, then the fast launches rebuilt at this specialisation
        _step(q_off, k, v, layout, 7, 0.0)
    plan = next(iter(lc.cache_snapshot().shape_plans.values()))
    assert plan.groups == {}
    k_off = _view(k.shape, k.dtype, "bhtd", 1, 0).requires_grad_()
    _, ran = _fast_then_run(rec, runs, lambda: _step(q, k_off, v, layout, 7, 0.0))
    assert "_rmt_attn_fwd_kernel" in ran


def test_the_same_specialisation_stays_on_the_fast_path(rig):
    rec, runs, (q, k, v, layout) = _setup(rig)
    q2 = torch.randn_like(q)  # other data and pointers, the same dtype, alignment and strides
    _, ran = _fast_then_run(rec, runs, lambda: _step(q2.requires_grad_(), k, v, layout, 8, 0.0))
    assert ran == []


_ENV_CHANGES = ["debug", "instrumentation", "enter hook", "hook function", "hook added", "pre-run hook", "driver"]


@pytest.mark.parametrize("change", [*_ENV_CHANGES, "device"])
def test_option_hook_and_device_changes_fall_back_to_run(rig, monkeypatch, change):
    """With the plan's fast launches and groups made, a change of what Triton's run reads besides the arguments
    sends the call to run (the group's environment check, then the fast launch's own, give up)."""
    rec, runs, (q, k, v, layout), plan = _grouped_setup(rig)

    def call():
        return ta.rmt_attention(q.detach(), k.detach(), v.detach(), layout, check=False)

    if change == "debug":
        monkeypatch.setattr(knobs.runtime, "debug", True)
    elif change == "instrumentation":
        monkeypatch.setattr(knobs.compilation, "instrumentation_mode", "consan")
    elif change == "enter hook":
        monkeypatch.setattr(knobs.runtime, "launch_enter_hook", None)  # launch metadata then None
    elif change == "hook function":  # a hook in place of the chain: it gets the launch metadata
        monkeypatch.setattr(knobs.runtime, "launch_enter_hook", _a_hook)
    elif change == "hook added":  # a hook in the chain (Triton 3.9; on 3.6 the default hook is None)
        chain = knobs.runtime.launch_exit_hook
        if chain is None:
            pytest.skip("no hook chain in this Triton")
        monkeypatch.setattr(chain, "calls", [_a_hook])  # the chain's own list is restored afterwards
    elif change == "pre-run hook":
        monkeypatch.setattr(ta._rmt_attn_fwd_kernel, "pre_run_hooks", [lambda *a, **k: None])
    elif change == "driver":
        monkeypatch.setattr(driver, "_active", host_overhead.FakeDriver())
    elif change == "device":
        monkeypatch.setattr(host_overhead.FakeDriver, "get_current_device", lambda self: 1)
    calls, ran = _fast_then_run(rec, runs, call)
    if change == "enter hook":  # nothing in the cache key: the fast launch passes None metadata as run does
        assert ran == [] and calls[0][6] is None and calls[0][7] is None
        return
    if change.startswith("hook"):  # nothing in the cache key: the fast launch passes the hook its metadata
        plan.groups.clear()
        plan.fast.clear()
        again, _ = _fast_then_run(rec, runs, call)
        assert ran == [] and calls == again and calls[0][6][0] == "LazyDict", calls[0][6:9]
        return
    assert ran == ["_rmt_attn_fwd_kernel"]


def _a_hook(metadata) -> None:
    return None


@pytest.mark.parametrize("mode", ["", "fpsan"])
def test_the_fp_sanitizer_flag_counts_under_an_instrumentation_mode_only(rig, monkeypatch, mode):
    """Triton 3.9's ``fpsan_homomorphic_casts`` reaches the compiled code only through a sanitizing instrumentation
    mode: with none, a change of it keeps the fast path (the check skips its environment look-up); under one, the
    call goes to run."""
    if not hasattr(knobs.compilation, "fpsan_homomorphic_casts"):
        pytest.skip("no fp-sanitizer flag in this Triton")
    monkeypatch.setattr(knobs.compilation, "instrumentation_mode", mode)
    rec, runs, (q, k, v, layout), plan = _grouped_setup(rig)
    monkeypatch.setenv("TRITON_FPSAN_HOMOMORPHIC_CASTS", "1")
    call = lambda: ta.rmt_attention(q.detach(), k.detach(), v.detach(), layout, check=False)  # noqa: E731
    _, ran = _fast_then_run(rec, runs, call)
    assert ran == ([] if mode == "" else ["_rmt_attn_fwd_kernel"])


def test_a_failing_fast_launch_setup_or_check_never_fails_the_call(rig):
    rec, runs, (q, k, v, layout) = _setup(rig)

    def broken(*args):
        raise RuntimeError("planted")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fast_launch, "_build", broken)
        lc.clear_launch_cache()
        for _ in range(2):
            calls, ran = _fast_then_run(rec, runs, lambda: ta.rmt_attention(q, k, v, layout, check=False))
            assert ran == ["_rmt_attn_fwd_kernel"] and len(calls) == 1
        plan = next(iter(lc.cache_snapshot().shape_plans.values()))
        assert plan.fast == {"fwd": None}
    rec, runs, (q, k, v, layout) = _setup(rig)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(host_overhead.FakeDriver, "get_current_stream", broken)  # raises inside the fast check
        with pytest.raises(RuntimeError, match="planted"):  # then run asks the driver too: its error propagates
            ta.rmt_attention(q, k, v, layout, check=False)
    assert runs == ["_rmt_attn_fwd_kernel"]  # the fast check gave up, run was called (and raised)


def test_only_verified_triton_versions():
    assert fast_launch.supported("3.6.0") and fast_launch.supported("3.9.0")
    assert not fast_launch.supported("3.5.1") and not fast_launch.supported("3.10.0")


def test_stand_in_kernels_and_uncached_plans_get_no_fast_launch(rig):
    rec, runs, (q, k, v, layout) = _setup(rig)
    with lc.override_configs(fwd=(16, 16, 4, 1)):  # a fresh, uncached plan per call
        for _ in range(2):
            _, ran = _fast_then_run(rec, runs, lambda: ta.rmt_attention(q, k, v, layout, check=False))
            assert ran == ["_rmt_attn_fwd_kernel"]
    assert fast_launch.build(host_overhead._StubKernel(ta._rmt_attn_fwd_kernel), object(), (1, 1), (), {}) is None


def test_the_gradient_reaching_the_backward_launches_has_the_plans_dtype(rig):
    """The backward's fast launches trust dO's dtype (``_trusted``'s typed positions): autograd casts a gradient
    of another dtype to the output's before the node runs. A float32 dO for a float16 output reaches every
    backward launch as float16, and the fast path makes the calls ``run`` makes."""
    rec, runs, (q, k, v, layout) = _setup(rig)
    out = ta.rmt_attention(q, k, v, layout, check=False)
    torch.autograd.grad(out, (q, k, v), torch.ones_like(out, dtype=torch.float32))
    fast, ran = rec.take(), list(runs)
    assert ran == [] and len(fast) == 3  # forward, dQ (storing delta: the "inline" default), dK/dV: all fast
    positions = (None, 9 + 3, 9 + 3)  # dO: the 4th launch argument of dQ and of dK/dV

    def cast_fresh(calls):  # the cast dO is a fresh buffer at each backward: compare it by dtype
        return [c if p is None else (*c[:p], c[p][2], *c[p + 1 :]) for c, p in zip(calls, positions)]

    assert all(c[p][2] is torch.float16 for c, p in zip(fast[1:], positions[1:]))
    plan = next(iter(lc.cache_snapshot().shape_plans.values()))
    out = ta.rmt_attention(q, k, v, layout, check=False)  # again, through the groups
    torch.autograd.grad(out, (q, k, v), torch.ones_like(out, dtype=torch.float32))
    assert set(plan.groups) == {"fwd", (True, True)} and runs == []
    grouped = rec.take()
    assert all(c[p][2] is torch.float16 for c, p in zip(grouped[1:], positions[1:]))
    _through_run(plan)
    out = ta.rmt_attention(q, k, v, layout, check=False)
    torch.autograd.grad(out, (q, k, v), torch.ones_like(out, dtype=torch.float32))
    assert len(runs) == 3 and cast_fresh(rec.take()) == cast_fresh(fast) == cast_fresh(grouped)


@pytest.mark.parametrize(
    "value, kind",
    [
        (0, "i32"),
        (-(2**31), "i32"),
        (2**31 - 1, "i32"),
        (2**31, "i64"),
        (-(2**31) - 1, "i64"),
        (-(2**63), "i64"),
        (2**63 - 1, "i64"),
        (2**63, "u64"),
        (-(2**63) - 1, "u64"),
        (True, None),
        (1.0, None),
    ],
)
def test_int_range_matches_tritons_boundaries(value, kind):
    """Triton's int argument types by range (``native_specialize_impl``), at each boundary; not an int -> None."""
    assert fast_launch._int_range(value) == kind


def test_getter_returns_a_tuple_for_any_number_of_positions():
    args = ("a", "b", "c")
    assert fast_launch._getter([])(args) == ()
    assert fast_launch._getter([1])(args) == ("b",)
    assert fast_launch._getter([0, 2])(args) == ("a", "c")


def _first_build(rig, monkeypatch) -> tuple:
    """The arguments of the forward's first ``fast_launch.build`` call: (fn, kernel, grid, args, kwargs, trusted,
    typed)."""
    seen = []
    real_build = fast_launch.build

    def recording(fn, kernel, grid, args, kwargs, trusted=(), typed=()):
        seen.append((fn, kernel, grid, args, kwargs, tuple(trusted), tuple(typed)))
        return real_build(fn, kernel, grid, args, kwargs, trusted, typed)

    monkeypatch.setattr(fast_launch, "build", recording)
    _setup(rig)
    return seen[0]


class _Sub(torch.Tensor):
    pass


def test_build_gives_up_on_each_case_it_cannot_vouch_for(rig, monkeypatch):
    """One disqualifying input per guard of ``build``: each alone makes it return None (run launches instead)."""
    fn, kernel, grid, args, kwargs, trusted, typed = _first_build(rig, monkeypatch)
    assert fast_launch.build(fn, kernel, grid, args, kwargs, trusted, typed) is not None  # the unchanged call
    q = args[0]
    misaligned = _view(q.shape, q.dtype, "bhtd", 1, 0)
    cases = {
        "no kernel": dict(kernel=None),
        "callable grid": dict(grid=lambda meta: (1, 1)),
        "empty grid": dict(grid=()),
        "4-D grid": dict(grid=(1, 1, 1, 1)),
        "more args than parameters": dict(args=args + (0,) * (len(fn.params) - len(args) + 1)),
        "a parameter given twice": dict(kwargs={**kwargs, fn.params[0].name: 0}),
        "debug option": dict(kwargs={**kwargs, "debug": True}),
        "tensor subclass": dict(args=(q.as_subclass(_Sub), *args[1:])),
        "unsupported argument type": dict(args=(*args[:7], [1], *args[8:])),
        "trusted tensor misaligned": dict(args=(*args[:4], misaligned, *args[5:])),
        "do_not_specialize position trusted": dict(trusted=(*trusted, len(args) - 1)),
    }
    for name, change in cases.items():
        call = dict(kernel=kernel, grid=grid, args=args, kwargs=kwargs, trusted=trusted, typed=typed) | change
        built = fast_launch.build(
            fn, call["kernel"], call["grid"], call["args"], call["kwargs"], call["trusted"], call["typed"]
        )
        assert built is None, name
    # a pre-run hook, a launch_metadata function or a stages hook at build time
    for attr, value in (("pre_run_hooks", [lambda *a, **k: None]), ("launch_metadata", lambda *a: {})):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(fn, attr, value)
            assert fast_launch.build(fn, kernel, grid, args, kwargs, trusted, typed) is None, attr
    if hasattr(knobs.runtime, "add_stages_inspection_hook"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(knobs.runtime, "add_stages_inspection_hook", lambda: ("k", "h"))
            assert fast_launch.build(fn, kernel, grid, args, kwargs, trusted, typed) is None


def test_build_refuses_a_kernel_it_does_not_know_how_to_describe(rig, monkeypatch):
    """A compiled kernel whose class makes its own launch metadata, or one compiled from another function."""
    fn, kernel, grid, args, kwargs, trusted, typed = _first_build(rig, monkeypatch)

    class _OwnMetadata(type(kernel)):
        def launch_metadata(self, grid, stream, *args):
            return None

    other = object.__new__(_OwnMetadata)
    other.__dict__.update(kernel.__dict__)
    assert fast_launch.build(fn, other, grid, args, kwargs, trusted, typed) is None
    monkeypatch.setattr(kernel, "src", type("Src", (), {"fn": ta._rmt_attn_bwd_dq_kernel})())
    assert fast_launch.build(fn, kernel, grid, args, kwargs, trusted, typed) is None


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_a_fast_launch_passes_the_grid_as_three_dimensions(rig, monkeypatch, dims):
    """Triton's launcher takes three grid sizes: a 1-D or 2-D grid is padded with ones, as ``run`` pads it."""
    rec, runs = rig
    fn, kernel, grid, args, kwargs, trusted, typed = _first_build(rig, monkeypatch)
    grid = (5, 7, 3)[:dims]
    fast = fast_launch.build(fn, kernel, grid, args, kwargs, trusted, typed)
    rec.take()
    assert fast(args) is True
    assert rec.take()[0][:3] == ((5, 7, 3)[:dims] + (1, 1))[:3]


def test_a_fast_launch_checks_each_argument_kind(rig, monkeypatch):
    """The built launch refuses (returns False, launches nothing) a call whose one argument differs in a way the
    specialisation sees: a misaligned q, another dtype of token counts, a changed stride, a seed out of i32."""
    rec, runs = rig
    fn, kernel, grid, args, kwargs, trusted, typed = _first_build(rig, monkeypatch)
    fast = fast_launch.build(fn, kernel, grid, args, kwargs, trusted, typed)
    rec.take()
    assert fast(args) is True and len(rec.take()) == 1
    q = args[0]
    refused = {
        "misaligned q": (_view(q.shape, q.dtype, "bhtd", 1, 0), *args[1:]),
        "counts of another dtype": (
            *args[:6],
            args[6].to(torch.float32) if args[6].dtype != torch.float32 else args[6].half(),
            *args[7:],
        ),
        "a stride changed": (*args[:7], args[7] + 1, *args[8:]),
        "seed beyond i32": (*args[:-1], 2**31),
        "one argument fewer": args[:-1],
    }
    for name, changed in refused.items():
        assert fast(changed) is False and rec.take() == [], name


_SIGNATURE_CHANGES = [
    "q misaligned",
    "k misaligned",
    "v misaligned",
    "k strides",
    "v stride 1 is 16",
    "dO misaligned",
    "dO strides",
    "counts int64",
    "counts misaligned",
    "dropout_p",
    "seed i64",
    "seed i64 below",
    "out",
    "out misaligned",
]


@pytest.mark.parametrize("change", _SIGNATURE_CHANGES)
def test_a_group_launches_only_calls_of_the_signature_it_was_made_at(rig, change):
    """A group launches unchecked: a call whose signature differs in any part (q, k, v's alignment or strides,
    dO's, the token counts' dtype or alignment, dropout_p's value, the seed's integer range, a caller's ``out``)
    goes through the launches' own checks, here through Triton's run; and its calls are those of run alone."""
    rec, runs, (q, k, v, layout), plan = _grouped_setup(rig)
    kw = dict(check=False)
    g = torch.ones(2, 40, 2, 32, dtype=q.dtype)
    if change.endswith(" misaligned") and change[0] in "qkv":  # one element in: 2 bytes off 16
        new = _view(q.shape, q.dtype, "bhtd", 1, 0).requires_grad_()
        q, k, v = (new if name == change[0] else t for name, t in zip("qkv", (q, k, v)))
    elif change == "k strides":
        k = _view(k.shape, k.dtype, "bthd", 0, 1).requires_grad_()
    elif change == "v stride 1 is 16":
        v = _view(v.shape, v.dtype, "bhtd", 0, 0).transpose(2, 3).contiguous().transpose(2, 3).requires_grad_()
    elif change == "counts misaligned":
        layout = SegmentLayout(2, 36, 2, True, token_counts=torch.tensor([0, 5, 36], dtype=torch.int32)[1:])
        for _ in range(2):  # first aligned int32 counts: a new plan, fast launches, groups
            aligned = SegmentLayout(2, 36, 2, True, token_counts=torch.tensor([5, 36], dtype=torch.int32))
            torch.autograd.grad(ta.rmt_attention(q, k, v, aligned, **kw), (q, k, v), g)
        rec.take()
        runs.clear()
    elif change == "dO misaligned":
        g = torch.ones(2 * 40 * 2 * 32 + 1, dtype=q.dtype)[1:].view(2, 40, 2, 32)
    elif change == "dO strides":
        g = torch.ones(2, 2, 40, 32, dtype=q.dtype).transpose(1, 2)
    elif change == "counts int64":
        layout = SegmentLayout(2, 36, 2, True, token_counts=torch.tensor([5, 36]))
        g2 = torch.ones_like(g)  # first the same step with int32 counts: a new plan, fast launches, groups
        for _ in range(2):
            int32 = SegmentLayout(2, 36, 2, True, token_counts=torch.tensor([5, 36], dtype=torch.int32))
            torch.autograd.grad(ta.rmt_attention(q, k, v, int32, **kw), (q, k, v), g2)
        rec.take()
        runs.clear()
        plan = next(p for p in lc.cache_snapshot().shape_plans.values() if p.key[4])  # the padded plan
        assert set(plan.groups) == {"fwd", (True, True)}
    elif change == "dropout_p":
        kw.update(dropout_p=0.25, seed=7)
        for p in (0.5, 0.5):  # a dropout plan with groups made at p = 0.5
            torch.autograd.grad(ta.rmt_attention(q, k, v, layout, check=False, dropout_p=p, seed=7), (q, k, v), g)
        rec.take()
        runs.clear()
    elif change.startswith("seed i64"):  # above the i32 range, or below it
        kw.update(dropout_p=0.5, seed=2**31 if change == "seed i64" else -(2**31) - 1)
        for _ in range(2):
            torch.autograd.grad(ta.rmt_attention(q, k, v, layout, check=False, dropout_p=0.5, seed=7), (q, k, v), g)
        rec.take()
        runs.clear()
    elif change == "out":
        # not a view (a view gets a copy of a fresh result), with the strides of a (B, H, T, D) buffer
        kw.update(out=torch.empty_strided((2, 40, 2, 32), (2 * 40 * 32, 32, 40 * 32, 1), dtype=q.dtype))
    elif change == "out misaligned":  # the plan's strides, 2 bytes off 16 (its detached alias is not a view)
        kw.update(out=torch.empty(2 * 40 * 2 * 32 + 1, dtype=q.dtype)[1:].view(2, 40, 2, 32))

    def call():  # each call writes a fresh alias of ``out`` (the buffer's history stays out of the next call)
        out = ta.rmt_attention(q, k, v, layout, **{**kw, "out": kw["out"].detach()} if "out" in kw else kw)
        torch.autograd.grad(out, (q, k, v), g)

    calls, ran = _fast_then_run(rec, runs, call)
    assert _bwd_runs(ran) == ["_rmt_attn_bwd_dkdv_kernel", "_rmt_attn_bwd_dq_kernel"], change
    assert ("_rmt_attn_fwd_kernel" in ran) == (not change.startswith("dO")), change
    for p in lc.cache_snapshot().shape_plans.values():
        _through_run(p)
    again, ran = _fast_then_run(rec, runs, call)
    assert len(ran) == 3 and calls == again, change


_TAILS = {"Hq", "G", "Tq", "Tk", "D", "num_read", "num_tokens", "qk_scale"}
_STRIDES = {  # dQ runs over query positions (m), dK / dV over key positions (n)
    "dq": {f"stride_dq{d}" for d in "bhmd"},
    "dk": {f"stride_dk{d}" for d in "bhnd"},
    "dv": {f"stride_dv{d}" for d in "bhnd"},
}
# kind -> (the kernel parameters the fast launch trusts, those whose dtype only it trusts): named here by hand, so
# that a kernel signature change that moves a position under _trusted's counted ranges fails this test
_TRUSTED_NAMES = {
    "fwd": ({"LSE"} | _TAILS, {"Q", "K", "V", "Out"}),
    "pre": ({"DELTA", "Hq", "Tq", "D"}, {"Out", "DO"}),
    "dq": ({"DQ", "LSE", "DELTA", "sm_scale"} | _STRIDES["dq"] | _TAILS, {"Q", "K", "V", "DO", "Out"}),
    "dkdv": (
        {"DK", "DV", "LSE", "DELTA", "DQ", "Hkv", "sm_scale"} | _STRIDES["dk"] | _STRIDES["dv"] | _TAILS,
        {"Q", "K", "V", "DO", "Out"},
    ),
}


@pytest.mark.parametrize("kind", sorted(_TRUSTED_NAMES))
def test_the_trusted_positions_are_the_plans_buffers_strides_and_scalars(rig, kind):
    """``_trusted`` counts positions; each must name a buffer the plan allocates, its strides or the plan's scalars
    (trusted), or q, k, v, out, dO (dtype trusted): never a caller's tensor, a stride of one, the token runs,
    dropout_p or the seed."""
    _setup(rig)
    plan = next(iter(lc.cache_snapshot().shape_plans.values()))
    names = [p.name for p in getattr(ta, ta._KERNEL_NAMES[kind]).params]
    trusted, typed = ta._trusted(kind, plan)
    assert ({names[i] for i in trusted}, {names[i] for i in typed}) == _TRUSTED_NAMES[kind]
    assert len(set(trusted)) == len(trusted) and len(set(typed)) == len(typed)


class _Driver(host_overhead.FakeDriver):
    def get_current_stream(self, device):
        return ("stream", device)


def _launch_of(drv, fn, device=0):
    """A stand-in for a fast launch (fast_launch.build's) as ``environment`` reads it: its ``state``."""

    def launch(args):
        return True

    launch.state = (drv, device, fast_launch._knob_state(knobs), fn, fn.debug)
    return launch


def _kernel(debug=False):
    return type("Kernel", (), {"pre_run_hooks": [], "debug": debug})()


def test_environment_refuses_launches_built_apart_or_another_active_driver(monkeypatch):
    """``environment`` gives a group's check only for launches built in one state, under the active driver."""
    drv = _Driver()
    monkeypatch.setattr(driver, "_active", drv)
    a, b = _kernel(), _kernel()
    assert fast_launch.environment([_launch_of(drv, a), _launch_of(drv, b)])() == ("stream", 0)
    assert fast_launch.environment([_launch_of(drv, a), _launch_of(drv, b, device=1)]) is None
    assert fast_launch.environment([_launch_of(drv, a), _launch_of(_Driver(), b)]) is None  # same device and knobs
    assert fast_launch.environment([_launch_of(drv, a), lambda args: True]) is None  # no state: not a fast launch
    launches = [_launch_of(drv, a), _launch_of(drv, b)]
    monkeypatch.setattr(driver, "_active", _Driver())
    assert fast_launch.environment(launches) is None


@pytest.mark.parametrize("which", [0, 1])
@pytest.mark.parametrize("change", ["debug", "pre-run hook"])
def test_environment_watches_every_kernel_of_the_group(monkeypatch, which, change):
    """The check covers each kernel of the group (both, with the same debug and knobs: none stands for another)."""
    drv = _Driver()
    monkeypatch.setattr(driver, "_active", drv)
    kernels = [_kernel(), _kernel()]
    stream = fast_launch.environment([_launch_of(drv, k) for k in kernels])
    assert stream() == ("stream", 0)
    if change == "debug":
        kernels[which].debug = True
    else:
        kernels[which].pre_run_hooks = [_a_hook]
    assert stream() is None


@pytest.mark.parametrize("chain", ["launch_enter_hook", "launch_exit_hook"])
def test_environment_needs_both_hook_chains_idle_and_sees_a_hook_added_to_either(monkeypatch, chain):
    if getattr(knobs.runtime, chain) is None:
        pytest.skip("no hook chain in this Triton")
    drv = _Driver()
    monkeypatch.setattr(driver, "_active", drv)
    launches = [_launch_of(drv, _kernel())]
    stream = fast_launch.environment(launches)
    with monkeypatch.context() as m:
        m.setattr(getattr(knobs.runtime, chain), "calls", [_a_hook])
        assert fast_launch.environment(launches) is None  # one chain busy at the group's making: no group
        assert stream() is None  # a hook added after it: the check fails
    assert stream() == ("stream", 0)


def test_float32_follows_torchs_tf32_policy_at_every_call(rig):
    """fp32 dots are exact IEEE unless torch allows TF32: a change of the policy between two calls of one shape
    gets a plan (and a compile) of the other precision, not the cached one."""
    rec, runs = rig
    q, k, v = (torch.randn(1, 2, 20, 16) for _ in range(3))
    layout = SegmentLayout(2, 16, 2, True)
    lc.clear_launch_cache()
    matmul = torch.backends.cuda.matmul  # its flags are not plain attributes: restored by hand
    before = matmul.allow_tf32
    try:
        for allow in (False, True, False):
            matmul.allow_tf32 = allow
            ta.rmt_attention(q, k, v, layout, check=False)
    finally:
        matmul.allow_tf32 = before
    plans = list(lc.cache_snapshot().shape_plans.values())
    assert [p.fwd.kwargs["DOT_PREC"] for p in plans] == ["ieee", "tf32"]
    assert runs == ["_rmt_attn_fwd_kernel"] * 2  # each plan's first launch (the third call: the fast launch)
