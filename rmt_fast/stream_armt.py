"""FastARMT's stream step: the sequential schedule (layer after layer) over B slots, one segment each.

Each slot runs its own document's segment: per-row token ids padded to the static width, per-row valid
counts (the memory slots' positions and rotary tables follow each row's length, as :mod:`rmt_fast.armt.plan`
gives them for a short segment), a per-row token mask, and per-row first-segment flags. The associative memory
(A, z) of every layer is reset to zero for a slot that takes a new document (a masked ``torch.where``), and
that row's write takes the first-segment rule (vbar = 0, gamma = 1): a read of a zero memory adds exactly 0,
so the row computes what FastARMT computes on the document alone. The step reuses FastARMT's own cell
function (:meth:`FastARMT.cells`), stacked layers and head.
"""

from __future__ import annotations

import torch

from .armt.layers import StackedLayers
from .armt.memory import ARMTMemoryState
from .kernels.layout import SegmentLayout
from .stream_steps import token_cross_entropy


class ARMTSlotStep:
    builds = 0

    def __init__(self, armt, batch: int, return_logits: bool, keep_entry_memory: bool):
        self.armt, self.batch = armt, batch
        self.return_logits, self.keep_entry_memory = return_logits, keep_entry_memory
        self.gpt2 = armt.model.config.model_type == "gpt2"
        device, dtype = armt.memory.device, armt.memory.dtype
        zeros = armt.mem_shape.zeros(armt.n_layers, batch, dtype, device)
        self.A, self.z = list(zeros.A.unbind(0)), list(zeros.z.unbind(0))
        size, m = armt.segment_size, armt.num_mem_tokens
        self.slot = torch.arange(size + m, device=device)
        self.idle = torch.zeros(3 * size + 2, dtype=torch.int64, device=device)
        self.idle[size : 2 * size] = 1
        self.idle[2 * size : 3 * size] = -100
        self.idle[3 * size :] = torch.tensor([size, 1])
        self._layers = None

    def _prepare(self):
        armt = self.armt
        if self._layers is None:
            self._layers = StackedLayers(
                armt.model, armt.decoder_layers, armt.model.config.model_type, armt.settings.attn_backend
            )
            self._weights = tuple(
                torch.stack([getattr(p, name).weight for p in armt.assoc]) for name in ("W_mq", "W_mk", "W_mv", "W_mb")
            ) + (torch.stack([p.W_mb.bias for p in armt.assoc]),)
        return self._layers, self._weights

    def run(self, work: list) -> None:
        armt, b = self.armt, self.batch
        size, m = armt.segment_size, armt.num_mem_tokens
        layers, weights = self._prepare()
        pack = torch.stack([self.idle if d is None else d.packs[d.step] for d in work])
        ids, visible, targets = pack[:, :size], pack[:, size : 2 * size].bool(), pack[:, 2 * size : 3 * size]
        counts, first = pack[:, 3 * size], pack[:, 3 * size + 1].bool()
        entry = None
        if self.keep_entry_memory:
            entry = (torch.stack(self.A), torch.stack(self.z))  # before the reset: only rows past their first
        for layer in range(armt.n_layers):  # a new document's slot starts from an empty memory
            self.A[layer] = torch.where(first[:, None, None, None], 0.0, self.A[layer])
            self.z[layer] = torch.where(first[:, None, None], 0.0, self.z[layer])
        positions = torch.where(self.slot >= size, self.slot - size + counts[:, None], self.slot)  # (B, S)
        x = torch.cat([armt.word_embeddings(ids), armt.memory.unsqueeze(0).expand(b, -1, -1)], dim=1)
        base = armt._info.base_model
        rope = None
        if self.gpt2:
            x = base.drop(x + base.wpe(positions))
        else:
            rope = base.rotary_emb(torch.empty(0, dtype=armt.memory.dtype, device=x.device), positions)
        layout = SegmentLayout(0, size, m, True, token_mask=visible)
        first_arg = first.view(1, b, 1, 1, 1)
        x = x.unsqueeze(0)
        for layer in range(armt.n_layers):
            x, a, zz = armt.cells(
                x, self.A[layer][None], self.z[layer][None], layer, layout, rope, first_arg, layers, weights
            )
            self.A[layer], self.z[layer] = a[0], zz[0]
        norm = base.ln_f if self.gpt2 else base.norm
        logits = armt.model.get_output_embeddings()(norm(x[0, :, :size]))
        losses = token_cross_entropy(logits, targets)
        for s, doc in enumerate(work):
            if doc is None:
                continue
            length = doc.segments[doc.step][1]
            doc.token_losses.append(losses[s, :length])
            if self.return_logits:
                doc.logits.append(logits[s, :length])
            if doc.at_last:
                doc.memory = self._row(self.A, self.z, s)
                if entry is not None and doc.step > 0:
                    doc.memory_before_last = ARMTMemoryState(
                        entry[0][:, s : s + 1].clone(), entry[1][:, s : s + 1].clone()
                    )

    @staticmethod
    def _row(A, z, s: int) -> ARMTMemoryState:
        return ARMTMemoryState(torch.stack([a[s : s + 1] for a in A]), torch.stack([c[s : s + 1] for c in z]))
