"""Value checks on RMT inputs, run before any device work.

What is checked (shapes, dtypes and devices are checked before, in :meth:`rmt_fast.base.RMTBase._check_inputs`):

* ``input_ids``: every id in ``[0, vocab)``, vocab = the rows of the backbone's word embedding. Encoders drop
  the pad, CLS and SEP ids by value before segmenting; the constructor makes sure those three lie inside the
  vocabulary, so "in the vocabulary or a special id" is the same rule: an id equal to the pad id is dropped,
  as the reference does, and is no error;
* ``labels`` that are class ids (decoder and masked-LM token labels, single-label classification): in
  ``[0, classes)`` or equal to the ignore index -100. Regression and multi-label targets are not ids and are
  not checked;
* ``attention_mask`` and ``labels_mask``: 0 and 1 only (or bool);
* ``memory_state``: finite. NaN or inf in the memory would flow into every later segment's hidden states and
  into the next call's memory, so it is an error rather than silent propagation;
* encoders: an ``attention_mask`` that hides a content (non-pad) token, which the encoder cannot honour.

Cost: every check reduces its tensor to one or two scalars on the inputs' device; the scalars are stacked into
one small int64 tensor and read with ONE host synchronisation per call (not one per segment). Only when a value
is wrong does a second pass find the first offending (row, position) for the error message.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

IGNORE_INDEX = -100


@dataclass
class _Check:
    values: list[Tensor]  # 0-d tensors on the inputs' device, read with the one sync
    bad: Callable[[list[int]], bool]  # given the host values: is something wrong?
    message: Callable[[], str]  # the error message; only called on the error path (may sync)


def label_classes(model, kind: str, input_ids: Tensor, labels: Tensor) -> tuple[int, str] | None:
    """(number of classes, what they are) when ``labels`` hold class ids, None when they do not (regression or
    multi-label targets). Mirrors what the backbone's loss does with them."""
    config = model.config
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_rows = getattr(getattr(out, "weight", None), "shape", (None,))[0]
    if kind == "decoder":
        return head_rows or model.get_input_embeddings().num_embeddings, "the vocabulary"
    token_labels = labels.ndim == 2 and labels.shape[1] == input_ids.shape[1]
    if token_labels:  # masked LM over the vocabulary, or token classification over num_labels
        if head_rows is not None:
            return head_rows, "the vocabulary"
        return config.num_labels, "num_labels"
    if "SequenceClassification" not in type(model).__name__:
        return None
    problem = config.problem_type  # transformers' rule (it sets problem_type on the first call)
    if problem is None:
        if config.num_labels == 1:
            problem = "regression"
        elif labels.dtype in (torch.int64, torch.int32):
            problem = "single_label_classification"
    if problem != "single_label_classification":
        return None
    return config.num_labels, "num_labels"


def check_values(
    input_ids: Tensor,
    vocab: int,
    attention_mask: Tensor | None = None,
    labels: Tensor | None = None,
    classes: tuple[int, str] | None = None,
    labels_mask: Tensor | None = None,
    memory_state: Tensor | None = None,
    encoder_pad_id: int | None = None,
) -> None:
    """Raise a ValueError naming the first bad argument, its offending value and where it sits.

    ``classes``: (n, description) when ``labels`` are class ids (see :func:`label_classes`). ``encoder_pad_id``:
    the encoder's pad id, to refuse an ``attention_mask`` that hides a non-pad token."""
    checks = [_ids_check(input_ids, vocab)]
    if attention_mask is not None:
        checks += _binary_checks("attention_mask", attention_mask)
        if encoder_pad_id is not None:
            checks.append(_hidden_content_check(input_ids, attention_mask, encoder_pad_id))
    if labels is not None and classes is not None:
        checks.append(_labels_check(labels, *classes))
    if labels_mask is not None:
        checks += _binary_checks("labels_mask", labels_mask)
    if memory_state is not None:
        checks.append(_finite_check(memory_state))
    _run(checks)


def check_encoder_mask(input_ids: Tensor, attention_mask: Tensor, pad_id: int) -> None:
    """Only the encoder's "attention_mask hides a content token" check (used when value checks are off)."""
    _run([_hidden_content_check(input_ids, attention_mask, pad_id)])


def _run(checks: list[_Check]) -> None:
    values = [v for c in checks for v in c.values]
    host = torch.stack([v.to(torch.int64) for v in values]).tolist()  # the one host sync of the check
    at = 0
    for c in checks:
        part = host[at : at + len(c.values)]
        at += len(c.values)
        if c.bad(part):
            raise ValueError(c.message())


# --------------------------------------------------------------------------------------------- the checks
def _where(bad: Tensor) -> tuple[int, ...]:
    return tuple(bad.nonzero()[0].tolist())


def _ids_check(ids: Tensor, vocab: int) -> _Check:
    lo, hi = torch.aminmax(ids)

    def message() -> str:
        r, p = _where((ids < 0) | (ids >= vocab))
        return (
            f"input_ids holds {ids[r, p].item()} at row {r}, position {p}: expected token ids in the "
            f"vocabulary [0, {vocab}) (the rows of the model's word embedding)"
        )

    return _Check([lo, hi], lambda v: v[0] < 0 or v[1] >= vocab, message)


def _labels_check(labels: Tensor, n: int, what: str) -> _Check:
    ignored = labels == IGNORE_INDEX
    lo, hi = torch.aminmax(labels.masked_fill(ignored, 0))

    def message() -> str:
        where = _where(((labels < 0) | (labels >= n)) & ~ignored)
        place = f"row {where[0]}" + (f", position {where[1]}" if len(where) > 1 else "")
        return (
            f"labels holds {labels[where].item()} at {place}: expected class ids in [0, {n}) ({what}) or "
            f"the ignore index {IGNORE_INDEX}"
        )

    return _Check([lo, hi], lambda v: v[0] < 0 or v[1] >= n, message)


def _binary_checks(name: str, mask: Tensor) -> list[_Check]:
    if mask.dtype == torch.bool:
        return []
    if mask.is_floating_point():
        values = [((mask != 0) & (mask != 1)).any()]

        def bad(v):
            return v[0] != 0
    else:
        values = list(torch.aminmax(mask))

        def bad(v):
            return v[0] < 0 or v[1] > 1

    def message() -> str:
        r, p = _where((mask != 0) & (mask != 1))
        return f"{name} holds {mask[r, p].item()} at row {r}, position {p}: expected only 0 and 1 (or a bool mask)"

    return [_Check(values, bad, message)]


def _hidden_content_check(ids: Tensor, mask: Tensor, pad_id: int) -> _Check:
    hidden = (mask == 0) & (ids != pad_id)

    def message() -> str:
        r, p = _where(hidden)
        return (
            f"attention_mask masks non-pad tokens (row {r}, position {p}: id {ids[r, p].item()}), but an "
            "encoder RMT derives its mask from the pad tokens (pad, CLS and SEP are dropped from input_ids): "
            "replace masked tokens by the pad id"
        )

    return _Check([hidden.any()], lambda v: v[0] != 0, message)


def _finite_check(memory: Tensor) -> _Check:
    def message() -> str:
        r, s, f = _where(~torch.isfinite(memory))
        return (
            f"memory_state holds {memory[r, s, f].item()} at row {r}, memory slot {s} (feature {f}): expected "
            "finite values (NaN or inf would spread into every later segment and every later call's memory)"
        )

    return _Check([torch.isfinite(memory).all()], lambda v: v[0] == 0, message)
