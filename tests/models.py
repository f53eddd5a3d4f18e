"""Tiny transformers models built from configs (no downloads), and helpers to compare two RMT wrappers."""

from __future__ import annotations

import copy

import torch
import transformers as tf

VOCAB = 96
CLS, SEP, PAD = 1, 2, 0


def _quiet(cfg):
    for name in ("bos_token_id", "eos_token_id"):
        if getattr(cfg, name, None) is not None and getattr(cfg, name) >= VOCAB:
            setattr(cfg, name, None)
    return cfg


def gpt2(**kw):
    kw = {**dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0), **kw}
    cfg = tf.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=128, **kw)
    return tf.GPT2LMHeadModel(_quiet(cfg))


def llama(**kw):
    cfg = tf.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
                         tie_word_embeddings=False, **kw)  # fmt: skip
    return tf.LlamaForCausalLM(_quiet(cfg))


def qwen2(**kw):
    cfg = tf.Qwen2Config(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128, **kw)  # fmt: skip
    return tf.Qwen2ForCausalLM(_quiet(cfg))


def mistral(**kw):
    cfg = tf.MistralConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                           num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=128, **kw)  # fmt: skip
    return tf.MistralForCausalLM(_quiet(cfg))


def _bert_cfg(**kw):
    return tf.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                         vocab_size=VOCAB, max_position_embeddings=128, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0, pad_token_id=PAD, **kw)  # fmt: skip


def bert_cls(**kw):
    return tf.BertForSequenceClassification(_bert_cfg(num_labels=3, **kw))


def bert_mlm(**kw):
    return tf.BertForMaskedLM(_bert_cfg(**kw))


def bert_bare(**kw):
    return tf.BertModel(_bert_cfg(**kw))


def roberta_cls(**kw):
    cfg = tf.RobertaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                           vocab_size=VOCAB, max_position_embeddings=160, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0, num_labels=3, **kw)  # fmt: skip
    return tf.RobertaForSequenceClassification(cfg)


DECODERS = {"gpt2": gpt2, "llama": llama, "qwen2": qwen2, "mistral": mistral}
ENCODERS = {"bert_cls": bert_cls, "bert_mlm": bert_mlm, "bert_bare": bert_bare, "roberta_cls": roberta_cls}


def encoder_ids(name):
    """(cls, sep, pad) for an encoder factory: BERT's must be passed, RoBERTa's come from its config."""
    return {} if name.startswith("roberta") else {"cls_token_id": CLS, "sep_token_id": SEP}


def pair(factory, num_mem_tokens, segment_size, seed=0, **kw):
    """A ReferenceRMT and a FastRMT over identical copies of one backbone, with the same memory."""
    from rmt_fast import FastRMT, ReferenceRMT

    torch.manual_seed(seed)
    base = factory()
    ref = ReferenceRMT(copy.deepcopy(base), num_mem_tokens, segment_size, **kw)
    fast = FastRMT(copy.deepcopy(base), num_mem_tokens, segment_size, **kw)
    with torch.no_grad():
        fast.memory.copy_(ref.memory)
    return ref, fast


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    denom = b.norm()
    return (a - b).norm().item() / (denom.item() if denom > 0 else 1.0)


def run(rmt, inputs, grad=True):
    rmt.zero_grad(set_to_none=True)
    out = rmt(**inputs)
    if grad:
        objective = out.loss if out.loss is not None else out.logits.float().square().mean()
        objective = objective + out.memory_state.float().square().mean()
        objective.backward()
    return out


def assert_equivalent(ref, fast, inputs, tol=1e-5, grad=True):
    a = run(ref, inputs, grad)
    b = run(fast, inputs, grad)
    assert b.logits.shape == a.logits.shape
    assert rel(b.logits, a.logits) <= tol, ("logits", rel(b.logits, a.logits))
    assert rel(b.memory_state, a.memory_state) <= tol, ("memory", rel(b.memory_state, a.memory_state))
    if a.loss is not None:
        assert b.loss is not None
        assert abs(b.loss.item() - a.loss.item()) <= tol * max(1.0, abs(a.loss.item())), (a.loss, b.loss)
    if grad:
        assert_grads_equal(ref, fast, tol)
    return a, b


def assert_grads_equal(ref, fast, tol=1e-5):
    """Every parameter gradient of ``fast`` equals ``ref``'s (same parameter names) to ``tol``."""
    ref_params = dict(ref.named_parameters())
    n_checked = 0
    for name, p in fast.named_parameters():
        q = ref_params[name]
        if q.grad is None:
            assert p.grad is None or p.grad.abs().max() == 0, name
            continue
        assert p.grad is not None, f"no gradient for {name}"
        # Gradients that are zero in exact arithmetic (e.g. a key bias under softmax) are rounding noise:
        # an absolute floor keeps them from dominating.
        err = (p.grad.double() - q.grad.double()).norm().item()
        assert err <= tol * max(q.grad.double().norm().item(), 1e-6), (name, rel(p.grad, q.grad))
        n_checked += 1
    assert n_checked > 0


def check_padding_and_causality(rmt, ids):
    """Perturbation checks on a decoder RMT over one (1, 12) row in segments of 6: a token masked by
    attention_mask is invisible to every other position and to the memory; inside a segment, changing token 9
    changes no earlier logit but changes the later ones and the memory (write slots see every token)."""
    mask = torch.ones_like(ids)
    mask[0, 7] = 0
    base = rmt(ids, attention_mask=mask)
    changed = ids.clone()
    changed[0, 7] = (ids[0, 7] + 1) % VOCAB
    out = rmt(changed, attention_mask=mask)
    keep = torch.arange(ids.shape[1]) != 7
    assert torch.allclose(out.logits[:, keep], base.logits[:, keep], atol=1e-6)
    assert torch.allclose(out.memory_state, base.memory_state, atol=1e-6)
    changed = ids.clone()
    changed[0, 9] = (ids[0, 9] + 1) % VOCAB
    plain, out = rmt(ids), rmt(changed)
    assert torch.allclose(out.logits[:, :9], plain.logits[:, :9], atol=1e-6)
    assert not torch.allclose(out.logits[:, 9:], plain.logits[:, 9:], atol=1e-6)
    assert not torch.allclose(out.memory_state, plain.memory_state, atol=1e-6)
