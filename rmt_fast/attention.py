"""The attention seam between transformers and the RMT backends.

rmt-fast registers one attention implementation and one mask function with transformers under the name
``"rmt_fast"``; no model class is patched. While FastRMT runs a segment, the segment's
:class:`~rmt_fast.kernels.layout.SegmentLayout` is *active* (a context variable):

* the mask function returns the active segment instead of building a 4-D mask, so transformers builds none;
* the attention function receives it as ``attention_mask`` and calls the chosen backend (SDPA or Triton),
  which derives the mask from the layout.

With no active segment (the backbone used on its own, or inside ``generate``) both functions delegate to
transformers' SDPA implementations, so the wrapped model keeps working unchanged.

Guards against a silently dropped mask: the mask function refuses mask patterns it cannot express (sliding
windows shorter than the segment, extra mask functions, a causality mismatch), and the attention function
refuses to run while a segment is active if the mask it received is not that segment.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import (
    AttentionMaskInterface,
    bidirectional_mask_function,
    causal_mask_function,
    sdpa_mask,
)

from .kernels.layout import SegmentLayout
from .kernels.sdpa_attention import sdpa_rmt_attention

logger = logging.getLogger(__name__)

ATTN_NAME = "rmt_fast"
BACKENDS = ("auto", "sdpa", "triton")


@dataclass(frozen=True, eq=False)
class ActiveSegment:
    """What the mask function hands to every attention layer while a segment runs."""

    layout: SegmentLayout
    backend: str


_ACTIVE: contextvars.ContextVar[ActiveSegment | None] = contextvars.ContextVar("rmt_fast_segment", default=None)


@contextlib.contextmanager
def active_segment(layout: SegmentLayout, backend: str) -> Iterator[ActiveSegment]:
    seg = ActiveSegment(layout, backend)
    token = _ACTIVE.set(seg)
    try:
        yield seg
    finally:
        _ACTIVE.reset(token)


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


def _triton():
    try:
        return importlib.import_module("rmt_fast.kernels.rmt_attention")
    except ImportError:  # triton is not installed
        return None


def choose_backend(requested: str, q, k, v, layout: SegmentLayout, dropout_p: float) -> str:
    """The backend to run for this call: decided per call; 'triton' never falls back silently."""
    if requested == "sdpa":
        return "sdpa"
    mod = _triton()
    if mod is None:
        reason = "triton is not installed"
    elif requested == "auto" and not q.is_cuda:
        reason = "the inputs are not on a CUDA device"  # 'auto' never picks Triton's CPU interpreter
    else:
        reason = mod.rmt_attention_supported(q, k, v, layout, dropout_p)
    if reason is None:
        return "triton"
    if requested == "triton":
        raise ValueError(f"attn_backend='triton' cannot run this case: {reason}")
    if reason not in _FALLBACK_LOGGED:
        _FALLBACK_LOGGED.add(reason)
        logger.info("rmt_fast: attn_backend='auto' uses SDPA here: %s", reason)
    return "sdpa"


def run_backend(backend: str, q, k, v, layout: SegmentLayout, *, scale, dropout_p: float) -> torch.Tensor:
    chosen = choose_backend(backend, q, k, v, layout, dropout_p)
    if chosen == "triton":
        return _triton().rmt_attention(q, k, v, layout, scale=scale, dropout_p=dropout_p)
    return sdpa_rmt_attention(q, k, v, layout, scale=scale, dropout_p=dropout_p)


def rmt_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    seg = _ACTIVE.get()
    if seg is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)  # fmt: skip
    if attention_mask is not seg:
        raise RuntimeError(
            "rmt_fast: an RMT segment is running but this attention layer received a mask that was not built "
            f"through transformers' mask interface ({type(attention_mask).__name__}); refusing to drop it"
        )
    if getattr(module, "is_causal", seg.layout.causal) != seg.layout.causal:
        raise RuntimeError("rmt_fast: the attention module's causality disagrees with the segment layout")
    out = run_backend(seg.backend, query, key, value, seg.layout, scale=scaling, dropout_p=dropout)
    return out, None


AttentionInterface.register(ATTN_NAME, rmt_attention_forward)
AttentionMaskInterface.register(ATTN_NAME, rmt_mask)
