"""rmt-fast: a fast runtime for Recurrent Memory Transformers on HuggingFace models.

Layers, each importing only the ones above it:

* ``rmt_fast.kernels`` (the ``kernels/`` folder): segment layout, SDPA backend, Triton kernel; torch and triton only;
* ``rmt_fast`` (this folder): FastRMT, ReferenceRMT, the transformers seam;
* ``rmt_fast.bench`` (the ``benchmarks/`` folder): ``rmt-fast-bench``.

The public names are imported explicitly below, for editors, type checkers and readers; at run time they load
on first use (PEP 562), so that ``import rmt_fast`` costs about 2 ms instead of the 1.8 s of importing
transformers, and ``import rmt_fast.kernels`` (the kernel layer, which the Python import system reaches through
this file) never imports transformers. ``_LAZY`` is the same list, name by name; tests/project/test_layers.py checks
that the two agree and that every name resolves.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the explicit imports; the run-time table below mirrors them
    from .armt.fast import FastARMT
    from .armt.memory import ARMTMemoryState
    from .armt.reference import ReferenceARMT
    from .base import RMTOutput, memory_detached_before
    from .fast import FastRMT
    from .kernels.layout import SegmentLayout
    from .reference import ReferenceRMT
    from .stream import DocumentStream, stream_documents

__all__ = [
    "FastRMT",
    "ReferenceRMT",
    "RMTOutput",
    "SegmentLayout",
    "memory_detached_before",
    "FastARMT",
    "ReferenceARMT",
    "ARMTMemoryState",
    "DocumentStream",
    "stream_documents",
]
__version__ = "0.1.0"

_LAZY = {
    "FastRMT": ".fast",
    "ReferenceRMT": ".reference",
    "RMTOutput": ".base",
    "memory_detached_before": ".base",
    "SegmentLayout": ".kernels.layout",
    "FastARMT": ".armt.fast",
    "ReferenceARMT": ".armt.reference",
    "ARMTMemoryState": ".armt.memory",
    "DocumentStream": ".stream",
    "stream_documents": ".stream",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'rmt_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
