"""The attention backends that ``tune`` and ``kernels`` race, each called exactly as the runtime calls it
(``rmt_fast.attention.run_backend``), and how a backend's failure becomes a row's status.

The names are the dispatch table's (:data:`rmt_fast.kernels.dispatch.BACKENDS`): ``triton`` (the kernel, with
whatever launch configurations are installed), ``sdpa`` (SDPA choosing its kernel: ``is_causal`` for a full
segment, the layout's dense mask for a padded one), ``sdpa_flash`` / ``sdpa_efficient`` / ``sdpa_cudnn`` (the same
call with that one SDPA kernel forced, ``torch.nn.attention.sdpa_kernel``) and ``flex`` (FlexAttention, compiled on
CUDA, with the layout's ``mask_mod`` as a block mask built once per case).
"""

from __future__ import annotations

from collections.abc import Callable

from rmt_fast.kernels import dispatch

from .runner import is_oom

RACED = dispatch.BACKENDS
# What a backend raises when it cannot take a case at all (not a failure of the run): SDPA with a forced kernel
# that does not apply, FlexAttention's refusals.
_UNAVAILABLE_WORDS = ("No available kernel", "No viable backend", "flex_rmt_attention:")


def selected(text: str | None) -> tuple[str, ...]:
    """The backends named by a comma-separated list (``--backends``), in :data:`RACED` order; None or "" is all.
    ``sdpa`` must be among them: every table entry is measured against it."""
    import argparse

    if not text:
        return RACED
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in RACED]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown backend(s) {', '.join(unknown)}; expected some of {', '.join(RACED)}"
        )
    if dispatch.DEFAULT_BACKEND not in names:
        raise argparse.ArgumentTypeError("the backends must include sdpa (every table entry is measured against it)")
    return tuple(n for n in RACED if n in names)


def impls(layout, q, k, v, names: tuple[str, ...] = RACED) -> dict[str, Callable | str]:
    """``{name: fn(q, k, v) -> out}`` for the layout and tensors, or ``{name: why it cannot run}``."""
    out: dict[str, Callable | str] = {}
    for name in names:
        try:
            out[name] = _impl(name, layout, q, k, v)
        except Exception as exc:  # an import or a block mask that failed: the row says so
            out[name] = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:160]
    return out


def _impl(name: str, layout, q, k, v) -> Callable | str:
    if name == "triton":
        from rmt_fast.kernels import triton_attention as ta

        reason = ta.rmt_attention_supported(q, k, v, layout)
        return f"unsupported: {reason}" if reason else (lambda q, k, v: ta.rmt_attention(q, k, v, layout, check=False))
    from rmt_fast.kernels import sdpa_attention as sa

    if name == "sdpa":
        return lambda q, k, v: sa.sdpa_rmt_attention(q, k, v, layout)
    if name in dispatch.SDPA_KERNELS:
        reason = sa.sdpa_kernel_supported(name, q, k, v, layout)
        return (
            f"unsupported: {reason}"
            if reason
            else (lambda q, k, v: sa.sdpa_rmt_attention(q, k, v, layout, sdpa_kernel=name))
        )
    if name == "flex":
        from rmt_fast.kernels import flex_attention as fa

        reason = fa.flex_supported(q, k, v, layout)
        if reason:
            return f"unsupported: {reason}"
        block_mask = fa.flex_block_mask(layout, q.shape[0], q.device)
        return lambda q, k, v: fa.flex_rmt_attention(q, k, v, layout, block_mask=block_mask)
    raise ValueError(f"backends.impls: unknown backend {name!r}; expected one of {RACED}")


def failure(exc: BaseException) -> dict:
    """A failed measurement's status and note: ``unavailable`` where the backend refused the case (a forced SDPA
    kernel that does not apply, FlexAttention's limits), else the runner's words (``oom`` or ``error``)."""
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    if is_oom(exc):
        status = "oom"
    elif isinstance(exc, NotImplementedError) or any(w in text for w in _UNAVAILABLE_WORDS):
        status = "unavailable"
    else:
        status = "error"
    return {"status": status, "note": text[:160]}
