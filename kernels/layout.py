"""The RMT segment layout: the one description of a segment's attention mask.

A segment's sequence is ``[read slots | token slots | write slots]``:

* ``num_read`` read-memory slots, always visible as keys;
* ``num_tokens`` token slots (a static capacity), of which only the valid ones are visible as keys:
  either one contiguous run per row, ``[token_starts[b], token_counts[b])`` (``token_starts`` omitted: from
  0, i.e. the first ``token_counts[b]`` slots: a right-padded segment), the case every backend runs,
  or those set in ``token_mask[b]`` (an arbitrary caller mask with holes; the Triton kernel refuses it);
* ``num_write`` write-memory slots, always visible as keys;
* ``causal``: a query at position i sees keys at positions j <= i; otherwise attention is bidirectional.

``token_counts[b]`` is thus the END (exclusive) of row b's visible run; both are clamped to
``[0, num_tokens]`` and an end at or before the start gives an empty run. :func:`mask_runs` turns a 0/1 token
mask into starts, ends and a per-row "has holes" verdict.

Encoders keep their memory inside the token region (``[CLS] [MEM]*m [SEP] tokens [SEP] [PAD]*``), so they
use ``num_read = num_write = 0`` and a per-row valid count.

The Triton kernel, the SDPA fallback and the dense reference all read this object, so the mask logic
lives here and nowhere else. Nothing here imports transformers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


@dataclass(frozen=True, eq=False)
class SegmentLayout:
    num_read: int
    num_tokens: int
    num_write: int
    causal: bool
    token_counts: Tensor | None = None
    token_mask: Tensor | None = None
    token_starts: Tensor | None = None

    def __post_init__(self):
        for name in ("num_read", "num_tokens", "num_write"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"SegmentLayout: {name} must be a non-negative int, got {value!r}")
        if self.seq_len == 0:
            raise ValueError("SegmentLayout: the segment is empty (num_read + num_tokens + num_write == 0)")
        if self.token_counts is not None and self.token_mask is not None:
            raise ValueError("SegmentLayout: give token_counts or token_mask, not both")
        if self.token_counts is not None:
            c = self.token_counts
            if not isinstance(c, Tensor) or c.ndim != 1 or c.dtype not in _INT_DTYPES:
                raise ValueError(
                    f"SegmentLayout: token_counts must be a 1-D integer tensor of shape (batch,), got {_describe(c)}"
                )
        if self.token_starts is not None:
            s = self.token_starts
            if self.token_counts is None:
                raise ValueError("SegmentLayout: token_starts needs token_counts (the ends of the visible runs)")
            if not isinstance(s, Tensor) or s.ndim != 1 or s.dtype not in _INT_DTYPES:
                raise ValueError(
                    f"SegmentLayout: token_starts must be a 1-D integer tensor of shape (batch,), got {_describe(s)}"
                )
            if s.shape != self.token_counts.shape or s.device != self.token_counts.device:
                raise ValueError(
                    "SegmentLayout: token_starts and token_counts must have one shape and device, got "
                    f"{tuple(s.shape)} on {s.device} and {tuple(self.token_counts.shape)} on {self.token_counts.device}"
                )
        if self.token_mask is not None:
            m = self.token_mask
            if not isinstance(m, Tensor) or m.ndim != 2 or m.dtype != torch.bool or m.shape[1] != self.num_tokens:
                raise ValueError(
                    f"SegmentLayout: token_mask must be a bool tensor of shape (batch, {self.num_tokens}), "
                    f"got {_describe(m)}"
                )

    # ----------------------------------------------------------------------------------------------- shape
    @property
    def seq_len(self) -> int:
        return self.num_read + self.num_tokens + self.num_write

    @property
    def write_start(self) -> int:
        return self.num_read + self.num_tokens

    @property
    def is_padded(self) -> bool:
        """True when some token slots may be invisible (a mask beyond plain causal/bidirectional)."""
        return self.token_counts is not None or self.token_mask is not None

    @property
    def batch_size(self) -> int | None:
        if self.token_counts is not None:
            return self.token_counts.shape[0]
        if self.token_mask is not None:
            return self.token_mask.shape[0]
        return None

    # ------------------------------------------------------------------------------------------------ mask
    def key_valid(self, device: torch.device | str | None = None) -> Tensor | None:
        """(B, seq_len) bool: which key positions are visible; None when all are."""
        if not self.is_padded:
            return None
        if self.token_mask is not None:
            tok = self.token_mask.to(device) if device is not None else self.token_mask
        else:
            counts = self.token_counts.to(device) if device is not None else self.token_counts
            idx = torch.arange(self.num_tokens, device=counts.device)
            tok = idx[None, :] < counts[:, None].to(idx.dtype)
            if self.token_starts is not None:
                starts = self.token_starts.to(counts.device)
                tok = tok & (idx[None, :] >= starts[:, None].to(idx.dtype))
        b = tok.shape[0]
        ones_r = tok.new_ones(b, self.num_read)
        ones_w = tok.new_ones(b, self.num_write)
        return torch.cat([ones_r, tok, ones_w], dim=1)

    def dense_mask(self, q_len: int | None = None, device: torch.device | str | None = None) -> Tensor:
        """(B or 1, 1, q_len, seq_len) bool, True where a query may attend a key.

        ``q_len < seq_len`` places the queries at the end of the sequence (a decode step).
        """
        q_len = self.seq_len if q_len is None else q_len
        if q_len > self.seq_len:
            raise ValueError(f"q_len ({q_len}) exceeds the segment length ({self.seq_len})")
        if device is None:
            device = next((t.device for t in (self.token_counts, self.token_mask) if t is not None), "cpu")
        kv = torch.arange(self.seq_len, device=device)
        if self.causal:
            q = torch.arange(self.seq_len - q_len, self.seq_len, device=device)
            mask = (kv[None, :] <= q[:, None])[None, None]
        else:
            mask = torch.ones(1, 1, q_len, self.seq_len, dtype=torch.bool, device=device)
        valid = self.key_valid(device)
        if valid is not None:
            mask = mask & valid[:, None, None, :]
        return mask

    def mask_mod(self):
        """The mask as a FlexAttention ``mask_mod(b, h, q_idx, kv_idx) -> bool``, for ``create_block_mask``
        (or any broadcasting integer tensors): the same positions as :meth:`dense_mask` with ``q_len ==
        seq_len``. Computed from the token runs' ends (and starts), or looked up in ``token_mask``."""
        read, write_start, causal = self.num_read, self.write_start, self.causal
        counts, starts, token_mask = self.token_counts, self.token_starts, self.token_mask
        if counts is not None:
            counts = counts.long().clamp(0, self.num_tokens)
            starts = None if starts is None else starts.long().clamp(0, self.num_tokens)
        if token_mask is not None:  # padded with one visible slot each side: memory slots index into it
            token_mask = torch.nn.functional.pad(token_mask, (1, 1), value=True)

        def mask_mod(b, h, q_idx, kv_idx):
            if counts is not None:
                tok = kv_idx - read
                run = (tok < counts[b]) if starts is None else (tok < counts[b]) & (tok >= starts[b])
                visible = run | (kv_idx < read) | (kv_idx >= write_start)
            elif token_mask is not None:
                slot = (kv_idx - read + 1).clamp(min=0)  # memory slots: the pads at 0 and num_tokens + 1
                slot = torch.where(kv_idx >= write_start, self.num_tokens + 1, slot)
                visible = token_mask[b, slot]
            else:
                visible = kv_idx >= 0
            return visible & (kv_idx <= q_idx) if causal else visible

        return mask_mod


def mask_runs(mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A (..., L) 0/1 or bool token mask -> ``(starts, ends, holes)``, each of shape (...,).

    ``[starts, ends)`` spans the row's visible tokens, from its first to its last (int32; 0, 0 for a row with
    none); ``holes`` (bool) is True where some token inside that span is hidden, i.e. the row is not one
    contiguous run and needs the general ``token_mask`` layout. Vectorised, on the mask's device, no sync.
    """
    if not isinstance(mask, Tensor) or mask.ndim < 1:
        raise ValueError(f"mask_runs: mask must be a tensor of shape (..., L), got {_describe(mask)}")
    m = mask.bool()
    length = m.shape[-1]
    any_visible = m.any(-1)
    first = m.to(torch.uint8).argmax(-1)  # the first maximal index
    last = length - 1 - m.flip(-1).to(torch.uint8).argmax(-1)
    starts = torch.where(any_visible, first, 0).to(torch.int32)
    ends = torch.where(any_visible, last + 1, 0).to(torch.int32)
    holes = m.sum(-1, dtype=torch.int32) != ends - starts
    return starts, ends, holes


def _describe(x) -> str:
    if isinstance(x, Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"{type(x).__name__}"
