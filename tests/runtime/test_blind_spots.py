"""Cases the equivalence suite once let through: each test here fails under a named planted bug.

* the encoder BPTT rule counts the segments that run (leading segments empty in every row take no number);
* the encoder under ``bptt_depth`` detaches where ReferenceRMT does;
* FastRMT truncates rows longer than ``segment_size * max_n_segments``;
* ``generate`` agrees by scores, not only tokens, with left padding that reaches the last segment;
* ``bptt_depth`` reaches exactly the segments of a hand-written hop table (measured by autograd);
* a full encoder segment reaches SDPA with no mask.
"""

import pytest
import torch
from models import DECODERS, ENCODERS, PAD, VOCAB, assert_equivalent, pair, spy_sdpa
from numerics import assert_close, assert_differs

from rmt_fast import FastRMT, ReferenceRMT

BERT_IDS = dict(cls_token_id=1, sep_token_id=2)


def _ids(b, t, seed=1):
    return torch.randint(3, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------- encoder BPTT rule
@pytest.mark.parametrize("bptt_depth", [1, 2, 3, 4])
def test_encoder_bptt_counts_only_the_segments_that_run(bptt_depth):
    """Two rows of 10 tokens in segments of 5 under max_n_segments=6: four leading segments are empty in
    every row and do not run, so the two that run are segments 0 and 1 of the rule: with k >= 1 nothing is
    detached, and the last segment's loss reaches the initial memory through one transition."""
    ref, fast = pair(ENCODERS["bert_cls"], 2, 5, max_n_segments=6, bptt_depth=bptt_depth, **BERT_IDS)
    inputs = dict(input_ids=_ids(2, 10), labels=torch.tensor([1, 0]))
    assert_equivalent(ref, fast, inputs)
    for rmt in (ref, fast):
        assert rmt.memory.grad is not None and rmt.memory.grad.norm() > 0, type(rmt).__name__


@pytest.mark.parametrize("bptt_depth, max_n_segments", [(0, None), (1, 6), (2, None)])
def test_encoder_bptt_depth_matches_reference(bptt_depth, max_n_segments):
    """Rows of 5, 3 and 1 segments (segments of 4): detaches in the middle of the longest row."""
    ref, fast = pair(ENCODERS["bert_cls"], 2, 4, bptt_depth=bptt_depth, max_n_segments=max_n_segments, **BERT_IDS)
    ids = _ids(3, 20)
    ids[1, 12:] = PAD
    ids[2, 3:] = PAD
    assert_equivalent(ref, fast, dict(input_ids=ids, labels=torch.tensor([1, 0, 2])))


# ------------------------------------------------------------------------------- encoder truncation
@pytest.mark.parametrize("alignment", ["right", "left"])
def test_fast_encoder_truncates_rows_longer_than_the_limit(alignment):
    """23 content tokens under max_n_segments=2 (segments of 5): both wrappers keep the first 10, which is
    the same as passing those 10 alone."""
    ref, fast = pair(ENCODERS["bert_cls"], 2, 5, max_n_segments=2, segment_alignment=alignment, **BERT_IDS)
    ids = _ids(2, 23)
    ids[1, 17:] = PAD  # both rows are longer than the limit, by different amounts
    labels = torch.tensor([2, 1])
    assert_equivalent(ref, fast, dict(input_ids=ids, labels=labels))
    with torch.no_grad():
        long, kept = fast(ids, labels=labels), fast(ids[:, :10], labels=labels)
    assert_close(long.logits, kept.logits, dtype=torch.float32, name="logits")
    assert_close(long.memory_state, kept.memory_state, dtype=torch.float32, name="memory")


# ----------------------------------------------------------------------------------------- generate
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_generate_matches_reference_by_scores(name):
    """Segments of 6 over 16 tokens: 6, 6, 4. Row 0's left padding covers its first two segments and
    reaches into the last; row 1 has a little. Scores of every step must agree, not only the tokens."""
    ref, fast = pair(DECODERS[name], 3, 6)
    ids = _ids(2, 16, seed=4)
    mask = torch.ones_like(ids)
    mask[0, :14] = 0
    mask[1, :2] = 0
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    a = ref.generate(ids, attention_mask=mask, **kw)
    b = fast.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(a.sequences, b.sequences)
    assert len(a.scores) == len(b.scores) == 4
    for step, (x, y) in enumerate(zip(a.scores, b.scores)):
        assert_close(y, x, dtype=torch.float32, name=f"step {step}")
    # the memory of the first two segments matters: generating without them gives other scores
    blank = ref.generate(ids[:, 12:], attention_mask=mask[:, 12:], **kw)
    assert_differs(blank.scores[0][1], a.scores[0][1], by=1e-3, name="scores")


# -------------------------------------------------------------------------------- BPTT hop tables
# The loss of segment j reaches back to segment j - HOPS[k][j] and no further (n = 5 segments). With k >= 0
# detaches come every k + 1 segments counted back from the last one: k=1 detaches before 1 and 3, k=2 before 2,
# k=3 before 1; k=-1 nowhere.
HOPS = {-1: [0, 1, 2, 3, 4], 1: [0, 0, 1, 0, 1], 2: [0, 1, 0, 1, 2], 3: [0, 0, 1, 2, 3]}


@pytest.mark.parametrize("cls", [ReferenceRMT, FastRMT])
@pytest.mark.parametrize("bptt_depth", sorted(HOPS))
def test_decoder_bptt_reaches_the_hand_written_hops(cls, bptt_depth):
    n, size = 5, 4
    torch.manual_seed(0)
    rmt = cls(DECODERS["llama"](), 2, size, bptt_depth=bptt_depth)  # untied head: embedding rows = inputs
    ids = torch.stack([torch.arange(s * 10 + 5, s * 10 + 5 + size) for s in range(n)]).reshape(1, -1)
    for j in range(n):
        labels = torch.full_like(ids, -100)
        labels[:, j * size + 1 : (j + 1) * size] = ids[:, j * size + 1 : (j + 1) * size]  # loss inside segment j
        rmt.zero_grad(set_to_none=True)
        rmt(ids, labels=labels).loss.backward()
        emb = rmt.word_embeddings.weight.grad
        reached = [emb[ids[0, i * size : (i + 1) * size]].abs().sum().item() > 0 for i in range(j)]
        first = j - HOPS[bptt_depth][j]
        assert reached == [i >= first for i in range(j)], (j, reached)
        memory_reached = rmt.memory.grad is not None and rmt.memory.grad.abs().sum().item() > 0
        assert memory_reached == (first == 0), j


@pytest.mark.parametrize("cls", [ReferenceRMT, FastRMT])
@pytest.mark.parametrize("bptt_depth", [-1, 0, 1, 2, 3])
def test_encoder_bptt_reaches_the_hand_written_hops(cls, bptt_depth):
    """The encoder's loss is the last segment's: it reaches back exactly min(k, n - 1) segments (n = 4), and
    the initial memory exactly when that is n - 1. Leading segments empty in every row (max_n_segments=7)
    do not count."""
    n, size = 4, 4
    torch.manual_seed(0)
    rmt = cls(ENCODERS["bert_cls"](), 2, size, bptt_depth=bptt_depth, max_n_segments=7, **BERT_IDS)
    ids = torch.stack([torch.arange(s * 10 + 5, s * 10 + 5 + size) for s in range(n)]).reshape(1, -1)
    rmt.zero_grad(set_to_none=True)
    rmt(ids, labels=torch.tensor([1])).loss.backward()
    emb = rmt.word_embeddings.weight.grad
    reached = [emb[ids[0, i * size : (i + 1) * size]].abs().sum().item() > 0 for i in range(n)]
    hops = {-1: 3, 0: 0, 1: 1, 2: 2, 3: 3}[bptt_depth]
    assert reached == [i >= n - 1 - hops for i in range(n)], reached
    assert (rmt.memory.grad is not None and rmt.memory.grad.abs().sum().item() > 0) == (hops == n - 1)


# ----------------------------------------------------------------------------------- encoder mask spy
def test_encoder_full_segments_reach_sdpa_without_a_mask(monkeypatch):
    """Segments of 5 over rows of 10 and 7 content tokens (right-aligned): the first segment is short in
    row 1 (a boolean mask), the second is full in both rows (no mask at all)."""
    torch.manual_seed(0)
    rmt = FastRMT(ENCODERS["bert_cls"](), 2, 5, **BERT_IDS)
    seen = spy_sdpa(monkeypatch)
    ids = _ids(2, 10)
    ids[1, 7:] = PAD
    rmt(ids)
    n_layers, width = 2, 5 + 2 + 3
    assert len(seen) == 2 * n_layers
    for mask, causal in seen[:n_layers]:  # row 1's first segment holds 2 tokens: 2 + m + 3 = 7 valid slots
        assert not causal and mask is not None and mask.dtype.is_floating_point  # SDPA's additive form
        assert (mask[1, 0, 0] == 0).tolist() == [True] * 7 + [False] * (width - 7)
    assert all(mask is None and not causal for mask, causal in seen[n_layers:])
    seen.clear()
    rmt(_ids(2, 10))  # two full segments in every row: no mask anywhere
    assert len(seen) == 2 * n_layers and all(mask is None and not causal for mask, causal in seen)


# ------------------------------------------------------------------------------ input-check boundaries
def test_the_error_names_the_offender_not_a_valid_zero_before_it():
    """Id 0 is a valid token: the message must point at the id out of the vocabulary, not at the 0."""
    torch.manual_seed(0)
    rmt = FastRMT(DECODERS["gpt2"](), 2, 6)
    ids = _ids(2, 8)
    ids[0, 0], ids[1, 3] = 0, VOCAB
    with pytest.raises(ValueError, match=rf"input_ids holds {VOCAB} at row 1, position 3"):
        rmt(ids)


def test_label_classes_follow_the_head():
    from rmt_fast.input_checks import label_classes

    ids = _ids(2, 8)
    torch.manual_seed(0)
    decoder = DECODERS["llama"]()
    decoder.lm_head = torch.nn.Linear(32, VOCAB + 4, bias=False)  # a head wider than the input vocabulary
    assert label_classes(decoder, "decoder", ids, ids) == (VOCAB + 4, "the vocabulary")
    import transformers as tf
    from models import _bert_cfg

    regression = tf.BertForSequenceClassification(_bert_cfg(num_labels=1))  # transformers: num_labels=1 regresses
    assert label_classes(regression, "encoder", ids, torch.tensor([3, 5])) is None
    two = tf.BertForSequenceClassification(_bert_cfg(num_labels=2))
    assert label_classes(two, "encoder", ids, torch.tensor([0, 1])) == (2, "num_labels")


def test_ignored_labels_never_count_as_out_of_range():
    from rmt_fast.input_checks import check_values

    ids = _ids(1, 3)
    check_values(ids, VOCAB, labels=torch.tensor([[-100, 0, -100]]), classes=(1, "num_labels"))
    with pytest.raises(ValueError, match="labels"):
        check_values(ids, VOCAB, labels=torch.tensor([[-100, 1, -100]]), classes=(1, "num_labels"))


def test_mask_errors_name_the_offender_and_float_zeros_pass():
    torch.manual_seed(0)
    rmt = FastRMT(DECODERS["gpt2"](), 2, 6)
    ids = _ids(2, 8)
    mask = torch.ones(2, 8)
    mask[0, 1] = 0.0  # a float mask of 0 and 1 is a valid mask
    assert torch.equal(rmt(ids, attention_mask=mask).logits, rmt(ids, attention_mask=mask.bool()).logits)
    mask = torch.ones(2, 8, dtype=torch.int64)
    mask[0, 1], mask[1, 4] = 0, 2
    with pytest.raises(ValueError, match=r"attention_mask holds 2 at row 1, position 4"):
        rmt(ids, attention_mask=mask)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_decoder_mask_hiding_the_first_token_of_every_row(name):
    """Every row sees tokens 1.. of each segment: one visible run that does not start at 0, so the mask must
    reach attention (it is not 'all ones')."""
    ref, fast = pair(DECODERS[name], 2, 6)
    ids = _ids(2, 12)
    mask = torch.ones_like(ids)
    mask[:, 0] = 0
    mask[:, 6] = 0
    assert_equivalent(ref, fast, dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)))


# ------------------------------------------------------------------------------------------ mask_runs
@pytest.mark.parametrize(
    "row, start, end, holes",
    [
        ([0, 1, 1, 0], 1, 3, False),
        ([1, 0, 1, 1], 0, 4, True),
        ([0, 0, 0, 0], 0, 0, False),
        ([1, 1, 1, 1], 0, 4, False),
        ([0, 0, 0, 1], 3, 4, False),
        ([1, 0, 0, 0], 0, 1, False),
        ([0, 1, 0, 1], 1, 4, True),
    ],
)
def test_mask_runs_hand_written(row, start, end, holes):
    """A wrong 'holes' verdict would only move a mask from the kernel to SDPA, which equivalence cannot see."""
    from rmt_fast.kernels.layout import mask_runs

    for mask in (torch.tensor([row]), torch.tensor([row]).bool(), torch.tensor([[row], [row]])):
        s, e, h = mask_runs(mask)
        assert s.shape == e.shape == h.shape == mask.shape[:-1] and s.dtype == e.dtype == torch.int32
        assert (s == start).all() and (e == end).all() and (h == holes).all(), (row, s, e, h)
