"""rmt_fast.memory_attention: the attention of RMT memory operations, and examples/memory_attention.py.

Checked against independent computations: layer-0 attention recomputed by hand in float64 from the backbone's
weights, memory and logits of the wrappers' own forwards (FastRMT with SDPA or Triton, ReferenceRMT), and the
committed Detect & Memorize model's write slots looking at the fact."""

from __future__ import annotations

import math
import os
import random
import sys

import models
import pytest
import torch
from numerics import assert_close

from rmt_fast import FastRMT
from rmt_fast.memory_attention import memory_attention

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMMITTED = os.path.join(ROOT, "examples", "results", "memory_attention", "model")
M, SIZE = 3, 5


def _pair(kind, dtype=torch.float64, **kw):
    if kind == "decoder":
        ref, fast = models.pair(models.gpt2, M, SIZE, **kw)
    else:
        ref, fast = models.pair(models.bert_cls, M, SIZE, cls_token_id=models.CLS, sep_token_id=models.SEP, **kw)
    return ref.to(dtype).eval(), fast.to(dtype).eval()


def _ids(b=2, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, models.VOCAB, (b, n * SIZE), generator=g)


def _softmax_reference(q, k, valid, causal):
    """(B, H, S, S) float64 softmax(q k^T / sqrt(d)) over the valid keys, causal or not."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    allowed = valid[:, None, None, :].clone()
    if causal:
        s = scores.shape[-1]
        allowed = allowed & torch.ones(s, s, dtype=torch.bool).tril()
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1)


def _layer0_gpt2(model, embeds):
    h = model.transformer.h[0]
    x = h.ln_1(embeds + model.transformer.wpe(torch.arange(embeds.shape[1])))
    q, k, _ = h.attn.c_attn(x).split(model.config.n_embd, dim=2)
    heads = model.config.n_head
    q, k = (t.view(*t.shape[:2], heads, -1).transpose(1, 2) for t in (q, k))
    return _softmax_reference(q, k, torch.ones(embeds.shape[:2], dtype=torch.bool), causal=True)


def _layer0_bert(model, embeds):
    x = model.bert.embeddings(inputs_embeds=embeds, token_type_ids=torch.zeros(embeds.shape[:2], dtype=torch.long))
    sa = model.bert.encoder.layer[0].attention.self
    heads = sa.num_attention_heads
    q, k = (t.view(*t.shape[:2], heads, -1).transpose(1, 2) for t in (sa.query(x), sa.key(x)))
    return _softmax_reference(q, k, torch.ones(embeds.shape[:2], dtype=torch.bool), causal=False)


# ------------------------------------------------------------------------------------------ exact numbers
@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_layer0_matches_a_float64_recomputation(kind):
    """Segments 0 and 1, layer 0: the whole attention matrix equals softmax(QK^T) recomputed from the weights,
    with the memory entering segment 1 taken from FastRMT's own forward on the first segment."""
    _, fast = _pair(kind)
    ids = _ids()
    result = memory_attention(fast, ids, full=True)
    with torch.no_grad():
        memory_in = [fast.memory.expand(2, -1, -1), fast(ids[:, :SIZE]).memory_state]
        for t in (0, 1):
            tokens = ids[:, t * SIZE : (t + 1) * SIZE]
            mem = memory_in[t]
            if kind == "decoder":
                embeds = torch.cat([mem, fast.word_embeddings(tokens), mem], 1)
                want = _layer0_gpt2(fast.model, embeds)
            else:
                b = tokens.shape[0]
                seg = torch.cat(
                    [
                        torch.full((b, 1), models.CLS),
                        torch.zeros(b, M, dtype=torch.long),
                        torch.full((b, 1), models.SEP),
                        tokens,
                        torch.full((b, 1), models.SEP),
                    ],
                    1,
                )
                embeds = fast.word_embeddings(seg)
                embeds[:, 1 : 1 + M] = mem
                want = _layer0_bert(fast.model, embeds)
            seg_att = result.segments[t]
            got = seg_att.probs[0]
            assert got.dtype == torch.float64
            assert_close(got, want, dtype=torch.float64, name=f"probabilities, segment {t}")
            w = seg_att.write_slots
            assert_close(seg_att.write[0], want[:, :, w.start : w.stop], dtype=torch.float64, name="write rows")
            assert_close(seg_att.answer[0], want[:, :, seg_att.answer_position], dtype=torch.float64, name="answer")


@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_slots_and_answer_positions(kind):
    _, fast = _pair(kind)
    result = memory_attention(fast, _ids())
    for seg in result.segments:
        if kind == "decoder":
            assert seg.read_slots == range(0, M) and seg.write_slots == range(M + SIZE, 2 * M + SIZE)
            assert seg.answer_position == M + SIZE - 1
            assert (seg.ids[:, :M] == -1).all() and (seg.ids[:, -M:] == -1).all()
        else:
            assert seg.read_slots == seg.write_slots == range(1, 1 + M)
            assert seg.answer_position == 0 and (seg.ids[:, 0] == models.CLS).all()
            assert (seg.ids[:, 1 : 1 + M] == -1).all()
    dec = memory_attention(fast, _ids(), answer_token=-2) if kind == "decoder" else None
    if dec is not None:
        assert dec.segments[0].answer_position == M + SIZE - 2


@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_rows_sum_to_one_over_the_visible_keys(kind):
    """Padding (an encoder row with fewer segments, a short last decoder segment) gets no weight, a decoder
    write slot none on the write slots after it, and every kept row sums to one."""
    _, fast = _pair(kind, dtype=torch.float32)
    ids = _ids(b=3)
    if kind == "decoder":
        ids = ids[:, :-2]  # a short last segment
    else:
        ids[1, : SIZE + 2] = models.PAD  # row 1: two segments, the first of them short
    result = memory_attention(fast, ids, full=True)
    assert len(result.segments) == 3
    if kind == "encoder":
        assert result.segments[0].rows.tolist() == [0, 2]
    for seg in result.segments:
        hidden = ~seg.key_valid[:, None, None, :]
        for layer in range(seg.num_layers):
            for rows in (seg.write[layer], seg.answer[layer][:, :, None], seg.probs[layer]):
                assert_close(rows.sum(-1), torch.ones_like(rows.sum(-1)), tol=1e-6, name="row sums")  # was atol 1e-5
                assert (rows.masked_select(hidden.expand_as(rows)) == 0).all()
            if kind == "decoder":
                w = seg.write_slots
                later = torch.arange(seg.ids.shape[1])[None, :] > torch.arange(w.start, w.stop)[:, None]
                assert (seg.write[layer][:, :, later] == 0).all()
            share = seg.read_share(layer)
            assert ((share >= 0) & (share <= 1 + 1e-6)).all()
        # every position that names an input column holds that column's id
        row_ids = ids if seg.rows is None else ids[seg.rows]
        src = seg.source_positions
        named = src >= 0
        assert (seg.ids[named] == row_ids.gather(1, src.clamp(min=0))[named]).all()
    # each content column appears exactly once over all segments
    seen = torch.zeros_like(ids)
    for seg in result.segments:
        rows = torch.arange(ids.shape[0]) if seg.rows is None else seg.rows
        for i, r in enumerate(rows.tolist()):
            cols = seg.source_positions[i]
            seen[r, cols[cols >= 0]] += 1
    content = ids != models.PAD
    assert (seen[content] == 1).all() and (seen[~content] == 0).all()


@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_backends_and_wrappers_agree(kind):
    """The rerun carries the wrappers' memory (final memory and logits equal FastRMT's SDPA forward and
    ReferenceRMT's forward), gives the same maps for ReferenceRMT and for FastRMT with the SDPA or the Triton
    backend, and leaves each backbone's attention implementation as it was."""
    ref, fast = _pair(kind, dtype=torch.float32)
    _, triton = _pair(kind, dtype=torch.float32, attn_backend="triton")
    triton.load_state_dict(fast.state_dict())
    ids = _ids()
    with torch.no_grad():
        forward = {"reference": ref(ids), "fast": fast(ids)}
    results = {}
    for name, rmt in (("reference", ref), ("fast", fast), ("triton", triton)):
        before = rmt.model.config._attn_implementation
        results[name] = memory_attention(rmt, ids)
        assert rmt.model.config._attn_implementation == before
        for out in forward.values():
            assert_close(results[name].memory_state, out.memory_state, dtype=torch.float32, name=name)
            assert_close(results[name].logits, out.logits, dtype=torch.float32, name=name)
    for other in ("fast", "triton"):
        for sa, sb in zip(results["reference"].segments, results[other].segments, strict=True):
            for layer in range(sa.num_layers):
                assert_close(sb.write[layer], sa.write[layer], tol=1e-6, name=f"{other} write, layer {layer}")
                assert_close(sb.answer[layer], sa.answer[layer], tol=1e-6, name=f"{other} answer, layer {layer}")
    with torch.no_grad():  # the wrapper's own forward is unchanged afterwards
        again = fast(ids)
    assert torch.equal(again.memory_state, forward["fast"].memory_state)


def test_bad_arguments():
    _, dec = _pair("decoder", dtype=torch.float32)
    _, enc = _pair("encoder", dtype=torch.float32)
    ids = _ids()
    with pytest.raises(TypeError, match="rmt must be"):
        memory_attention(dec.model, ids)
    with pytest.raises(ValueError, match="answer_token is a decoder option"):
        memory_attention(enc, ids, answer_token=-1)
    with pytest.raises(ValueError, match="answer_token=5 is outside"):
        memory_attention(dec, ids, answer_token=5)
    with pytest.raises(TypeError, match="answer_token must be an int"):
        memory_attention(dec, ids, answer_token=1.0)
    with pytest.raises(TypeError, match="full must be"):
        memory_attention(dec, ids, full=1)
    with pytest.raises(ValueError, match="input_ids"):
        memory_attention(dec, ids[0])
    assert dec.model.config._attn_implementation == "rmt_fast"


# ----------------------------------------------------------------------------------- the committed model
def _example_module():
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import memory_attention as example

    return example


def test_committed_model_writes_the_fact_to_memory():
    """On the committed Detect & Memorize model and 20 seeded 4-segment examples with the fact inside one
    segment: some layer and head of the write slots puts at least twice the uniform share on the fact's
    tokens, computed here straight from the attention matrices; [CLS] reads memory in the last segment."""
    from rmt_fast.tasks import make_example

    rmt = FastRMT.from_pretrained(COMMITTED)
    rng = random.Random("test-memory-attention")
    m, size = rmt.num_mem_tokens, rmt.segment_size
    checked = 0
    while checked < 20:
        ex = make_example("detect", 4, size, rng, return_example=True)
        ((a, b),) = ex.fact_spans
        t = a // size
        if t != (b - 1) // size:
            continue
        checked += 1
        result = memory_attention(rmt, torch.tensor([ex.input_ids]), full=True)
        seg = result.segments[t]
        # the fact's positions in segment t: [CLS] [MEM]*m [SEP] then the segment's tokens
        cols = torch.arange(2 + m + a - t * size, 2 + m + b - t * size)
        assert (seg.ids[0, cols] == torch.tensor(ex.input_ids[a:b])).all()
        visible = int(seg.key_valid[0].sum())
        best = max(p[0, :, 1 : 1 + m][..., cols].sum(-1).mean(-1).max().item() for p in seg.probs)
        assert best >= 2 * (b - a) / visible, (best, (b - a) / visible)
        last = result.segments[-1]
        assert max(p[0, :, 0, 1 : 1 + m].sum(-1).max().item() for p in last.probs) > 0.5


def test_example_script_writes_figure_and_json(tmp_path):
    example = _example_module()
    stats = example.main(["--out", str(tmp_path), "--model", COMMITTED])
    assert (tmp_path / "memory_attention.png").stat().st_size > 10_000
    import json

    saved = json.loads((tmp_path / "memory_attention.json").read_text())
    for key in ("fact_share_write", "uniform_share", "read_share"):
        assert 0 <= saved[key] <= 1 and saved[key] == stats[key]
    assert saved["fact_share_write"] >= 2 * saved["uniform_share"]
    assert saved["facts"][0]["segment"] == 0 and saved["answered_correctly"]
    # uniform_share: the fact's tokens over the segment's visible positions (content + [CLS], memory, 2 [SEP])
    fact = saved["facts"][0]
    assert saved["uniform_share"] == pytest.approx(
        (fact["span"][1] - fact["span"][0]) / (saved["segment_size"] + saved["num_mem_tokens"] + 3)
    )
