"""End to end: FastRMT(attn_backend='triton') equals ReferenceRMT on tiny models, in Triton's interpreter on
the CPU (tests/conftest.py sets TRITON_INTERPRET=1 there) and on the GPU as it is."""

import copy
import os

import pytest
import torch
import transformers as tf
from models import CLS, SEP, VOCAB, assert_equivalent, pair, run
from numerics import TOL, assert_close, rel_err

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)


def gpt2_d16():
    return tf.GPT2LMHeadModel(
        tf.GPT2Config(
            n_layer=2,
            n_embd=64,
            n_head=4,
            vocab_size=VOCAB,
            n_positions=64,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        )
    )


def llama_gqa_d16():
    return tf.LlamaForCausalLM(
        tf.LlamaConfig(
            num_hidden_layers=2,
            hidden_size=64,
            intermediate_size=96,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=VOCAB,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        )
    )


def bert_d16():
    return tf.BertForSequenceClassification(
        tf.BertConfig(
            num_hidden_layers=2,
            hidden_size=64,
            num_attention_heads=4,
            intermediate_size=96,
            vocab_size=VOCAB,
            max_position_embeddings=64,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            num_labels=3,
        )
    )


def _ids(b, t):
    return torch.randint(3, VOCAB, (b, t), generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("factory", [gpt2_d16, llama_gqa_d16])
def test_decoder_triton_backend_equals_reference(factory):
    ref, fast = pair(factory, 2, 6, attn_backend="triton")
    ids = _ids(2, 15)  # 6, 6 and a short, padded 3
    assert_equivalent(ref, fast, dict(input_ids=ids, labels=ids))


def test_encoder_triton_backend_equals_reference():
    """The encoder's memory gradient is ill-conditioned in fp32 (the fp32 reference itself is ~1e-4 off a
    float64 run), so every quantity is held to a float64 run: Triton's error stays within 1e-5 or within 3x the
    fp32 reference's own error."""
    ref, fast = pair(bert_d16, 2, 5, attn_backend="triton", cls_token_id=CLS, sep_token_id=SEP)
    ref64 = copy.deepcopy(ref).double()
    ids = _ids(2, 13)
    ids[1, 7:] = 0  # rows of different lengths: per-row counts in the kernel
    inputs = dict(input_ids=ids, labels=torch.tensor([0, 2]))
    outs = {name: run(m, inputs) for name, m in (("ref", ref), ("fast", fast), ("ref64", ref64))}
    for key in ("logits", "memory_state", "loss"):
        exact = getattr(outs["ref64"], key)
        budget = max(TOL[torch.float32], 3 * rel_err(getattr(outs["ref"], key), exact))
        assert_close(getattr(outs["fast"], key), exact, tol=budget, name=key)
    grads64 = dict(ref64.named_parameters())
    grads32 = dict(ref.named_parameters())
    for name, p in fast.named_parameters():
        exact = grads64[name].grad.double()
        if exact.norm() < 1e-9:  # zero in exact arithmetic (a key bias under softmax)
            continue
        budget = max(TOL[torch.float32], 3 * rel_err(grads32[name].grad, exact))
        assert_close(p.grad, exact, tol=budget, name=name)


# ------------------------------------------------------------------------------------------ decoder masks
def _spy_kernel(monkeypatch):
    """Records the layout of every call that reaches the Triton kernel."""
    from rmt_fast.kernels import triton_attention as ra

    layouts = []
    real = ra.rmt_attention

    def spy(q, k, v, layout, **kw):
        layouts.append(layout)
        return real(q, k, v, layout, **kw)

    monkeypatch.setattr(ra, "rmt_attention", spy)
    return layouts


def _mask(kind, b, t):
    mask = torch.ones(b, t, dtype=torch.long)
    if kind == "left":
        mask[0, :4] = 0  # inside the first segments
        mask[1, :8] = 0  # one segment with no visible token in that row
    elif kind == "right":
        mask[0, 12:] = 0
        mask[1, 5:] = 0  # later segments fully hidden in that row
    return mask


@pytest.mark.parametrize("kind", ["left", "right", "ones"])
@pytest.mark.parametrize("factory", [gpt2_d16, llama_gqa_d16])
@pytest.mark.parametrize("alignment", ["left", "right"])
def test_decoder_mask_runs_in_the_kernel(factory, kind, alignment, monkeypatch):
    layouts = _spy_kernel(monkeypatch)
    ref, fast = pair(factory, 2, 6, attn_backend="triton", segment_alignment=alignment)
    ids = _ids(2, 15)  # 6, 6, 3 (or 3, 6, 6)
    mask = _mask(kind, 2, 15)
    labels = ids.masked_fill(mask == 0, -100)
    assert_equivalent(ref, fast, dict(input_ids=ids, attention_mask=mask, labels=labels))
    assert len(layouts) == 2 * 3  # 2 layers x 3 segments, all in the kernel
    assert all(lay.token_mask is None for lay in layouts)
    with_runs = sum(lay.token_starts is not None for lay in layouts)
    assert with_runs > 0 if kind != "ones" else with_runs == 0


def test_generate_with_a_mask_runs_the_head_in_the_kernel(monkeypatch):
    layouts = _spy_kernel(monkeypatch)
    ref, fast = pair(gpt2_d16, 3, 6, attn_backend="triton")
    ids = _ids(2, 16)
    mask = torch.ones_like(ids)
    mask[0, :8] = 0  # left padding across both head segments (6, 6), the first fully hidden in row 0
    mask[1, :2] = 0
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    a = ref.generate(ids, attention_mask=mask, **kw)
    b = fast.generate(ids, attention_mask=mask, **kw)
    assert a.shape == (2, 4)
    assert torch.equal(a, b)
    assert len(layouts) == 2 * 2 and all(lay.token_mask is None for lay in layouts), layouts
    assert sum(lay.token_starts is not None for lay in layouts) == 2 * 2, layouts
    # the memory the head leaves is the reference's (the generated ids could agree by chance)
    head_ref = ref(ids[:, :12], attention_mask=mask[:, :12]).memory_state
    head_fast = fast(ids[:, :12], attention_mask=mask[:, :12]).memory_state
    assert_close(head_fast, head_ref, dtype=torch.float32, name="lm head")


def _holey():
    ids = _ids(2, 15)
    mask = torch.ones_like(ids)
    mask[0, 7] = 0  # a hole inside the second segment
    mask[1, :3] = 0
    return ids, mask


def test_mask_with_holes_auto_equals_reference_through_sdpa(monkeypatch):
    layouts = _spy_kernel(monkeypatch)
    ref, fast = pair(llama_gqa_d16, 2, 6, attn_backend="auto")
    ids, mask = _holey()
    assert_equivalent(ref, fast, dict(input_ids=ids, attention_mask=mask, labels=ids))
    assert all(lay.token_mask is None for lay in layouts)  # the holey segment never reached the kernel


def test_mask_with_holes_triton_raises_and_says_why():
    _, fast = pair(llama_gqa_d16, 2, 6, attn_backend="triton")
    ids, mask = _holey()
    with pytest.raises(ValueError, match="attn_backend='triton' cannot run this case: .*holes"):
        fast(ids, attention_mask=mask)
