"""``FastARMT(cuda_graph=True)``: inference steps replayed from CUDA graphs, in both schedules.

FastARMT at batch 1 is bound by the host: a call runs N x L (sequential) or N + L - 1 (diagonal) steps of a few
dozen small kernels each. The runner captures steps once and replays them, with what FastRMT's runner uses
(:class:`rmt_fast.cuda_graph.StaticStep`: warm-up on the shared side stream, capture, replay; the same
``capture`` seam, so the CPU runs the same static-buffer logic without capturing):

* the state lives in static buffers of one *group* (one per batch size, dtype, device, backbone and mode):
  every layer's ``A`` and ``z``, and for the diagonal schedule ``X``, the input of each layer's next cell
  (``X[l]``: the output of layer l - 1 for the segment that enters layer l next; ``X[0]`` the next segment's
  embedding, written in place, so a step's input is one slice and needs no ``cat``). A step reads its slices and
  writes them back in place inside the graph, so a call is "copy the segment's ids in, replay", step after step;
* sequential: one graph runs a whole segment (embedding, the L cells one after another, the final norm and
  head), so N segments are N replays; the first segment of a stream (no memory to read), full segments and
  a short last segment are the distinct shapes;
* diagonal: one graph per distinct step: the ramp up (L - 1 steps of 1 .. L - 1 cells, each reading layer
  0's embedding), the full step (L cells, replayed N - L + 1 times; the one holding a stream's first segment
  is its own shape), the ramp down (L - 1 steps, each finishing a segment);
* what a step reads besides the state is either a per-replay input copied into a static buffer (the
  segment's token ids, its loss targets) or fixed by the step's key (positions, rotary tables, the segment
  layout of a short last segment, which cells are a stream's first segment), kept with the step;
* the cache is bounded: at most ``max_graphs`` steps per group and ``max_groups`` groups, least recently used
  first out (an evicted graph is reset and its buffers dropped). A step the current call already used is
  never evicted: when every cached step is in use, the step runs eagerly over the same buffers instead of
  thrashing (``overflows`` counts them). The default bound holds every step of a call in either schedule;
* a group's graphs share one memory pool (their scratch is dead between replays); a step's outputs (logits,
  loss part) are cloned right after its replay, before any other graph of the pool runs;
* the layers' weights are stacked once and kept (eager FastARMT stacks them per call); the runner checks
  every parameter's version counter at each call and, when any changed (an optimizer step, a
  ``load_state_dict``), drops every graph and stacks anew, so replays always use the current weights;
* warm-up runs the step for real, so the group's state is saved before a capture and restored after it;
* if capture fails, a warning is given once and that step runs eagerly over the same buffers;
* inference only, as FastRMT's graphs: under autograd the call is refused with a RuntimeError; a caller's
  ``attention_mask`` takes the eager path.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ..cuda_graph import StaticStep
from .base import ARMTOutput
from .memory import ARMTMemoryState
from .plan import CallPlan, first_segment_arg

DEFAULT_MAX_GROUPS = 2


def default_max_graphs(n_layers: int) -> int:
    """Every distinct step one group needs: the diagonal's ramps with and without a stream's first segment and
    with a short last segment (about 4 L), the sequential's four per-segment shapes, and a spare."""
    return 4 * n_layers + 8


def _positive(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class _Group:
    """The static state the graphs of one call shape share, their memory pool and their steps (LRU order)."""

    def __init__(self, armt, batch: int, diagonal: bool):
        weight = armt.memory
        L, size, m = armt.n_layers, armt.segment_size, armt.num_mem_tokens
        with torch.inference_mode(False):  # buffers any later call may update in place
            state = armt.mem_shape.zeros(L, batch, weight.dtype, weight.device)
            self.A, self.z = state.A, state.z
            self.X = (
                torch.zeros(L, batch, size + m, weight.shape[-1], dtype=weight.dtype, device=weight.device)
                if diagonal
                else None
            )
        self.pool = torch.cuda.graph_pool_handle() if weight.is_cuda else None
        self.steps: dict[tuple, StaticStep] = {}

    def buffers(self) -> list[Tensor]:
        return [self.A, self.z] + ([] if self.X is None else [self.X])

    def release(self) -> None:
        for step in self.steps.values():
            step.release()
        self.steps.clear()


class ARMTGraphRunner:
    def __init__(
        self, armt, capture: bool | None = None, max_graphs: int | None = None, max_groups: int = DEFAULT_MAX_GROUPS
    ):
        self.armt = armt
        self.capture = capture
        self.max_graphs = (
            default_max_graphs(armt.n_layers) if max_graphs is None else _positive("max_graphs", max_graphs)
        )
        self.max_groups = _positive("max_groups", max_groups)
        self.groups: dict[tuple, _Group] = {}  # insertion order = least recently used first
        self.captures = self.evictions = self.overflows = 0
        self._stacks = None  # (signature, StackedLayers, memory weights)
        self._in_use: set = set()
        self._warned = False

    # ------------------------------------------------------------------------------------------- checks
    def check_inference(self) -> None:
        if torch.is_grad_enabled():
            raise RuntimeError(
                "FastARMT(cuda_graph=True) runs inference only: call it under torch.no_grad() or "
                "torch.inference_mode(); training through CUDA graphs is not supported (use cuda_graph=False)"
            )

    # ------------------------------------------------------------------------------------------- weights
    def _signature(self) -> tuple:
        armt = self.armt
        return (armt.model.training, tuple((p.data_ptr(), p._version) for p in armt.parameters()))

    def _weights(self):
        """The stacked weights every graph reads, restacked (and every graph dropped) when a parameter changed."""
        sig = self._signature()
        if self._stacks is None or self._stacks[0] != sig:
            self.release()
            with torch.no_grad(), torch.inference_mode(False):
                layers, weights = self.armt.stacked_weights()
            self._stacks = (sig, layers, weights)
        return self._stacks[1], self._stacks[2]

    def release(self) -> None:
        """Drop every graph, buffer and stacked weight (the next call builds anew)."""
        for group in self.groups.values():
            group.release()
        self.groups.clear()
        self._stacks = None

    # ------------------------------------------------------------------------------------------- cache
    def _group(self, batch: int) -> _Group:
        armt = self.armt
        w = armt.memory
        st = armt.settings
        key = (batch, w.dtype, w.device, id(armt.model), armt.model.training, armt.diagonal, st.attn_backend)
        group = self.groups.pop(key, None)
        if group is None:
            while len(self.groups) >= self.max_groups:
                self.groups.pop(next(iter(self.groups))).release()
                self.evictions += 1
            group = _Group(armt, batch, armt.diagonal)
        self.groups[key] = group
        return group

    def _step(self, group: _Group, key: tuple, make) -> StaticStep:
        """The cached step for key (marked most recently used), or a new one from ``make() -> (fn, inputs)``:
        captured when there is room, else run eagerly over the same buffers."""
        step = group.steps.pop(key, None)
        if step is None:
            fn, inputs = make()
            if len(group.steps) >= self.max_graphs:
                victim = next((k for k in group.steps if k not in self._in_use), None)
                if victim is None:  # every cached step serves this call: do not thrash
                    self.overflows += 1
                    return StaticStep(fn, inputs, capture=False)
                group.steps.pop(victim).release()
                self.evictions += 1
            step = self._build(group, fn, inputs)
        group.steps[key] = step
        self._in_use.add(key)
        return step

    def _build(self, group: _Group, fn, inputs: dict) -> StaticStep:
        capture = self.capture if self.capture is not None else group.A.is_cuda
        if not capture:
            return StaticStep(fn, inputs, capture=False)
        saved = [t.clone() for t in group.buffers()]  # warm-up runs the step for real
        try:
            step = StaticStep(fn, inputs, capture=True, pool=group.pool, device=group.A.device)
            self.captures += 1
        except Exception as exc:  # capture can fail on ops that sync or allocate dynamically
            if not self._warned:
                warnings.warn(
                    f"rmt_fast: CUDA-graph capture of a FastARMT step failed ({type(exc).__name__}: "
                    f"{exc}); running this step eagerly",
                    RuntimeWarning,
                    stacklevel=5,
                )
                self._warned = True
            step = StaticStep(fn, inputs, capture=False)
        finally:
            for t, s in zip(group.buffers(), saved, strict=True):
                t.copy_(s)
        return step

    # ------------------------------------------------------------------------------------------- a call
    def run(self, plan: CallPlan, targets: Tensor | None, denom, memory_state, return_logits: bool) -> ARMTOutput:
        self.check_inference()
        armt = self.armt
        layers, weights = self._weights()
        b, L = plan.batch, armt.n_layers
        group = self._group(b)
        first = memory_state is None
        if first:
            group.A.zero_()
            group.z.zero_()
        else:
            group.A.copy_(memory_state.A)
            group.z.copy_(memory_state.z)
        n = len(plan.segments)
        if armt.diagonal:
            from . import schedule

            macro = [[(l0, segs)] for l0, segs in schedule.diagonal(n, L)]
        else:
            macro = [[(layer, [s]) for layer in range(L)] for s in range(n)]
        logits, loss_sum = [], None
        self._in_use = set()
        try:
            for subs in macro:
                part, seg_logits = self._replay(group, plan, subs, first, targets, return_logits, layers, weights)
                if seg_logits is not None:
                    logits.append(seg_logits)
                if part is not None:
                    loss_sum = part if loss_sum is None else loss_sum + part
        finally:
            self._in_use = set()
        loss = loss_sum / denom if loss_sum is not None else None
        return ARMTOutput(
            loss=loss,
            logits=torch.cat(logits, dim=1) if return_logits else None,
            memory_state=ARMTMemoryState(group.A.clone(), group.z.clone()),
        )

    def _replay(self, group, plan, subs, first, targets, return_logits, layers, weights):
        """Run one graph's sub-steps (the L cells of a segment, or one diagonal step): returns the finished
        segment's loss part and logits (cloned), or None."""
        armt = self.armt
        L = armt.n_layers
        l0_first, segs_first = subs[0]
        l0_last, segs_last = subs[-1]
        embeds = l0_first == 0
        finishes = l0_last + len(segs_last) == L
        fin_seg = segs_last[-1] if finishes else None
        fin_len = plan.segments[fin_seg][1] if finishes else None
        key = tuple(
            (l0, tuple(plan.segments[s][1] for s in segs), tuple(first and s == 0 for s in segs)) for l0, segs in subs
        )
        if finishes:
            key += (("finish", return_logits, targets is not None),)
        ids = plan.segment_ids(segs_first[0]) if embeds else None
        seg_targets = None
        if finishes and targets is not None:
            start = plan.segments[fin_seg][0]
            seg_targets = targets[:, start : start + fin_len]

        def make():
            with torch.inference_mode(False):  # static inputs any later call may update in place
                inputs = {
                    "ids": None if ids is None else ids.clone(),
                    "targets": None if seg_targets is None else seg_targets.clone(),
                }
            return self._step_fn(group, plan, subs, first, fin_len, return_logits, layers, weights), inputs

        step = self._step(group, key, make)
        if ids is not None:
            step.inputs["ids"].copy_(ids)
        if seg_targets is not None:
            step.inputs["targets"].copy_(seg_targets)
        out = step()
        if not finishes:
            return None, None
        part = out["part"]
        seg_logits = out["logits"]
        return (None if part is None else part.clone()), (None if seg_logits is None else seg_logits.clone())

    def _step_fn(self, group, plan, subs, first, fin_len, return_logits, layers, weights):
        """The step's function over the group's buffers; everything fixed by the step's key is bound here."""
        armt = self.armt
        L = armt.n_layers
        gpt2 = armt.model.config.model_type == "gpt2"
        device = plan.device
        fixed = []
        for l0, segs in subs:
            first_arg = first_segment_arg(first, segs, device)
            fixed.append((l0, len(segs), plan.layout(segs), plan.rope(segs), first_arg))
        positions = plan.positions(subs[0][1][0])
        cells = armt._cells_fn()
        A, Z, X = group.A, group.z, group.X

        def fn(ids, targets):
            y = None
            out = {"part": None, "logits": None}
            for l0, g_n, layout, rope, first_arg in fixed:
                if l0 == 0 and X is not None:  # the diagonal: layer 0's input joins the others in place (no cat)
                    X[0].copy_(armt._embed(ids, positions, gpt2))
                    x = X[:g_n]
                elif l0 == 0:
                    x = armt._embed(ids, positions, gpt2).unsqueeze(0)
                elif y is not None:  # the sub-step before ran layer l0 - 1 of this segment (sequential)
                    x = y
                else:
                    x = X[l0 : l0 + g_n]
                a, z = A[l0 : l0 + g_n], Z[l0 : l0 + g_n]
                y, a_new, z_new = cells(x, a, z, l0, layout, rope, first_arg, layers, weights)
                a.copy_(a_new)
                z.copy_(z_new)
                top = l0 + g_n == L
                if X is not None and g_n > top:  # the diagonal: hand the outputs to the next step's cells
                    X[l0 + 1 : l0 + g_n + 1 - top].copy_(y[: g_n - top])
                if top:
                    out["logits"], out["part"] = armt._finish(y[-1], fin_len, targets, return_logits)
            return out

        return fn
