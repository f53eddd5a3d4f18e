"""Segmentation plans for FastRMT, computed once per call, and the decoder segment's static buffers.

Decoders: (start, length) of each segment along the sequence, left- or right-aligned.

Encoders (the published encoder's rules, vectorised): drop pad/CLS/SEP from every row, keep the first
``segment_size * max_n_segments`` content tokens, split each row into segments (right-aligned by default: the
first one is short), and align rows on their last segment so shorter rows start with empty segments. Each
segment becomes ``[CLS] [MEM]*m [SEP] tokens [SEP] [PAD]*`` of static width, built for all segments at once on
the device; one host synchronisation per call reads the row lengths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .kernels.layout import SegmentLayout, mask_runs


def decoder_plan(length: int, size: int, alignment: str) -> list[tuple[int, int]]:
    if alignment == "left":
        bounds = list(range(0, length, size)) + [length]
    else:
        bounds = (list(range(length, 0, -size)) + [0])[::-1]
    return [(a, b - a) for a, b in zip(bounds, bounds[1:])]


def decoder_targets(labels: Tensor | None, labels_mask: Tensor | None):
    """(B, T) targets where position p holds the label it predicts (p + 1), -100 where nothing counts,
    and the number of counted positions (the loss denominator)."""
    if labels is None:
        return None, None
    keep = labels[:, 1:] != -100
    if labels_mask is not None:
        keep = keep & labels_mask[:, 1:].bool()
    targets = torch.nn.functional.pad(torch.where(keep, labels[:, 1:], -100), (0, 1), value=-100)
    return targets, keep.sum()


@dataclass
class EncoderSegment:
    ids: Tensor  # (b, input_size) ids; memory slots hold the pad id (their embeddings are replaced)
    counts: Tensor | None  # (b,) valid prefix length; None when every row fills the input
    labels: Tensor | None  # (b,) / (b, k) sequence labels or (b, input_size) token labels
    rows: Tensor | None  # indices of the non-empty rows, None when all rows take part


@dataclass
class EncoderPlan:
    n_segments: int  # the grid: max_n_segments, or the longest row's segment count
    segments: list[EncoderSegment]  # the segments that run (those empty in every row are left out)


def encoder_plan(input_ids: Tensor, labels: Tensor | None, st, input_size: int, m: int) -> EncoderPlan:
    b, total = input_ids.shape
    size = st.segment_size
    device = input_ids.device
    special = torch.tensor([st.pad_token_id, st.cls_token_id, st.sep_token_id], device=device)
    keep = ~torch.isin(input_ids, special)
    lengths = keep.sum(1)
    if st.max_n_segments is not None:
        lengths = lengths.clamp(max=size * st.max_n_segments)
    lengths_host = lengths.tolist()  # the one host sync of the call
    if min(lengths_host) == 0:
        raise ValueError("input_ids: a row has no content tokens (only pad/cls/sep)")
    n_rows = [-(-c // size) for c in lengths_host]
    n = st.max_n_segments or max(n_rows)

    # Content tokens first, in order (a stable sort moves dropped tokens to the end of each row).
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
    content = input_ids.gather(1, order)
    token_labels = labels is not None and labels.ndim == 2 and labels.shape[1] == total
    content_labels = labels.gather(1, order) if token_labels else None

    i = torch.arange(total, device=device)[None]
    n_rows_t = torch.tensor(n_rows, device=device)[:, None]
    right = st.segment_alignment == "right"
    pad = (n_rows_t * size - lengths[:, None]) if right else torch.zeros_like(n_rows_t)
    local = (i + pad) // size
    slot = i + pad - local * size - torch.where(local == 0, pad, 0)
    valid = i < lengths[:, None]
    seg = n - n_rows_t + local
    row = torch.arange(b, device=device)[:, None].expand(b, total)

    ids = torch.full((n, b, input_size), st.pad_token_id, dtype=input_ids.dtype, device=device)
    ids[:, :, 0] = st.cls_token_id
    ids[:, :, 1 + m] = st.sep_token_id
    where = (seg[valid], row[valid], (2 + m + slot)[valid])
    ids.index_put_(where, content[valid])
    seg_len = torch.zeros(n, b, dtype=torch.long, device=device)
    seg_len.index_put_(where[:2], torch.ones_like(where[0]), accumulate=True)
    ids.scatter_(2, (2 + m + seg_len)[..., None].clamp(max=input_size - 1), st.sep_token_id)
    counts = torch.where(seg_len > 0, seg_len + m + 3, 0).to(torch.int32)
    seg_labels = None
    if token_labels:
        seg_labels = torch.full((n, b, input_size), -100, dtype=labels.dtype, device=device)
        seg_labels.index_put_(where, content_labels[valid])

    segments = []
    for t in range(n):
        active = [r for r in range(b) if t >= n - n_rows[r]]
        if not active:
            continue
        full = all(
            _segment_length(lengths_host[r], n_rows[r], t - (n - n_rows[r]), size, right) == size for r in active
        )
        if labels is None:
            lab = None
        else:
            lab = seg_labels[t] if token_labels else labels
        if len(active) == b:
            segments.append(EncoderSegment(ids[t], None if full else counts[t], lab, None))
        else:
            rows = torch.tensor(active, device=device)
            segments.append(EncoderSegment(ids[t, rows], counts[t, rows], None if lab is None else lab[rows], rows))
    return EncoderPlan(n, segments)


def _segment_length(c: int, n_row: int, local: int, size: int, right: bool) -> int:
    short = c - (n_row - 1) * size
    if right:
        return short if local == 0 else size
    return short if local == n_row - 1 else size


class DecoderStatic:
    """Per-call-shape constants of the decoder segment: token slot indices, positions, the all-valid mask;
    and the conversion of a caller's attention mask into each segment's layout (:meth:`mask_plan`)."""

    def __init__(self, batch: int, m: int, size: int, device):
        self.m, self.size = m, size
        seq = 2 * m + size
        self.token_index = torch.arange(m, m + size, device=device)
        self.slot = torch.arange(seq, device=device)
        self.full_positions = self.slot[None]
        self.all_valid = torch.ones(batch, seq, dtype=torch.bool, device=device)
        self._counts: dict[int, Tensor] = {}
        self._buffer: Tensor | None = None
        self.batch = batch

    def segment(self, input_ids, targets, start: int, length: int):
        """A segment's inputs padded to the static width: ids, counts (None when full), targets."""
        pad = self.size - length
        ids = F.pad(input_ids[:, start : start + length], (0, pad))
        counts = self.counts(length) if pad else None
        seg_targets = None
        if targets is not None:
            seg_targets = F.pad(targets[:, start : start + length], (0, pad), value=-100)
        return ids, counts, seg_targets

    def mask_plan(self, attention_mask: Tensor | None, plan: list[tuple[int, int]]) -> list:
        """What the caller's (B, T) attention mask hides in each segment of ``plan``, for :meth:`layout`:

        * None: nothing beyond the static padding (no mask, or all ones there);
        * ``(starts, ends)``, each (B,) int32: every row sees one contiguous run of its token slots (left or
          right padding): the Triton kernel runs it;
        * a (B, size) bool token mask: some row has a hole (a hidden token between visible ones): SDPA only.

        Computed for all segments at once: one host synchronisation per call, none per segment.
        """
        if attention_mask is None:
            return [None] * len(plan)
        hidden_pad = torch.stack([F.pad(attention_mask[:, a : a + n].bool(), (0, self.size - n)) for a, n in plan])
        starts, ends, holes = mask_runs(hidden_pad)  # (n, B): the padded tail is hidden, so ends <= length
        lengths = torch.tensor([n for _, n in plan], dtype=ends.dtype).to(ends.device, non_blocking=True)
        all_ones = ((starts == 0) & (ends == lengths[:, None])).all(1)  # with no holes: every token visible
        flags = torch.stack([holes.any(1), all_ones], 1).tolist()  # the one host sync of the call
        out = []
        for t, (has_holes, ones) in enumerate(flags):
            if has_holes:
                out.append(hidden_pad[t])
            elif ones:
                out.append(None)
            else:
                out.append((starts[t], ends[t]))
        return out

    def layout(self, counts: Tensor | None, visible) -> SegmentLayout:
        """The decoder segment's layout: ``counts`` (B,) valid token slots of a short segment (None: full),
        ``visible`` one entry of :meth:`mask_plan` (the caller's mask, which then decides key visibility)."""
        m, size = self.m, self.size
        if visible is None:
            return SegmentLayout(m, size, m, True, token_counts=counts)
        if isinstance(visible, tuple):
            starts, ends = visible
            return SegmentLayout(m, size, m, True, token_counts=ends, token_starts=starts)
        return SegmentLayout(m, size, m, True, token_mask=visible)

    def embeds_buffer(self, dtype, hidden: int) -> Tensor:
        """The segment input buffer: one per call shape under no_grad, a fresh one per segment with autograd
        (a reused buffer would be overwritten while the graph still needs it)."""
        shape = (self.batch, 2 * self.m + self.size, hidden)
        if torch.is_grad_enabled():
            return torch.empty(shape, dtype=dtype, device=self.slot.device)
        if self._buffer is None or self._buffer.dtype != dtype:
            self._buffer = torch.empty(shape, dtype=dtype, device=self.slot.device)
        return self._buffer

    def counts(self, length: int) -> Tensor:
        if length not in self._counts:
            self._counts[length] = torch.full((self.batch,), length, dtype=torch.int32, device=self.slot.device)
        return self._counts[length]

    def positions(self, counts: Tensor | None) -> Tensor:
        """Read slots 0..m-1, tokens m.., write slots right after the valid tokens (as in the reference's
        unpadded short segment); padded token slots get harmless in-range positions."""
        if counts is None:
            return self.full_positions
        write = self.slot >= self.m + self.size
        shifted = self.slot[None] - self.size + counts[:, None].long()
        return torch.where(write[None], shifted, self.slot[None])

    def key_valid(self, layout: SegmentLayout) -> Tensor:
        valid = layout.key_valid()
        return self.all_valid if valid is None else valid
