"""Bad inputs shared by the RMT and ARMT input tests (tests/runtime/test_bad_input.py,
tests/armt/test_armt_inputs.py): the decoder cases, each with the error it must raise, and the check that an error
leaves the model untouched."""

import copy

import pytest
import torch
from models import VOCAB


def _ids(b=2, t=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 90, (b, t), generator=g)


def _with(t, index, value):
    t = t.clone()
    t[index] = value
    return t


def _expect_error(rmt, call, match):
    """call() raises ValueError(match), the embedding never ran, parameters and memory are unchanged."""
    params = copy.deepcopy(rmt.state_dict())
    calls = []
    hook = rmt.word_embeddings.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=match):
            call()
    finally:
        hook.remove()
    assert calls == [], "the backbone ran before the error"
    after = rmt.state_dict()
    assert all(torch.equal(after[k], v) for k, v in params.items())


# -------------------------------------------------------------------------------------------- decoders
def _decoder_cases():
    ids = _ids()
    nan_memory = torch.zeros(2, 2, 32)
    nan_memory[1, 0, 5] = float("nan")
    inf_memory = torch.zeros(2, 2, 32)
    inf_memory[0, 1, 3] = -float("inf")
    return {
        "id >= vocab": (dict(input_ids=_with(ids, (1, 5), 120)), r"input_ids holds 120 at row 1, position 5"),
        "id == vocab": (
            dict(input_ids=_with(ids, (0, 11), VOCAB)),
            rf"input_ids holds {VOCAB} at row 0, position 11.*\[0, {VOCAB}\)",
        ),
        "negative id": (dict(input_ids=_with(ids, (0, 7), -3)), r"input_ids holds -3 at row 0, position 7"),
        "int32 id >= vocab": (
            dict(input_ids=_with(ids, (1, 2), 500).int()),
            r"input_ids holds 500 at row 1, position 2",
        ),
        "label >= vocab": (
            dict(input_ids=ids, labels=_with(ids, (0, 3), 120)),
            r"labels holds 120 at row 0, position 3.*-100",
        ),
        "label -1": (dict(input_ids=ids, labels=_with(ids, (1, 0), -1)), r"labels holds -1 at row 1, position 0"),
        "label int32": (dict(input_ids=ids, labels=ids.int()), "labels must be an int64"),
        "label float": (dict(input_ids=ids, labels=ids.float()), "labels must be an int64"),
        "batch size 0": (dict(input_ids=ids[:0]), r"input_ids has batch size 0 \(shape \(0, 12\)\)"),
        "attention_mask 2s": (
            dict(input_ids=ids, attention_mask=_with(torch.ones_like(ids), (1, 4), 2)),
            r"attention_mask holds 2 at row 1, position 4: expected only 0 and 1",
        ),
        "attention_mask -1": (
            dict(input_ids=ids, attention_mask=_with(torch.ones_like(ids), (0, 2), -1)),
            r"attention_mask holds -1 at row 0, position 2",
        ),
        "attention_mask 0.5": (
            dict(input_ids=ids, attention_mask=_with(torch.ones(2, 12), (0, 9), 0.5)),
            r"attention_mask holds 0.5 at row 0, position 9",
        ),
        "attention_mask nan": (
            dict(input_ids=ids, attention_mask=_with(torch.ones(2, 12), (1, 1), float("nan"))),
            r"attention_mask holds nan at row 1, position 1",
        ),
        "attention_mask list": (
            dict(input_ids=ids, attention_mask=[[1] * 12] * 2),
            "attention_mask must have the shape",
        ),
        "attention_mask on meta": (
            dict(input_ids=ids, attention_mask=torch.ones(2, 12, device="meta")),
            "attention_mask is on meta",
        ),
        "labels on meta": (
            dict(input_ids=ids, labels=torch.ones(2, 12, dtype=torch.long, device="meta")),
            "labels is on meta",
        ),
        "labels_mask without labels": (
            dict(input_ids=ids, labels_mask=torch.ones_like(ids)),
            "labels_mask was given without labels",
        ),
        "labels_mask 3s": (
            dict(input_ids=ids, labels=ids, labels_mask=_with(torch.ones_like(ids), (1, 6), 3)),
            r"labels_mask holds 3 at row 1, position 6",
        ),
        "memory_state nan": (
            dict(input_ids=ids, memory_state=nan_memory),
            r"memory_state holds nan at row 1, memory slot 0 \(feature 5\)",
        ),
        "memory_state inf": (
            dict(input_ids=ids, memory_state=inf_memory),
            r"memory_state holds -inf at row 0, memory slot 1 \(feature 3\)",
        ),
    }


DECODER_CASES = _decoder_cases()
