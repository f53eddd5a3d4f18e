"""Dense masked RMT attention in float64 (by default): the reference every attention backend is tested against.

It builds the full (B, H, Tq, Tk) score matrix from ``SegmentLayout.dense_mask``: for tests, not for speed."""

from __future__ import annotations

import torch
from torch import Tensor

from .layout import SegmentLayout


def dense_rmt_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: SegmentLayout,
    *,
    scale: float | None = None,
    dropout_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    upcast: torch.dtype = torch.float64,
) -> Tensor:
    """Plain dense masked attention in high precision: the reference every backend is tested against.

    ``dropout_mask`` (B, Hq, Tq, Tk) bool, True = keep, applies inverted dropout with rate ``dropout_p``.
    Returns (B, Tq, Hq, D) in ``upcast`` precision.
    """
    qf, kf, vf = (t.to(upcast) for t in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    kf = kf.repeat_interleave(groups, dim=1)
    vf = vf.repeat_interleave(groups, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("bhqd,bhkd->bhqk", qf, kf) * scale
    mask = layout.dense_mask(q_len=q.shape[-2], device=q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if dropout_mask is not None:
        probs = probs * dropout_mask.to(upcast) / (1.0 - dropout_p)
    out = torch.einsum("bhqk,bhkd->bhqd", probs, vf)
    return out.transpose(1, 2)
