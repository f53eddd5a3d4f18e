"""Attention weights of the memory operations, per segment and layer (the 1M-token paper's Figure 6).

:func:`memory_attention` reruns an RMT's segments (FastRMT or ReferenceRMT) through transformers' ``"eager"``
attention with ``output_attentions=True``, segment by segment as ReferenceRMT runs them, carrying the same memory
from one segment to the next, and keeps the attention probabilities that involve memory. The wrapper's own
forward is untouched: nothing here runs unless called, and the numbers do not depend on which attention backend
(SDPA, Triton) the wrapper uses, since the rerun always goes through eager attention. The rerun is done in eval
mode (no dropout) under ``torch.no_grad()``; the backbone's attention implementation and training mode are
restored afterwards.

What "write slots" and "read slots" are, per kind of backbone:

* **decoder**, segment ``[memory | tokens | memory]`` (``2m + L`` positions, causal): the *read slots* are the
  first m positions, which carry the memory in (keys that the tokens attend to); the *write slots* are the last
  m positions, whose outputs become the next memory (queries, attending causally to the read slots, every token
  and the write slots before them). The *answering token* is a token slot, by default the segment's last token.
* **encoder**, segment ``[CLS] [MEM]*m [SEP] tokens [SEP] [PAD]*`` (bidirectional): the same m slots
  (positions 1..m) are both read and write slots: their inputs are the memory read from the previous segment
  and their outputs are the memory written for the next one. The *answering token* is ``[CLS]`` (position 0),
  whose output the classification head reads.

Per segment and layer this keeps ``write`` (the write slots' attention over every key position of the segment)
and ``answer`` (the answering token's attention over every key position, of which ``read`` is the part on the
read slots); with ``full=True`` also the whole (S x S) attention matrix. Rows sum to one over the visible keys.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import RMTBase
from .segments import decoder_plan, encoder_plan


@dataclass
class SegmentAttention:
    """The memory attention of one segment. ``b`` is the number of batch rows in the segment (``rows`` picks them
    out of the batch for encoder rows that start with empty segments; None: every row), S its positions, H heads.
    """

    index: int  # the segment's number (0 = first)
    rows: Tensor | None  # (b,) batch rows in this segment, None for all
    ids: Tensor  # (b, S) token ids at each position; -1 at the memory slots
    key_valid: Tensor  # (b, S) bool: the key positions attention may see (padding is False)
    source_positions: Tensor  # (b, S) int64: the input_ids column each position holds, -1 for memory/specials/pad
    read_slots: range  # key positions of the memory read in
    write_slots: range  # query positions whose outputs become the next memory
    answer_position: int  # query position of the answering token ([CLS] or a decoder token)
    write: list[Tensor]  # per layer (b, H, m, S): write-slot queries over all key positions
    answer: list[Tensor]  # per layer (b, H, S): the answering token over all key positions
    probs: list[Tensor] | None = None  # per layer (b, H, S, S) with full=True

    @property
    def num_layers(self) -> int:
        return len(self.write)

    def read(self, layer: int) -> Tensor:
        """(b, H, m): the answering token's attention on the read slots in ``layer``."""
        return self.answer[layer][..., self.read_slots.start : self.read_slots.stop]

    def read_share(self, layer: int) -> Tensor:
        """(b, H): the share of the answering token's attention that goes to the read slots."""
        return self.read(layer).sum(-1)

    def write_share(self, layer: int, keys: Tensor) -> Tensor:
        """(b, H): the share of the write slots' attention mass on the key positions ``keys`` ((b, S) bool),
        averaged over the write slots (each slot's row sums to one)."""
        if keys.shape != self.key_valid.shape or keys.dtype != torch.bool:
            raise ValueError(
                f"keys must be a bool tensor of shape {tuple(self.key_valid.shape)}, got "
                f"{keys.dtype} {tuple(keys.shape)}"
            )
        w = self.write[layer]
        return (w * keys[:, None, None, :].to(w.dtype)).sum(-1).mean(-1)

    def columns(self, start, end) -> Tensor:
        """(b, S) bool: the positions that hold input_ids columns ``[start, end)`` (ints, or (b,) tensors)."""
        src = self.source_positions
        start = torch.as_tensor(start, device=src.device).reshape(-1, 1)
        end = torch.as_tensor(end, device=src.device).reshape(-1, 1)
        if self.rows is not None and start.shape[0] > 1:
            start, end = start[self.rows], end[self.rows]
        return (src >= start) & (src < end)


@dataclass
class MemoryAttention:
    """The result of :func:`memory_attention`: one :class:`SegmentAttention` per segment, and the rerun's
    outputs (``memory_state`` (B, m, d) after the last segment; ``logits``: decoder (B, T, V) over the token
    positions, encoder the last segment's), which equal the wrapper's forward."""

    kind: str
    num_mem_tokens: int
    segments: list[SegmentAttention]
    memory_state: Tensor
    logits: Tensor | None


def memory_attention(
    rmt: RMTBase,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    memory_state: Tensor | None = None,
    *,
    answer_token: int | None = None,
    full: bool = False,
) -> MemoryAttention:
    """Rerun ``rmt`` on ``input_ids`` through eager attention and return the attention of its memory operations.

    ``answer_token`` (decoders only): which token slot of each segment answers, an index into the segment's
    tokens (negative counts from its end; default -1, the last token). ``full=True`` also keeps each layer's
    whole attention matrix (memory: B x H x S^2 per layer and segment). Inputs are checked as the wrapper's
    forward checks them.
    """
    if not isinstance(rmt, RMTBase):
        raise TypeError(f"rmt must be a FastRMT or ReferenceRMT, got {type(rmt).__name__}")
    if answer_token is not None:
        if not rmt.is_decoder:
            raise ValueError("answer_token is a decoder option: an encoder's answering token is [CLS]")
        if not isinstance(answer_token, int) or isinstance(answer_token, bool):
            raise TypeError(f"answer_token must be an int, got {type(answer_token).__name__}")
    if not isinstance(full, bool):
        raise TypeError(f"full must be True or False, got {full!r}")
    rmt._check_inputs(input_ids, attention_mask, None, None, memory_state)
    if rmt.is_decoder:
        index = -1 if answer_token is None else answer_token
        lengths = [n for _, n in decoder_plan(input_ids.shape[1], rmt.segment_size, rmt.settings.segment_alignment)]
        if not all(-n <= index < n for n in lengths):
            raise ValueError(f"answer_token={index} is outside a segment of {min(lengths)} tokens")
        rmt._check_decoder_length(input_ids.shape[1])
    with torch.no_grad(), _eager(rmt):
        if rmt.is_decoder:
            return _decoder(rmt, input_ids, attention_mask, memory_state, index, full)
        return _encoder(rmt, input_ids, memory_state, full)


@contextlib.contextmanager
def _eager(rmt: RMTBase):
    model = rmt.model
    previous, was_training = model.config._attn_implementation, rmt.training
    model.set_attn_implementation("eager")
    rmt.eval()
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
        rmt.train(was_training)
        if hasattr(rmt, "_last_hidden"):  # FastRMT's hook saw these calls: drop the reference
            rmt._last_hidden = None


def _attentions(rmt: RMTBase, out) -> tuple[Tensor, ...]:
    attentions = getattr(out, "attentions", None)
    if not attentions or any(a is None for a in attentions):
        raise ValueError(
            f"{type(rmt.model).__name__} returned no attention weights with output_attentions=True "
            "under eager attention"
        )
    return attentions


def _keep(attentions, write_slots: range, answer: int, full: bool):
    """The kept rows, in fp32 at least (fp16/bf16 weights are widened; fp64 stays fp64)."""
    wide = [a.to(torch.promote_types(a.dtype, torch.float32)) for a in attentions]
    write = [a[:, :, write_slots.start : write_slots.stop].clone() for a in wide]
    answer_rows = [a[:, :, answer].clone() for a in wide]
    probs = [a.clone() for a in wide] if full else None
    return write, answer_rows, probs


# ------------------------------------------------------------------------------------------------ decoder
def _decoder(rmt, input_ids, attention_mask, memory_state, answer_token, full) -> MemoryAttention:
    m, b = rmt.num_mem_tokens, input_ids.shape[0]
    device = input_ids.device
    memory = rmt.initial_memory(b, memory_state)
    segments, logits = [], []
    for t, (start, n) in enumerate(decoder_plan(input_ids.shape[1], rmt.segment_size, rmt.settings.segment_alignment)):
        ids = input_ids[:, start : start + n]
        embeds = torch.cat([memory, rmt.word_embeddings(ids), memory], dim=1)
        mask = torch.ones(b, 2 * m + n, dtype=torch.int64, device=device)
        if attention_mask is not None:
            mask[:, m : m + n] = attention_mask[:, start : start + n]
        out = rmt.model(
            inputs_embeds=embeds,
            attention_mask=mask,
            output_attentions=True,
            output_hidden_states=True,
            use_cache=False,
        )
        write_slots = range(m + n, 2 * m + n)
        answer = m + (answer_token % n)
        write, answer_rows, probs = _keep(_attentions(rmt, out), write_slots, answer, full)
        memory_ids = torch.full((b, m), -1, dtype=ids.dtype, device=device)
        none = torch.full((b, m), -1, dtype=torch.int64, device=device)
        columns = torch.arange(start, start + n, device=device).expand(b, n)
        segments.append(
            SegmentAttention(
                index=t,
                rows=None,
                ids=torch.cat([memory_ids, ids, memory_ids], 1),
                key_valid=mask.bool(),
                source_positions=torch.cat([none, columns, none], 1),
                read_slots=range(0, m),
                write_slots=write_slots,
                answer_position=answer,
                write=write,
                answer=answer_rows,
                probs=probs,
            )
        )
        logits.append(out.logits[:, m : m + n])
        memory = out.hidden_states[-1][:, m + n :]
    return MemoryAttention("decoder", m, segments, memory, torch.cat(logits, 1))


# ------------------------------------------------------------------------------------------------ encoder
def _encoder(rmt, input_ids, memory_state, full) -> MemoryAttention:
    st, m = rmt.settings, rmt.num_mem_tokens
    plan = encoder_plan(input_ids, None, st, rmt.input_size, m)
    sources = _encoder_sources(rmt, input_ids, len(plan.segments))
    memory = rmt.initial_memory(input_ids.shape[0], memory_state)
    slots = range(1, 1 + m)
    segments, out = [], None
    for k, seg in enumerate(plan.segments):
        rows = seg.rows
        embeds = rmt.word_embeddings(seg.ids)
        embeds[:, 1 : 1 + m] = memory if rows is None else memory[rows]
        positions = torch.arange(seg.ids.shape[1], device=seg.ids.device)
        valid = torch.ones_like(seg.ids, dtype=torch.bool) if seg.counts is None else positions < seg.counts[:, None]
        out = rmt.model(
            inputs_embeds=embeds,
            attention_mask=valid.long(),
            token_type_ids=torch.zeros_like(seg.ids),
            output_attentions=True,
            output_hidden_states=True,
        )
        write, answer_rows, probs = _keep(_attentions(rmt, out), slots, 0, full)
        ids = seg.ids.clone()
        ids[:, 1 : 1 + m] = -1
        src = sources[k] if rows is None else sources[k][rows]
        segments.append(
            SegmentAttention(
                index=plan.n_segments - len(plan.segments) + k,
                rows=rows,
                ids=ids,
                key_valid=valid,
                source_positions=src,
                read_slots=slots,
                write_slots=slots,
                answer_position=0,
                write=write,
                answer=answer_rows,
                probs=probs,
            )
        )
        new = out.hidden_states[-1][:, 1 : 1 + m]
        memory = new if rows is None else memory.index_put((rows,), new)
    logits = getattr(out, "logits", None)
    return MemoryAttention("encoder", m, segments, memory, out.last_hidden_state if logits is None else logits)


def _encoder_sources(rmt, input_ids: Tensor, n_segments: int) -> list[Tensor]:
    """For each of the plan's ``n_segments`` segments, (B, S): the input_ids column at each position (-1 for
    [CLS], memory, [SEP] and padding), following the published encoder's segmentation (specials dropped,
    ``max_n_segments`` truncation, alignment, rows aligned on their last segment)."""
    st, m, size = rmt.settings, rmt.num_mem_tokens, rmt.segment_size
    b, width = input_ids.shape[0], rmt.input_size
    out = torch.full((n_segments, b, width), -1, dtype=torch.int64)
    special = torch.tensor([st.pad_token_id, st.cls_token_id, st.sep_token_id], device=input_ids.device)
    for r in range(b):
        columns = (~torch.isin(input_ids[r], special)).nonzero()[:, 0].cpu()
        if st.max_n_segments is not None:
            columns = columns[: size * st.max_n_segments]
        c = len(columns)
        if st.segment_alignment == "right":
            bounds = (list(range(c, 0, -size)) + [0])[::-1]
        else:
            bounds = list(range(0, c, size)) + [c]
        pieces = list(zip(bounds, bounds[1:]))
        first = n_segments - len(pieces)
        for j, (a, e) in enumerate(pieces):
            out[first + j, r, 2 + m : 2 + m + e - a] = columns[a:e]
    return list(out.to(input_ids.device))
