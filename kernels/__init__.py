"""RMT attention kernels and backends. Nothing in this package imports transformers.

Modules: ``layout`` (SegmentLayout: the one description of the segment mask), ``sdpa_attention`` (the portable
backend), ``float64_reference`` (dense attention in float64, what every backend is tested against),
``triton_kernels`` (the jit kernels), ``triton_attention`` (their launchers and the public ``rmt_attention``),
``launch_configs`` (the kernels' launch configurations and tuned tables), ``dispatch`` (the measured table that
``attn_backend="auto"`` reads).
"""

from .float64_reference import dense_rmt_attention_reference
from .layout import SegmentLayout
from .sdpa_attention import sdpa_rmt_attention

__all__ = ["SegmentLayout", "dense_rmt_attention_reference", "sdpa_rmt_attention"]

try:  # the Triton backend needs triton (Linux); without it only the SDPA backend is exported
    from .triton_attention import rmt_attention, rmt_attention_dropout_mask, rmt_attention_supported
except ImportError:
    pass
else:
    __all__ += ["rmt_attention", "rmt_attention_supported", "rmt_attention_dropout_mask"]
