"""RMT attention kernels and backends. Nothing in this package imports transformers."""

from .layout import SegmentLayout
from .reference import dense_rmt_attention_reference
from .sdpa_attention import sdpa_rmt_attention

__all__ = ["SegmentLayout", "dense_rmt_attention_reference", "sdpa_rmt_attention"]
