"""FastRMT: the RMT wrapper for speed. Same constructor, forward and results as ReferenceRMT.

What it does differently from the reference:
* attention goes through the ``rmt_fast`` attention implementation: the segment layout travels to the backend
  (SDPA now, the Triton kernel when available) and transformers builds no 4-D mask;
* each segment's input is written into slices of one buffer (no ``torch.cat``), a short segment is padded to
  the static shape with position ids that keep it equal to the reference, and only the backbone's last hidden
  state is taken (a forward hook), never every layer's;
* LM-head logits are computed for token slots only (``logits_to_keep``), the decoder loss accumulates segment
  by segment so (B, T, V) is never needed for it, and ``return_logits=False`` drops the logits;
* under ``torch.no_grad()`` nothing from earlier segments is kept alive.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import ATTN_NAME, active_segment
from .attention import preload as preload_backend
from .base import RMTBase, RMTOutput, memory_detached_before
from .compiled import CompiledStep, compile_options
from .cuda_graph import SegmentGraphRunner
from .fast_inference import EAGER, GRAPHED_COMPILED, FastInference, compile_errors
from .kernels.layout import SegmentLayout
from .loss import linear_cross_entropy, plain_head, wants_chunked_loss
from .segments import DecoderStatic, decoder_plan, decoder_targets, encoder_plan


class FastRMT(RMTBase):
    """See the module docstring and the README. FastRMT-only options:

    * ``gradient_checkpointing``: keep only each segment's input memory and recompute the segment in
      backward, so activation memory grows by N x m x d plus one segment (use with ``return_logits=False``
      for long decoder inputs, so the logits are not kept either);
    * ``cuda_graph``: run inference segments through one captured CUDA graph per call shape
      (:mod:`rmt_fast.cuda_graph`); training with it is refused with a clear error;
    * ``compile_step``: False, True or a dict of ``torch.compile`` keyword arguments: the per-segment step runs
      compiled (:mod:`rmt_fast.compiled`), in training, under checkpointing and inside CUDA graphs;
    * ``fast_inference``: one switch for the fastest inference path, the compiled step captured as a CUDA graph,
      wherever it applies (CUDA, gradients off); elsewhere the eager step, with the reason logged once
      (:mod:`rmt_fast.fast_inference`). ``compile_step`` then holds that path's compile options.
    """

    def __init__(
        self,
        model,
        num_mem_tokens: int,
        segment_size: int,
        *,
        gradient_checkpointing: bool = False,
        cuda_graph: bool = False,
        compile_step=False,
        fast_inference: bool = False,
        **kwargs,
    ):
        if not isinstance(fast_inference, bool):
            raise ValueError(f"fast_inference must be True or False, got {fast_inference!r}")
        if fast_inference:  # the fast path's compile options: compile_step's, or inductor's defaults
            fast_kwargs = compile_options(
                True if compile_step is None or compile_step is False else compile_step, cuda_graph=True
            )
            compile_kwargs = None
        else:
            compile_kwargs = compile_options(compile_step, bool(cuda_graph))  # checked before anything is built
        super().__init__(model, num_mem_tokens, segment_size, **kwargs)
        self.gradient_checkpointing = bool(gradient_checkpointing)
        name = "decoder_step" if self.is_decoder else "encoder_step"
        if compile_kwargs is not None:  # an instance attribute shadows the method: every caller gets it
            setattr(self, name, CompiledStep(self, name, compile_kwargs))
        self._graphs = None
        if cuda_graph and not fast_inference:
            self._graphs = SegmentGraphRunner(self)
        self._fast = FastInference(self, name, fast_kwargs) if fast_inference else None
        model = self.model  # the transformers model that runs (inside a PeftModel, the one it wraps)
        self._original_attn = model.config._attn_implementation
        preload_backend(self.settings.attn_backend)
        model.set_attn_implementation(ATTN_NAME)
        if model.config._attn_implementation != ATTN_NAME:  # transformers only warns when it cannot switch
            model.set_attn_implementation(self._original_attn)
            raise ValueError(
                f"model: {type(model).__name__} cannot switch its attention implementation to "
                f"{ATTN_NAME!r}, so FastRMT cannot give it the segment layout"
            )
        self._last_hidden: Tensor | None = None
        self._plain_head = self.is_decoder and plain_head(model) is not None
        base = self._info.base_model
        self._hook = None if base is model else base.register_forward_hook(self._capture_hidden)

    def _capture_hidden(self, module, args, output):
        self._last_hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state

    def unwrap(self):
        """Give the backbone back as it was given (a PeftModel stays one): its original attention
        implementation and no hook."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.model.set_attn_implementation(self._original_attn)
        return self.model if self.peft_model is None else self.peft_model

    def _backbone_for_saving(self):
        return _WithAttn(self.model, self._original_attn)

    # ----------------------------------------------------------------------------------------------- api
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
        args = (input_ids, attention_mask, labels, labels_mask, memory_state, return_logits)
        if self._fast is None:
            return self._run(*args)
        path, reason = self.inference_path()
        if reason is not None:
            self._fast.log_once(reason)
        if path == EAGER:
            return self._run(*args)
        self._graphs = self._fast.runner  # this call only
        try:
            if path == GRAPHED_COMPILED:
                try:
                    with self._fast.compiled_step():
                        return self._run(*args)
                except compile_errors() as exc:
                    self._fast.compile_failed(exc)
                    self._fast.log_once(self.inference_path()[1])
            return self._run(*args)
        finally:
            self._graphs = None

    def inference_path(self) -> tuple[str, str | None]:
        """With ``fast_inference=True``: the path a call made now takes, ``"graphed+compiled"``, ``"graphed"`` or
        ``"eager"``, and why it is not the first (None when it is). Without it: the configured path (``cuda_graph``,
        ``compile_step``), no reason."""
        if self._fast is not None:
            return self._fast.path()
        compiled = "decoder_step" in vars(self) or "encoder_step" in vars(self)
        graphed = self._graphs is not None
        return ("graphed" if graphed else "eager") + ("+compiled" if compiled else ""), None

    def _run(self, input_ids, attention_mask, labels, labels_mask, memory_state, return_logits):
        if self.is_decoder:
            return self._decoder(input_ids, attention_mask, labels, labels_mask, memory_state, return_logits)
        return self._encoder(input_ids, labels, memory_state, return_logits)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, memory_state=None, **generate_kwargs):
        """Run every segment but the last, then generate from ``[memory ; embed(last segment)]``."""
        if not self.is_decoder:
            raise ValueError("generate() serves decoder RMTs only")
        self._check_inputs(input_ids, attention_mask, None, None, memory_state)
        plan = decoder_plan(input_ids.shape[1], self.segment_size, self.settings.segment_alignment)
        start, _ = plan[-1]
        memory = self.initial_memory(input_ids.shape[0], memory_state)
        if start > 0:
            head_mask = None if attention_mask is None else attention_mask[:, :start]
            memory = self._decoder(input_ids[:, :start], head_mask, None, None, memory, False).memory_state
        tail = input_ids[:, start:]
        embeds = self.word_embeddings(tail)
        inputs_embeds = embeds.new_empty(tail.shape[0], self.num_mem_tokens + tail.shape[1], embeds.shape[-1])
        inputs_embeds[:, : self.num_mem_tokens] = memory
        inputs_embeds[:, self.num_mem_tokens :] = embeds
        mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.int64, device=tail.device)
        if attention_mask is not None:
            mask[:, self.num_mem_tokens :] = attention_mask[:, start:]
        return self.model.generate(inputs_embeds=inputs_embeds, attention_mask=mask, **generate_kwargs)

    # ------------------------------------------------------------------------------------------- decoder
    def _decoder(self, input_ids, attention_mask, labels, labels_mask, memory_state, return_logits):
        b, total = input_ids.shape
        n = self._check_decoder_length(total)
        plan = decoder_plan(total, self.segment_size, self.settings.segment_alignment)
        targets, denom = decoder_targets(labels, labels_mask)
        memory = self.initial_memory(b, memory_state)
        if self._graphs is not None and self._graphs.supports_decoder(attention_mask):
            return self._graphs.run_decoder(input_ids, targets, denom, memory, plan, return_logits)
        static = DecoderStatic(b, self.num_mem_tokens, self.segment_size, input_ids.device)
        visibility = static.mask_plan(attention_mask, plan)
        loss_sum, logits = None, []
        for t, (start, length) in enumerate(plan):
            if memory_detached_before(t, n, self.settings.bptt_depth):
                memory = memory.detach()
            ids, counts, seg_targets = static.segment(input_ids, targets, start, length)
            seg_logits, memory, part = self._call(
                self.decoder_step, ids, memory, counts, visibility[t], static, return_logits, seg_targets
            )
            if part is not None:
                loss_sum = part if loss_sum is None else loss_sum + part
            if return_logits:
                logits.append(seg_logits[:, :length])
        loss = loss_sum / denom if loss_sum is not None else None
        out_logits = torch.cat(logits, dim=1) if return_logits else None
        return RMTOutput(loss=loss, logits=out_logits, memory_state=memory)

    def _call(self, step, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            # Keep only the segment's inputs (its memory); recompute the segment in backward.
            return torch.utils.checkpoint.checkpoint(step, *args, use_reentrant=False)
        return step(*args)

    def decoder_step(self, ids, memory, counts, token_mask, static, need_logits=True, targets=None):
        """One segment: [memory | tokens | memory] -> (token logits (B, L, V) or None, new memory (B, m, d),
        summed cross-entropy over ``targets`` (B, L) or None).

        ``counts`` (B,) holds the valid token slots of a short (padded) segment and sets the write slots'
        positions; ``token_mask``, the caller's attention mask as :meth:`DecoderStatic.mask_plan` gives it (a
        ``(starts, ends)`` pair of visible runs or a (B, L) bool mask), decides key visibility when given."""
        m, size = self.num_mem_tokens, ids.shape[1]
        buf = static.embeds_buffer(self.memory.dtype, self.hidden_size)
        buf[:, :m] = memory
        buf[:, m : m + size] = self.word_embeddings(ids)
        buf[:, m + size :] = memory
        layout = static.layout(counts, token_mask)
        kwargs = dict(
            inputs_embeds=buf,
            attention_mask=static.key_valid(layout),
            use_cache=False,
            position_ids=static.positions(counts),
        )
        # Loss without logits (rmt_fast.loss): the head and cross-entropy chunk by chunk, logits never stored.
        head = self.model.get_output_embeddings() if self._plain_head else None
        chunked = targets is not None and not need_logits and wants_chunked_loss(ids.shape[0], size, head)
        need_logits = need_logits or (targets is not None and not chunked)
        with active_segment(layout, self.settings.attn_backend):
            if need_logits and self._info.accepts_logits_to_keep:
                logits = self.model(**kwargs, logits_to_keep=static.token_index).logits
                hidden = self._last_hidden
            else:
                hidden = self._info.base_model(**kwargs).last_hidden_state
                logits = self.model.get_output_embeddings()(hidden[:, m : m + size]) if need_logits else None
        self._last_hidden = None
        loss_sum = None
        if chunked:
            loss_sum = linear_cross_entropy(hidden[:, m : m + size], head, targets)
        elif targets is not None:
            loss_sum = F.cross_entropy(
                logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum"
            )
        return logits, hidden[:, m + size :], loss_sum

    # ------------------------------------------------------------------------------------------- encoder
    def _encoder(self, input_ids, labels, memory_state, return_logits):
        st, m = self.settings, self.num_mem_tokens
        plan = encoder_plan(input_ids, labels, st, self.input_size, m)
        memory = self.initial_memory(input_ids.shape[0], memory_state)
        if self._graphs is not None:
            graphed = self._graphs.run_encoder(plan, memory, return_logits)
            if graphed is not None:
                return graphed
        losses, logits = [], None
        for t, seg in enumerate(plan.segments):  # only the segments that run: the BPTT rule counts these
            if memory_detached_before(t, len(plan.segments), st.bptt_depth):
                memory = memory.detach()
            if seg.rows is None:
                out, memory = self._call(self.encoder_step, seg.ids, memory, seg.counts, seg.labels)
            else:
                out, new = self._call(self.encoder_step, seg.ids, memory[seg.rows], seg.counts, seg.labels)
                memory = memory.index_put((seg.rows,), new)
            if seg.labels is not None:
                losses.append(out.loss)
            logits = out
        loss = None
        if losses:
            loss = torch.stack(losses).mean() if st.sum_loss else losses[-1]
        out_logits = None
        if return_logits:
            out_logits = getattr(logits, "logits", None)
            if out_logits is None:
                out_logits = logits.last_hidden_state
        return RMTOutput(loss=loss, logits=out_logits, memory_state=memory)

    def encoder_step(self, ids, memory, counts, labels):
        """One segment: [CLS] [MEM]*m [SEP] tokens [SEP] [PAD]* -> (model output, new memory (B, m, d))."""
        m = self.num_mem_tokens
        embeds = self.word_embeddings(ids)
        embeds[:, 1 : 1 + m] = memory
        layout = SegmentLayout(0, ids.shape[1], 0, False, token_counts=counts)
        key_valid = layout.key_valid()
        with active_segment(layout, self.settings.attn_backend):
            out = self.model(
                inputs_embeds=embeds, attention_mask=key_valid, token_type_ids=torch.zeros_like(ids), labels=labels
            )
        hidden = out.last_hidden_state if self._info.base_model is self.model else self._last_hidden
        self._last_hidden = None
        return out, hidden[:, 1 : 1 + m]


class _WithAttn:
    """Saves the backbone with its original attention implementation recorded, not ``rmt_fast``."""

    def __init__(self, model, attn: str):
        self.model, self.attn = model, attn

    def save_pretrained(self, path, **kwargs):
        config = self.model.config
        current = config._attn_implementation
        config._attn_implementation_internal = self.attn
        try:
            self.model.save_pretrained(path, **kwargs)
        finally:
            config._attn_implementation_internal = current
