"""Evaluating many documents: segment-level continuous batching (API page: docs/stream.md).

:class:`DocumentStream` holds B slots. Each step runs one segment for every active slot; when a document ends,
its slot takes the next document, starting from the initial memory, in the same step shape. Results come back
as documents finish (tagged with their index) or in input order::

    stream = DocumentStream(rmt, batch_size=16)
    for result in stream(documents):          # an iterable of 1-D id tensors / lists / dicts
        result.index, result.logits, result.memory_state, result.error

    results = stream.run(documents)            # all of them, in input order (like vllm.LLM.generate)

The names follow the ecosystem: ``batch_size`` and a generator of outputs as a transformers pipeline called on
a dataset, ``use_tqdm`` as ``vllm.LLM.generate``. Every result equals running its document alone (batch 1)
through the same wrapper, up to rounding, with the same shapes: encoder ``logits`` (1, C), decoder ``loss``
(the mean over counted targets), ``token_losses`` (1, T) (position p's cross-entropy for token p + 1, 0 where
not counted), optionally ``logits`` (1, T, V) and a ``generated`` continuation (``generate()`` on the document
alone), and ``memory_state`` (1, m, d), or an ``ARMTMemoryState`` of batch 1 for ARMT.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from .stream_docs import Document, DocumentError, check_document
from .stream_steps import FastSlotStep, PerSlotStep

ADMISSION = ("input", "longest_first")
ON_ERROR = ("yield", "raise")


@dataclass
class DocumentResult:
    """One document's result. ``error`` is set (and the outputs are None) for a document that could not run."""

    index: int
    logits: Tensor | None = None
    loss: Tensor | None = None
    token_losses: Tensor | None = None
    memory_state: object = None
    generated: Tensor | None = None
    n_segments: int = 0
    error: Exception | None = None


@dataclass
class StreamStats:
    """What the last call did: ``steps`` run, ``useful`` slot-steps (segments of documents), ``documents``
    finished, ``errors``; ``utilisation`` = useful / (steps x batch_size); ``ideal_steps`` = ceil(useful / B)."""

    batch_size: int
    steps: int = 0
    useful: int = 0
    documents: int = 0
    errors: int = 0

    @property
    def utilisation(self) -> float:
        return self.useful / (self.steps * self.batch_size) if self.steps else 0.0

    @property
    def ideal_steps(self) -> int:
        return -(-self.useful // self.batch_size)


class DocumentStream:
    """Segment-level continuous batching over ``rmt`` (FastRMT, ReferenceRMT, FastARMT, ReferenceARMT).

    * ``batch_size``: the number of slots B;
    * ``ordered``: True yields results in input order; False as documents finish (each carries its ``index``);
    * ``admission``: ``"longest_first"`` (default) takes the documents in order of decreasing segment count, so
      the last steps are not left to one long document (the documents are read and checked up front);
      ``"input"`` takes them in input order, reading the iterable lazily;
    * ``return_logits`` (decoders): keep each document's (1, T, V) logits too (memory grows with T x V);
    * ``generate_kwargs`` (decoders): a dict for ``rmt.generate`` (e.g. ``{"max_new_tokens": 20, "do_sample":
      False}``); each document's continuation is generated alone from the memory entering its last segment,
      as ``rmt.generate(document)`` does; None (default): no continuation;
    * ``cuda_graph``: FastRMT only; None (default) captures the step as one CUDA graph on a GPU, False never;
    * ``on_error``: ``"yield"`` (default) gives a bad document a result whose ``error`` names its index, and the
      others go on; ``"raise"`` raises that error;
    * ``use_tqdm``: a progress bar over the documents (utilisation in its postfix).
    """

    def __init__(
        self,
        rmt,
        batch_size: int = 8,
        *,
        ordered: bool = True,
        admission: str = "longest_first",
        return_logits: bool = False,
        generate_kwargs: dict | None = None,
        cuda_graph: bool | None = None,
        on_error: str = "yield",
        use_tqdm: bool = True,
    ):
        from .base import RMTBase

        if not isinstance(rmt, RMTBase):
            raise ValueError(
                f"rmt must be a FastRMT, ReferenceRMT, FastARMT or ReferenceARMT, got {type(rmt).__name__}"
            )
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int (the number of slots), got {batch_size!r}")
        for name, value in (("ordered", ordered), ("return_logits", return_logits), ("use_tqdm", use_tqdm)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        if admission not in ADMISSION:
            raise ValueError(f"admission must be one of {ADMISSION}, got {admission!r}")
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        if cuda_graph not in (None, True, False):
            raise ValueError(f"cuda_graph must be None, True or False, got {cuda_graph!r}")
        if generate_kwargs is not None and not isinstance(generate_kwargs, dict):
            raise ValueError(f"generate_kwargs must be None or a dict, got {type(generate_kwargs).__name__}")
        if not rmt.is_decoder and (return_logits or generate_kwargs is not None):
            raise ValueError(
                "return_logits / generate_kwargs are decoder options: an encoder's result holds the "
                "last segment's logits"
            )
        self.rmt, self.batch_size, self.ordered, self.admission = rmt, batch_size, ordered, admission
        self.return_logits, self.generate_kwargs, self.on_error = return_logits, generate_kwargs, on_error
        self.use_tqdm, self.cuda_graph = use_tqdm, cuda_graph
        self.stepper = self._stepper()
        self.stats = StreamStats(batch_size)

    def _stepper(self):
        from .armt.fast import FastARMT
        from .fast import FastRMT

        rmt = self.rmt
        if isinstance(rmt, FastRMT):
            capture = None if self.cuda_graph is None else self.cuda_graph
            return FastSlotStep(rmt, self.batch_size, capture, self.return_logits, self.generate_kwargs is not None)
        if self.cuda_graph:
            raise ValueError(f"cuda_graph=True: only FastRMT's stream step is captured, not {type(rmt).__name__}'s")
        if isinstance(rmt, FastARMT):
            if rmt.diagonal:
                raise ValueError(
                    "a FastARMT stream runs the sequential schedule: build it with diagonal=False "
                    "(docs/stream.md says what the diagonal schedule would need)"
                )
            from .stream_armt import ARMTSlotStep

            return ARMTSlotStep(rmt, self.batch_size, self.return_logits, self.generate_kwargs is not None)
        return PerSlotStep(rmt, self.return_logits)

    # ----------------------------------------------------------------------------------------------- api
    def run(self, documents: Iterable) -> list[DocumentResult]:
        """Every document's result, in input order."""
        ordered, self.ordered = self.ordered, True
        try:
            return list(self(documents))
        finally:
            self.ordered = ordered

    def __call__(self, documents: Iterable) -> Iterator[DocumentResult]:
        from tqdm.auto import tqdm

        self.stats = StreamStats(self.batch_size)
        total = len(documents) if hasattr(documents, "__len__") else None
        bar = tqdm(total=total, desc="documents", unit="doc", disable=not self.use_tqdm)
        pending: dict[int, DocumentResult] = {}
        next_out = 0
        try:
            for result in self._results(documents):
                bar.update(1)
                if self.stats.steps:
                    bar.set_postfix_str(f"util {self.stats.utilisation:.1%} steps {self.stats.steps}", refresh=False)
                if not self.ordered:
                    yield result
                    continue
                pending[result.index] = result
                while next_out in pending:
                    yield pending.pop(next_out)
                    next_out += 1
        finally:
            bar.close()

    # ----------------------------------------------------------------------------------------- the slots
    def _queue(self, documents: Iterable) -> Iterator[Document | DocumentResult]:
        """Checked documents in admission order; a bad one as its error result, where it stands."""
        checked = (self._check(i, doc) for i, doc in enumerate(documents))
        if self.admission == "input":
            yield from checked
            return
        items = list(checked)
        bad = [x for x in items if isinstance(x, DocumentResult)]
        good = sorted((x for x in items if isinstance(x, Document)), key=lambda d: (-d.n_segments, d.index))
        yield from bad
        yield from good

    def _check(self, index: int, doc) -> Document | DocumentResult:
        try:
            return check_document(self.rmt, index, doc)
        except DocumentError as exc:
            if self.on_error == "raise":
                raise
            return DocumentResult(index, error=exc)

    def _results(self, documents: Iterable) -> Iterator[DocumentResult]:
        stats, b = self.stats, self.batch_size
        queue = self._queue(documents)
        slots: list[Document | None] = [None] * b
        exhausted = False
        while True:
            for s in range(b):  # refill the free slots
                while slots[s] is None and not exhausted:
                    item = next(queue, None)
                    if item is None:
                        exhausted = True
                    elif isinstance(item, DocumentResult):
                        stats.errors += 1
                        yield item
                    else:
                        slots[s] = item
            if all(d is None for d in slots):
                return
            with torch.no_grad():  # not around a yield: the caller's code keeps its own grad mode
                self.stepper.run(slots)
            stats.steps += 1
            stats.useful += sum(d is not None for d in slots)
            done = []
            for s, doc in enumerate(slots):
                if doc is None:
                    continue
                if doc.at_last:
                    slots[s] = None
                    stats.documents += 1
                    done.append(doc)
                else:
                    doc.step += 1
            for doc in done:
                with torch.no_grad():
                    result = self._finish(doc)
                yield result

    def _finish(self, doc: Document) -> DocumentResult:
        res = DocumentResult(doc.index, memory_state=doc.memory, n_segments=doc.n_segments)
        if not self.rmt.is_decoder:
            res.logits = doc.logits[0]
            return res
        res.token_losses = torch.cat(doc.token_losses)[None]
        res.loss = res.token_losses.sum() / doc.denom
        if self.return_logits:
            res.logits = torch.cat(doc.logits)[None]
        if self.generate_kwargs is not None:
            start, _ = doc.segments[-1]
            mask = None if doc.attention_mask is None else doc.attention_mask[:, start:]
            res.generated = self.rmt.generate(
                doc.ids[:, start:], attention_mask=mask, memory_state=doc.memory_before_last, **self.generate_kwargs
            )
        return res


def stream_documents(rmt, documents: Iterable, batch_size: int = 8, **kwargs) -> Iterator[DocumentResult]:
    """``DocumentStream(rmt, batch_size, **kwargs)(documents)``: the results as a generator."""
    return DocumentStream(rmt, batch_size, **kwargs)(documents)
