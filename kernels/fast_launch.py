"""A faster launch of a compiled Triton kernel: what ``JITFunction.run`` resolved at a first launch, kept, so that
a later launch with the same specialisation goes straight to the low-level launcher.

``JITFunction.run`` (Triton 3.6 and 3.9, ``triton/runtime/jit.py``) does at every launch: the option kwargs
(``debug``, ``instrumentation_mode``, on 3.9 ``fpsan_homomorphic_casts``), the active driver's current device
and stream, the pre-run hooks, the binder (all ~30-60 arguments bound; each non-constexpr one specialised by
``native_specialize_impl``: a tensor by its dtype and whether its pointer is 16-byte aligned, an int by its range
(i32 / i64 / u64), whether it is divisible by 16 and whether it equals 1 (then a constexpr), a float as fp32;
``do_not_specialize`` arguments by their type only), on 3.9 the stages-inspection hook, the cache key
(``str(options)`` included), the kernel cache look-up, the check of the globals the kernel read, the grid, the
launch metadata and the call ``kernel.run(grid0, grid1, grid2, stream, kernel.function, kernel.packed_metadata,
launch_metadata, launch_enter_hook, launch_exit_hook, *bound_args.values())``. About 12 us per launch on a CPU of
the benchmark machine (``host-overhead``'s ``triton`` stub), several launches per training step.

A fast launch (:func:`build`: a closure over what it checks, its locals) is built from one real launch (its
arguments and the kernel ``run`` returned) and, at a later launch, checks that everything the cache key and the
launch depend on is as it was, then makes the same low-level call. A call whose arguments would specialise
otherwise, a changed option knob, device, driver, hook, returns False: the caller goes through ``JITFunction.run``.
The check is conservative: the non-tensor arguments must be equal to the first launch's (the call sites give each
position one type: strides and plan scalars are ints, ``dropout_p`` a float, the seed an int), except
``do_not_specialize`` ones, which must keep their type and integer range; tensors must keep their dtype and their
16-byte alignment (where Triton specialises on it). A caller may name ``trusted`` positions whose arguments it
guarantees to be as at the first launch (a non-tensor equal, a tensor of the same dtype and 16-byte aligned: the
scalars a cached launch plan holds, the buffers it allocates itself); those are not checked again.

Launch hooks: where both are idle (None, or Triton 3.9's default, an empty hook chain: calling it calls nothing),
the launch passes None for them and for the launch metadata (which only hooks read) instead of building a
``LazyDict`` per launch as ``run`` does; a set hook gets its metadata as from ``run``.

A call that makes several launches in a row checks what ``run`` reads besides the arguments once for all of them:
:func:`environment` of their fast launches gives the current stream while driver, device, knobs, the kernels'
``debug`` and pre-run hooks are as at their build and no hook is set, and each launch's ``raw`` then launches
unchecked. Its arguments are the caller's to vouch for (``triton_attention`` compares a call signature: the
strides, alignment and dtypes the launches' own checks read, taken at a call where every launch's own check
passed).

Only for the Triton versions whose ``run`` was read (:data:`VERIFIED_VERSIONS`); elsewhere :func:`build` returns
None. Any exception while building or checking means no fast launch (never a failed call).
``tests/kernels/test_fast_launch.py`` records the low-level call of both paths with a fake driver and compares them.
"""

from __future__ import annotations

import operator

import torch
import triton
from triton import knobs
from triton.runtime.driver import driver

VERIFIED_VERSIONS = ("3.6.", "3.9.")
_HookChain = getattr(triton.knobs, "HookChain", None)


def supported(version: str) -> bool:
    """Whether the fast launch applies under Triton ``version`` (one whose ``JITFunction.run`` was read)."""
    return version.startswith(VERIFIED_VERSIONS)


# False turns every fast launch off (A/B timing, debugging); read when a launch plan is built.
ENABLED = supported(triton.__version__)


def _int_range(v) -> str | None:
    """Triton's type of an int argument by its range (``native_specialize_impl``), None for a non-int."""
    if type(v) is not int:
        return None
    if -(2**31) <= v < 2**31:
        return "i32"
    if -(2**63) <= v < 2**63:
        return "i64"
    return "u64"


def _getter(positions: list[int]):
    """``args`` -> the tuple of ``args[i]`` for i in positions (always a tuple, even for one position)."""
    if not positions:
        return lambda args: ()
    if len(positions) == 1:
        i = positions[0]
        return lambda args: (args[i],)
    return operator.itemgetter(*positions)


def _arg_check(tensors: list[int], dtypes: list, aligned: list[int], misaligned: tuple, dns: tuple):
    """``args`` -> whether the tensors at ``tensors`` have ``dtypes``, those at ``aligned`` the 16-byte alignment
    (``misaligned``: the low four bits nonzero) they had, and the ``do_not_specialize`` ints at ``dns`` ((position,
    range) pairs) the integer range they had: one generated expression (``a[i].dtype is Dn``, one OR of the
    pointers when all were aligned, an i32 range as two comparisons), cheaper than mapping getters over the
    positions. The source holds only the positions (ints) and names bound to the dtypes and to :func:`_int_range`."""
    parts = []
    if aligned and not any(misaligned):
        parts.append("not (" + " | ".join(f"a[{i}].data_ptr()" for i in aligned) + ") & 15")
    else:
        parts += [f"(a[{i}].data_ptr() & 15 != 0) is {bool(m)}" for i, m in zip(aligned, misaligned)]
    parts += [f"a[{i}].dtype is D{n}" for n, i in enumerate(tensors)]
    for i, kind in dns:
        if kind == "i32":
            parts.append(f"type(a[{i}]) is int and -2147483648 <= a[{i}] <= 2147483647")
        else:
            parts.append(f"R(a[{i}]) == {kind!r}")
    env = {f"D{n}": d for n, d in enumerate(dtypes)}
    env["R"] = _int_range
    return eval("lambda a: " + (" and ".join(parts) or "True"), env)  # noqa: S307  (generated from ints only)


def _idle(hook) -> bool:
    """Whether a launch hook does nothing: None, or a hook chain (Triton 3.9's default) with no hook in it."""
    return hook is None or (type(hook) is _HookChain and not hook.calls)


def _knob_state(knobs) -> tuple:
    """What ``JITFunction.run`` puts into the options besides the call's kwargs (``debug`` is the kernel's own
    ``debug`` or this knob: the kernel's is compared apart), and the 3.9 stages hook (a kernel compiled with it
    differs): a launch is fast only while this is what it was at the first launch."""
    c = knobs.compilation
    mode = c.instrumentation_mode
    return (
        knobs.runtime.debug,
        mode,
        # 3.9's fp-sanitizer flag reaches the code only through an instrumentation mode that enables the sanitizer;
        # with none ("") it selects nothing, and reading it costs an environment look-up (~0.15 us) per check
        mode and getattr(c, "fpsan_homomorphic_casts", None),
        getattr(knobs.runtime, "add_stages_inspection_hook", None),
    )


def build(fn, kernel, grid: tuple, args: tuple, kwargs: dict, trusted=(), typed=()):
    """The fast launch (a function: ``args`` -> True when it launched, False when the caller must go through
    ``JITFunction.run``) of jit function ``fn`` from its launch ``fn.run(*args, grid=grid, warmup=False,
    **kwargs)`` that returned ``kernel``, or None where the fast launch does not apply (another Triton version, a
    stand-in kernel, hooks or launch metadata in use, a kernel that reads globals) or anything fails.
    ``trusted``: positions of ``args`` the caller guarantees at every later launch (see the module docstring);
    never a ``do_not_specialize`` one. ``typed``: positions of tensors whose dtype the caller guarantees (its
    launch plan's dtype); their alignment is still checked."""
    try:
        return _build(fn, kernel, grid, args, kwargs, frozenset(trusted), frozenset(typed))
    except Exception:
        return None


def _build(fn, kernel, grid, args, kwargs, trusted=frozenset(), typed=frozenset()):
    from triton.compiler.compiler import CompiledKernel, LazyDict
    from triton.runtime.jit import JITFunction

    if not ENABLED or kernel is None or callable(grid) or not 1 <= len(grid) <= 3:
        return None
    if getattr(type(fn), "run", None) is not JITFunction.run or fn.pre_run_hooks or fn.used_global_vals:
        return None
    if fn.launch_metadata is not None or not isinstance(kernel, CompiledKernel) or kernel.module is None:
        return None
    if type(kernel).launch_metadata is not CompiledKernel.launch_metadata or getattr(kernel.src, "fn", fn) is not fn:
        return None
    if getattr(knobs.runtime, "add_stages_inspection_hook", None) is not None or kwargs.get("debug") is not None:
        return None
    params = fn.params
    if len(args) > len(params) or any(p.name in kwargs for p in params[: len(args)]):
        return None
    extra = []
    for p in params[len(args) :]:
        if p.name in kwargs:
            extra.append(kwargs[p.name])
        elif p.has_default:
            extra.append(p.default)
        else:
            return None  # Triton's binder would raise: let it
    tensors, aligned, values, dns = [], [], [], []
    for i, (p, a) in enumerate(zip(params, args)):
        if isinstance(a, torch.Tensor):
            if type(a) is not torch.Tensor:
                return None  # a subclass may answer data_ptr / dtype otherwise
            specialises = not p.do_not_specialize and not p.do_not_specialize_on_alignment
            if i in trusted:
                if specialises and a.data_ptr() & 15:
                    return None  # not what the caller promised
                continue
            if i not in typed:
                tensors.append(i)
            if specialises:
                aligned.append(i)
        elif p.do_not_specialize and not p.is_constexpr:
            if _int_range(a) is None or i in trusted:
                return None
            dns.append(i)
        elif type(a) in (int, float, bool, str) or a is None:
            if i not in trusted:
                values.append(i)
        else:
            return None
    drv = driver.active
    device = drv.get_current_device()
    knob_state, debug = _knob_state(knobs), fn.debug
    g0, g1, g2 = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)
    launcher, function, packed, name = kernel.run, kernel.function, kernel.packed_metadata, kernel.name
    extra, n_args = tuple(extra), len(args)
    misaligned = tuple(bool(args[i].data_ptr() & 15) for i in aligned)
    dns = tuple((i, _int_range(args[i])) for i in dns)
    args_ok = _arg_check(tensors, [args[i].dtype for i in tensors], aligned, misaligned, dns)
    if not args_ok(args):
        return None
    values = _getter(values)
    value_vals = values(args)

    def fast_launch(args: tuple) -> bool:
        """This kernel's launch with ``args`` (the keyword arguments and grid of the first launch: the caller keys
        it so) as ``JITFunction.run`` would make it; False (nothing launched) when ``run`` must make it."""
        try:
            if len(args) != n_args or driver.active is not drv or fn.pre_run_hooks:
                return False
            if fn.debug != debug or _knob_state(knobs) != knob_state or values(args) != value_vals:
                return False
            if not args_ok(args) or drv.get_current_device() != device:
                return False
            stream = drv.get_current_stream(device)
            runtime = knobs.runtime
            enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
            if _idle(enter) and _idle(leave):
                enter = leave = meta = None
            else:  # CompiledKernel.launch_metadata (3.6, 3.9) for a kernel without a launch_metadata function
                meta = None if enter is None else LazyDict({"name": name, "function": function, "stream": stream})
        except Exception:
            return False
        launcher(g0, g1, g2, stream, function, packed, meta, enter, leave, *args, *extra)
        return True

    def raw(stream, args: tuple) -> None:
        """The launch with ``args`` on ``stream``, unchecked: for a caller that got ``stream`` from
        :func:`environment` and vouches that ``args`` specialise as this launch's first ones did."""
        launcher(g0, g1, g2, stream, function, packed, None, None, None, *args, *extra)

    fast_launch.raw, fast_launch.state = raw, (drv, device, knob_state, fn, debug)
    return fast_launch


def environment(launches) -> object:
    """For fast launches (from :func:`build`) that a call makes back to back: one check, for all of them, of what
    ``JITFunction.run`` reads besides the arguments, in place of each launch's own: a function returning the
    current stream while the active driver, the device, the option knobs, each kernel's ``debug`` and pre-run
    hooks are as when the launches were built and no launch hook is set (the launches' ``raw`` then pass no
    metadata and no hooks, as an idle hook chain does nothing), else None. None where the launches were built
    in different states (or one is None). The arguments are not checked: the caller checks what they derive
    from (:mod:`~rmt_fast.kernels.triton_attention`'s call signatures)."""
    try:
        states = [f.state for f in launches]
    except AttributeError:
        return None
    drv, device, knob_state = states[0][:3]
    if any(s[0] is not drv or s[1:3] != (device, knob_state) for s in states) or driver._active is not drv:
        return None  # (``driver.active`` is a property that sets ``_active``: the check reads the field)
    kernels = {id(s[3]): (s[3], s[4]) for s in states}  # (fn, its debug), each kernel once
    kernels = tuple(kernels.values())
    runtime = knobs.runtime
    enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
    if not (_idle(enter) and _idle(leave)):
        return None
    no_enter, no_leave = enter is None, leave is None

    def stream():
        try:
            if driver._active is not drv or _knob_state(knobs) != knob_state:
                return None
            for fn, debug in kernels:
                if fn.pre_run_hooks or fn.debug != debug:
                    return None
            runtime = knobs.runtime  # the hook chains as they were, still empty (a hook is added into them)
            if runtime.launch_enter_hook is not enter or runtime.launch_exit_hook is not leave:
                return None
            if not (no_enter or not enter.calls) or not (no_leave or not leave.calls):
                return None
            if drv.get_current_device() != device:
                return None
            return drv.get_current_stream(device)
        except Exception:
            return None

    return stream
