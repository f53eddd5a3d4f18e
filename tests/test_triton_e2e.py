"""End to end: FastRMT(attn_backend='triton') equals ReferenceRMT on tiny models, in Triton's interpreter on
the CPU (tests/conftest.py sets TRITON_INTERPRET=1 there) and on the GPU as it is."""

import copy
import os

import pytest
import torch
import transformers as tf
from models import CLS, SEP, VOCAB, assert_equivalent, pair, rel, run

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)


def gpt2_d16():
    return tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64,
                                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                            eos_token_id=0))


def llama_gqa_d16():
    return tf.LlamaForCausalLM(tf.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=96,
                                              num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                              max_position_embeddings=64, tie_word_embeddings=False))


def bert_d16():
    return tf.BertForSequenceClassification(tf.BertConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=96, vocab_size=VOCAB,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3))


def _ids(b, t):
    return torch.randint(3, VOCAB, (b, t), generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("factory", [gpt2_d16, llama_gqa_d16])
def test_decoder_triton_backend_equals_reference(factory):
    ref, fast = pair(factory, 2, 6, attn_backend="triton")
    ids = _ids(2, 15)  # 6, 6 and a short, padded 3
    assert_equivalent(ref, fast, dict(input_ids=ids, labels=ids), tol=1e-5)


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
        budget = max(1e-5, 3 * rel(getattr(outs["ref"], key), exact))
        assert rel(getattr(outs["fast"], key), exact) <= budget, key
    grads64 = dict(ref64.named_parameters())
    grads32 = dict(ref.named_parameters())
    for name, p in fast.named_parameters():
        exact = grads64[name].grad.double()
        if exact.norm() < 1e-9:  # zero in exact arithmetic (a key bias under softmax)
            continue
        budget = max(1e-5, 3 * rel(grads32[name].grad, exact))
        assert rel(p.grad, exact) <= budget, (name, rel(p.grad, exact), budget)
