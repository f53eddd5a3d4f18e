"""rmt-fast: a fast runtime for Recurrent Memory Transformers on HuggingFace models."""

from kernels.layout import SegmentLayout

from .base import RMTOutput, memory_detached_before
from .fast import FastRMT
from .reference import ReferenceRMT

__all__ = ["FastRMT", "ReferenceRMT", "RMTOutput", "SegmentLayout", "memory_detached_before"]
__version__ = "0.1.0"
