"""FastARMT: ARMT for speed. Same constructor, forward, state and results as ReferenceARMT (up to rounding).

What it does differently from the reference:

* it runs the (segment, layer) cells itself: the layers as batched math over weights stacked once per call
  (:mod:`.layers`), the memory math batched the same way (:mod:`.memory`), attention through FastRMT's
  backend dispatch (:mod:`rmt_fast.attention`); transformers builds no mask and runs no layer;
* ``diagonal=True`` runs every cell of an anti-diagonal of the segment x layer grid as one step
  (:mod:`.schedule`): N + L - 1 steps instead of N x L, with the same result, in training too, at any batch
  size, with padding masks and a short last segment (padded to the static width, :mod:`.plan`);
* logits are computed for token slots only, the loss accumulates segment by segment, and with
  ``return_logits=False`` the head and cross-entropy run chunk by chunk (:mod:`rmt_fast.loss`);
* ``cuda_graph=True`` replays inference steps from CUDA graphs, in either schedule (:mod:`.graphs`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..attention import preload as preload_backend
from ..base import memory_detached_before
from ..compiled import compile_options
from ..loss import linear_cross_entropy, plain_head, wants_chunked_loss
from ..segments import decoder_plan, decoder_targets
from . import schedule
from .base import ARMTBase, ARMTOutput
from .graphs import ARMTGraphRunner
from .layers import StackedLayers, check_supported
from .memory import ARMTMemoryState, read, upcast, write
from .plan import CallPlan, first_segment_arg
from .reference import generate_with_memory


class FastARMT(ARMTBase):
    """See the module docstring and the README. FastARMT-only options:

    * ``diagonal``: the anti-diagonal schedule (a schedule, not a model: the state dict is the same);
    * ``gradient_checkpointing``: keep only each step's inputs and recompute the step in backward;
    * ``compile_step``: False, True or a dict of ``torch.compile`` keyword arguments for the per-step cell
      function (one compile per step shape);
    * ``cuda_graph``: run inference through CUDA graphs (:mod:`.graphs`): one graph per segment (sequential)
      or per distinct diagonal step; under autograd it is refused with an error (inference only, as FastRMT's).
    """

    def __init__(
        self,
        model,
        num_mem_tokens: int,
        segment_size: int,
        *,
        d_mem: int,
        n_heads: int = 1,
        use_denom: bool = True,
        correction: bool = True,
        diagonal: bool = False,
        bptt_depth: int = -1,
        attn_backend: str = "auto",
        gradient_checkpointing: bool = False,
        cuda_graph: bool = False,
        compile_step=False,
        check_inputs: bool = True,
    ):
        for name, value in (
            ("diagonal", diagonal),
            ("gradient_checkpointing", gradient_checkpointing),
            ("cuda_graph", cuda_graph),
        ):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        compile_kwargs = compile_options(compile_step, cuda_graph)
        super().__init__(
            model,
            num_mem_tokens,
            segment_size,
            d_mem=d_mem,
            n_heads=n_heads,
            use_denom=use_denom,
            correction=correction,
            bptt_depth=bptt_depth,
            attn_backend=attn_backend,
            check_inputs=check_inputs,
        )
        check_supported(self.model, self.decoder_layers, self.model.config.model_type, self.input_size)
        if plain_head(self.model) is None:
            raise ValueError(
                f"model: {type(self.model).__name__}'s logits are not a plain linear head over the last "
                "hidden state (logit scaling or soft-capping is not supported by FastARMT)"
            )
        preload_backend(attn_backend)
        self.diagonal = diagonal
        self.gradient_checkpointing = gradient_checkpointing
        self._compile_kwargs = compile_kwargs
        self._compiled = None
        self._graphs = ARMTGraphRunner(self) if cuda_graph else None

    def _schedule_settings(self) -> dict:
        return {"diagonal": self.diagonal, "gradient_checkpointing": self.gradient_checkpointing}

    # ----------------------------------------------------------------------------------------------- api
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
        return self._run(input_ids, attention_mask, labels, labels_mask, memory_state, return_logits)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, memory_state=None, **generate_kwargs):
        """Run every segment but the last (with writes), then generate from the last segment's tokens with
        reads on, writes off and no memory tokens (the backbone's own generate, with read hooks)."""
        self._check_inputs(input_ids, attention_mask, None, None, memory_state)
        start, _ = decoder_plan(input_ids.shape[1], self.segment_size, "left")[-1]
        if start > 0:
            head_mask = None if attention_mask is None else attention_mask[:, :start]
            memory_state = self._run(input_ids[:, :start], head_mask, None, None, memory_state, False).memory_state
        tail_mask = None if attention_mask is None else attention_mask[:, start:]
        return generate_with_memory(self, input_ids[:, start:], tail_mask, memory_state, generate_kwargs)

    # ----------------------------------------------------------------------------------------------- run
    def _run(self, input_ids, attention_mask, labels, labels_mask, memory_state, return_logits):
        if self._graphs is not None:
            self._graphs.check_inference()
        b, total = input_ids.shape
        n = self._check_decoder_length(total)
        L, size, m = self.n_layers, self.segment_size, self.num_mem_tokens
        segments = decoder_plan(total, size, "left")
        targets, denom = decoder_targets(labels, labels_mask)
        gpt2 = self.model.config.model_type == "gpt2"
        rotary = None if gpt2 else self._info.base_model.rotary_emb
        plan = CallPlan(input_ids, attention_mask, segments, size, m, rotary, self.memory.dtype)
        if self._graphs is not None and attention_mask is None:  # a caller mask takes the eager path
            return self._graphs.run(plan, targets, denom, memory_state, return_logits)
        layers, weights = self.stacked_weights()
        A, z, first = self.initial_state(b, memory_state)
        order = schedule.diagonal(n, L) if self.diagonal else schedule.sequential(n, L)
        depth = self.settings.bptt_depth
        cuts = [torch.is_grad_enabled() and memory_detached_before(s, n, depth) for s in range(n)]
        cells = self._cells_fn()
        carry = _Carry(A, z, any(cuts))
        logits: list[Tensor | None] = [None] * n
        loss_sum = None
        for l0, segs in order:
            g_n = len(segs)
            if l0 == 0:
                x = self._embed(plan.segment_ids(segs[0]), plan.positions(segs[0]), gpt2).unsqueeze(0)
                x = x if g_n == 1 else torch.cat([x, carry.hidden(1, g_n)])
            else:
                x = carry.hidden(l0, l0 + g_n)
            a_in, z_in = carry.state(l0, segs, cuts)
            first_arg = first_segment_arg(first, segs, input_ids.device)
            args = (x, a_in, z_in, l0, plan.layout(segs), plan.rope(segs), first_arg, layers, weights)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                y, a_out, z_out = checkpoint(cells, *args, use_reentrant=False)
            else:
                y, a_out, z_out = cells(*args)
            carry.update(l0, y, a_out, z_out)
            if l0 + g_n == L:  # the top cell's segment left the last layer
                s = segs[-1]
                start, length = plan.segments[s]
                seg_targets = None if targets is None else targets[:, start : start + length]
                seg_logits, part = self._finish(y[-1], length, seg_targets, return_logits)
                logits[s] = seg_logits
                if part is not None:
                    loss_sum = part if loss_sum is None else loss_sum + part
        A, z = carry.final()
        loss = loss_sum / denom if loss_sum is not None else None
        out_logits = torch.cat(logits, dim=1) if return_logits else None
        return ARMTOutput(loss=loss, logits=out_logits, memory_state=ARMTMemoryState(A, z))

    def stacked_weights(self) -> tuple[StackedLayers, tuple[Tensor, ...]]:
        """The layers' weights and the memory projections (W_mq, W_mk, W_mv, W_mb, W_mb's bias), each stacked
        over the layers."""
        layers = StackedLayers(
            self.model, self.decoder_layers, self.model.config.model_type, self.settings.attn_backend
        )
        weights = tuple(
            torch.stack([getattr(p, name).weight for p in self.assoc]) for name in ("W_mq", "W_mk", "W_mv", "W_mb")
        ) + (torch.stack([p.W_mb.bias for p in self.assoc]),)
        return layers, weights

    def _cells_fn(self):
        if self._compile_kwargs is None:
            return self.cells
        if self._compiled is None:
            self._compiled = torch.compile(self.cells, **self._compile_kwargs)
        return self._compiled

    def cells(self, x, A, z, l0, layout, rope, first, layers: StackedLayers, weights):
        """One schedule step: G cells, cell g running layer l0 + g. x (G, B, S, D), A (G, B, H, dk, dv),
        z (G, B, H, dk) -> the layers' outputs and the new A, z."""
        w_q, w_k, w_v, w_b, b_b = (w[l0 : l0 + x.shape[0]] for w in weights)
        if first is not True:  # a stream's first segment has no memory to read
            x = read(x, A, z, w_q, self.mem_shape)
        y = layers.step(x, l0, layout, rope)
        A, z = write(y[:, :, self.segment_size :], A, z, w_k, w_v, w_b, b_b, self.mem_shape, first)
        return y, A, z

    def _embed(self, ids: Tensor, positions: Tensor, gpt2: bool) -> Tensor:
        """A segment's layer-0 input: the (padded) token ids' embeddings, then the memory tokens."""
        x = torch.cat([self.word_embeddings(ids), self.memory.unsqueeze(0).expand(ids.shape[0], -1, -1)], dim=1)
        if gpt2:
            base = self._info.base_model
            x = base.drop(x + base.wpe(positions))
        return x

    def _finish(self, y: Tensor, length: int, seg_targets: Tensor | None, return_logits: bool):
        """A segment left the last layer: final norm, LM head over its ``length`` token slots, its loss part."""
        if not return_logits and seg_targets is None:
            return None, None
        base = self._info.base_model
        norm = base.ln_f if self.model.config.model_type == "gpt2" else base.norm
        hidden = norm(y[:, :length])
        head = self.model.get_output_embeddings()
        chunked = seg_targets is not None and not return_logits and wants_chunked_loss(y.shape[0], length, head)
        if chunked:
            return None, linear_cross_entropy(hidden, head, seg_targets)
        logits = head(hidden)
        part = None
        if seg_targets is not None:
            part = F.cross_entropy(
                upcast(logits).flatten(0, 1), seg_targets.flatten(), ignore_index=-100, reduction="sum"
            )
        return (logits if return_logits else None), part


class _Carry:
    """What one schedule step hands the next: the layers' outputs and memory states of the last step.

    The cells of a step run consecutive layers. Under the diagonal schedule, step d + 1's cell of layer l
    takes the output of step d's cell of layer l - 1 and the state of its cell of layer l, so a step's
    inputs are slices of the previous step's outputs (no re-stacking): one cat only where a layer enters
    (its initial state) and, for the hidden states, where layer 0's embedding joins. ``restack``: build every
    step's state cell by cell from the per-layer list (the truncated-BPTT detaches are per cell)."""

    def __init__(self, A: list[Tensor], z: list[Tensor], restack: bool):
        self.A, self.z, self.restack = A, z, restack  # per layer: the current state (views)
        self.l0 = 0
        self.y = self.a = self.zs = None  # the last step's outputs, its layers l0 .. l0 + G - 1

    def hidden(self, lo: int, hi: int) -> Tensor:
        """The last step's outputs of layers lo - 1 .. hi - 2 (the inputs of layers lo .. hi - 1)."""
        return self.y[lo - 1 - self.l0 : hi - 1 - self.l0]

    def state(self, l0: int, segs: list[int], cuts: list[bool]) -> tuple[Tensor, Tensor]:
        """(G, ...) A and z entering the cells of layers l0 .. l0 + G - 1 (segments ``segs``)."""
        g_n = len(segs)
        if self.restack:
            a = [self.A[l0 + g].detach() if cuts[s] else self.A[l0 + g] for g, s in enumerate(segs)]
            zs = [self.z[l0 + g].detach() if cuts[s] else self.z[l0 + g] for g, s in enumerate(segs)]
            return _stack(a), _stack(zs)
        have = (
            0
            if self.a is None or not self.l0 <= l0 < self.l0 + self.a.shape[0]
            else min(g_n, self.l0 + self.a.shape[0] - l0)
        )  # layers the last step's outputs hold
        if have == 0:
            return _stack(self.A[l0 : l0 + g_n]), _stack(self.z[l0 : l0 + g_n])
        a, zs = self.a[l0 - self.l0 : l0 - self.l0 + have], self.zs[l0 - self.l0 : l0 - self.l0 + have]
        if have < g_n:  # layers entering: their current state
            a = torch.cat([a, torch.stack(self.A[l0 + have : l0 + g_n])])
            zs = torch.cat([zs, torch.stack(self.z[l0 + have : l0 + g_n])])
        return a, zs

    def update(self, l0: int, y: Tensor, a: Tensor, zs: Tensor) -> None:
        for g in range(a.shape[0]):
            self.A[l0 + g], self.z[l0 + g] = a[g], zs[g]
        self.l0, self.y, self.a, self.zs = l0, y, a, zs

    def final(self) -> tuple[Tensor, Tensor]:
        """(L, ...) A and z after the call."""
        return torch.stack(self.A), torch.stack(self.z)


def _stack(tensors: list[Tensor]) -> Tensor:
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)
