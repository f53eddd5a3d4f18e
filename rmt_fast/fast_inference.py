"""``FastRMT(fast_inference=True)``: one switch for the fastest inference path.

The fastest path for a segment-by-segment forward is the segment step compiled (``compile_step``, inductor) and
captured as one CUDA graph (``cuda_graph``): on an H200, bert-base fp16 at batch 1 took 0.74 ms per segment that
way, 1.02 ms graphed alone and about 6 ms eagerly. The switch picks it per call, where it applies, and falls back
where it does not, logging the reason once per FastRMT and reason (logger ``rmt_fast``, level WARNING):

* ``graphed+compiled``: CUDA, gradients off (``torch.no_grad()`` / ``torch.inference_mode()``);
* ``graphed``: the same, after compiling the step failed once (the compiler's error is the logged reason);
* ``eager``: gradients on (training: the usual eager step, with its gradients), or the model is not on a
  CUDA device (CUDA graphs need one).

Inside the graphed path the runner's own fall-backs still apply: a decoder call with an ``attention_mask`` or an
encoder call with labels runs eagerly, and a shape whose capture fails runs eagerly with a warning
(:mod:`rmt_fast.cuda_graph`). ``compile_step`` given with ``fast_inference=True`` holds the compile options of
the fast path (default: inductor's defaults); the step is compiled only for the fast path, never for the eager
fall-back.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

from .compiled import CompiledStep
from .cuda_graph import SegmentGraphRunner

logger = logging.getLogger("rmt_fast")

GRAPHED_COMPILED, GRAPHED, EAGER = "graphed+compiled", "graphed", "eager"


def graphs_supported(device: torch.device) -> bool:
    """Whether CUDA graphs can run on ``device`` (a seam: the CPU tests patch it to run the graphed path's
    no-capture logic)."""
    return device.type == "cuda"


def compile_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "compiling the step failed" (not an error of the inputs or the model)."""
    errors: list[type[BaseException]] = [torch._dynamo.exc.TorchDynamoException]
    try:
        from torch._inductor.exc import InductorError

        errors.append(InductorError)
    except ImportError:  # pragma: no cover - older torch
        pass
    return tuple(errors)


class FastInference:
    """The fast path's state on one FastRMT: its graph runner, its compiled step, what was logged."""

    def __init__(self, rmt, step_name: str, compile_kwargs: dict):
        self.runner = SegmentGraphRunner(rmt)
        self.compiled = CompiledStep(rmt, step_name, compile_kwargs)
        self.step_name = step_name
        self.compile_error: str | None = None
        self._logged: set[str] = set()
        self._rmt = rmt

    def path(self) -> tuple[str, str | None]:
        """(the path this call takes, why it is not ``graphed+compiled`` or None)."""
        if torch.is_grad_enabled():
            return EAGER, (
                "gradients are enabled (training, or a call outside torch.no_grad() / "
                "torch.inference_mode()): running the eager step"
            )
        device = self._rmt.memory.device
        if not graphs_supported(device):
            return EAGER, f"the model is on {device.type}: CUDA graphs need a CUDA device; running the eager step"
        if self.compile_error is not None:
            return GRAPHED, f"compiling the step failed ({self.compile_error}): running it graphed, not compiled"
        return GRAPHED_COMPILED, None

    def log_once(self, reason: str) -> None:
        if reason not in self._logged:
            self._logged.add(reason)
            logger.warning("rmt_fast: FastRMT(fast_inference=True) falls back: %s", reason)

    @contextlib.contextmanager
    def compiled_step(self) -> Iterator[None]:
        """The compiled step stands in for the step method while the fast path runs (and captures)."""
        rmt = self._rmt
        setattr(rmt, self.step_name, self.compiled)
        try:
            yield
        finally:
            delattr(rmt, self.step_name)

    def compile_failed(self, exc: BaseException) -> None:
        """Remember the failure (later calls run graphed, not compiled) and drop what was captured with it."""
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()][:2]  # "backend=... raised:", cause
        self.compile_error = f"{type(exc).__name__}: {' '.join(lines)[:240]}"
        for step in self.runner.steps.values():
            step.release()
        self.runner.steps.clear()
