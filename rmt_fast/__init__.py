"""rmt-fast: a fast runtime for Recurrent Memory Transformers on HuggingFace models.

Layers, each importing only the ones above it:

* ``rmt_fast.kernels`` (the ``kernels/`` folder): segment layout, SDPA backend, Triton kernel; torch and triton only;
* ``rmt_fast`` (this folder): FastRMT, ReferenceRMT, the transformers seam;
* ``rmt_fast.bench`` (the ``benchmarks/`` folder): ``rmt-fast-bench``.

The public names below load lazily, so ``import rmt_fast.kernels`` does not import transformers.
"""

from __future__ import annotations

import importlib

__all__ = ["FastRMT", "ReferenceRMT", "RMTOutput", "SegmentLayout", "memory_detached_before", "FastARMT",
           "ReferenceARMT", "ARMTMemoryState", "DocumentStream", "stream_documents"]
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
