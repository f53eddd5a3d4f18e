"""CUDA-graph capture of FastRMT's per-segment step, for inference.

One segment of a small-batch RMT is a few hundred small kernels plus transformers' Python code, so on a GPU it
is bound by launch overhead. The runner captures the whole step once and replays it for every segment:

* static buffers hold the inputs (token ids, per-row token counts, the memory) and the outputs (the
  segment's logits or loss contribution, and the new memory);
* the memory hand-off happens inside the graph (the write-slot outputs are copied into the memory buffer),
  so N segments are N rounds of "copy ids in, replay";
* every segment runs with per-row counts, so one graph serves every segment, the padded last one included;
* graphs are keyed by batch size, dtype, device, backbone and FastRMT settings; a new key captures anew;
* at most ``max_graphs`` steps are kept (least recently used first out): an evicted graph is reset and its
  static buffers and private memory pool are released, so alternating batch sizes do not grow memory;
* warm-up runs on one side stream per device, shared by every capture (a new stream per capture would make
  cuBLAS allocate a new workspace, 32 MiB on Hopper, that lives as long as the process); each graph has its
  own private memory pool; outputs a later replay would overwrite are cloned before they reach the caller;
* warm-up and capture run inside :func:`rmt_fast.attention.graphed_step`, so ``attn_backend="auto"`` picks
  from the dispatch table's graphed (device-time) measurements;
* if capture fails, a warning is given once and that key runs eagerly, with the same static-buffer logic.

On a machine without CUDA (or with ``capture=False``) the same static-buffer logic runs eagerly, which is how
the CPU tests check it against eager FastRMT.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from .attention import graphed_step
from .base import RMTOutput
from .segments import DecoderStatic

DEFAULT_MAX_GRAPHS = 4
_WARMUP_STREAMS: dict[int, torch.cuda.Stream] = {}


def _warmup_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device for every warm-up (and so one cuBLAS workspace for all of them)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _WARMUP_STREAMS.get(index)
    if stream is None:
        stream = _WARMUP_STREAMS[index] = torch.cuda.Stream(device=index)
    return stream


def capture_device(inputs: dict, device: torch.device | None = None) -> torch.device:
    """The device a step captures on: ``device``, else that of its first tensor input."""
    if device is not None:
        return device
    found = next((t.device for t in inputs.values() if isinstance(t, Tensor)), None)
    if found is None:
        raise ValueError("StaticStep: no tensor input to take the capture device from: pass device=")
    return found


class StaticStep:
    """A step function over static input buffers: captured as a CUDA graph, or run eagerly."""

    def __init__(
        self,
        fn: Callable[..., dict],
        inputs: dict[str, Tensor | None],
        capture: bool,
        warmup: int = 2,
        pool=None,
        device: torch.device | None = None,
    ):
        """``pool``: a memory pool shared with other graphs (``torch.cuda.graph_pool_handle()``; None: a private
        pool). Graphs sharing a pool must not need each other's outputs across replays: read (or clone) a
        step's outputs before the next replay of any graph in its pool. ``device``: where to capture (default:
        the first tensor input's device; a step whose inputs are all None needs it)."""
        self.fn, self.inputs, self.graph = fn, inputs, None
        self.outputs: dict = {}
        if capture:
            device = capture_device(inputs, device)
            stream = _warmup_stream(device)
            with graphed_step():
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(warmup):
                        fn(**inputs)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):  # a private memory pool per graph unless one is given
                    self.outputs = fn(**inputs)
            self.graph = graph

    def release(self) -> None:
        """Drop the graph, its outputs and its input buffers (the private pool is freed with them)."""
        if self.graph is not None:
            self.graph.reset()
        self.graph, self.outputs, self.inputs = None, {}, {}

    def __call__(self) -> dict:
        if self.graph is None:
            self.outputs = self.fn(**self.inputs)
        else:
            self.graph.replay()
        return self.outputs


class SegmentGraphRunner:
    def __init__(self, rmt, capture: bool | None = None, max_graphs: int = DEFAULT_MAX_GRAPHS):
        if not isinstance(max_graphs, int) or isinstance(max_graphs, bool) or max_graphs < 1:
            raise ValueError(f"max_graphs must be a positive int, got {max_graphs!r}")
        self.rmt = rmt
        self.capture = capture
        self.max_graphs = max_graphs
        self.steps: dict[tuple, StaticStep] = {}  # insertion order = least recently used first
        self.captures = 0
        self.evictions = 0
        self._warned = False

    # ------------------------------------------------------------------------------------------- helpers
    def _key(self, kind: str, batch: int, *flags) -> tuple:
        rmt = self.rmt
        st = rmt.settings
        return (
            kind,
            batch,
            rmt.memory.dtype,
            rmt.memory.device,
            id(rmt.model),
            st.num_mem_tokens,
            st.segment_size,
            st.attn_backend,
            *flags,
        )

    def _check_inference(self):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "FastRMT(cuda_graph=True) runs inference only: call it under torch.no_grad() or "
                "torch.inference_mode(); training through CUDA graphs is not supported (use cuda_graph=False)"
            )

    def _get(self, key) -> StaticStep | None:
        """The cached step for key, marked most recently used."""
        step = self.steps.pop(key, None)
        if step is not None:
            self.steps[key] = step
        return step

    def _evict_for_one_more(self) -> None:
        while len(self.steps) >= self.max_graphs:
            old = self.steps.pop(next(iter(self.steps)))
            old.release()
            self.evictions += 1

    def _build(self, key, fn, inputs) -> StaticStep:
        self._evict_for_one_more()  # before capturing, so the freed pool can serve the new graph
        capture = self.capture if self.capture is not None else inputs["memory"].is_cuda
        try:
            step = StaticStep(fn, inputs, capture)
        except Exception as exc:  # capture can fail on ops that sync or allocate dynamically
            if not capture:
                raise
            if not self._warned:
                warnings.warn(
                    f"rmt_fast: CUDA-graph capture failed ({type(exc).__name__}: {exc}); running this shape eagerly",
                    RuntimeWarning,
                    stacklevel=3,
                )
                self._warned = True
            step = StaticStep(fn, inputs, capture=False)
        self.captures += int(step.graph is not None)
        self.steps[key] = step
        return step

    # ------------------------------------------------------------------------------------------- decoder
    def supports_decoder(self, attention_mask) -> bool:
        return attention_mask is None  # a caller mask takes the eager path

    def run_decoder(self, input_ids, targets, denom, memory, plan, return_logits) -> RMTOutput:
        self._check_inference()
        rmt = self.rmt
        b, size = input_ids.shape[0], rmt.segment_size
        need_logits = return_logits or targets is not None
        key = self._key("decoder", b, need_logits, targets is not None)
        step = self._get(key)
        if step is None:
            device = input_ids.device
            static = DecoderStatic(b, rmt.num_mem_tokens, size, device)
            inputs = dict(
                ids=torch.zeros(b, size, dtype=input_ids.dtype, device=device),
                counts=torch.full((b,), size, dtype=torch.int32, device=device),
                memory=memory.detach().clone(),
                targets=torch.full((b, size), -100, dtype=torch.long, device=device) if targets is not None else None,
                loss=torch.zeros((), dtype=torch.float32, device=device),
            )

            def fn(ids, counts, memory, targets, loss):
                logits, new_memory, part = rmt.decoder_step(ids, memory, counts, None, static, need_logits, targets)
                memory.copy_(new_memory)
                if part is not None:
                    loss.add_(part)
                return {"logits": logits}

            step = self._build(key, fn, inputs)
        io = step.inputs
        io["memory"].copy_(memory)
        io["loss"].zero_()
        logits = []
        for start, length in plan:
            io["ids"][:, :length].copy_(input_ids[:, start : start + length])
            io["counts"].fill_(length)
            if targets is not None:
                io["targets"].fill_(-100)
                io["targets"][:, :length].copy_(targets[:, start : start + length])
            out = step()
            if return_logits:
                logits.append(out["logits"][:, :length].clone())
        loss = io["loss"].clone() / denom if targets is not None else None
        return RMTOutput(
            loss=loss, logits=torch.cat(logits, dim=1) if return_logits else None, memory_state=io["memory"].clone()
        )

    # ------------------------------------------------------------------------------------------- encoder
    def run_encoder(self, plan, memory, return_logits) -> RMTOutput:
        self._check_inference()
        rmt = self.rmt
        b = memory.shape[0]
        has_labels = any(seg.labels is not None for seg in plan.segments)
        if has_labels:  # labels at inference: rare, shapes vary by head; run eagerly
            return None
        key = self._key("encoder", b)
        step = self._get(key)
        width = rmt.input_size
        if step is None:
            device = memory.device
            inputs = dict(
                ids=torch.zeros(b, width, dtype=torch.long, device=device),
                counts=torch.full((b,), width, dtype=torch.int32, device=device),
                memory=memory.detach().clone(),
            )

            def fn(ids, counts, memory):
                out, new_memory = rmt.encoder_step(ids, memory, counts, None)
                memory.copy_(new_memory)
                logits = getattr(out, "logits", None)
                return {"logits": out.last_hidden_state if logits is None else logits}

            step = self._build(key, fn, inputs)
        io = step.inputs
        io["memory"].copy_(memory)
        out = None
        for seg in plan.segments:
            if seg.rows is not None:  # some rows are empty here: a smaller batch, run eagerly
                res, new = rmt.encoder_step(seg.ids, io["memory"][seg.rows], seg.counts, None)
                io["memory"][seg.rows] = new
                out = {"logits": getattr(res, "logits", None)}
                continue
            io["ids"].copy_(seg.ids)
            if seg.counts is None:
                io["counts"].fill_(width)
            else:
                io["counts"].copy_(seg.counts)
            out = step()
        logits = out["logits"].clone() if return_logits and out["logits"] is not None else None
        return RMTOutput(loss=None, logits=logits, memory_state=io["memory"].clone())
