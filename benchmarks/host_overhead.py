"""Host (CPU) time per attention call, the Triton path against the SDPA path, eager: ``stub`` (any machine; the
kernel launches and SDPA's compute replaced by no-ops, so what is left is our wrappers' Python), ``stub_triton``
(the same with Triton's own launch path, ``JITFunction.run`` or our fast launch, up to a no-op low-level launch),
``stub_triton_run`` (the same with the fast launch off) and ``cuda`` (with a GPU, the real calls; host and device
time apart). Target: Triton's host time at most SDPA's + 10 us. Cases and outputs: docs/benchmarks.md, section
``host-overhead``.

The stub modes time two SDPA baselines. Paths ``sdpa``, ``sdpa_grad``, ``sdpa_step``: SDPA replaced by a view of q
(no allocation, no dispatch, no saved tensors), a lower bound no real SDPA call reaches: SDPA's own host work (its
C++ dispatch and kernel choice, the output and logsumexp allocations, an autograd node saving q, k, v, out, lse) is
left out, while the Triton stub keeps our allocations and our autograd node. Paths ``sdpa_real``, ``sdpa_real_grad``,
``sdpa_real_step``: the real op on a tiny problem of the same layout (:data:`TINY`), whose compute is nearly
nothing: SDPA's C++ host path, with that small compute and the CPU flash kernel's scratch allocations still in it,
so an upper-side estimate of SDPA's CPU host path. It is compared with the Triton stub path at the same tiny shape
(``triton_tiny``, ``triton_tiny_grad``, ``triton_tiny_step``): on the CPU a buffer's size costs host time (the
allocator) that a GPU's caching allocator does not charge, so the two paths are compared with the same buffers.
Neither is SDPA's CUDA host path, which only the ``cuda`` rows measure.
"""

from __future__ import annotations

import contextlib
import itertools
import statistics
import time

import torch
import torch.nn.functional as F
from torch import Tensor
from triton.runtime.jit import JITFunction

from rmt_fast.kernels import fast_launch, launch_configs
from rmt_fast.kernels import triton_attention as ra
from rmt_fast.kernels.layout import SegmentLayout
from rmt_fast.kernels.sdpa_attention import needs_mask, sdpa_rmt_attention

from .common import machine_label
from .runner import Benchmark, Timer

TARGET_US = 10.0
KERNELS = (
    "_rmt_attn_fwd_kernel",
    "_rmt_attn_bwd_preprocess_kernel",
    "_rmt_attn_bwd_dq_kernel",
    "_rmt_attn_bwd_dkdv_kernel",
)


class _StubKernel(JITFunction):
    """Stands in for a jit kernel: accepts a launch, does nothing. A ``JITFunction`` (never initialised as one)
    so that ``torch.library.wrap_triton`` accepts it: the custom op's eager path launches it too."""

    def __init__(self, real):  # noqa: D107  (JITFunction.__init__ would compile-prepare a function)
        self.real = real
        self.arg_names = getattr(real, "arg_names", None)

    def run(self, *args, grid, warmup, **kwargs):
        return None

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **kwargs):
        return None


# ----------------------------------------------------------------------- the "triton" stub: Triton's own run
class FakeDriver:
    """Triton's active driver as on a one-GPU machine: device 0, its default stream (0), an sm_90 target. What
    ``JITFunction.run`` asks the driver for; nothing else is needed while the compiled kernels are fakes."""

    def __init__(self):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 0

    def get_current_target(self):
        return self.target


def _no_launch(*args):
    return None


_HANDLES = itertools.count(0x7F0000)  # made-up function handles, one per fake compile


def fake_compiled_kernel(fn, key, signature, constexprs, options, attrs, launcher=_no_launch):
    """A ``CompiledKernel`` as ``JITFunction._do_compile`` would return it after loading it on the device (its
    handles initialised), without compiling: ``run`` (the low-level launcher) is ``launcher``; ``function`` a
    made-up handle; ``launch_metadata`` is CompiledKernel's own."""
    from triton.compiler import ASTSource, CompiledKernel

    kernel = CompiledKernel.__new__(CompiledKernel)  # its __init__ reads a compiled binary
    kernel.src = ASTSource(fn, signature, constexprs, attrs)
    kernel.name, kernel.hash, kernel.metadata = fn.__name__, key, options
    kernel.packed_metadata = (options.num_warps, options.num_ctas, 0)  # (warps, CTAs, shared memory) on CUDA
    kernel.module, kernel._module_pid = object(), None  # handles "loaded" (never unloaded: not this process's)
    kernel.function = next(_HANDLES)
    kernel._run = launcher
    return kernel


def jit_copy(real, launcher=_no_launch) -> JITFunction:
    """A fresh ``JITFunction`` of ``real``'s Python function (a JITFunction or, under TRITON_INTERPRET, an
    InterpretedFunction) with the same specialisation options, whose compile step makes a
    :func:`fake_compiled_kernel` and stores it where ``run`` looks it up (the per-device kernel cache), as the real
    one does. ``run`` is Triton's own: binding, specialisation, cache key, driver queries; only the final
    low-level launch is ``launcher``. Fresh, so the real kernel's caches never hold a fake."""
    import triton.runtime.jit as jit

    opts = getattr(real, "kwargs", None)  # an InterpretedFunction keeps the decorator's arguments
    if opts is None:
        opts = {
            "do_not_specialize": real.do_not_specialize,
            "debug": real.debug,
            "noinline": real.noinline,
            "do_not_specialize_on_alignment": real.do_not_specialize_on_alignment,
            "repr": real._repr,
            "launch_metadata": real.launch_metadata,
        }
    registry = getattr(jit, "_triton_jit_function_registry", None)  # triton 3.9 registers every JITFunction
    saved = dict(registry) if registry is not None else None
    fn = JITFunction(real.fn, **opts)
    if registry is not None:
        registry.clear()
        registry.update(saved)

    def do_compile(key, signature, device, constexprs, options, attrs, warmup):
        kernel = fake_compiled_kernel(fn, key, signature, constexprs, options, attrs, launcher)
        fn.device_caches[device][0][key] = kernel
        return kernel

    fn._do_compile = do_compile
    return fn


@contextlib.contextmanager
def fake_driver():
    """:class:`FakeDriver` as Triton's active driver inside the block (the previous one restored on exit)."""
    from triton.runtime.driver import driver

    previous = driver._active  # None on a machine without a GPU: Triton makes its default lazily
    driver.set_active(FakeDriver())
    try:
        yield
    finally:
        driver.set_active(previous)


# ------------------------------------------------------------------------------------------------- stubs
STUB_MODES = ("plain", "triton", "triton_run")
_USER_MODES = ("stub", "stub_triton")  # rows whose Triton path is the one users run (not the fast launch off)
ROW_MODES = {"plain": "stub", "triton": "stub_triton", "triton_run": "stub_triton_run"}  # the rows' ``mode``


@contextlib.contextmanager
def stubs(mode: str = "plain", module=ra, cfg=launch_configs, launcher=_no_launch):
    """Kernel launches and SDPA's compute replaced by no-ops (restored on exit). ``mode``: ``"plain"``, every
    kernel a :class:`_StubKernel` whose ``run`` returns at once (our Python only); ``"triton"``, every kernel a
    :func:`jit_copy` with a :class:`FakeDriver` active: Triton's ``JITFunction.run`` (or the fast launch) runs as
    on a GPU up to the low-level launch, which is ``launcher`` (a no-op; tests record); ``"triton_run"``: the same
    with the fast launch off (:data:`~rmt_fast.kernels.fast_launch.ENABLED`), every launch through ``run``.
    ``module`` / ``cfg``: the triton_attention and launch_configs modules to stub (another checkout's, for an A/B
    in one process)."""
    if mode not in STUB_MODES:
        raise ValueError(f"stub mode must be one of {STUB_MODES}, got {mode!r}")
    saved = {name: getattr(module, name) for name in KERNELS}
    real_sdpa = F.scaled_dot_product_attention

    def sdpa_stub(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        # a view: no compute, but an autograd node when q requires grad, as the real op records one
        return q.view(q.shape)

    fast = fast_launch.ENABLED
    with contextlib.ExitStack() as stack:
        if mode != "plain":
            stack.enter_context(fake_driver())
        try:
            fast_launch.ENABLED = fast and mode != "triton_run"
            for name, kernel in saved.items():
                setattr(module, name, _StubKernel(kernel) if mode == "plain" else jit_copy(kernel, launcher))
            F.scaled_dot_product_attention = sdpa_stub
            cfg.clear_launch_cache()
            yield
        finally:
            for name, kernel in saved.items():
                setattr(module, name, kernel)
            F.scaled_dot_product_attention = real_sdpa
            fast_launch.ENABLED = fast
            cfg.clear_launch_cache()


# The same-shape comparison's problem: the cases' layouts at the fewest tokens that keep each case's shape (a read
# and a write slot, 3 tokens, the last one padded, row 0's run from token 1), one row, one head, D = 16 (the least
# head dim the Triton path takes): the real SDPA op's compute as small as it gets (its host path does not shrink
# with the shape, its compute does), and the Triton stub path at the same shape. The same shape for both because
# on the CPU the buffers' sizes cost host time that a GPU's caching allocator does not charge (measured, the Triton
# stub, 3 x 100 interleaved rounds: the full case's 1.7 MB buffers cost 0.2 us more per grad call and 1.3 us (min)
# to 3.8 us (median) more per step than these).
TINY = dict(B=1, H=1, m=1, size=3, D=16, pad=1, start=1)


def cases(device, B=2, H=12, m=16, size=512, D=64, dtype=torch.float16, pad=100, start=37) -> dict:
    """The decoder layout ``[m read | size tokens | m write]``, case -> (q, k, v, layout): ``full``, ``counts``
    (every row's tokens end ``pad`` before the segment's end) and ``runs`` (the same ends, row 0's run begins at
    token ``start``: a left-padded row)."""
    g = torch.Generator().manual_seed(0)
    T = 2 * m + size
    q, k, v = (torch.randn(B, T, H, D, generator=g).to(dtype).to(device).transpose(1, 2) for _ in range(3))
    counts = torch.full((B,), size - pad, dtype=torch.int32, device=device)
    starts = torch.tensor([start, 0][:B] + [0] * max(0, B - 2), dtype=torch.int32, device=device)
    return {
        "full": (q, k, v, SegmentLayout(m, size, m, True)),
        "counts": (q, k, v, SegmentLayout(m, size, m, True, token_counts=counts)),
        "runs": (q, k, v, SegmentLayout(m, size, m, True, token_counts=counts.clone(), token_starts=starts)),
    }


def _step(f, inputs: tuple, g_out: Tensor):
    """A training step's attention call: the forward, then the backward into q, k, v (``autograd.grad``: no
    accumulation into ``.grad``, which on CPU tensors would be real compute)."""

    def step():
        torch.autograd.grad(f(), inputs, g_out, allow_unused=True)

    return step


def _op_call(q, k, v, layout):
    """``rmt_attention``'s eager call through the custom op (``rmt_fast::attn_fwd`` with its registered autograd)
    instead of the autograd Function: what unifying eager with the compile path would cost (None in the
    interpreter, where the ops are not registered)."""
    if ra._OPS is None:
        return None
    starts, counts, padded, has_starts = ra._runs_arg(layout, q)
    meta = (padded, has_starts, layout.num_read, layout.num_tokens, layout.causal, q.shape[-1] ** -0.5, 0.0, 0)
    op = ra._OPS[0]
    return lambda: op(q, k, v, starts, counts, *meta)[0]


def _grad_inputs(q, k, v) -> tuple:
    """(q, k, v) as leaves that require grad, and the output's gradient (ones, in the output's (B, T, H, D))."""
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    return qg, kg, vg, torch.ones(q.shape[0], q.shape[2], q.shape[1], q.shape[3], dtype=q.dtype, device=q.device)


def segment_mask(q: Tensor, layout: SegmentLayout) -> Tensor | None:
    """The mask the runtime hands every SDPA layer of a segment (None where the layout needs none): built once per
    segment by :class:`~rmt_fast.attention.ActiveSegment` (in SDPA's additive form) and reused by every layer, so a
    per-layer SDPA call does not build it. Timed on its own as ``sdpa_mask_once_per_segment``."""
    from rmt_fast.attention import ActiveSegment  # the runtime's own (imports transformers: only when measuring)

    if not needs_mask(layout, q.shape[-2]):
        return None
    return ActiveSegment(layout, "sdpa").dense_mask(q.shape[-2], q.device, q.dtype)


def _paths(q, k, v, layout) -> dict:
    """The timed calls of one case: each backend's per-layer call as the runtime makes it (no_grad, grad, step; SDPA
    with the segment's mask built beforehand) and the work the runtime does once per segment."""
    qg, kg, vg, g_out = _grad_inputs(q, k, v)
    paths = {
        **_triton_paths("triton", q, k, v, layout, (qg, kg, vg, g_out)),
        **_sdpa_paths("sdpa", q, k, v, layout, (qg, kg, vg, g_out)),
        "validate_once_per_segment": lambda: ra.rmt_attention_supported(q, k, v, layout),
        "sdpa_mask_once_per_segment": lambda: segment_mask(q, layout),
    }
    op = _op_call(qg, kg, vg, layout)
    if op is not None:
        paths["triton_op_grad"] = op
        paths["triton_op_step"] = _step(op, (qg, kg, vg), g_out)
    return paths


def _triton_paths(name: str, q, k, v, layout, grad_inputs: tuple) -> dict:
    """``name``, ``name_grad``, ``name_step``: :func:`rmt_attention`'s no_grad call, grad call and step as the runtime
    makes them (``check=False``: validated once per segment); ``grad_inputs``: from :func:`_grad_inputs`."""
    qg, kg, vg, g_out = grad_inputs
    grad = lambda: ra.rmt_attention(qg, kg, vg, layout, check=False)  # noqa: E731
    return {
        name: lambda: ra.rmt_attention(q, k, v, layout, check=False),
        f"{name}_grad": grad,
        f"{name}_step": _step(grad, (qg, kg, vg), g_out),
    }


def _sdpa_paths(name: str, q, k, v, layout, grad_inputs: tuple) -> dict:
    """``name``, ``name_grad``, ``name_step``: :func:`sdpa_rmt_attention`'s no_grad call, grad call and step as the
    runtime makes them, with the segment's mask built beforehand (:func:`segment_mask`); ``grad_inputs``: from
    :func:`_grad_inputs`."""
    qg, kg, vg, g_out = grad_inputs
    mask = segment_mask(q, layout)
    grad = lambda: sdpa_rmt_attention(qg, kg, vg, layout, mask=mask)  # noqa: E731
    return {
        name: lambda: sdpa_rmt_attention(q, k, v, layout, mask=mask),
        f"{name}_grad": grad,
        f"{name}_step": _step(grad, (qg, kg, vg), g_out),
    }


def _tiny_paths(q, k, v, layout) -> dict:
    """The same-shape comparison on a :data:`TINY` case: ``sdpa_real``, ``sdpa_real_grad``, ``sdpa_real_step``, the
    SDPA path's three calls to be timed with the real SDPA in place (:func:`_sdpa_for`), and ``triton_tiny``,
    ``triton_tiny_grad``, ``triton_tiny_step``, the Triton path's (its kernels the mode's stubs)."""
    sdpa = _sdpa_paths("sdpa_real", q, k, v, layout, _grad_inputs(q, k, v))
    return sdpa | _triton_paths("triton_tiny", q, k, v, layout, _grad_inputs(q, k, v))


@contextlib.contextmanager
def _sdpa_for(path: str, real_sdpa):
    """``F.scaled_dot_product_attention`` is ``real_sdpa`` inside the block for the ``sdpa_real`` paths (the stub
    restored on exit), unchanged for the others. Entered around a timer call, not inside the timed callable: the
    swap is once per ``n`` calls, not part of a call's time."""
    if not path.startswith("sdpa_real"):
        yield
        return
    stub = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = real_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = stub


def _grad_ctx(path: str):
    no_grad = ("triton", "sdpa", "sdpa_real", "triton_tiny", "validate_once_per_segment", "sdpa_mask_once_per_segment")
    return torch.no_grad() if path in no_grad else contextlib.nullcontext()


@contextlib.contextmanager
def one_thread():
    """torch's CPU ops on the calling thread alone inside the block (``torch.set_num_threads(1)``, restored on
    exit). The stubs' CPU times are process CPU times: with a second intra-op thread, the real SDPA's CPU kernel
    runs on it even at a few tokens, and an idle OpenMP worker spinning after a parallel region is charged to
    whichever path runs next (measured: a stubbed Triton grad call 8.1 us of the calling thread's time, 17.6 us
    of the process's)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def measure_stub(timer: Timer, n: int, repeats: int, mode: str = "plain") -> list[dict]:
    """Each case's paths timed in turn, ``repeats`` rounds of ``n`` calls per path (interleaved, so that a load
    change on a shared machine hits every path alike); per path the median over the rounds of the wall time
    (``host_us``) and of the process CPU time (``cpu_us``) per call. ``mode``: the :func:`stubs` mode. Beside
    each case's paths, its :data:`TINY` twin's (:func:`_tiny_paths`): the SDPA path with the real
    ``F.scaled_dot_product_attention`` (the one in place before the stubs) and the Triton path (stubbed), at one
    shape. One intra-op thread (:func:`one_thread`)."""
    rows = []
    real_sdpa = F.scaled_dot_product_attention
    tiny = cases("cpu", **TINY)
    with one_thread(), stubs(mode):
        for case, (q, k, v, layout) in cases("cpu").items():
            paths = _paths(q, k, v, layout) | _tiny_paths(*tiny[case])
            wall = {path: [] for path in paths}
            cpu = {path: [] for path in paths}
            for r in range(repeats):
                for path, fn in paths.items():
                    with _grad_ctx(path), _sdpa_for(path, real_sdpa):
                        t = timer(fn, repeats=1, warmup=1 if r == 0 else 0, inner=n, clock="host")
                    wall[path].append(t.median_s)
                    cpu[path].append(t.cpu_s)
            for path in paths:
                rows.append(
                    {
                        "mode": ROW_MODES[mode],
                        "case": case,
                        "path": path,
                        "host_us": round(1e6 * statistics.median(wall[path]), 2),
                        "cpu_us": round(1e6 * statistics.median(cpu[path]), 2),
                    }
                )
    return rows


def interleaved_cpu_us(fns: dict, rounds: int, calls: int, warmup: int, no_grad, around=None) -> dict:
    """Process CPU time per call in µs of each of ``fns`` (key -> argument-free callable), ``rounds`` rounds in
    which every function runs ``calls`` times in turn (so a load change on a shared machine hits each alike;
    ``warmup`` untimed calls before its first round); ``no_grad(key)``: whether to call it under
    ``torch.no_grad()``; ``around(key)``, if given: a context entered around each batch of the key's calls (as
    :func:`_sdpa_for`). One intra-op thread (:func:`one_thread`). Returns key -> the rounds' samples. For the A/B
    and pieces scripts in scripts/."""
    samples = {key: [] for key in fns}
    with one_thread():
        for r in range(rounds):
            for key, fn in fns.items():
                ctx = contextlib.nullcontext() if around is None else around(key)
                with ctx, torch.no_grad() if no_grad(key) else contextlib.nullcontext():
                    if r == 0:
                        for _ in range(warmup):
                            fn()
                    t = time.process_time()
                    for _ in range(calls):
                        fn()
                    samples[key].append((time.process_time() - t) / calls * 1e6)
    return samples


def measure_cuda(timer: Timer, n: int, repeats: int, fast: bool = True) -> list[dict]:
    """The real calls; ``fast=False``: with the fast launch off (rows ``cuda_run``: every launch through Triton's
    ``JITFunction.run``)."""
    rows = []
    enabled = fast_launch.ENABLED
    try:
        fast_launch.ENABLED = enabled and fast
        launch_configs.clear_launch_cache()
        for case, (q, k, v, layout) in cases("cuda").items():
            for path, fn in _paths(q, k, v, layout).items():
                if path.startswith("validate") or (not fast and "_op" in path):
                    continue
                with _grad_ctx(path):
                    host = 1e6 * timer(fn, repeats=repeats, inner=n, clock="host").median_s
                    device = 1e6 * timer(fn, repeats=1, warmup=0, inner=n, clock="device").median_s
                rows.append(
                    {
                        "mode": "cuda" if fast else "cuda_run",
                        "case": case,
                        "path": path,
                        "host_us": round(host, 2),
                        "device_us": round(device, 2),
                    }
                )
    finally:
        fast_launch.ENABLED = enabled
        launch_configs.clear_launch_cache()
    return rows


CALLS = {"": "no_grad", "_grad": "grad", "_step": "step"}


def summarize(rows: list[dict]) -> list[dict]:
    """Triton minus SDPA host time per (mode, case, call), against the targets: at most SDPA's + 10 us (issue 9)
    and at or below SDPA's (issue 24, the grad call and the step). ``call``: ``no_grad`` (the forward alone),
    ``grad`` (the forward of inputs that require grad) or ``step`` (forward + backward). The stub compares
    process CPU time (a shared machine's load inflates wall time, not the work done), ``cuda`` wall time.
    ``sdpa_us`` / ``at_or_below_sdpa``: against the SDPA path as timed in the row's mode (in the stub modes the
    view stub, a lower bound); ``sdpa_real_us`` / ``at_or_below_real_sdpa``: the ``sdpa_real`` paths (the real op
    at the :data:`TINY` shape) against the Triton path at the same shape (``triton_tiny_us``: its stubbed kernels),
    None in the ``cuda`` modes, which time no such path (their SDPA is the real op)."""
    by = {
        (r["mode"], r["case"], r["path"]): r["cpu_us"] if r["mode"].startswith("stub") else r["host_us"] for r in rows
    }
    out = []
    for (mode, case, path), triton_us in by.items():
        if not path.startswith("triton") or path.startswith(("triton_op", "triton_tiny")):
            continue
        suffix = path.removeprefix("triton")
        sdpa_us = by[(mode, case, "sdpa" + suffix)]
        real_us = by.get((mode, case, "sdpa_real" + suffix))
        tiny_us = by.get((mode, case, "triton_tiny" + suffix))
        diff = triton_us - sdpa_us
        out.append(
            {
                "mode": mode,
                "case": case,
                "call": CALLS[suffix],
                "triton_us": triton_us,
                "sdpa_us": sdpa_us,
                "diff_us": round(diff, 2),
                "target_us": TARGET_US,
                "meets_target": diff <= TARGET_US,
                "at_or_below_sdpa": diff <= 0.0,
                "sdpa_real_us": real_us,
                "triton_tiny_us": tiny_us,
                "at_or_below_real_sdpa": None if real_us is None or tiny_us is None else tiny_us <= real_us,
                "custom_op_us": by.get((mode, case, "triton_op" + suffix)),
            }
        )
    return out


def run(ctx) -> dict:
    n, repeats = (50, 3) if ctx.quick else (500, 7)
    rows = [row for mode in STUB_MODES for row in measure_stub(Timer(torch.device("cpu")), n, repeats, mode)]
    if ctx.cuda:
        for fast in (True, False):
            rows += measure_cuda(Timer(torch.device("cuda")), n if ctx.quick else 200, repeats, fast)
    summary = summarize(rows)
    ctx.write_json({"rows": rows, "summary": summary})
    lines = [
        f"# Host time per attention call ({machine_label()})",
        "",
        "| mode | case | call | Triton us | SDPA us | Triton - SDPA | <= SDPA + 10 us | <= SDPA | Triton us (tiny) "
        "| real SDPA us (tiny) | <= real SDPA | custom op us |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        op = "" if s["custom_op_us"] is None else f"{s['custom_op_us']:.1f}"
        real = "" if s["sdpa_real_us"] is None else f"{s['sdpa_real_us']:.1f}"
        tiny = "" if s["triton_tiny_us"] is None else f"{s['triton_tiny_us']:.1f}"
        below_real = {None: "", True: "yes", False: "NO"}[s["at_or_below_real_sdpa"]]
        lines.append(
            f"| {s['mode']} | {s['case']} | {s['call']} | {s['triton_us']:.1f} | {s['sdpa_us']:.1f} | "
            f"{s['diff_us']:+.1f} | {'yes' if s['meets_target'] else 'NO'} | "
            f"{'yes' if s['at_or_below_sdpa'] else 'NO'} | {tiny} | {real} | {below_real} | {op} |"
        )
    lines += ["", "| mode | case | path | host us (wall) | CPU us | device us |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['case']} | {r['path']} | {r['host_us']:.1f} | {r.get('cpu_us', '')} | "
            f"{r.get('device_us', '')} |"
        )
    ctx.write_text("\n".join(lines) + "\n", "host_overhead.md")
    print("\n".join(lines))
    graded = [s for s in summary if s["call"] != "no_grad"]
    return {
        "rows": len(rows),
        "all_meet_target": all(s["meets_target"] for s in summary),
        "grad_at_or_below_sdpa": all(s["at_or_below_sdpa"] for s in graded),
        # the paths a user gets (stub_triton_run: Triton's run with the fast launch off, an A/B reference)
        "grad_at_or_below_real_sdpa": all(s["at_or_below_real_sdpa"] for s in graded if s["mode"] in _USER_MODES),
        "worst_diff_us": max(s["diff_us"] for s in summary),
    }


BENCHMARK = Benchmark("host_overhead", run=run)
