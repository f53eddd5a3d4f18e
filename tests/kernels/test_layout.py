"""SegmentLayout, the one description of the segment mask, against the definition written out as plain Python
loops (kernels/layout.py's docstring): the dense mask, the key validity, the FlexAttention mask_mod, mask_runs,
the shape properties, and the refusal of every bad argument (naming it) at construction."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rmt_fast.kernels.layout import SegmentLayout, mask_runs


def _expected(read, tokens, write, causal, runs=None, token_mask=None, q_len=None):
    """(B, 1, q_len, T) from the definition: read and write slots always visible; token slot t visible iff
    start <= t < end (both clamped to [0, tokens]) or token_mask[b][t]; causal: key j <= query position."""
    T = read + tokens + write
    q_len = T if q_len is None else q_len
    rows = len(runs) if runs is not None else len(token_mask) if token_mask is not None else 1
    out = torch.zeros(rows, 1, q_len, T, dtype=torch.bool)
    for b in range(rows):
        for i in range(q_len):
            pos = T - q_len + i
            for j in range(T):
                if read <= j < read + tokens:
                    t = j - read
                    if runs is not None:
                        start, end = (min(max(x, 0), tokens) for x in runs[b])
                        visible = start <= t < end
                    else:
                        visible = token_mask is None or bool(token_mask[b][t])
                else:
                    visible = True
                out[b, 0, i, j] = visible and (j <= pos or not causal)
    return out


@st.composite
def layouts(draw):
    read, tokens, write = draw(st.integers(0, 3)), draw(st.integers(0, 6)), draw(st.integers(0, 3))
    if read + tokens + write == 0:
        tokens = 1
    causal, kind = draw(st.booleans()), draw(st.sampled_from(["plain", "counts", "runs", "mask"]))
    batch = draw(st.integers(1, 3))
    dtype = draw(st.sampled_from([torch.int32, torch.int64, torch.int16]))
    ends = [draw(st.integers(-2, tokens + 2)) for _ in range(batch)]
    starts = [draw(st.integers(-2, tokens + 2)) for _ in range(batch)]
    if kind == "plain":
        return SegmentLayout(read, tokens, write, causal), dict(read=read, tokens=tokens, write=write, causal=causal)
    if kind == "mask":
        mask = [[draw(st.booleans()) for _ in range(tokens)] for _ in range(batch)]
        layout = SegmentLayout(
            read, tokens, write, causal, token_mask=torch.tensor(mask, dtype=torch.bool).view(batch, tokens)
        )
        return layout, dict(read=read, tokens=tokens, write=write, causal=causal, token_mask=mask)
    counts = torch.tensor(ends, dtype=dtype)
    if kind == "counts":
        runs = [(0, e) for e in ends]
        layout = SegmentLayout(read, tokens, write, causal, token_counts=counts)
    else:
        runs = list(zip(starts, ends, strict=True))
        layout = SegmentLayout(
            read, tokens, write, causal, token_counts=counts, token_starts=torch.tensor(starts, dtype=dtype)
        )
    return layout, dict(read=read, tokens=tokens, write=write, causal=causal, runs=runs)


@settings(max_examples=120, deadline=None, derandomize=True, database=None)
@given(layouts(), st.data())
def test_dense_mask_key_valid_and_mask_mod_follow_the_definition(case, data):
    layout, spec = case
    want = _expected(**spec)
    got = layout.dense_mask()
    assert got.dtype == torch.bool and torch.equal(got.expand_as(want), want)
    T = layout.seq_len
    q_len = data.draw(st.integers(1, T))  # a decode step: the queries are the last q_len positions
    assert torch.equal(layout.dense_mask(q_len).expand(want.shape[0], 1, q_len, T), _expected(**spec, q_len=q_len))
    valid = layout.key_valid()
    if spec.get("runs") is None and spec.get("token_mask") is None:
        assert valid is None and not layout.is_padded and layout.batch_size is None
    else:  # the key validity is the non-causal mask of any query row
        assert layout.is_padded and layout.batch_size == want.shape[0]
        assert torch.equal(valid, _expected(**{**spec, "causal": False})[:, 0, 0, :])
    b = torch.arange(want.shape[0])[:, None, None, None]
    q, kv = torch.arange(T)[None, None, :, None], torch.arange(T)[None, None, None, :]
    assert torch.equal(layout.mask_mod()(b, torch.zeros(1, 1, 1, 1, dtype=torch.long), q, kv).expand_as(want), want)


def test_shape_properties():
    layout = SegmentLayout(2, 5, 3, True)
    assert (layout.seq_len, layout.write_start, layout.is_padded, layout.batch_size) == (10, 7, False, None)
    counts = SegmentLayout(0, 5, 0, False, token_counts=torch.tensor([1, 2, 3, 4]))
    assert (counts.seq_len, counts.write_start, counts.is_padded, counts.batch_size) == (5, 5, True, 4)
    mask = SegmentLayout(1, 2, 0, False, token_mask=torch.ones(3, 2, dtype=torch.bool))
    assert (mask.seq_len, mask.write_start, mask.is_padded, mask.batch_size) == (3, 3, True, 3)
    with pytest.raises(ValueError, match=r"q_len \(11\) exceeds the segment length \(10\)"):
        layout.dense_mask(11)
    assert layout.dense_mask(10).shape == (1, 1, 10, 10)


def test_key_valid_moves_to_the_device_asked_for():
    layout = SegmentLayout(1, 3, 1, True, token_counts=torch.tensor([2]), token_starts=torch.tensor([1]))
    assert layout.key_valid("cpu").tolist() == [[True, False, True, False, True]]
    assert layout.key_valid(torch.device("meta")).device.type == "meta"
    assert layout.dense_mask(device="meta").device.type == "meta"


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(
    st.lists(st.lists(st.booleans(), min_size=1, max_size=7), min_size=1, max_size=4).filter(
        lambda rows: len({len(r) for r in rows}) == 1
    ),
    st.booleans(),
)
def test_mask_runs_follows_its_definition(rows, as_int):
    mask = torch.tensor(rows, dtype=torch.long if as_int else torch.bool)
    starts, ends, holes = mask_runs(mask)
    assert starts.dtype == ends.dtype == torch.int32 and holes.dtype == torch.bool
    for r, row in enumerate(rows):
        seen = [i for i, x in enumerate(row) if x]
        start, end = (seen[0], seen[-1] + 1) if seen else (0, 0)
        assert (starts[r].item(), ends[r].item()) == (start, end)
        assert holes[r].item() == (len(seen) != end - start)
    with pytest.raises(ValueError, match="mask_runs: mask must be a tensor of shape"):
        mask_runs(torch.tensor(True))
    with pytest.raises(ValueError, match="mask_runs: mask must be a tensor"):
        mask_runs([[1, 0]])


def test_mask_runs_keeps_leading_dimensions():
    starts, ends, holes = mask_runs(torch.tensor([[[0, 1, 1, 0], [1, 0, 1, 0]]]))
    assert starts.tolist() == [[1, 0]] and ends.tolist() == [[3, 3]] and holes.tolist() == [[False, True]]


COUNTS = torch.tensor([2, 3])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_read=-1), "num_read must be a non-negative int, got -1"),
        (dict(num_tokens=2.0), "num_tokens must be a non-negative int, got 2.0"),
        (dict(num_write="1"), "num_write must be a non-negative int, got '1'"),
        (dict(num_read=0, num_tokens=0, num_write=0), "the segment is empty"),
        (dict(token_counts=COUNTS, token_mask=torch.ones(2, 4, dtype=torch.bool)), "token_counts or token_mask"),
        (dict(token_counts=[2, 3]), "token_counts must be a 1-D integer tensor of shape \\(batch,\\), got list"),
        (dict(token_counts=COUNTS[None]), "token_counts must be a 1-D integer tensor .*shape \\(1, 2\\)"),
        (dict(token_counts=COUNTS.float()), "token_counts must be a 1-D integer tensor .*float32"),
        (dict(token_counts=COUNTS.bool()), "token_counts must be a 1-D integer tensor .*torch.bool"),
        (dict(token_starts=COUNTS), "token_starts needs token_counts"),
        (dict(token_counts=COUNTS, token_starts=COUNTS.float()), "token_starts must be a 1-D integer tensor"),
        (dict(token_counts=COUNTS, token_starts=COUNTS[None]), "token_starts must be a 1-D integer tensor"),
        (dict(token_counts=COUNTS, token_starts=torch.tensor([0, 0, 0])), "one shape and device, got \\(3,\\)"),
        (dict(token_counts=COUNTS, token_starts=COUNTS.to("meta")), "one shape and device, .* on meta"),
        (dict(token_mask=torch.ones(2, 4)), "token_mask must be a bool tensor of shape \\(batch, 4\\), got"),
        (dict(token_mask=torch.ones(2, 3, dtype=torch.bool)), "token_mask must be a bool tensor .*\\(2, 3\\)"),
        (dict(token_mask=torch.ones(4, dtype=torch.bool)), "token_mask must be a bool tensor .*\\(4,\\)"),
        (dict(token_mask="mask"), "token_mask must be a bool tensor .* got str"),
    ],
)
def test_bad_arguments_are_refused_by_name(kwargs, match):
    args = {"num_read": 1, "num_tokens": 4, "num_write": 1, "causal": True, **kwargs}
    with pytest.raises(ValueError, match=match):
        SegmentLayout(**args)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8])
def test_every_integer_dtype_is_accepted(dtype):
    starts = torch.tensor([1, 0], dtype=dtype)
    layout = SegmentLayout(1, 4, 1, False, token_counts=COUNTS.to(dtype), token_starts=starts)
    assert layout.key_valid().tolist() == [[True, False, True, False, False, True], [True] * 4 + [False, True]]


@pytest.mark.parametrize("sizes", [(0, 1, 0), (1, 0, 0), (0, 0, 1), (3, 0, 2)])
def test_the_smallest_segments_are_accepted(sizes):
    layout = SegmentLayout(*sizes, True)
    assert layout.seq_len == sum(sizes) and torch.equal(
        layout.dense_mask()[0, 0], torch.ones(sum(sizes), sum(sizes), dtype=torch.bool).tril()
    )


def test_a_layout_is_frozen_and_compared_by_identity():
    """Frozen: nothing changes a layout a backend has read. Identity: two layouts are never equal by value (their
    tensors would have to be compared elementwise) and a layout with tensors is hashable (a cache key)."""
    import dataclasses

    a = SegmentLayout(1, 3, 1, True, token_counts=torch.tensor([2, 1]))
    b = SegmentLayout(1, 3, 1, True, token_counts=a.token_counts)
    assert a == a and a != b and len({a, b}) == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.num_read = 2


def test_key_valid_moves_a_token_mask_to_the_device_asked_for():
    layout = SegmentLayout(1, 2, 0, False, token_mask=torch.tensor([[True, False]]))
    assert layout.key_valid().tolist() == [[True, True, False]]
    assert layout.key_valid(torch.device("meta")).device.type == "meta"


def test_mask_runs_takes_one_row():
    starts, ends, holes = mask_runs(torch.tensor([0, 1, 0, 1, 0]))
    assert (starts.item(), ends.item(), holes.item()) == (1, 4, True)
