"""The attention seam between transformers and the RMT backends.

rmt-fast registers one attention implementation and one mask function with transformers under the name
``"rmt_fast"``; no model class is patched. While FastRMT runs a segment, the segment's
:class:`~rmt_fast.kernels.layout.SegmentLayout` is *active* (a context variable):

* the mask function returns the active segment instead of building a 4-D mask, so transformers builds none;
* the attention function receives it as ``attention_mask`` and calls the chosen backend (SDPA, one SDPA kernel
  forced, FlexAttention or Triton), which derives the mask from the layout.

With no active segment (the backbone used on its own, or inside ``generate``) both functions delegate to
transformers' SDPA implementations, so the wrapped model keeps working unchanged.

The backend is decided once per segment (the first layer's call: support check, then for ``"auto"`` the measured
dispatch table of :mod:`rmt_fast.kernels.dispatch`) and cached on the :class:`ActiveSegment`; later layers
compare one key tuple and call the kernel with ``check=False``.

Guards against a silently dropped mask: the mask function refuses mask patterns it cannot express (sliding
windows shorter than the segment, extra mask functions, a causality mismatch), and the attention function
refuses to run while a segment is active if the mask it received is not that segment.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import (
    AttentionMaskInterface,
    bidirectional_mask_function,
    causal_mask_function,
    sdpa_mask,
)

from .kernels import dispatch
from .kernels.flex_attention import flex_block_mask, flex_rmt_attention, flex_supported
from .kernels.layout import SegmentLayout
from .kernels.sdpa_attention import SDPA_KERNELS, needs_mask, sdpa_kernel_supported, sdpa_rmt_attention

logger = logging.getLogger(__name__)

ATTN_NAME = "rmt_fast"
BACKENDS = ("auto", "sdpa", "triton")


class ActiveSegment:
    """What the mask function hands to every attention layer while a segment runs.

    It also carries the segment's backend decision: the first attention call of the segment checks support and
    consults the dispatch table; later layers with the same (shapes, dtypes, devices, needs_grad, dropout) key
    reuse the decision after one tuple comparison, and run the kernel without validating again. And the SDPA
    backend's dense mask of a padded segment, in SDPA's additive form: built by the first layer, reused by the
    others (one mask per segment, not one per layer: a CUDA-graphed segment, whose layout always has counts,
    captured 8 small mask kernels per layer before, and SDPA's bool-to-float conversion in every layer).
    """

    __slots__ = ("layout", "backend", "decision_key", "decision", "block_mask", "mask_key", "mask")

    def __init__(self, layout: SegmentLayout, backend: str):
        self.layout = layout
        self.backend = backend
        self.decision_key: tuple | None = None
        self.decision: str | None = None
        self.block_mask: tuple | None = None  # ((batch, device), FlexAttention block mask) when 'flex' runs
        self.mask_key: tuple | None = None
        self.mask: torch.Tensor | None = None

    def dense_mask(self, q_len: int, device, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``layout.dense_mask(q_len, device)``, built once per segment; with a floating ``dtype``, in the
        additive form SDPA turns a boolean mask into (0 where visible, -inf elsewhere), so that conversion also
        runs once per segment instead of in every layer."""
        key = (q_len, device, dtype)
        if key != self.mask_key:
            mask = self.layout.dense_mask(q_len=q_len, device=device)
            if dtype is not None:
                mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(
                    mask.logical_not(), float("-inf")
                )
            self.mask, self.mask_key = mask, key
        return self.mask


class _ThreadVar:
    """A per-thread variable with the ContextVar get/set/reset API, which torch.compile can trace (Dynamo
    graph-breaks on ``ContextVar.get``, which would split a compiled segment step at every attention layer).
    Segments run synchronously in their thread, so per-thread is the scope needed."""

    def __init__(self, default):
        default_value = default

        class _Local(threading.local):
            def __init__(self):
                self.value = default_value

        self._local = _Local()

    def get(self):
        return self._local.value

    def set(self, value):
        previous = self._local.value
        self._local.value = value
        return previous

    def reset(self, token) -> None:
        self._local.value = token


_ACTIVE = _ThreadVar(None)  # the ActiveSegment while a segment runs
# True while a CUDA-graph runner warms up or captures a step: 'auto' then uses the table's graphed measurements.
_GRAPHED = _ThreadVar(False)


@contextlib.contextmanager
def active_segment(layout: SegmentLayout, backend: str) -> Iterator[ActiveSegment]:
    seg = ActiveSegment(layout, backend)
    token = _ACTIVE.set(seg)
    try:
        yield seg
    finally:
        _ACTIVE.reset(token)


@contextlib.contextmanager
def graphed_step(graphed: bool = True) -> Iterator[None]:
    """Mark the code inside as a step that runs under a CUDA graph (set by :mod:`rmt_fast.cuda_graph` while it
    warms up and captures), so 'auto' picks from the graphed (device-time) measurements."""
    token = _GRAPHED.set(bool(graphed))
    try:
        yield
    finally:
        _GRAPHED.reset(token)


# --------------------------------------------------------------------------------------------- mask function
def rmt_mask(*, q_length: int, kv_length: int, mask_function=None, **kwargs):
    seg = _ACTIVE.get()
    if seg is None:
        return sdpa_mask(q_length=q_length, kv_length=kv_length, mask_function=mask_function, **kwargs)
    layout = seg.layout
    if q_length != layout.seq_len or kv_length != layout.seq_len:
        raise RuntimeError(
            f"rmt_fast: the model asked for a {q_length}x{kv_length} mask but the active segment has "
            f"{layout.seq_len} positions (is a KV cache in use? FastRMT runs segments with use_cache=False)"
        )
    local_size = kwargs.get("local_size")
    if mask_function is causal_mask_function or (local_size is not None and local_size >= kv_length):
        causal = True
    elif mask_function is bidirectional_mask_function:
        causal = False
    else:
        raise NotImplementedError(
            "rmt_fast: the model requested a mask pattern the RMT segment layout cannot express "
            f"(mask_function={getattr(mask_function, '__name__', mask_function)!r}, local_size={local_size}); "
            "sliding windows shorter than the segment and custom mask functions are not supported"
        )
    if causal != layout.causal:
        raise RuntimeError(
            f"rmt_fast: the model builds a {'causal' if causal else 'bidirectional'} mask but the segment "
            f"layout is {'causal' if layout.causal else 'bidirectional'}"
        )
    return seg


# ---------------------------------------------------------------------------------------- attention function
_FALLBACK_LOGGED: set[str] = set()


_TRITON_MODULE: list = []  # [module or None] once imported


def _triton():
    """The Triton kernel module, or None without triton. Imported once, eagerly: FastRMT's constructor calls this,
    so a compiled step never traces the import (an import inside torch.compile is a graph break)."""
    if not _TRITON_MODULE:
        try:
            from .kernels import triton_attention

            _TRITON_MODULE.append(triton_attention)
        except ImportError:  # triton is not installed
            _TRITON_MODULE.append(None)
    return _TRITON_MODULE[0]


def preload(backend: str) -> None:
    """Resolve what ``backend`` may need outside any compiled region (called by FastRMT's constructor)."""
    if backend != "sdpa":
        _triton()
    if backend == "auto":
        dispatch.preload()


def _auto_device_ok(q) -> bool:
    return q.is_cuda  # 'auto' never picks Triton's CPU interpreter


def _needs_grad(q, k, v) -> bool:
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)


def _auto_unsupported(backend: str, q, k, v, layout: SegmentLayout, dropout_p: float) -> str | None:
    """Why the backend the dispatch table named cannot run this case, or None."""
    if backend == "triton":
        mod = _triton()
        return "triton is not installed" if mod is None else mod.rmt_attention_supported(q, k, v, layout, dropout_p)
    if backend == "flex":
        return flex_supported(q, k, v, layout, dropout_p)
    if backend in SDPA_KERNELS:
        return sdpa_kernel_supported(backend, q, k, v, layout, dropout_p)
    return None  # "sdpa": SDPA picks its kernel


def choose_backend(
    requested: str,
    q,
    k,
    v,
    layout: SegmentLayout,
    dropout_p: float,
    *,
    needs_grad: bool | None = None,
    graphed: bool | None = None,
) -> str:
    """The backend to run for this case (one of :data:`rmt_fast.kernels.dispatch.BACKENDS`); 'triton' never falls
    back silently.

    'auto' runs, on CUDA, the backend the measured dispatch table (:mod:`rmt_fast.kernels.dispatch`) names for this
    architecture, dtype, head dim, shape class, ``needs_grad`` and graphed/eager mode: the Triton kernel, SDPA
    with one kernel forced (``"sdpa_flash"``, ``"sdpa_efficient"``, ``"sdpa_cudnn"``), FlexAttention (``"flex"``)
    or plain SDPA; plain SDPA where there is no table or entry, off CUDA, or where the named backend cannot run
    the case (each reason is logged once). ``needs_grad`` and ``graphed`` default to the current autograd state
    and :func:`graphed_step` flag.
    """
    if requested == "sdpa":
        return "sdpa"
    if requested == "triton":
        mod = _triton()
        reason = "triton is not installed" if mod is None else mod.rmt_attention_supported(q, k, v, layout, dropout_p)
        if reason is not None:
            raise ValueError(f"attn_backend='triton' cannot run this case: {reason}")
        return "triton"
    if not _auto_device_ok(q):
        reason = "the inputs are not on a CUDA device"
    else:
        decision = dispatch.decide(
            q,
            k,
            layout,
            needs_grad=_needs_grad(q, k, v) if needs_grad is None else needs_grad,
            graphed=_GRAPHED.get() if graphed is None else graphed,
        )
        if decision.backend == "sdpa":
            reason = decision.reason
        else:
            why = _auto_unsupported(decision.backend, q, k, v, layout, dropout_p)
            if why is None:
                return decision.backend
            reason = f"the dispatch table names {decision.backend}, which cannot run this case: {why}"
    # Log each reason once; not while torch.compile traces (mutating the set would fail a guard: a recompile).
    if reason not in _FALLBACK_LOGGED and not torch.compiler.is_compiling():
        _FALLBACK_LOGGED.add(reason)
        logger.info("rmt_fast: attn_backend='auto' uses SDPA here: %s", reason)
    return "sdpa"


def run_backend(
    backend: str, q, k, v, layout: SegmentLayout, *, scale, dropout_p: float, segment: ActiveSegment | None = None
) -> torch.Tensor:
    """Run the chosen backend. With ``segment`` the decision (support check + table look-up) is made once per
    segment and reused by later calls with the same key; the kernel then runs without validating again (and
    FlexAttention's block mask is built once per segment)."""
    needs_grad = _needs_grad(q, k, v)
    if segment is None:
        chosen = choose_backend(backend, q, k, v, layout, dropout_p, needs_grad=needs_grad)
    else:
        key = (
            q.shape,
            k.shape,
            v.shape,
            q.dtype,
            k.dtype,
            v.dtype,
            q.device,
            k.device,
            v.device,
            needs_grad,
            dropout_p,
        )
        if key == segment.decision_key:
            chosen = segment.decision
        else:
            chosen = choose_backend(backend, q, k, v, layout, dropout_p, needs_grad=needs_grad)
            segment.decision_key, segment.decision = key, chosen
    if chosen == "triton":
        return _triton().rmt_attention(q, k, v, layout, scale=scale, dropout_p=dropout_p, check=False)
    if chosen == "flex":
        block_mask = None
        if segment is not None:
            mask_key = (q.shape[0], q.device)
            if segment.block_mask is None or segment.block_mask[0] != mask_key:
                segment.block_mask = (mask_key, flex_block_mask(layout, q.shape[0], q.device))
            block_mask = segment.block_mask[1]
        return flex_rmt_attention(q, k, v, layout, scale=scale, dropout_p=dropout_p, block_mask=block_mask)
    mask = None
    if segment is not None and needs_mask(layout, q.shape[-2]):
        mask = segment.dense_mask(q.shape[-2], q.device, q.dtype)
    return sdpa_rmt_attention(
        q, k, v, layout, scale=scale, dropout_p=dropout_p, sdpa_kernel=None if chosen == "sdpa" else chosen, mask=mask
    )


def rmt_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    seg = _ACTIVE.get()
    if seg is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if attention_mask is not seg:
        raise RuntimeError(
            "rmt_fast: an RMT segment is running but this attention layer received a mask that was not built "
            f"through transformers' mask interface ({type(attention_mask).__name__}); refusing to drop it"
        )
    if getattr(module, "is_causal", seg.layout.causal) != seg.layout.causal:
        raise RuntimeError("rmt_fast: the attention module's causality disagrees with the segment layout")
    out = run_backend(seg.backend, query, key, value, seg.layout, scale=scaling, dropout_p=dropout, segment=seg)
    return out, None


AttentionInterface.register(ATTN_NAME, rmt_attention_forward)
AttentionMaskInterface.register(ATTN_NAME, rmt_mask)
