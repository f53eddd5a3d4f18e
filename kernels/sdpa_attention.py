"""RMT segment attention on torch SDPA: the portable backend.

It reads the segment layout: a plain causal or bidirectional segment goes to SDPA with ``is_causal`` and no
mask (so SDPA may pick its flash or efficient kernel), and only a padded segment gets a boolean mask built
from the layout. Grouped-query attention uses SDPA's ``enable_gqa`` rather than copying K/V.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .layout import SegmentLayout


def sdpa_rmt_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: SegmentLayout,
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
    mask: Tensor | None = None,
) -> Tensor:
    """q (B, Hq, Tq, D), k and v (B, Hkv, Tk, D) -> output (B, Tq, Hq, D), the layout transformers expects.

    ``mask``: ``layout.dense_mask(q_len=Tq)`` already built by the caller (every layer of a segment reuses one),
    boolean or in SDPA's additive float form (0 visible, -inf hidden), used where the layout needs a mask; None
    builds it here."""
    tq, tk = q.shape[-2], k.shape[-2]
    if tk != layout.seq_len:
        raise ValueError(f"k has {tk} positions but the segment layout has {layout.seq_len}")
    enable_gqa = q.shape[1] != k.shape[1]
    if layout.is_padded or (layout.causal and tq != tk):
        # (a decode step: queries at the end; SDPA's is_causal aligns top-left, so the mask is built)
        attn_mask = mask if mask is not None else layout.dense_mask(q_len=tq, device=q.device)
        is_causal = False
    else:
        attn_mask, is_causal = None, layout.causal
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
        enable_gqa=enable_gqa,
    )  # fmt: skip
    return out.transpose(1, 2)
