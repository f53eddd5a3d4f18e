"""RMT attention kernels and backends. Nothing in this package imports transformers."""

from .layout import SegmentLayout
from .reference import dense_rmt_attention_reference
from .sdpa_attention import sdpa_rmt_attention

__all__ = ["SegmentLayout", "dense_rmt_attention_reference", "sdpa_rmt_attention"]

try:  # the Triton backend needs triton (Linux); without it only the SDPA backend is exported
    from .rmt_attention import rmt_attention, rmt_attention_dropout_mask, rmt_attention_supported
except ImportError:
    pass
else:
    __all__ += ["rmt_attention", "rmt_attention_supported", "rmt_attention_dropout_mask"]
