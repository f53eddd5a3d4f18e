"""The steps a :class:`rmt_fast.stream.DocumentStream` runs: one segment for each of its B slots.

* :class:`FastSlotStep` (FastRMT, decoder and encoder): one fixed shape, B slots x one segment. The inputs live
  in static buffers: a packed (B, width) int64 tensor (each slot's segment: ids, visible token slots, targets,
  valid count, a reset flag; :mod:`rmt_fast.stream_docs`) and the (B, m, d) memory. Inside the step the memory
  of every slot whose reset flag is set is replaced by the initial memory (a masked copy: ``torch.where``), the
  segment runs with per-row counts (FastRMT's own ``decoder_step`` / ``encoder_step``), and the new memory is
  copied back into the buffer. So refilling a slot changes buffer contents only, never a shape: the step is
  built once, through :class:`rmt_fast.cuda_graph.StaticStep`, captured as one CUDA graph on a GPU and
  replayed for every step (on the CPU, or with ``cuda_graph=False``, the same step runs eagerly). Decoders
  get per-token cross-entropy inside the step.
* :class:`PerSlotStep` (ReferenceRMT, ReferenceARMT, or any wrapper): every active slot's segment runs alone
  through the wrapper's own forward with the slot's memory as ``memory_state``; the faithful, slow path.
* FastARMT's batched sequential step is :class:`rmt_fast.stream_armt.ARMTSlotStep`.

A step object gets ``run(work)``, ``work[s]`` the :class:`~rmt_fast.stream_docs.Document` slot s works on (or
None: an idle slot), runs segment ``doc.step`` of each, and stores on the document what that segment
produced (token losses, logits, the memory after it, and the memory entering its last segment).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cuda_graph import StaticStep
from .segments import DecoderStatic


def token_cross_entropy(logits, targets):
    """(B, L, V) logits, (B, L) targets -> (B, L) cross-entropy in float32 (0 where the target is -100)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none").view(
        targets.shape
    )


class FastSlotStep:
    def __init__(self, rmt, batch: int, capture: bool | None, return_logits: bool, keep_entry_memory: bool):
        self.rmt, self.batch = rmt, batch
        self.return_logits, self.keep_entry_memory = return_logits, keep_entry_memory
        device = rmt.memory.device
        self.capture = capture if capture is not None else device.type == "cuda"
        if rmt.is_decoder:
            size = rmt.segment_size
            self.width = 3 * size + 2
            idle = torch.zeros(self.width, dtype=torch.int64, device=device)
            idle[size : 2 * size] = 1  # every token slot visible, targets ignored, full count, reset
            idle[2 * size : 3 * size] = -100
            idle[3 * size :] = torch.tensor([size, 1])
        else:
            self.width = rmt.input_size + 2
            idle = torch.zeros(self.width, dtype=torch.int64, device=device)
            idle[-2:] = torch.tensor([rmt.input_size, 1])
        self.idle = idle
        self.builds = 0  # how many times the step was built (captured): once per stream
        self._step = None

    # --------------------------------------------------------------------------------------------- build
    def _build(self) -> StaticStep:
        rmt, b = self.rmt, self.batch
        device = rmt.memory.device
        inputs = dict(
            pack=self.idle.expand(b, -1).clone(), memory=rmt.memory.detach().unsqueeze(0).expand(b, -1, -1).clone()
        )
        if rmt.is_decoder:
            size = rmt.segment_size
            static = DecoderStatic(b, rmt.num_mem_tokens, size, device)

            def fn(pack, memory):
                ids, visible, targets = pack[:, :size], pack[:, size : 2 * size].bool(), pack[:, 2 * size : 3 * size]
                counts, reset = pack[:, 3 * size].to(torch.int32), pack[:, 3 * size + 1].bool()
                memory.copy_(torch.where(reset[:, None, None], rmt.memory.detach(), memory))  # refill: masked copy
                entry = memory.clone() if self.keep_entry_memory else None
                logits, new_memory, _ = rmt.decoder_step(ids, memory, counts, visible, static, True, None)
                memory.copy_(new_memory)
                return {
                    "token_loss": token_cross_entropy(logits, targets),
                    "entry": entry,
                    "logits": logits if self.return_logits else None,
                }
        else:
            width = rmt.input_size

            def fn(pack, memory):
                ids, counts, reset = pack[:, :width], pack[:, width].to(torch.int32), pack[:, width + 1].bool()
                memory.copy_(torch.where(reset[:, None, None], rmt.memory.detach(), memory))
                out, new_memory = rmt.encoder_step(ids, memory, counts, None)
                memory.copy_(new_memory)
                logits = getattr(out, "logits", None)
                return {"logits": out.last_hidden_state if logits is None else logits}

        self.builds += 1
        try:
            return StaticStep(fn, inputs, self.capture)
        except Exception as exc:  # as SegmentGraphRunner: warn and run the same static step eagerly
            if not self.capture:
                raise
            import warnings

            warnings.warn(
                f"rmt_fast stream: CUDA-graph capture failed ({type(exc).__name__}: {exc}); running the step eagerly",
                RuntimeWarning,
                stacklevel=4,
            )
            return StaticStep(fn, dict(pack=self.idle.expand(b, -1).clone(), memory=inputs["memory"]), False)

    @property
    def step(self) -> StaticStep:
        if self._step is None:
            self._step = self._build()
        return self._step

    # ----------------------------------------------------------------------------------------------- run
    def run(self, work: list) -> None:
        step = self.step
        io = step.inputs
        io["pack"].copy_(torch.stack([self.idle if d is None else d.packs[d.step] for d in work]))
        out = step()
        rmt = self.rmt
        if rmt.is_decoder:
            losses = out["token_loss"].clone()
            logits = out["logits"].clone() if self.return_logits else None
            entry = out["entry"]
            for s, doc in enumerate(work):
                if doc is None:
                    continue
                length = doc.segments[doc.step][1]
                doc.token_losses.append(losses[s, :length])
                if logits is not None:
                    doc.logits.append(logits[s, :length])
                if doc.at_last:
                    doc.memory = io["memory"][s : s + 1].clone()
                    if entry is not None:
                        doc.memory_before_last = entry[s : s + 1].clone()
            return
        for s, doc in enumerate(work):
            if doc is not None and doc.at_last:
                doc.memory = io["memory"][s : s + 1].clone()
                doc.logits = [out["logits"][s : s + 1].clone()]


class PerSlotStep:
    """Each active slot's segment through the wrapper's own forward, alone (ReferenceRMT, ReferenceARMT)."""

    builds = 0

    def __init__(self, rmt, return_logits: bool):
        self.rmt, self.return_logits = rmt, return_logits

    def run(self, work: list) -> None:
        rmt = self.rmt
        for doc in work:
            if doc is None:
                continue
            t = doc.step
            if doc.at_last:
                doc.memory_before_last = doc.memory
            if rmt.is_decoder:
                start, length = doc.segments[t]
                mask = None if doc.attention_mask is None else doc.attention_mask[:, start : start + length]
                out = rmt(doc.ids[:, start : start + length], attention_mask=mask, memory_state=doc.memory)
                targets = doc.targets[:, start : start + length]
                doc.token_losses.append(token_cross_entropy(out.logits, targets)[0])
                if self.return_logits:
                    doc.logits.append(out.logits[0])
            else:
                out = rmt(doc.contents[t], memory_state=doc.memory)
                doc.logits = [out.logits]
            doc.memory = out.memory_state
