"""ReferenceARMT: a plain, faithful copy of the published ARMT (``AssociativeMemoryCell`` +
``AssociativeRecurrentWrapper``, modeling_amt/language_modeling.py), the baseline FastARMT is tested against.

Slow on purpose: a ``torch.cat`` per segment, one backbone call per segment with transformers' own attention
and masks, and the memory attached to transformers' decoder layers with forward hooks (a read before every
layer, a write after it), segment after segment.

Deliberate differences from the published code (each in the README):

* ``labels_mask`` follows FastRMT's convention (the mask of the predicted position, ``labels_mask[:, 1:]``);
  the published code masks with the predicting position (``labels_mask[:, :-1]``);
* the memory state is returned (``out.memory_state``) and can be passed back to continue the stream; its
  segments then all read the memory (the published layers keep it in module attributes);
* ``bptt_depth`` detaches every layer's memory state by :func:`rmt_fast.base.memory_detached_before`.
"""

from __future__ import annotations

import torch

from ..base import memory_detached_before
from ..reference import causal_lm_loss
from ..segments import decoder_plan
from .base import ARMTBase, ARMTOutput
from .hooks import LayerMemory, memory_hooks
from .memory import ARMTMemoryState


class ReferenceARMT(ARMTBase):
    def forward(
        self,
        input_ids,
        attention_mask=None,
        labels=None,
        labels_mask=None,
        memory_state=None,
        return_logits: bool = True,
    ) -> ARMTOutput:
        self._check_inputs(input_ids, attention_mask, labels, labels_mask, memory_state)
        return self._run(input_ids, attention_mask, labels, labels_mask, memory_state)

    def _segment_inputs(self, ids, mask, with_memory=True):
        embeds = self.word_embeddings(ids)
        if with_memory:
            embeds = torch.cat([embeds, self.memory.unsqueeze(0).expand(ids.shape[0], -1, -1)], dim=1)
            if mask is not None:
                mask = torch.cat([mask.long(), mask.new_ones(mask.shape[0], self.num_mem_tokens).long()], dim=1)
        return embeds, mask

    def _run(self, input_ids, attention_mask, labels, labels_mask, memory_state):
        b, total = input_ids.shape
        n = self._check_decoder_length(total)
        A, z, first = self.initial_state(b, memory_state)
        mem = LayerMemory(A, z, first)
        logits = []
        for t, (start, length) in enumerate(decoder_plan(total, self.segment_size, "left")):
            if memory_detached_before(t, n, self.settings.bptt_depth):
                mem.A = [a.detach() for a in mem.A]
                mem.z = [c.detach() for c in mem.z]
            ids = input_ids[:, start : start + length]
            mask = None if attention_mask is None else attention_mask[:, start : start + length]
            embeds, mask = self._segment_inputs(ids, mask)
            with memory_hooks(
                self.decoder_layers,
                self.assoc,
                self.mem_shape,
                mem,
                reads=not mem.first,
                write_slots=self.num_mem_tokens,
            ):
                out = self.model(inputs_embeds=embeds, attention_mask=mask, use_cache=False)
            mem.first = False
            logits.append(out.logits[:, :length])
        full_logits = torch.cat(logits, dim=1)
        loss = None if labels is None else causal_lm_loss(full_logits, labels, labels_mask)
        state = ARMTMemoryState(torch.stack(mem.A), torch.stack(mem.z))
        return ARMTOutput(loss=loss, logits=full_logits, memory_state=state)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, memory_state=None, **generate_kwargs):
        """Run every segment but the last (with writes), then generate from the last segment's tokens with
        reads on, writes off and no memory tokens."""
        self._check_inputs(input_ids, attention_mask, None, None, memory_state)
        start, _ = decoder_plan(input_ids.shape[1], self.segment_size, "left")[-1]
        if start > 0:
            head_mask = None if attention_mask is None else attention_mask[:, :start]
            memory_state = self._run(input_ids[:, :start], head_mask, None, None, memory_state).memory_state
        return generate_with_memory(
            self,
            input_ids[:, start:],
            None if attention_mask is None else attention_mask[:, start:],
            memory_state,
            generate_kwargs,
        )


def generate_with_memory(armt: ARMTBase, ids, mask, memory_state, generate_kwargs):
    """The backbone's ``generate`` from ``ids`` with every layer reading ``memory_state`` (None: no reads)."""
    embeds = armt.word_embeddings(ids)
    if mask is None:
        mask = torch.ones(ids.shape, dtype=torch.int64, device=ids.device)
    A, z, first = armt.initial_state(ids.shape[0], memory_state)
    mem = LayerMemory(A, z, first)
    with memory_hooks(armt.decoder_layers, armt.assoc, armt.mem_shape, mem, reads=not first, write_slots=None):
        return armt.model.generate(inputs_embeds=embeds, attention_mask=mask, **generate_kwargs)
