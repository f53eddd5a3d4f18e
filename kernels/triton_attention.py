"""RMT segment attention on Triton: the launchers, the autograd Function, the custom ops for torch.compile and
the public functions around the jit kernels of :mod:`rmt_fast.kernels.triton_kernels`.

The segment mask (``[read | tokens | write]`` slots, causal or bidirectional, a per-row run of valid token
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
* Launch configurations: :mod:`rmt_fast.kernels.launch_configs`. A launch that fails to compile for lack of
  shared memory / registers steps down (``LaunchConfig.smaller``) and the cache remembers the config that
  compiled.

Host time per call: the shapes, dtype, device and layout of a call select a cached
:class:`~rmt_fast.kernels.launch_configs.ShapePlan` (launches, grids, buffer shapes, scalar arguments of the
forward and, from the first backward on, of the backward), so that a call only reads its tensors' strides,
allocates its outputs and launches; in eager mode autograd goes through :class:`_RmtAttentionFn`'s C ``apply``.
After a cached plan's first launch of a kernel through Triton's ``JITFunction.run``, later launches whose
arguments specialise alike go through the plan's fast launch (:func:`~rmt_fast.kernels.fast_launch.build`: the low-level
launcher, without ``run``'s binding, specialisation and cache key); the launch caches are read and filled only
through :mod:`~rmt_fast.kernels.launch_configs`' public functions.

Groups: the forward, and the backward per (need dQ, need dK/dV), keep a **group** (``ShapePlan.groups``) made at a
call whose launches all went through their fast launches: that call's signature (the strides of q, k, v, dO and
a caller's out, whether all their pointers and the token runs' are 16-byte aligned, the token runs' dtypes,
dropout_p, whether the seed is an i32), one environment check (:func:`~rmt_fast.kernels.fast_launch.environment`)
and the launches' unchecked ``raw``. A later call with the same signature checks it once and launches every kernel
raw; any other goes through the launches one by one as above. Everything else a launch gets is the plan's
(scalars, buffer strides) or a buffer the plan allocates (its dtype, fresh: aligned); q, k, v, out and dO have the
plan's dtype (see :func:`_trusted`). ``tests/kernels/test_fast_launch.py`` plants a change in each part of the
signature and checks that the call then launches what ``run`` alone launches.

Test hooks on this module: ``_empty`` (every buffer the kernels overwrite; tests pre-fill it with NaN), the
kernels by name (``_rmt_attn_fwd_kernel``... are looked up here at each new launch plan),
``_MASK_BOUNDARY_ONLY`` and ``_FORCE_DROPOUT_I64``; the interpreter's block sizes are set with
``launch_configs.interpreter_mode(blocks=...)``.

File order: launch plans, launchers, the autograd Function, the custom ops, the public functions.
"""

from __future__ import annotations

import functools

import torch
import triton
from torch import Tensor

from . import fast_launch as _fast
from . import launch_configs as _cfg
from .launch_configs import LaunchConfig, ShapePlan, next_pow2
from .layout import SegmentLayout
from .triton_kernels import (  # noqa: F401  (looked up by name in _new_plan: tests swap them here)
    _rmt_attn_bwd_dkdv_kernel,
    _rmt_attn_bwd_dq_kernel,
    _rmt_attn_bwd_preprocess_kernel,
    _rmt_attn_fwd_kernel,
    _rmt_dropout_mask_kernel,
)

_LOG2E = 1.4426950408889634
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MIN_HEAD_DIM = 16
_MAX_HEAD_DIM = 256
_MAX_GRID_Y = 65535  # (batch, head) pairs run on the second grid axis

# Build the mask only for key blocks that straddle a boundary (Tk, the causal diagonal, the padded tail);
# interior blocks skip the element-wise mask. False masks every block (for A/B timing on a GPU).
_MASK_BOUNDARY_ONLY = True


# ============================================================================================ launch plans
class _Launch:
    """A ready launch of one kernel variant: the kernel's bound ``run``, its keyword arguments (constexprs and
    launch config) as one dict built once, and the block sizes for the grid. Built on the first call of a
    variant and cached: a call after that does one dict look-up, builds no dict and binds nothing. ``jit``:
    whether the kernel is a ``JITFunction`` with Triton's own ``run`` (a fast launch may apply)."""

    __slots__ = ("kernel", "run", "kwargs", "block_m", "block_n", "cfg", "fixed", "jit")

    def __init__(self, kernel, cfg: LaunchConfig, consts: dict, fixed: bool):
        self.kernel, self.run = kernel, kernel.run
        self.kwargs = {**consts, **cfg.kwargs}
        self.block_m, self.block_n, self.cfg, self.fixed = cfg.block_m, cfg.block_n, cfg, fixed
        self.jit = _fast.ENABLED and getattr(type(kernel), "run", None) is triton.runtime.jit.JITFunction.run


_KERNEL_NAMES = {
    "fwd": "_rmt_attn_fwd_kernel",
    "dq": "_rmt_attn_bwd_dq_kernel",
    "dkdv": "_rmt_attn_bwd_dkdv_kernel",
    "pre": "_rmt_attn_bwd_preprocess_kernel",
}


def _plan(
    kind: str, D: int, dtype, device, causal: bool, padded: bool, has_starts: bool, dropout: bool, i64: bool
) -> _Launch:
    """The launch of kernel ``kind`` for this variant (see :class:`_Launch`)."""
    key = _variant_key(kind, D, dtype, device, causal, padded, has_starts, dropout, i64)
    plan = _cfg.cached_plan(key)  # None while not caching (override block, interpreter)
    return plan if plan is not None else _new_plan(key)


def _new_plan(key: tuple, cfg: LaunchConfig | None = None) -> _Launch:
    kind, D, dtype, device, causal, padded, has_starts, dropout, i64, ieee, boundary_only = key
    kernel = globals()[_KERNEL_NAMES[kind]]  # looked up now: tests and benchmarks swap kernels here
    block_d = max(16, next_pow2(D))
    if kind == "pre":
        plan = _Launch(kernel, LaunchConfig(16 if _cfg.interpreting() else 64, 16, 4, 1), {"BLOCK_D": block_d}, True)
        del plan.kwargs["BLOCK_N"]  # the preprocess kernel tiles queries only
        _cfg.remember_plan(key, plan)
        return plan
    consts = {
        "CAUSAL": causal,
        "PADDED": padded,
        "HAS_STARTS": has_starts,
        "DROPOUT": dropout,
        "DROP_I64": i64,
        "BLOCK_D": block_d,
        "DOT_PREC": "ieee" if ieee else "tf32",
        "BOUNDARY_ONLY": boundary_only,
    }
    if cfg is None:
        fixed = _cfg.override_config(kind)
        if fixed is not None:  # used exactly, not cached
            return _Launch(kernel, fixed, {**consts, **_cfg.variant_constexprs(kind, fixed.variant)}, True)
    cfg_key = (kind, D, dtype, device)
    if cfg is None:
        cfg = _cfg.cached_config(cfg_key)  # None while not caching
    if cfg is None:
        cfg = _cfg.launch_config(kind, D, dtype)
    plan = _Launch(kernel, cfg, {**consts, **_cfg.variant_constexprs(kind, cfg.variant)}, False)
    _cfg.remember_config(cfg_key, cfg)
    _cfg.remember_plan(key, plan)
    return plan


def _variant_key(kind, D, dtype, device, causal, padded, has_starts, dropout, i64) -> tuple:
    # fp32 inputs follow torch's matmul policy: exact IEEE dots unless the user allowed TF32.
    ieee = dtype is torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    return (kind, D, dtype, device, causal, padded, has_starts, dropout, i64, ieee, _MASK_BOUNDARY_ONLY)


# Test hook: force 64-bit dropout offsets even when B * Hq * Tq * Tk < 2**31.
_FORCE_DROPOUT_I64 = False


def _needs_i64(B: int, Hq: int, Tq: int, Tk: int) -> bool:
    return _FORCE_DROPOUT_I64 or B * Hq * Tq * Tk >= 2**31


def _shape_plan(
    q: Tensor,
    k: Tensor,
    padded: bool,
    has_starts: bool,
    num_read: int,
    num_tokens: int,
    causal: bool,
    scale: float | None,
    dropout: bool,
    cache: bool = True,
) -> ShapePlan:
    """The :class:`~rmt_fast.kernels.launch_configs.ShapePlan` of a call: one key and one dict look-up once
    cached. ``cache=False`` (the custom ops, whose shapes may be symbolic) builds a fresh one. The key holds
    every input of the plan: shapes, dtype, device, the layout's integers, the scale, whether dropout is on, and
    the globals the kernel variant reads (torch's TF32 policy for fp32, the two test hooks). ``scale`` None: the
    default ``D ** -0.5``, computed here on a miss (a call that names no scale reads no head dim)."""
    dtype = q.dtype
    key = (
        q.shape,
        k.shape,
        dtype,
        q.device,
        padded,
        has_starts,
        num_read,
        num_tokens,
        causal,
        scale,
        dropout,
        dtype is torch.float32 and not torch.backends.cuda.matmul.allow_tf32,
        _MASK_BOUNDARY_ONLY,
        _FORCE_DROPOUT_I64,
    )
    if cache:
        plan = _cfg.cached_shape_plan(key)  # None while not caching (override block, interpreter)
        if plan is not None:
            return plan
        cache = _cfg.caching()
    B, Hq, Tq, D = key[0]
    Hkv, Tk = key[1][1], key[1][2]
    if scale is None:
        scale = D**-0.5
    variant = (D, dtype, key[3], causal, padded, has_starts, dropout, _needs_i64(B, Hq, Tq, Tk))
    fwd = _plan("fwd", *variant)
    dims = (B, Hq, Hkv, Tq, Tk)
    plan = ShapePlan(
        variant,
        dims,
        dtype,
        key[3],
        fwd,
        _grid("fwd", fwd, dims),
        (Hq, Hq // Hkv, Tq, Tk, D, num_read, num_tokens, scale * _LOG2E),
        scale,
        ((B, Tq, Hq, D), (B, Hq, Tq), (B, Hq, Tq), (B, Tq, Hq, D), (B, Tk, Hkv, D)),
        cache,
    )
    _plan_buffers(plan)
    if cache:
        _cfg.remember_shape_plan(key, plan)  # bounded: e.g. a decode loop makes a new Tq / Tk at every step
    return plan


def _plan_buffers(plan: ShapePlan) -> None:
    """The plan's allocators (``new_out``, ``new_lse``), ``fwd_rest`` and ``hook``. A cached plan, with the
    default :func:`_empty`, allocates each buffer with ``torch.empty_like`` of a one-element template expanded to
    the buffer's shape (it gives a contiguous tensor of that shape: checked here; one C call through
    ``functools.partial``, without ``torch.empty``'s keyword arguments); an uncached plan (symbolic shapes under
    torch.compile, the interpreter) or a test's :func:`_empty` goes through :func:`_empty`."""
    plan.fwd_rest = (*_contiguous_strides(plan.out_shape), *plan.fwd_tail)
    hook = _empty if _empty is not _EMPTY or not plan.cached else None
    plan.hook = hook
    if hook is None:
        plan.new_out = _like(plan.out_shape, plan.dtype, plan.device)
        plan.new_lse = _like(plan.lse_shape, torch.float32, plan.device)
    else:
        plan.new_out = functools.partial(_empty, plan.out_shape, plan.dtype, plan.device)
        plan.new_lse = functools.partial(_empty, plan.lse_shape, torch.float32, plan.device)


def _contiguous_strides(shape: tuple) -> tuple:
    """The strides ``torch.empty(shape)`` gives (a size-0 dimension counts as 1, as torch counts it)."""
    strides, n = [], 1
    for size in reversed(shape):
        strides.append(n)
        n *= max(size, 1)
    return tuple(reversed(strides))


def _like(shape: tuple, dtype, device):
    """An argument-free allocator of a contiguous ``shape`` buffer (see :func:`_plan_buffers`)."""
    new = functools.partial(torch.empty_like, torch.empty((), dtype=dtype, device=device).expand(shape))
    t = new()
    if tuple(t.shape) == tuple(shape) and t.is_contiguous() and t.dtype == dtype:
        return new
    return functools.partial(torch.empty, shape, dtype=dtype, device=device)


def _grid(kind: str, launch: _Launch, dims: tuple) -> tuple:
    """The launch grid of kernel ``kind``: query tiles (key tiles for dK/dV) x (batch, head) pairs."""
    B, Hq, Hkv, Tq, Tk = dims
    if kind == "dkdv":
        return (-(-Tk // launch.block_n), B * Hkv)
    return (-(-Tq // launch.block_m), B * Hq)


def _backward_launches(plan: ShapePlan) -> tuple:
    """((launch, grid, tail) of the preprocess, dQ and dK/dV kernels, then the schedule) of ``plan``, built at its
    first backward and kept on the plan. The preprocess tail: its scalars; the dQ and dK/dV tails: (the strides of
    the gradient buffers the backward allocates, fixed by their shapes; the scalars after the strides, before
    ``dropout_p, seed``). The schedule: (dK/dV is ``"fused"``, dQ's variant, dK/dV is ``"fa2"``)."""
    D = plan.key[0]
    B, Hq, Hkv, Tq, Tk = plan.dims
    G, num_read, num_tokens, scale_log2 = plan.fwd_tail[1], plan.fwd_tail[5], plan.fwd_tail[6], plan.fwd_tail[7]
    pre = _plan("pre", D, plan.dtype, plan.device, False, False, False, False, False)
    dq = _plan("dq", *plan.key)
    dkdv = _plan("dkdv", *plan.key)
    dq_strides = (Tq * Hq * D, D, Hq * D, 1)  # a (B, Tq, Hq, D) buffer seen as (B, Hq, Tq, D)
    dkv_strides = (Tk * Hkv * D, D, Hkv * D, 1)
    common = (Tq, Tk, D, num_read, num_tokens, scale_log2, plan.scale)
    bwd = (
        (pre, _grid("pre", pre, plan.dims), (Hq, Tq, D)),
        (dq, _grid("dq", dq, plan.dims), (dq_strides, (Hq, G, *common))),
        (dkdv, _grid("dkdv", dkdv, plan.dims), ((*dkv_strides, *dkv_strides), (Hq, Hkv, G, *common))),
        (dkdv.cfg.variant == "fused", dq.cfg.variant, dkdv.cfg.variant == "fa2"),
    )
    plan.bwd = bwd
    return bwd


def _run(launch: _Launch, grid: tuple, args: tuple, wrap, plan: ShapePlan, kind: str) -> bool:
    """Launch ``launch`` on ``grid``: through the plan's fast launch of this kernel where it has one and the
    arguments specialise as at its first launch (:mod:`~rmt_fast.kernels.fast_launch`; returns True), else
    through ``JITFunction.run`` (after which a cached plan builds its fast launch from this launch; returns False).
    A launch that fails to compile for lack of shared memory or registers steps the configuration down (and the
    caches remember it), unless the configuration was fixed by :func:`override_configs`. ``wrap``
    (``torch.library.wrap_triton``, inside the custom ops) makes the launch visible to torch.compile; the compiler
    then compiles the kernel."""
    if wrap is not None:
        wrap(launch.kernel)[grid](*args, **launch.kwargs)
        return False
    fast = plan.fast.get(kind)
    if fast is not None and fast(args):
        return True
    try:
        kernel = launch.run(*args, grid=grid, warmup=False, **launch.kwargs)
    except triton.runtime.errors.OutOfResources as exc:
        if launch.fixed:
            raise
        _run_stepping_down(exc, launch, args, plan, kind)
        return False
    if launch.jit and plan.cached and (fast is not None or kind not in plan.fast):  # new, or no longer matching
        trusted, typed = _trusted(kind, plan)
        plan.fast[kind] = _fast.build(launch.kernel, kernel, grid, args, launch.kwargs, trusted, typed)
    return False


def _trusted(kind: str, plan: ShapePlan) -> tuple[tuple, tuple]:
    """(trusted, typed) positions of kernel ``kind``'s launch arguments for its fast launch (``fast_launch.build``).
    Trusted, not checked again: what the plan fixes (see :func:`_forward`, :func:`_backward`): the buffers it
    allocates (its dtypes, freshly allocated: 16-byte aligned), the strides it gives them and its scalar tails.
    Typed, only their alignment checked: q, k, v, out and dO, whose dtype is the plan's (q's dtype is in its key;
    k, v and a caller's ``out`` share it, which :func:`rmt_attention` checks or its ``check=False`` caller
    promises; autograd casts dO to the output's dtype). ``starts`` / ``counts`` keep their dtype check. An
    allocation hook (:func:`_empty` patched) must allocate as :func:`_empty` does (fresh buffers of the dtype)."""
    if kind == "fwd":  # q k v out lse starts counts, q k v out strides, the tail
        return (4, *range(23, 23 + len(plan.fwd_tail))), (0, 1, 2, 3)
    pre, dq, dkdv, _ = plan.bwd
    if kind == "pre":  # out do delta, out do strides, the tail
        return (2, *range(11, 11 + len(pre[2]))), (0, 1)
    if kind == "dq":  # q k v do dq lse delta out starts counts, q k v do dq out strides, the tail
        return (4, 5, 6, *range(26, 30), *range(34, 34 + len(dq[2][1]))), (0, 1, 2, 3, 7)
    # q k v do dk dv lse delta out dq starts counts, q k v do dk dv out dq strides, the tail
    return (4, 5, 6, 7, 9, *range(28, 36), *range(44, 44 + len(dkdv[2][1]))), (0, 1, 2, 3, 8)


def _group(plan: ShapePlan, needs: tuple, sig: tuple, kinds: list) -> None:
    """Keep on ``plan`` the group of its ``kinds`` launches for a call with ``needs`` at call signature ``sig``
    (every one of them just went through its fast launch at that signature: each accepted the arguments that
    signature gives): (sig, the environment check of :func:`~rmt_fast.kernels.fast_launch.environment`, kind ->
    unchecked launch). No group where the launches' environments differ."""
    launches = [plan.fast[kind] for kind in kinds]
    env = _fast.environment(launches)
    if env is not None:
        plan.groups[needs] = (sig, env, {kind: f.raw for kind, f in zip(kinds, launches)})


def _run_stepping_down(exc, launch: _Launch, args: tuple, plan: ShapePlan, kind: str) -> None:
    cfg = launch.cfg
    _cfg.forget_plans()  # the plan at hand keeps its launches for this call only
    D, dtype, device = plan.key[:3]
    while True:
        cfg = cfg.smaller()
        if cfg is None:
            raise exc
        _cfg.remember_config((kind, D, dtype, device), cfg)
        launch = _new_plan(_variant_key(kind, *plan.key), cfg)
        try:
            launch.run(*args, grid=_grid(kind, launch, plan.dims), warmup=False, **launch.kwargs)
            return
        except triton.runtime.errors.OutOfResources as again:
            exc = again


def _empty(shape, dtype, device) -> Tensor:
    """Every buffer the kernels fully overwrite is allocated here or, in a cached plan built while this is the
    module's own function, alike by the plan (tests monkeypatch it to poison the buffers: a plan built while it
    is patched allocates through it)."""
    return torch.empty(shape, dtype=dtype, device=device)


_EMPTY = _empty


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


def _forward(q, k, v, starts, counts, plan: ShapePlan, dropout_p: float, seed: int, out, wrap=None):
    """Launch the forward kernel: (out (B, Tq, Hq, D), lse (B, Hq, Tq) fp32). ``plan`` from :func:`_shape_plan`;
    ``starts`` / ``counts`` are any tensor when unused."""
    lse = plan.new_lse()
    if out is None and wrap is None:
        out = plan.new_out()
        out_s, rest = None, plan.fwd_rest  # its strides are the plan's
    else:  # a caller's out, or the custom op's (shapes may be symbolic): read the strides
        out = plan.new_out() if out is None else out
        out_s = out.stride()
        rest = (*out_s, *plan.fwd_tail)
    qs, ks, vs = q.stride(), k.stride(), v.stride()
    args = (q, k, v, out, lse, starts, counts, *qs, *ks, *vs, *rest, dropout_p, seed)
    if wrap is not None or not (plan.cached and plan.fwd.jit):
        _run(plan.fwd, plan.fwd_grid, args, wrap, plan, "fwd")
        return out, lse
    sig = (  # see _backward
        qs,
        ks,
        vs,
        out_s,
        dropout_p,
        -2147483648 <= seed <= 2147483647,
        None if counts is q else (starts.dtype, counts.dtype),  # q: no token runs (_runs_arg)
        # (an out the plan allocated is fresh: aligned)
        not (q.data_ptr() | k.data_ptr() | v.data_ptr() | (0 if out_s is None else out.data_ptr())) & 15
        and (counts is q or not (starts.data_ptr() | counts.data_ptr()) & 15),
    )
    group = plan.groups.get("fwd")
    if group is not None and group[0] == sig:
        stream = group[1]()
        if stream is not None:
            group[2]["fwd"](stream, args)
            return out, lse
    if _run(plan.fwd, plan.fwd_grid, args, wrap, plan, "fwd") and sig[-1]:
        _group(plan, "fwd", sig, ["fwd"])
    return out, lse


def _backward(
    q,
    k,
    v,
    out,
    lse,
    do,
    starts,
    counts,
    plan: ShapePlan,
    dropout_p: float,
    seed: int,
    need_dq: bool,
    need_dkv: bool,
    wrap=None,
):
    """Launch the backward kernels: (dq, dk, dv) seen as (B, H, T, D) over (B, T, H, D) buffers (None for the
    ones not needed). The launches follow the kernel variants of the resolved configs (launch_configs.VARIANTS):
    dK/dV ``"fused"``: one launch; else the preprocess (unless every kernel that reads delta gets it otherwise:
    an ``"inline"`` dQ computes and stores it, an ``"inline"`` dK/dV computes its own), dQ, then dK/dV.

    Buffers: a cached plan without an allocation hook (``plan.hook``) allocates each with one C call where the plan's
    shapes and strides fix it (``new_empty_strided`` of q for the gradients, ``empty_like`` of lse for delta and
    of dK for dV: the dtype, device, shape and strides :func:`_empty` and a transpose would give)."""
    pre, dq_l, dkdv_l, (fused_variant, dq_variant, dkdv_fa2) = plan.bwd or _backward_launches(plan)
    fused = need_dkv and fused_variant
    run_dq = need_dq and not fused
    dq_writes_delta = run_dq and dq_variant == "inline"
    needs_pre = not fused and ((run_dq and dq_variant == "fa2") or (need_dkv and dkdv_fa2 and not dq_writes_delta))
    hook = plan.hook if wrap is None else _empty
    out_s, do_s = out.stride(), do.stride()
    qkv_s = (*q.stride(), *k.stride(), *v.stride())
    # One check for all the launches (the module docstring's groups): the plan's group for these needs, when this
    # call's signature is the one the group was made at, launches unchecked on the stream its environment gives.
    sig = stream = None
    if wrap is None and plan.cached and dkdv_l[0].jit:
        sig = (
            qkv_s,
            do_s,
            out_s,
            dropout_p,
            -2147483648 <= seed <= 2147483647,
            None if counts is q else (starts.dtype, counts.dtype),
            not (q.data_ptr() | k.data_ptr() | v.data_ptr() | do.data_ptr() | out.data_ptr()) & 15
            and (counts is q or not (starts.data_ptr() | counts.data_ptr()) & 15),
        )
        group = plan.groups.get((need_dq, need_dkv))
        if group is not None and group[0] == sig:
            stream = group[1]()
    fast = stream is not None  # every launch so far went through a fast launch (or the group)
    if not (needs_pre or dq_writes_delta):
        delta = lse  # unread
    elif hook is None:
        delta = torch.empty_like(lse)
    else:
        delta = hook(plan.delta_shape, torch.float32, plan.device)
    if needs_pre:
        args = (out, do, delta, *out_s, *do_s, *pre[2])
        if stream is None:
            fast = _run(pre[0], pre[1], args, wrap, plan, "pre")
        else:
            group[2]["pre"](stream, args)
    dq = dk = dv = dq_buf = None
    dq_strides, dq_tail = dq_l[2]
    if need_dq or fused:  # the fused kernel always writes dQ: without need_dq, a scratch buffer, dropped
        # Gradients in the (B, T, H, D) memory layout of the typical projection outputs, seen as (B, H, T, D).
        if hook is None:  # empty_like keeps the strides of a dense q: these ones when q has them
            dq_buf = torch.empty_like(q) if qkv_s[:4] == dq_strides else q.new_empty_strided(q.shape, dq_strides)
        else:
            dq_buf = hook(plan.dq_shape, plan.dtype, plan.device).transpose(1, 2)
        dq = dq_buf if need_dq else None
    if run_dq:
        args = (
            q,
            k,
            v,
            do,
            dq,
            lse,
            delta,
            out,
            starts,
            counts,
            *qkv_s,
            *do_s,
            *dq_strides,
            *out_s,
            *dq_tail,
            dropout_p,
            seed,
        )
        if stream is None:
            fast = _run(dq_l[0], dq_l[1], args, wrap, plan, "dq") and (fast or not needs_pre)
        else:
            group[2]["dq"](stream, args)
    if need_dkv:
        dkv_strides, dkv_tail = dkdv_l[2]
        if hook is None:
            dk = torch.empty_like(k) if qkv_s[4:8] == dkv_strides[:4] else q.new_empty_strided(k.shape, dkv_strides[:4])
            dv = torch.empty_like(dk)
        else:
            dk = hook(plan.dkv_shape, plan.dtype, plan.device).transpose(1, 2)
            dv = hook(plan.dkv_shape, plan.dtype, plan.device).transpose(1, 2)
        if dq_buf is None:  # unused by the unfused kernel: any tensor of the dtype, with dK's strides
            dq_arg, dq_arg_strides = dk, dkv_strides[:4]
        else:
            dq_arg, dq_arg_strides = dq_buf, dq_strides
        args = (
            q,
            k,
            v,
            do,
            dk,
            dv,
            lse,
            delta,
            out,
            dq_arg,
            starts,
            counts,
            *qkv_s,
            *do_s,
            *dkv_strides,
            *out_s,
            *dq_arg_strides,
            *dkv_tail,
            dropout_p,
            seed,
        )
        if stream is None:
            fast = _run(dkdv_l[0], dkdv_l[1], args, wrap, plan, "dkdv") and (fast or not (needs_pre or run_dq))
        else:
            group[2]["dkdv"](stream, args)
    if stream is None and fast and sig[-1]:  # every launch was fast at this signature: group them
        kinds = [kind for kind, ran in (("pre", needs_pre), ("dq", run_dq), ("dkdv", need_dkv)) if ran]
        _group(plan, (need_dq, need_dkv), sig, kinds)
    return dq, dk, dv


# ================================================================================= autograd Function
class _RmtAttentionFn(torch.autograd.Function):
    """Autograd in eager mode. ``call`` = (starts, counts, plan, dropout_p, seed): one argument, as every
    argument of ``apply`` costs host time; ``starts`` / ``counts`` never need a gradient. A call with ``out``
    goes through :class:`_RmtAttentionOutFn` (``out`` an input of ``apply``, marked dirty), so this one takes
    q, k, v and ``call`` only.

    Applied through :data:`_APPLY`, the C ``apply`` without ``Function.apply``'s Python wrapper (whose pytree
    pass over the arguments for functorch costs about as much as the rest of the call); under a functorch
    transform the wrapper runs. Measured against a ``torch.library.custom_op`` with ``register_autograd``
    (benchmarks/host_overhead.py, path ``triton_grad_op``): the custom op's dispatch adds far more host time than
    this, so the custom ops serve torch.compile only."""

    @staticmethod
    def forward(ctx, q, k, v, call):
        o, lse = _forward(q, k, v, *call, None)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.call = call
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        starts, counts, plan, dropout_p, seed = ctx.call
        need = ctx.needs_input_grad
        dq, dk, dv = _backward(q, k, v, o, lse, do, starts, counts, plan, dropout_p, seed, need[0], need[1] or need[2])
        return dq, dk if need[1] else None, dv if need[2] else None, None


class _RmtAttentionOutFn(_RmtAttentionFn):
    """:class:`_RmtAttentionFn` for a call with ``out`` (an input here, marked dirty: autograd rebases it)."""

    @staticmethod
    def forward(ctx, q, k, v, out, call):
        o, lse = _forward(q, k, v, *call, out)
        ctx.mark_dirty(out)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.call = call
        return o

    @staticmethod
    def backward(ctx, do):
        return (*_RmtAttentionFn.backward(ctx, do), None)


# torch's C ``apply`` bound to the Functions (a private API: the Python ``apply`` where a torch lacks it).
_C_APPLY = getattr(torch._C, "_FunctionBase", object).__dict__.get("apply")
_APPLY = _RmtAttentionFn.apply if _C_APPLY is None else _C_APPLY.__get__(None, _RmtAttentionFn)
_APPLY_OUT = _RmtAttentionOutFn.apply if _C_APPLY is None else _C_APPLY.__get__(None, _RmtAttentionOutFn)


# ============================================================================ torch.compile: custom ops
def _register_ops():
    """The forward and backward as ``torch.library.triton_op`` custom ops (``rmt_fast::attn_fwd``,
    ``rmt_fast::attn_bwd``) with autograd registered: torch.compile sees the kernel launches (``wrap_triton``)
    and compiles the kernels itself; the fake implementation is the same Python run on fake tensors. Used only
    while compiling (:func:`rmt_attention` checks ``torch.compiler.is_compiling()``): in eager mode the custom
    op's dispatch only adds host time (``host-overhead``'s ``triton_op_grad`` row: the eager grad call through
    this op costs several times the autograd Function's). Not registered in Triton's interpreter (``wrap_triton``
    took compiled kernels only before torch 2.13)."""
    from torch.library import triton_op, wrap_triton

    @triton_op("rmt_fast::attn_fwd", mutates_args=())
    def attn_fwd(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        starts: Tensor,
        counts: Tensor,
        padded: bool,
        has_starts: bool,
        num_read: int,
        num_tokens: int,
        causal: bool,
        scale: float,
        dropout_p: float,
        seed: int,
    ) -> tuple[Tensor, Tensor]:
        plan = _shape_plan(
            q, k, padded, has_starts, num_read, num_tokens, causal, scale, dropout_p > 0.0, type(q) is Tensor
        )  # cached for real tensors only (traced shapes may be symbolic)
        return _forward(q, k, v, starts, counts, plan, dropout_p, seed, None, wrap_triton)

    @triton_op("rmt_fast::attn_bwd", mutates_args=())
    def attn_bwd(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        lse: Tensor,
        do: Tensor,
        starts: Tensor,
        counts: Tensor,
        padded: bool,
        has_starts: bool,
        num_read: int,
        num_tokens: int,
        causal: bool,
        scale: float,
        dropout_p: float,
        seed: int,
    ) -> tuple[Tensor, Tensor, Tensor]:
        plan = _shape_plan(
            q, k, padded, has_starts, num_read, num_tokens, causal, scale, dropout_p > 0.0, type(q) is Tensor
        )
        return _backward(q, k, v, out, lse, do, starts, counts, plan, dropout_p, seed, True, True, wrap_triton)

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
# Bound once (a module attribute look-up less per call); torch.compile folds the function itself, by identity.
_is_compiling = torch.compiler.is_compiling
if not _cfg.interpreting() and hasattr(torch.library, "triton_op"):
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
        if not _cfg.interpreting():
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
    returned (written in place; with grad, a view of another tensor gets a copy of the result instead: autograd
    cannot rebase a custom Function's output onto a view). Differentiable with respect to q, k and v.

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
    if scale is not None:
        scale = float(scale)
    dropout_p = float(dropout_p)
    if dropout_p > 0.0:
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, (1,)).item())  # CPU generator: no device sync
        seed = int(seed)
    else:
        seed = 0
    starts, counts, padded, has_starts = _runs_arg(layout, q)
    if _OPS is not None and _is_compiling():
        scale = q.size(-1) ** -0.5 if scale is None else scale
        meta = (padded, has_starts, layout.num_read, layout.num_tokens, layout.causal, scale, dropout_p, seed)
        return _compiled_attention(q, k, v, out, starts, counts, meta)
    plan = _shape_plan(
        q, k, padded, has_starts, layout.num_read, layout.num_tokens, layout.causal, scale, dropout_p > 0.0
    )
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        call = (starts, counts, plan, dropout_p, seed)
        functorch = torch._C._are_functorch_transforms_active()  # then Function.apply's wrapper must run
        if out is None or out._base is not None:  # autograd fails (an internal assert) to rebase a dirty view
            o = _RmtAttentionFn.apply(q, k, v, call) if functorch else _APPLY(q, k, v, call)
            return o if out is None else out.copy_(o)
        return _RmtAttentionOutFn.apply(q, k, v, out, call) if functorch else _APPLY_OUT(q, k, v, out, call)
    return _forward(q, k, v, starts, counts, plan, dropout_p, seed, out)[0]


def rmt_attention_dropout_mask(B: int, Hq: int, Tq: int, Tk: int, p: float, seed: int, device) -> Tensor:
    """(B, Hq, Tq, Tk) bool keep-mask that :func:`rmt_attention` applies for ``dropout_p=p`` and ``seed``."""
    device = torch.device(device)
    keep = torch.empty((B, Hq, Tq, Tk), dtype=torch.int8, device=device)
    if keep.numel() == 0:
        return keep.bool()
    block = 16 if _cfg.interpreting() else 32
    _rmt_dropout_mask_kernel[(triton.cdiv(Tq, block), B * Hq)](
        keep,
        Tq,
        Tk,
        float(p),
        int(seed),
        BLOCK_M=block,
        BLOCK_N=block,
        DROP_I64=_needs_i64(B, Hq, Tq, Tk),
    )
    return keep.bool()


__all__ = ["rmt_attention", "rmt_attention_supported", "rmt_attention_dropout_mask"]
