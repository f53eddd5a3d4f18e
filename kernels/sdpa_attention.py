"""RMT segment attention on torch SDPA: the portable backend.

It reads the segment layout: a plain causal or bidirectional segment goes to SDPA with ``is_causal`` and no
mask (so SDPA may pick its flash or efficient kernel), and only a padded segment gets a boolean mask built
from the layout. Grouped-query attention uses SDPA's ``enable_gqa`` rather than copying K/V.

``sdpa_kernel="sdpa_flash"`` (or ``"sdpa_efficient"``, ``"sdpa_cudnn"``, ``"sdpa_math"``) runs the same call with
that one SDPA kernel allowed (``torch.nn.attention.sdpa_kernel``): what the dispatch table names when it measured
one SDPA kernel faster than SDPA's own choice. :func:`sdpa_kernel_supported` says beforehand whether that kernel
can take the case.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from .layout import SegmentLayout

# backend name (as the dispatch table writes it) -> the SDPA kernel it forces
SDPA_KERNELS = {
    "sdpa_flash": SDPBackend.FLASH_ATTENTION,
    "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa_math": SDPBackend.MATH,
}
# torch's own check of each kernel's constraints (CUDA), by backend name
_CAN_USE = {
    "sdpa_flash": "can_use_flash_attention",
    "sdpa_efficient": "can_use_efficient_attention",
    "sdpa_cudnn": "can_use_cudnn_attention",
}
# The context manager that forces the kernel: a module attribute so that CPU tests can spy on the selection (the
# math kernel is the only one a CPU build has).
_force_kernel = sdpa_kernel


def _check_kernel_name(name: str) -> SDPBackend:
    if name not in SDPA_KERNELS:
        raise ValueError(f"sdpa_kernel must be one of {tuple(SDPA_KERNELS)} or None, got {name!r}")
    return SDPA_KERNELS[name]


def needs_mask(layout: SegmentLayout, q_len: int) -> bool:
    """Whether the SDPA call for this layout takes a dense mask: a padded segment, or a causal decode step
    (queries at the end; SDPA's is_causal aligns top-left)."""
    return layout.is_padded or (layout.causal and q_len != layout.seq_len)


def _sdpa_mask(q: Tensor, k: Tensor, layout: SegmentLayout, mask: Tensor | None = None) -> tuple[Tensor | None, bool]:
    """(attn_mask, is_causal) of the SDPA call for this layout; ``mask``: the layout's dense mask already built."""
    tq = q.shape[-2]
    if needs_mask(layout, tq):
        return (mask if mask is not None else layout.dense_mask(q_len=tq, device=q.device)), False
    return None, layout.causal


def sdpa_kernel_supported(
    name: str, q: Tensor, k: Tensor, v: Tensor, layout: SegmentLayout, dropout_p: float = 0.0
) -> str | None:
    """Why the SDPA kernel ``name`` (``"sdpa_flash"``, ...) cannot run this call, or None. On CUDA: torch's own
    check (``torch.backends.cuda.can_use_*``) of the exact arguments :func:`sdpa_rmt_attention` passes. Elsewhere,
    and while torch.compile traces, nothing is checked (None): SDPA raises if the kernel cannot run."""
    _check_kernel_name(name)
    if name == "sdpa_math" or not q.is_cuda or torch.compiler.is_compiling():
        return None
    can_use = getattr(torch.backends.cuda, _CAN_USE[name], None)
    if can_use is None:
        return f"this torch has no torch.backends.cuda.{_CAN_USE[name]}"
    attn_mask, is_causal = _sdpa_mask(q, k, layout)
    try:
        params = torch._C._SDPAParams(q, k, v, attn_mask, float(dropout_p), is_causal, q.shape[1] != k.shape[1])
        ok = can_use(params, False)
    except (RuntimeError, TypeError, AttributeError) as exc:  # a torch whose SDPAParams differs
        return f"torch.backends.cuda.{_CAN_USE[name]} failed ({type(exc).__name__}: {exc})"
    return None if ok else f"SDPA's {name.removeprefix('sdpa_')} kernel cannot take these arguments ({_CAN_USE[name]})"


def sdpa_rmt_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: SegmentLayout,
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
    sdpa_kernel: str | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """q (B, Hq, Tq, D), k and v (B, Hkv, Tk, D) -> output (B, Tq, Hq, D), the layout transformers expects.
    ``sdpa_kernel``: None (SDPA picks its kernel) or the one kernel to run (``"sdpa_flash"``, ...).
    ``mask``: ``layout.dense_mask(q_len=Tq)`` already built by the caller (every layer of a segment reuses one),
    boolean or in SDPA's additive float form (0 visible, -inf hidden), used where the layout needs a mask; None
    builds it here."""
    forced = None if sdpa_kernel is None else _check_kernel_name(sdpa_kernel)
    tk = k.shape[-2]
    if tk != layout.seq_len:
        raise ValueError(f"k has {tk} positions but the segment layout has {layout.seq_len}")
    enable_gqa = q.shape[1] != k.shape[1]
    attn_mask, is_causal = _sdpa_mask(q, k, layout, mask)
    if forced is None:
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=scale,
            enable_gqa=enable_gqa,
        )
    else:
        with _force_kernel([forced]):
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=attn_mask,
                dropout_p=dropout_p,
                is_causal=is_causal,
                scale=scale,
                enable_gqa=enable_gqa,
            )
    return out.transpose(1, 2)
