"""One document of a :class:`rmt_fast.stream.DocumentStream`: its checks, its segments and what it collects.

A document is a 1-D sequence of token ids (a tensor or a list of ints) or a dict with ``input_ids`` and, for
decoders, optional ``attention_mask``, ``labels`` and ``labels_mask`` (encoders: ``attention_mask`` only, which
must agree with the pad tokens, as in FastRMT). It is checked exactly as ``rmt(input_ids[None], ...)`` checks a
batch of one (the wrapper's own checks), and a failure becomes a ``ValueError`` naming the document's index.

Its segments are planned as running it alone plans them (:func:`rmt_fast.segments.decoder_plan` /
:func:`~rmt_fast.segments.encoder_plan`), so a slot runs the same segments with the same padding:

* decoder: per segment a packed int64 row ``[ids (size) | visible (size) | targets (size) | count | reset]``;
* encoder: per segment ``[ids (input_size) | count | reset]`` (ids as FastRMT builds them: CLS, memory
  slots, SEP, tokens, SEP, pads), ``count`` the valid prefix, ``reset`` 1 on the first segment.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .segments import decoder_plan, decoder_targets, encoder_plan

DECODER_KEYS = ("input_ids", "attention_mask", "labels", "labels_mask")
ENCODER_KEYS = ("input_ids", "attention_mask")


class DocumentError(ValueError):
    """A document that cannot run: the message starts with ``document <index>:``."""

    def __init__(self, index: int, message: str):
        super().__init__(f"document {index}: {message}")
        self.index = index


@dataclass
class Document:
    """A checked, planned document and what its segments have produced so far."""

    index: int
    ids: Tensor  # (1, T)
    attention_mask: Tensor | None  # (1, T)
    segments: list[tuple[int, int]]  # (start, length) along the content; encoder: (0, tokens in the segment)
    packs: Tensor | None  # (n, width) int64 rows the fast step reads (None for engines that do not use them)
    targets: Tensor | None = None  # decoder: (1, T) targets (position p predicts p + 1), -100 where not counted
    denom: Tensor | None = None  # decoder: counted targets
    contents: list[Tensor] = field(default_factory=list)  # encoder: each segment's content ids (1, k)
    # collected while it runs
    step: int = 0  # the next segment to run
    token_losses: list[Tensor] = field(default_factory=list)
    logits: list[Tensor] = field(default_factory=list)
    memory: object = None  # the memory after the last segment run (an engine's per-document memory)
    memory_before_last: object = None  # the memory entering the last segment (for a continuation)

    @property
    def n_segments(self) -> int:
        return len(self.segments)

    @property
    def at_last(self) -> bool:
        return self.step == len(self.segments) - 1


def _as_ids(value, name: str, device) -> Tensor:
    if isinstance(value, Tensor):
        t = value
    elif isinstance(value, (list, tuple)):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ValueError(f"{name} must hold ints only")
        t = torch.tensor(value, dtype=torch.int64)
    else:
        raise ValueError(f"{name} must be a 1-D tensor or a list of ints, got {type(value).__name__}")
    if t.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one document), got shape {tuple(t.shape)}")
    return t.to(device)


def check_document(rmt, index: int, doc) -> Document:
    """Check and plan document ``index`` for ``rmt``; a :class:`DocumentError` names what is wrong."""
    try:
        return _plan(rmt, index, doc)
    except DocumentError:
        raise
    except (ValueError, TypeError) as exc:
        raise DocumentError(index, str(exc)) from None


def _plan(rmt, index: int, doc) -> Document:
    device = rmt.memory.device
    keys = DECODER_KEYS if rmt.is_decoder else ENCODER_KEYS
    if isinstance(doc, dict):
        unknown = sorted(set(doc) - set(keys))
        if unknown or "input_ids" not in doc:
            raise ValueError(f"a dict document takes the keys {keys} (input_ids required), got {sorted(doc)}")
        fields = {k: (None if doc.get(k) is None else _as_ids(doc[k], k, device)) for k in keys}
    else:
        fields = {"input_ids": _as_ids(doc, "input_ids", device)}
    batch = {k: (None if v is None else v[None]) for k, v in fields.items()}
    ids = batch["input_ids"]
    if rmt.is_decoder:
        labels = batch.get("labels")
        labels = ids.to(torch.int64) if labels is None else labels
        rmt._check_inputs(ids, batch.get("attention_mask"), labels, batch.get("labels_mask"), None)
        rmt._check_decoder_length(ids.shape[1])
        segments = decoder_plan(ids.shape[1], rmt.segment_size, rmt.settings.segment_alignment)
        targets, denom = decoder_targets(labels, batch.get("labels_mask"))
        document = Document(index, ids, batch.get("attention_mask"), segments, None, targets, denom)
        document.packs = _decoder_packs(document, rmt.segment_size)
        return document
    rmt._check_inputs(ids, batch.get("attention_mask"), None, None, None)
    m = rmt.num_mem_tokens
    plan = encoder_plan(ids, None, rmt.settings, rmt.input_size, m)
    width = rmt.input_size
    full = torch.full((1,), width, dtype=torch.int32, device=device)
    counts = torch.cat([full if seg.counts is None else seg.counts for seg in plan.segments])
    n = len(plan.segments)
    packs = torch.zeros(n, width + 2, dtype=torch.int64, device=device)  # a few whole-document ops, no per-row
    packs[:, :width] = torch.cat([seg.ids for seg in plan.segments])
    packs[:, width] = counts
    packs[0, width + 1] = 1
    lengths = [c - m - 3 for c in counts.tolist()]  # the one host sync of the planning
    segments = [(0, k) for k in lengths]
    contents = [seg.ids[:, 2 + m : 2 + m + k] for seg, k in zip(plan.segments, lengths)]  # views
    return Document(index, ids, batch.get("attention_mask"), segments, packs, contents=contents)


def _decoder_packs(doc: Document, size: int) -> Tensor:
    """(n, 3 size + 2) rows: ids, visible token slots, targets, count, reset (see the module docstring)."""
    rows = []
    for t, (start, length) in enumerate(doc.segments):
        pad = size - length
        ids = F.pad(doc.ids[0, start : start + length].to(torch.int64), (0, pad))
        if doc.attention_mask is None:
            visible = torch.ones(length, dtype=torch.int64, device=ids.device)
        else:
            visible = doc.attention_mask[0, start : start + length].to(torch.int64)
        visible = F.pad(visible, (0, pad))
        targets = F.pad(doc.targets[0, start : start + length], (0, pad), value=-100)
        tail = torch.tensor([length, int(t == 0)], dtype=torch.int64, device=ids.device)
        rows.append(torch.cat([ids, visible, targets, tail]))
    return torch.stack(rows)
