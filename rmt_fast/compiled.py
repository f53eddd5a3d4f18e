"""``FastRMT(compile_step=...)``: the per-segment step under ``torch.compile``.

The step (``decoder_step`` / ``encoder_step``: embeddings, every layer, the write-slot read-out, the segment's
loss) is compiled once, lazily on the first call, so the compiler can fuse bias, GELU, residual and norm
epilogues; eager FastRMT's loop, its checkpointing and the CUDA-graph runner all call the compiled step
unchanged. Options:

* ``compile_step=True``: ``torch.compile`` defaults (inductor), with ``dynamic=False`` (a segment's shapes are
  static; a new batch size compiles anew);
* a dict: keyword arguments for ``torch.compile`` (``{"mode": "max-autotune"}``, ``{"backend": "aot_eager"}``,
  ...), ``dynamic`` still defaulting to False. With ``cuda_graph=True`` the runner captures the step itself,
  so inductor's own CUDA graphs are switched off: ``"max-autotune"`` becomes ``"max-autotune-no-cudagraphs"``
  and ``"reduce-overhead"`` the default mode.

The memory argument is made contiguous before the compiled call, so the first segment (whose memory is the
broadcast parameter) and the later ones share one compiled graph.

Graph breaks: none of rmt-fast's own. :mod:`rmt_fast.attention` keeps the active segment in a per-thread holder
that dynamo traces (a ContextVar would break the graph at every attention call), the Triton module and the
dispatch table are resolved by FastRMT's constructor, and the once-only fall-back log is skipped while tracing,
so the whole step is one graph (``fullgraph=True`` holds: tests/runtime/test_compiled_step.py). Dynamo keeps at most
``recompile_limit`` (8) variants per step; each FastRMT step has two (full and padded last segment) per grad
mode and batch size.
"""

from __future__ import annotations

import torch

_GRAPHED_MODES = {"max-autotune": "max-autotune-no-cudagraphs", "reduce-overhead": None}


def compile_options(compile_step, cuda_graph: bool = False) -> dict | None:
    """Check ``compile_step`` and turn it into ``torch.compile`` keyword arguments (None: not compiled)."""
    if compile_step is None or compile_step is False:
        return None
    if compile_step is True:
        options = {}
    elif isinstance(compile_step, dict):
        options = dict(compile_step)
    else:
        raise ValueError(
            "compile_step must be False, True or a dict of torch.compile keyword arguments, "
            f"got {type(compile_step).__name__}"
        )
    if not all(isinstance(k, str) for k in options) or "model" in options:
        raise ValueError(f"compile_step: keys must be torch.compile keyword arguments, got {sorted(map(str, options))}")
    options.setdefault("dynamic", False)
    if cuda_graph and options.get("mode") in _GRAPHED_MODES:
        mode = _GRAPHED_MODES[options.pop("mode")]
        if mode is not None:
            options["mode"] = mode
    try:  # torch.compile checks its arguments when called; compiling itself waits for the first call
        torch.compile(_probe, **options)
    except Exception as exc:
        raise ValueError(f"compile_step: torch.compile rejects {options}: {type(exc).__name__}: {exc}") from None
    return options


def _probe():
    return None


class CompiledStep:
    """Stands in for one step method of a FastRMT instance; compiles it on the first call."""

    def __init__(self, rmt, name: str, options: dict):
        self._rmt, self.name, self.options = rmt, name, options
        self._fn = None

    def __call__(self, ids, memory, *args, **kwargs):
        if self._fn is None:
            eager = getattr(type(self._rmt), self.name).__get__(self._rmt)
            self._fn = torch.compile(eager, **self.options)
        return self._fn(ids, memory.contiguous(), *args, **kwargs)

    def __deepcopy__(self, memo):  # a copied FastRMT compiles its own step
        import copy

        return CompiledStep(copy.deepcopy(self._rmt, memo), self.name, dict(self.options))

    def __getstate__(self):
        return {"_rmt": self._rmt, "name": self.name, "options": self.options, "_fn": None}

    def __repr__(self) -> str:
        return f"CompiledStep({self.name}, {self.options}, compiled={self._fn is not None})"
