"""Property tests (Hypothesis): over drawn cases FastRMT equals ReferenceRMT in fp32 (logits, loss, final memory,
every gradient), and a decoder input streamed in chunks of whole segments equals one long call.

Seeded (``derandomize=True``) and bounded (``max_examples``) so CI draws the same cases every run; the tiny
backbones are built once per module and copied into each case's wrappers. ``RMT_PROPERTY_SCALE=10`` draws ten
times as many cases (a longer search, by hand).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from models import CLS, PAD, SEP, VOCAB, assert_grads_equal, bert_cls, bert_mlm, gpt2, llama
from numerics import assert_close

from rmt_fast import FastRMT, ReferenceRMT
from rmt_fast.segments import decoder_plan

FACTORIES = {"gpt2": gpt2, "llama": llama, "bert_cls": bert_cls, "bert_mlm": bert_mlm}
SCALE = float(os.environ.get("RMT_PROPERTY_SCALE", "1"))
PROPERTY = settings(
    derandomize=True,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def backbones():
    torch.manual_seed(0)
    return {name: factory() for name, factory in FACTORIES.items()}


def _pair(base, m, size, **kw):
    ref = ReferenceRMT(copy.deepcopy(base), m, size, **kw)
    fast = FastRMT(copy.deepcopy(base), m, size, **kw)
    with torch.no_grad():
        fast.memory.copy_(ref.memory)
    return ref, fast


def _backward(rmt, inputs, return_logits):
    rmt.zero_grad(set_to_none=True)
    out = rmt(**inputs, return_logits=return_logits)
    (out.loss + out.memory_state.float().square().mean()).backward()
    return out


def _assert_same(ref, fast, inputs, return_logits):
    a = _backward(ref, inputs, True)
    b = _backward(fast, inputs, return_logits)
    if return_logits:
        assert b.logits.shape == a.logits.shape
        assert_close(b.logits, a.logits, dtype=torch.float32, name="logits")
    else:
        assert b.logits is None
    assert_close(b.memory_state, a.memory_state, dtype=torch.float32, name="memory")
    assert_close(b.loss, a.loss, dtype=torch.float32, floor=1.0, name="loss")  # <= tol * max(1, |a|)
    assert_grads_equal(ref, fast)  # TOL[float32]


# ------------------------------------------------------------------------------------------ decoders
@st.composite
def decoder_cases(draw, min_segments=1):
    size = draw(st.integers(2, 6))
    m = draw(st.integers(0, 3))
    b = draw(st.integers(1, 3))
    n_seg = draw(st.integers(min_segments, 5))  # drawn first, so multi-segment cases (BPTT, streaming) are common
    length = draw(st.integers(max(2, (n_seg - 1) * size + 1), n_seg * size))
    alignment = draw(st.sampled_from(["left", "right"]))
    n = len(decoder_plan(length, size, alignment))
    extra = draw(st.sampled_from([None, 0, 2]))
    case = dict(
        name=draw(st.sampled_from(["gpt2", "llama"])),
        size=size,
        m=m,
        length=length,
        alignment=alignment,
        max_n_segments=None if extra is None else n + extra,
        bptt_depth=draw(st.integers(-1, 3)),
        return_logits=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )
    # Per-row padding (left or right), at least two visible tokens; memory slots keep every query's row
    # non-empty, so padding needs m >= 1.
    pads = [(draw(st.sampled_from(["left", "right"])), draw(st.integers(0, length - 2))) for _ in range(b)]
    case["pads"] = pads if m > 0 and draw(st.booleans()) else None
    case["b"] = b
    starts = [start for start, _ in decoder_plan(length, size, alignment)][1:]
    case["splits"] = sorted(draw(st.sets(st.sampled_from(starts), min_size=1, max_size=2))) if starts else []
    return case


def _decoder_inputs(case):
    g = torch.Generator().manual_seed(case["seed"])
    ids = torch.randint(3, VOCAB, (case["b"], case["length"]), generator=g)
    inputs = dict(input_ids=ids, labels=ids)
    if case["pads"] is not None:
        mask = torch.ones_like(ids)
        for row, (side, amount) in enumerate(case["pads"]):
            length = case["length"]
            mask[row, slice(0, amount) if side == "left" else slice(length - amount, length)] = 0
        inputs["attention_mask"] = mask
        inputs["labels"] = ids.masked_fill(mask == 0, -100)
    return inputs


@settings(PROPERTY, max_examples=int(60 * SCALE))
@given(case=decoder_cases())
def test_decoder_fast_equals_reference(backbones, case):
    ref, fast = _pair(
        backbones[case["name"]],
        case["m"],
        case["size"],
        segment_alignment=case["alignment"],
        max_n_segments=case["max_n_segments"],
        bptt_depth=case["bptt_depth"],
    )
    _assert_same(ref, fast, _decoder_inputs(case), case["return_logits"])


@settings(PROPERTY, max_examples=int(30 * SCALE))
@given(case=decoder_cases(min_segments=2))
def test_decoder_streamed_equals_one_call(backbones, case):
    """Chunks that end on segment boundaries, each continuing from the previous chunk's memory, give the
    logits and the final memory of one call over the whole input."""
    _, fast = _pair(backbones[case["name"]], case["m"], case["size"], segment_alignment=case["alignment"])
    inputs = _decoder_inputs(case)
    ids, mask = inputs["input_ids"], inputs.get("attention_mask")
    with torch.no_grad():
        whole = fast(ids, attention_mask=mask)
        memory, logits = None, []
        bounds = [0, *case["splits"], ids.shape[1]]
        for a, z in zip(bounds, bounds[1:]):
            out = fast(ids[:, a:z], attention_mask=None if mask is None else mask[:, a:z], memory_state=memory)
            memory = out.memory_state
            logits.append(out.logits)
    assert_close(torch.cat(logits, 1), whole.logits, dtype=torch.float32, name="streamed logits")
    assert_close(memory, whole.memory_state, dtype=torch.float32, name="streamed memory")


# ------------------------------------------------------------------------------------------ encoders
@st.composite
def encoder_cases(draw):
    size = draw(st.integers(2, 6))
    b = draw(st.integers(1, 3))
    n_seg = draw(st.integers(1, 5))  # the longest row's segments, drawn first so that BPTT cases are common
    width = draw(st.integers((n_seg - 1) * size + 1, n_seg * size))
    rows = [width] + [draw(st.integers(1, width)) for _ in range(b - 1)]  # content tokens per row
    rows = draw(st.permutations(rows))
    return dict(
        name=draw(st.sampled_from(["bert_cls", "bert_mlm"])),
        size=size,
        m=draw(st.integers(0, 3)),
        b=b,
        width=width,
        rows=rows,
        pad_side=draw(st.sampled_from(["left", "right"])),
        specials=draw(st.booleans()),
        alignment=draw(st.sampled_from(["left", "right"])),
        max_n_segments=draw(st.sampled_from([None, 1, 2, 5])),
        bptt_depth=draw(st.integers(-1, 3)),
        sum_loss=draw(st.booleans()),
        return_logits=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def _encoder_inputs(case):
    g = torch.Generator().manual_seed(case["seed"])
    ids = torch.full((case["b"], case["width"]), PAD)
    for row, count in enumerate(case["rows"]):
        content = torch.randint(3, VOCAB, (count,), generator=g)
        if case["specials"] and count > 1:  # a CLS / SEP inside the input: dropped, like padding (so a row
            # keeps at least one content token)
            content[torch.randint(0, count, (1,), generator=g)] = CLS if row % 2 else SEP
        if case["pad_side"] == "right":
            ids[row, :count] = content
        else:
            ids[row, case["width"] - count :] = content
    if case["name"] == "bert_cls":
        labels = torch.randint(0, 3, (case["b"],), generator=g)
    else:  # every content token labelled, so no segment has an empty loss
        labels = ids.clone()
    return dict(input_ids=ids, labels=labels)


@settings(PROPERTY, max_examples=int(50 * SCALE))
@given(case=encoder_cases())
def test_encoder_fast_equals_reference(backbones, case):
    ref, fast = _pair(
        backbones[case["name"]],
        case["m"],
        case["size"],
        cls_token_id=CLS,
        sep_token_id=SEP,
        segment_alignment=case["alignment"],
        max_n_segments=case["max_n_segments"],
        bptt_depth=case["bptt_depth"],
        sum_loss=case["sum_loss"],
    )
    _assert_same(ref, fast, _encoder_inputs(case), case["return_logits"])
