"""RMT segment attention on FlexAttention: the layout's ``mask_mod`` (:meth:`SegmentLayout.mask_mod`) turned into
a block mask (``create_block_mask``), and ``flex_attention`` compiled on CUDA (eager elsewhere: the CPU tests).
What the dispatch table names ``"flex"``. FlexAttention has no dropout and the mask_mod describes a full segment
(as many queries as keys): :func:`flex_supported` refuses the rest.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .layout import SegmentLayout

_COMPILED: list = []  # [compiled flex_attention] once built


def _flex_attention(device: torch.device):
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return _eager_flex  # unfused (it materialises the scores): for the CPU tests
    if not _COMPILED:
        _COMPILED.append(torch.compile(flex_attention, dynamic=False))
    return _COMPILED[0]


def _eager_flex(*args, **kwargs):
    from torch.nn.attention.flex_attention import flex_attention

    if torch.compiler.is_compiling():  # traced: compiled with the surrounding graph
        return flex_attention(*args, **kwargs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(*args, **kwargs)


def flex_supported(q: Tensor, k: Tensor, v: Tensor, layout: SegmentLayout, dropout_p: float = 0.0) -> str | None:
    """Why FlexAttention cannot run this call, or None."""
    if dropout_p:
        return f"FlexAttention has no dropout (dropout_p={dropout_p})"
    if q.shape[-2] != k.shape[-2]:
        return f"a decode step ({q.shape[-2]} queries, {k.shape[-2]} keys): the layout's mask_mod is for full segments"
    if k.shape[-2] != layout.seq_len:
        return f"k has {k.shape[-2]} positions but the segment layout has {layout.seq_len}"
    if not q.is_cuda and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return "FlexAttention has no backward on the CPU"
    if q.shape[1] % k.shape[1]:
        return f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads"
    return None


def flex_block_mask(layout: SegmentLayout, batch: int, device: torch.device):
    """The layout's block mask for a batch of ``batch`` rows (build it once per segment and pass it on)."""
    from torch.nn.attention.flex_attention import create_block_mask

    n = layout.seq_len
    return create_block_mask(layout.mask_mod(), batch, None, n, n, device=device)


def flex_rmt_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: SegmentLayout,
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
    block_mask=None,
) -> Tensor:
    """q (B, Hq, T, D), k and v (B, Hkv, T, D) -> output (B, T, Hq, D), like ``sdpa_rmt_attention``.
    ``block_mask``: :func:`flex_block_mask` of this layout and batch (built here when None)."""
    reason = flex_supported(q, k, v, layout, dropout_p)
    if reason is not None:
        raise ValueError(f"flex_rmt_attention: {reason}")
    if block_mask is None:
        block_mask = flex_block_mask(layout, q.shape[0], q.device)
    out = _flex_attention(q.device)(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(1, 2)
