"""ReferenceRMT: a plain, faithful copy of the published RMT wrappers' behaviour (see docs/reference.md).

It is slow on purpose: a ``torch.cat`` per segment, one backbone call per segment with
``output_hidden_states=True``, and transformers' own attention and masks. Tests and profiles compare FastRMT
against it. Its constructor, forward, ``memory`` parameter and ``load_reference_state_dict`` are FastRMT's.

Deliberate differences from the published code, each stated in docs/reference.md or the README:
* ``bptt_depth`` follows :func:`rmt_fast.base.memory_detached_before` (the published ``k2`` is a no-op);
* the encoder loss with ``sum_loss=True`` is the mean of the per-segment losses;
* ``labels_mask`` is shifted like the labels (``labels_mask[:, 1:]``);
* the memory is an (m, d) parameter; for encoders its initial value is drawn like the published model's
  extra embedding rows, and ``load_reference_state_dict`` splits them off the published embedding matrix;
* token-level encoder labels (masked LM) are segmented like the input ids.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import RMTBase, RMTOutput, memory_detached_before


def causal_lm_loss(logits: Tensor, labels: Tensor, labels_mask: Tensor | None) -> Tensor:
    """The published decoder loss: one cross-entropy over the concatenated token logits, position p predicting
    ``labels[:, p + 1]``, ``labels_mask[:, 1:]`` selecting the counted targets (computed in at least float32)."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1)
    if labels_mask is not None:
        keep = labels_mask[:, 1:].reshape(-1).bool()
        shift_logits, shift_labels = shift_logits[keep], shift_labels[keep]
    if shift_logits.dtype != torch.float64:
        shift_logits = shift_logits.float()
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)


class ReferenceRMT(RMTBase):
    def forward(
        self,
        input_ids,
        attention_mask=None,
        labels=None,
        labels_mask=None,
        memory_state=None,
        return_logits: bool = True,
    ) -> RMTOutput:
        self._check_inputs(input_ids, attention_mask, labels, labels_mask, memory_state)
        if self.is_decoder:
            return self._decoder(input_ids, attention_mask, labels, labels_mask, memory_state)
        return self._encoder(input_ids, labels, memory_state)

    # --------------------------------------------------------------------------------------------- decoder
    def _split(self, tensor: Tensor) -> list[Tensor]:
        size, length = self.segment_size, tensor.shape[1]
        if self.settings.segment_alignment == "left":
            bounds = list(range(0, length, size)) + [length]
        else:
            bounds = (list(range(length, 0, -size)) + [0])[::-1]
        return [tensor[:, a:b] for a, b in zip(bounds, bounds[1:])]

    def _decoder_segment(self, memory, ids, mask, write_mem=True):
        m = self.num_mem_tokens
        embeds = self.model.get_input_embeddings()(ids)
        parts = [memory, embeds, memory] if write_mem else [memory, embeds]
        inputs_embeds = torch.cat(parts, dim=1)
        if mask is not None:
            full = torch.ones(inputs_embeds.shape[:2], dtype=torch.int64, device=ids.device)
            full[:, m : m + mask.shape[1]] = mask
            mask = full
        return inputs_embeds, mask

    def _decoder(self, input_ids, attention_mask, labels, labels_mask, memory_state):
        m = self.num_mem_tokens
        n = self._check_decoder_length(input_ids.shape[1])
        ids_segments = self._split(input_ids)
        mask_segments = self._split(attention_mask) if attention_mask is not None else [None] * n
        memory = self.initial_memory(input_ids.shape[0], memory_state)
        logits = []
        for t, (ids, mask) in enumerate(zip(ids_segments, mask_segments)):
            if memory_detached_before(t, n, self.settings.bptt_depth):
                memory = memory.detach()
            inputs_embeds, mask = self._decoder_segment(memory, ids, mask)
            out = self.model(
                inputs_embeds=inputs_embeds, attention_mask=mask, output_hidden_states=True, use_cache=False
            )
            length = ids.shape[1]
            logits.append(out.logits[:, m : m + length])
            memory = out.hidden_states[-1][:, m + length :]
        full_logits = torch.cat(logits, dim=1)
        loss = None if labels is None else causal_lm_loss(full_logits, labels, labels_mask)
        return RMTOutput(loss=loss, logits=full_logits, memory_state=memory)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, memory_state=None, **generate_kwargs):
        """Run every segment but the last, then generate from ``[memory ; embed(last segment)]`` (no write
        slots: the fixed behaviour of the published code's later branch)."""
        if not self.is_decoder:
            raise ValueError("generate() serves decoder RMTs only")
        self._check_inputs(input_ids, attention_mask, None, None, memory_state)
        ids_segments = self._split(input_ids)
        mask_segments = self._split(attention_mask) if attention_mask is not None else [None] * len(ids_segments)
        memory = self.initial_memory(input_ids.shape[0], memory_state)
        if len(ids_segments) > 1:
            head = input_ids[:, : input_ids.shape[1] - ids_segments[-1].shape[1]]
            head_mask = None if attention_mask is None else attention_mask[:, : head.shape[1]]
            memory = self._decoder(head, head_mask, None, None, memory).memory_state
        inputs_embeds, mask = self._decoder_segment(memory, ids_segments[-1], mask_segments[-1], write_mem=False)
        if mask is None:
            mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.int64, device=input_ids.device)
        return self.model.generate(inputs_embeds=inputs_embeds, attention_mask=mask, **generate_kwargs)

    # --------------------------------------------------------------------------------------------- encoder
    def _encoder_segments(self, seq: Tensor, fill: int, specials: list[int], lab: Tensor | None):
        """One sample -> its list of padded segment id tensors (and token labels), as the published
        ``pad_and_segment`` builds them. Memory slots hold -1 (their embeddings are replaced)."""
        s, m = self.segment_size, self.num_mem_tokens
        keep = ~torch.isin(seq, torch.tensor(specials, device=seq.device))
        seq = seq[keep]
        lab = lab[keep] if lab is not None else None
        if self.settings.max_n_segments is not None:
            seq = seq[: s * self.settings.max_n_segments]
            lab = lab[: s * self.settings.max_n_segments] if lab is not None else None
        if len(seq) == 0:
            raise ValueError("input_ids: a row has no content tokens (only pad/cls/sep)")
        if self.settings.segment_alignment == "right":
            bounds = (list(range(len(seq), 0, -s)) + [0])[::-1]
        else:
            bounds = list(range(0, len(seq), s)) + [len(seq)]
        st = self.settings
        out = []
        for a, b in zip(bounds, bounds[1:]):
            ids = torch.full((self.input_size,), fill, dtype=seq.dtype, device=seq.device)
            ids[0] = st.cls_token_id
            ids[1 : 1 + m] = -1
            ids[1 + m] = st.sep_token_id
            ids[2 + m : 2 + m + b - a] = seq[a:b]
            ids[2 + m + b - a] = st.sep_token_id
            seg_lab = None
            if lab is not None:
                seg_lab = torch.full((self.input_size,), -100, dtype=lab.dtype, device=lab.device)
                seg_lab[2 + m : 2 + m + b - a] = lab[a:b]
            out.append((ids, seg_lab))
        return out

    def _encoder(self, input_ids, labels, memory_state):
        st, m = self.settings, self.num_mem_tokens
        token_labels = labels is not None and labels.ndim == 2 and labels.shape[1] == input_ids.shape[1]
        specials = [st.pad_token_id, st.cls_token_id, st.sep_token_id]
        per_sample = [
            self._encoder_segments(seq, st.pad_token_id, specials, labels[i] if token_labels else None)
            for i, seq in enumerate(input_ids)
        ]
        n = st.max_n_segments or max(len(p) for p in per_sample)
        per_sample = [[None] * (n - len(p)) + p for p in per_sample]
        memory = self.initial_memory(input_ids.shape[0], memory_state).clone()
        losses, out = [], None
        running = [t for t in range(n) if any(p[t] is not None for p in per_sample)]  # segments empty in every
        for i, t in enumerate(running):  # row are skipped, and the BPTT rule counts only the ones that run
            if memory_detached_before(i, len(running), st.bptt_depth):
                memory = memory.detach()
            non_empty = [p[t] is not None for p in per_sample]
            rows = torch.tensor(non_empty, device=input_ids.device)
            ids = torch.stack([p[t][0] for p in per_sample if p[t] is not None])
            attention_mask = (ids != st.pad_token_id).long()
            inputs_embeds = self.word_embeddings(ids.clamp(min=0))
            inputs_embeds[:, 1 : 1 + m] = memory[rows]
            seg_labels = None
            if labels is not None:
                seg_labels = (
                    torch.stack([p[t][1] for p in per_sample if p[t] is not None]) if token_labels else labels[rows]
                )
            out = self.model(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                token_type_ids=torch.zeros_like(ids),
                labels=seg_labels,
                output_hidden_states=True,
            )
            memory = memory.clone()
            memory[rows] = out.hidden_states[-1][:, 1 : 1 + m]
            if seg_labels is not None:
                losses.append(out.loss)
        loss = None
        if losses:
            loss = torch.stack(losses).mean() if st.sum_loss else losses[-1]
        logits = getattr(out, "logits", None)
        if logits is None:  # a bare encoder: its output is the last hidden state
            logits = out.last_hidden_state
        return RMTOutput(loss=loss, logits=logits, memory_state=memory)
