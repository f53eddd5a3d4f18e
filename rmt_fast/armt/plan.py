"""One FastARMT call's segment inputs: static-width token slots, positions, rotary tables and attention layouts.

Every segment is ``[token slots (segment_size) | m memory slots]``. A short last segment is padded to the
static width: its padded token slots are hidden keys and its memory slots get the positions the unpadded
segment gives them (``length .. length + m - 1``), so the result equals the reference's unpadded segment.
The caller's attention mask becomes, per segment, a visible run per row (``token_starts``/``token_counts``)
or, when some row has a hole, a token mask; memory slots are always visible. A group of cells (one step of
the schedule) concatenates its segments' layouts over rows. All masks are read with one host sync per call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernels.layout import SegmentLayout, mask_runs


def first_segment_arg(first: bool, segs, device) -> bool | Tensor:
    """The write rule's first-segment flag for a step over ``segs`` (segment indices, one per cell): a bool when
    all cells agree, else a (cells, 1, 1, 1, 1) bool tensor. ``first``: the call starts a stream (segment 0 is its
    first segment)."""
    firsts = [first and s == 0 for s in segs]
    if all(firsts):
        return True
    if not any(firsts):
        return False
    return torch.tensor(firsts, device=device).view(-1, 1, 1, 1, 1)


class CallPlan:
    def __init__(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        segments: list[tuple[int, int]],
        size: int,
        m: int,
        rotary=None,
        dtype=None,
    ):
        self.ids, self.segments, self.size, self.m = input_ids, segments, size, m
        self.batch = input_ids.shape[0]
        device = input_ids.device
        self.device = device
        slot = torch.arange(size + m, device=device)
        self._positions = {}
        for _, length in segments:
            if length not in self._positions:
                self._positions[length] = torch.where(slot >= size, slot - size + length, slot)[None]
        # rotary tables per segment length (1, S, dh)
        self._rope = {}
        if rotary is not None:
            probe = torch.empty(0, dtype=dtype, device=device)
            for length, pos in self._positions.items():
                self._rope[length] = rotary(probe, pos)
        self._runs = self._mask_runs(attention_mask)
        self._plain = SegmentLayout(0, size, m, True)

    def _mask_runs(self, attention_mask):
        """Per segment: None (every token slot visible), ('run', starts, ends) or ('mask', (B, size) bool)."""
        b, size = self.batch, self.size
        if attention_mask is None:
            out = []
            for _, length in self.segments:
                if length == size:
                    out.append(None)
                else:
                    ends = torch.full((b,), length, dtype=torch.int32, device=self.device)
                    out.append(("run", torch.zeros_like(ends), ends))
            return out
        padded = torch.stack([F.pad(attention_mask[:, a : a + n].bool(), (0, size - n)) for a, n in self.segments])
        starts, ends, holes = mask_runs(padded)
        full = (starts == 0) & (ends == size)
        flags = torch.stack([holes.any(1), full.all(1)], 1).tolist()  # the one host sync
        out = []
        for t, (has_holes, all_full) in enumerate(flags):
            if has_holes:
                out.append(("mask", padded[t]))
            elif all_full:
                out.append(None)
            else:
                out.append(("run", starts[t], ends[t]))
        return out

    # ---------------------------------------------------------------------------------------- per segment
    def segment_ids(self, s: int) -> Tensor:
        start, length = self.segments[s]
        return F.pad(self.ids[:, start : start + length], (0, self.size - length))

    def positions(self, s: int) -> Tensor:
        """(1, S) position ids of segment s's slots."""
        return self._positions[self.segments[s][1]]

    # -------------------------------------------------------------------------------------------- per group
    def layout(self, segs: list[int]) -> SegmentLayout:
        """The layout over the rows of the cells of segments ``segs`` (cell-major, B rows each)."""
        runs = [self._runs[s] for s in segs]
        if all(r is None for r in runs):
            return self._plain
        size, m, b = self.size, self.m, self.batch
        if any(r is not None and r[0] == "mask" for r in runs):
            masks = []
            for r in runs:
                if r is None:
                    masks.append(torch.ones(b, size, dtype=torch.bool, device=self.device))
                elif r[0] == "mask":
                    masks.append(r[1])
                else:
                    idx = torch.arange(size, device=self.device)[None]
                    masks.append((idx >= r[1][:, None]) & (idx < r[2][:, None]))
            return SegmentLayout(0, size, m, True, token_mask=torch.cat(masks))
        starts, ends = [], []
        for r in runs:
            if r is None:
                ends.append(torch.full((b,), size, dtype=torch.int32, device=self.device))
                starts.append(torch.zeros(b, dtype=torch.int32, device=self.device))
            else:
                starts.append(r[1].to(torch.int32))
                ends.append(r[2].to(torch.int32))
        return SegmentLayout(0, size, m, True, token_counts=torch.cat(ends), token_starts=torch.cat(starts))

    def rope(self, segs: list[int]) -> tuple[Tensor, Tensor] | None:
        """(cos, sin) for the cells' rows: (1, S, dh) when all segments are full, else (G * B, S, dh)."""
        if not self._rope:
            return None
        lengths = [self.segments[s][1] for s in segs]
        if all(n == lengths[0] for n in lengths):
            return self._rope[lengths[0]]
        b = self.batch
        cos = torch.cat([self._rope[n][0].expand(b, -1, -1) for n in lengths])
        sin = torch.cat([self._rope[n][1].expand(b, -1, -1) for n in lengths])
        return cos, sin
