"""DocumentStream (rmt_fast/stream.py): every document's result equals running it alone through the same wrapper
(fp32, 1e-5: logits, loss, token losses, final memory; generated tokens equal), for FastRMT and ReferenceRMT
decoders and encoders and FastARMT's sequential schedule; length mixes drawn by Hypothesis; ordering, stats,
bad documents, progress bar."""

import armt_helpers
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from models import CLS, PAD, SEP, VOCAB, bert_bare, bert_cls, gpt2, llama, pair
from numerics import assert_close

from rmt_fast.stream import DocumentStream, stream_documents
from rmt_fast.stream_docs import DocumentError

GEN = {"max_new_tokens": 3, "do_sample": False}


def _docs(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g) for n in lengths]


def _fields(doc):
    d = doc if isinstance(doc, dict) else {"input_ids": doc}
    return {k: (v if v is None else torch.as_tensor(v)[None]) for k, v in d.items()}


def _alone_decoder(rmt, doc, generate=False):
    f = _fields(doc)
    ids = f["input_ids"]
    labels = f.get("labels", ids)
    with torch.no_grad():
        out = rmt(ids, attention_mask=f.get("attention_mask"), labels=labels, labels_mask=f.get("labels_mask"))
        gen = rmt.generate(ids, attention_mask=f.get("attention_mask"), **GEN) if generate else None
    return out, gen


def check_decoder(rmt, docs, batch_size, generate=False, **kw):
    results = DocumentStream(
        rmt, batch_size, use_tqdm=False, return_logits=True, generate_kwargs=GEN if generate else None, **kw
    ).run(docs)
    assert [r.index for r in results] == list(range(len(docs)))
    for doc, res in zip(docs, results):
        assert res.error is None, res.error
        alone, gen = _alone_decoder(rmt, doc, generate)
        assert res.logits.shape == alone.logits.shape
        assert_close(res.logits, alone.logits, dtype=torch.float32, name=f"document {res.index}")
        memory, want = res.memory_state, alone.memory_state
        if hasattr(want, "A"):
            assert_close(memory.A, want.A, dtype=torch.float32, name=f"document {res.index}")
            assert_close(memory.z, want.z, dtype=torch.float32, name=f"document {res.index}")
        else:
            assert memory.shape == want.shape, res.index
            assert_close(memory, want, dtype=torch.float32, name=f"document {res.index}")
        if torch.isnan(alone.loss):  # a one-token document: nothing to predict, 0 / 0 as alone
            assert torch.isnan(res.loss)
        else:
            assert_close(res.loss, alone.loss, dtype=torch.float32, floor=1.0, name=f"loss, document {res.index}")
        assert res.token_losses.shape == _fields(doc)["input_ids"].shape
        if generate:
            assert torch.equal(res.generated, gen), (res.index, res.generated, gen)
    return results


def check_encoder(rmt, docs, batch_size, **kw):
    results = DocumentStream(rmt, batch_size, use_tqdm=False, **kw).run(docs)
    for doc, res in zip(docs, results):
        assert res.error is None, res.error
        with torch.no_grad():
            alone = rmt(_fields(doc)["input_ids"])
        assert res.logits.shape == alone.logits.shape
        assert_close(res.logits, alone.logits, dtype=torch.float32, name=f"document {res.index}")
        assert_close(res.memory_state, alone.memory_state, dtype=torch.float32, name=f"document {res.index}")
    return results


def _decoder_mix():
    """Padding inside documents (a run and a hole), labels with -100, labels_mask, a short last segment, one
    token, exact multiples of the segment."""
    docs = _docs([5, 23, 12, 6, 26, 1, 7, 18])
    docs[2] = {"input_ids": docs[2], "attention_mask": torch.tensor([0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1])}
    mask = torch.ones(23, dtype=torch.int64)
    mask[[3, 9, 10]] = 0  # holes
    labels = docs[1].clone()
    labels[4:8] = -100
    docs[1] = {"input_ids": docs[1], "attention_mask": mask, "labels": labels}
    docs[7] = {"input_ids": docs[7], "labels_mask": (torch.arange(18) % 3 != 0).long()}
    return docs


# ------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize(
    "factory, kind",
    [
        (gpt2, "fast"),
        pytest.param(llama, "fast", marks=pytest.mark.slow),
        pytest.param(gpt2, "reference", marks=pytest.mark.slow),
        pytest.param(llama, "reference", marks=pytest.mark.slow),
    ],
)
def test_decoder_results_equal_each_document_alone(factory, kind):
    ref, fast = pair(factory, 3, 6)
    rmt = (fast if kind == "fast" else ref).eval()
    check_decoder(rmt, _decoder_mix(), 3, generate=kind == "fast")


@pytest.mark.parametrize("alignment", [None, "right"])
def test_decoder_alignment_and_more_slots_than_documents(alignment):
    _, fast = pair(gpt2, 2, 5, segment_alignment=alignment)
    check_decoder(fast.eval(), _docs([7, 13, 2]), 8, admission="input")


ENCODER_CASES = [
    (f, k, kw)
    for f in (bert_cls, bert_bare)
    for k in ("fast", "reference")
    for kw in ({}, {"segment_alignment": "left"}, {"max_n_segments": 3})
]


@pytest.mark.parametrize(
    "factory, kind, kw",
    [
        c if c[:2] in ((bert_cls, "fast"), (bert_bare, "reference")) else pytest.param(*c, marks=pytest.mark.slow)
        for c in ENCODER_CASES
    ],
)
def test_encoder_results_equal_each_document_alone(factory, kind, kw):
    ref, fast = pair(factory, 2, 5, cls_token_id=CLS, sep_token_id=SEP, **kw)
    rmt = (fast if kind == "fast" else ref).eval()
    docs = _docs([5, 23, 12, 1, 7])
    docs[2][3:6] = PAD  # padding inside a document: dropped, as alone
    docs[1] = {"input_ids": docs[1], "attention_mask": torch.ones(23, dtype=torch.int64)}
    check_encoder(rmt, docs, 3)
    check_encoder(rmt, docs[:2], 5)  # more slots than documents


@pytest.mark.parametrize(
    "name, kind",
    [
        ("llama", "fast"),
        pytest.param("gpt2", "fast", marks=pytest.mark.slow),
        pytest.param("gpt2", "reference", marks=pytest.mark.slow),
        pytest.param("llama", "reference", marks=pytest.mark.slow),
    ],
)
def test_armt_sequential_results_equal_each_document_alone(name, kind):
    ref, fast = armt_helpers.pair(name)
    rmt = (fast if kind == "fast" else ref).eval()
    docs = _docs([5, 23, 12, 6, 2])
    docs[3] = {"input_ids": docs[3], "attention_mask": torch.tensor([1, 1, 0, 1, 1, 1])}
    check_decoder(rmt, docs, 3, generate=kind == "fast")


def test_armt_diagonal_is_refused():
    _, fast = armt_helpers.pair("gpt2", fast_kw={"diagonal": True})
    with pytest.raises(ValueError, match="diagonal=False"):
        DocumentStream(fast, 2)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lengths=st.lists(st.integers(1, 25), min_size=1, max_size=7),
    batch=st.integers(1, 5),
    admission=st.sampled_from(["input", "longest_first"]),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_length_mixes_decoder(lengths, batch, admission, seed):
    check_decoder(_GPT2, _docs(lengths, seed), batch, admission=admission)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lengths=st.lists(st.integers(1, 25), min_size=1, max_size=7),
    batch=st.integers(1, 5),
    admission=st.sampled_from(["input", "longest_first"]),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_length_mixes_encoder(lengths, batch, admission, seed):
    check_encoder(_BERT, _docs(lengths, seed), batch, admission=admission)


torch.manual_seed(0)
_GPT2 = pair(gpt2, 2, 5)[1].eval()
_BERT = pair(bert_cls, 2, 5, cls_token_id=CLS, sep_token_id=SEP)[1].eval()


# ------------------------------------------------------------------------------------- order and stats
def test_unordered_results_come_as_documents_finish_tagged_with_their_index():
    docs = _docs([30, 5, 5, 5])  # 6, 1, 1, 1 segments of 5
    got = [r.index for r in stream_documents(_GPT2, docs, 2, ordered=False, admission="input", use_tqdm=False)]
    assert got == [1, 2, 3, 0]
    ordered = [r.index for r in stream_documents(_GPT2, docs, 2, admission="input", use_tqdm=False)]
    assert ordered == [0, 1, 2, 3]


def test_stats_count_steps_and_utilisation():
    docs = _docs([20, 5, 5, 5, 5])  # 4 + 1 + 1 + 1 + 1 = 8 segments
    stream = DocumentStream(_GPT2, 2, use_tqdm=False)
    stream.run(docs)
    s = stream.stats
    assert (s.steps, s.useful, s.documents, s.ideal_steps, s.utilisation) == (4, 8, 5, 4, 1.0)
    stream = DocumentStream(_GPT2, 2, use_tqdm=False, admission="input")
    stream.run(docs[::-1])  # the long one last: 4 steps alone at the end
    assert (stream.stats.steps, stream.stats.utilisation) == (6, 8 / 12)


def test_progress_bar_and_caller_grad_mode(capsys):
    seen = []
    for _ in DocumentStream(_GPT2, 2, use_tqdm=True)(_docs([7, 3, 12])):
        seen.append(torch.is_grad_enabled())
    assert seen == [True] * 3  # the stream's no_grad does not leak into the caller's loop
    err = capsys.readouterr().err
    assert "documents" in err and "3/3" in err and "util" in err


# ------------------------------------------------------------------------------------------ bad input
def test_a_bad_document_is_named_and_the_others_go_on():
    good = _docs([7, 12, 4])
    bad = {
        1: torch.tensor([3, 4, VOCAB]),
        3: torch.zeros(2, 3, dtype=torch.long),
        4: [],
        5: {"input_ids": good[0], "mask": good[0]},
        6: torch.tensor([1.5, 2.0]),
    }
    docs = [good[0], bad[1], good[1], bad[3], bad[4], bad[5], bad[6], good[2]]
    results = DocumentStream(_GPT2, 2, use_tqdm=False).run(docs)
    assert [r.index for r in results] == list(range(8))
    for i, res in enumerate(results):
        if i in bad:
            assert isinstance(res.error, DocumentError) and str(res.error).startswith(f"document {i}:")
            assert res.loss is None and res.memory_state is None
        else:
            assert res.error is None
    assert "input_ids" in str(results[1].error) and str(VOCAB) in str(results[1].error)
    assert "1-D" in str(results[3].error) and "keys" in str(results[5].error)
    alone, _ = _alone_decoder(_GPT2, good[2])
    assert_close(results[7].memory_state, alone.memory_state, dtype=torch.float32, name="memory")
    with pytest.raises(DocumentError, match="document 1:"):
        DocumentStream(_GPT2, 2, use_tqdm=False, on_error="raise").run(docs)


def test_bad_documents_for_encoders_and_length_limits():
    _, capped = pair(gpt2, 2, 5, max_n_segments=2)
    res = DocumentStream(capped.eval(), 2, use_tqdm=False).run(_docs([10, 11]))
    assert res[0].error is None and "document 1:" in str(res[1].error) and "max_n_segments" in str(res[1].error)
    res = DocumentStream(_BERT, 2, use_tqdm=False).run([torch.tensor([PAD, CLS]), _docs([4])[0]])
    assert "document 0:" in str(res[0].error) and "no content tokens" in str(res[0].error) and res[1].error is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"ordered": 1}, "ordered"),
        ({"admission": "random"}, "admission"),
        ({"on_error": "skip"}, "on_error"),
        ({"generate_kwargs": 3}, "generate_kwargs"),
        ({"cuda_graph": "yes"}, "cuda_graph"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DocumentStream(_GPT2, **kwargs)


def test_encoder_refuses_decoder_options_and_non_wrappers():
    with pytest.raises(ValueError, match="decoder options"):
        DocumentStream(_BERT, 2, return_logits=True)
    with pytest.raises(ValueError, match="rmt must be"):
        DocumentStream(gpt2(), 2)
    ref, _ = pair(gpt2, 2, 5)
    with pytest.raises(ValueError, match="only FastRMT"):
        DocumentStream(ref, 2, cuda_graph=True)
