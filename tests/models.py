"""Tiny transformers models built from configs (no downloads; the shapes are the ``*-test`` rows of
``rmt_fast.bench.presets``), and helpers to compare two RMT wrappers."""

from __future__ import annotations

import copy

import torch
import transformers as tf
from numerics import TOL, assert_close, assert_differs

from rmt_fast.bench import presets

VOCAB = presets.PRESETS["gpt2-test"].vocab  # 96, every test model
CLS, SEP, PAD = 1, 2, 0


def _quiet(cfg):
    for name in ("bos_token_id", "eos_token_id"):
        if getattr(cfg, name, None) is not None and getattr(cfg, name) >= VOCAB:
            setattr(cfg, name, None)
    return cfg


def gpt2(**kw):
    return tf.GPT2LMHeadModel(_quiet(presets.config("gpt2-test", attn=None, **kw)))


def llama(**kw):
    return tf.LlamaForCausalLM(_quiet(presets.config("llama-test", attn=None, **kw)))


def qwen2(**kw):
    return tf.Qwen2ForCausalLM(_quiet(presets.config("qwen2-test", attn=None, **kw)))


def mistral(**kw):
    return tf.MistralForCausalLM(_quiet(presets.config("mistral-test", attn=None, **kw)))


def _bert_cfg(**kw):
    return presets.config("bert-test", attn=None, **kw)


def bert_cls(**kw):
    return tf.BertForSequenceClassification(_bert_cfg(num_labels=3, **kw))


def bert_mlm(**kw):
    return tf.BertForMaskedLM(_bert_cfg(**kw))


def bert_bare(**kw):
    return tf.BertModel(_bert_cfg(**kw))


def roberta_cls(**kw):
    return tf.RobertaForSequenceClassification(presets.config("roberta-test", attn=None, num_labels=3, **kw))


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


def run(rmt, inputs, grad=True):
    rmt.zero_grad(set_to_none=True)
    out = rmt(**inputs)
    if grad:
        objective = out.loss if out.loss is not None else out.logits.float().square().mean()
        objective = objective + out.memory_state.float().square().mean()
        objective.backward()
    return out


def assert_equivalent(ref, fast, inputs, tol=TOL[torch.float32], grad=True):
    a = run(ref, inputs, grad)
    b = run(fast, inputs, grad)
    assert b.logits.shape == a.logits.shape
    assert_close(b.logits, a.logits, tol=tol, name="logits")
    assert_close(b.memory_state, a.memory_state, tol=tol, name="memory")
    if a.loss is not None:
        assert b.loss is not None
        assert_close(b.loss, a.loss, tol=tol, floor=1.0, name="loss")  # |b - a| <= tol * max(1, |a|)
    if grad:
        assert_grads_equal(ref, fast, tol)
    return a, b


def assert_grads_equal(ref, fast, tol=TOL[torch.float32], floor=None):
    """Every parameter gradient of ``fast`` equals ``ref``'s (same parameter names) to ``tol``, relative to the
    larger of its norm and an absolute ``floor``: by default 1e-3 x the norm of all of ``ref``'s gradients
    together. A gradient that is zero in exact arithmetic (a key bias under softmax; a query projection whose
    queries each see one key) or a sum of cancelling terms carries the rounding of the model's gradient scale, not
    of its own tiny sum: a drawn llama case had q_proj's float64 gradient at 5.5e-18, both fp32 runs at 3e-9, 7e-10
    apart, with the model's gradient norm 8.9 (a fixed floor of 1e-6 failed it)."""
    ref_params = dict(ref.named_parameters())
    if floor is None:
        grads = [q.grad.double().flatten() for q in ref_params.values() if q.grad is not None]
        floor = max(1e-3 * torch.cat(grads).norm().item(), 1e-30) if grads else 1e-30
    n_checked = 0
    for name, p in fast.named_parameters():
        q = ref_params[name]
        if q.grad is None:
            assert p.grad is None or p.grad.abs().max() == 0, name
            continue
        assert p.grad is not None, f"no gradient for {name}"
        # Gradients that are zero in exact arithmetic are rounding noise: the floor keeps them from dominating.
        assert_close(p.grad, q.grad, tol=tol, floor=floor, name=f"grad of {name}")
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
    # An invisible token changes nothing: the same ops (bit-equal on the CPU), held to 1e-7 (the old elementwise
    # atol 1e-6 over these ~3.5-norm rows corresponds to about 3e-7). The changes below are 1e-3 or more.
    assert_close(out.logits[:, keep], base.logits[:, keep], tol=1e-7, name="logits beside a masked token")
    assert_close(out.memory_state, base.memory_state, tol=1e-7, name="memory with a masked token")
    changed = ids.clone()
    changed[0, 9] = (ids[0, 9] + 1) % VOCAB
    plain, out = rmt(ids), rmt(changed)
    assert_close(out.logits[:, :9], plain.logits[:, :9], tol=1e-7, name="logits before a changed token")
    assert_differs(out.logits[:, 9:], plain.logits[:, 9:], by=1e-5, name="logits from a changed token on")
    assert_differs(out.memory_state, plain.memory_state, by=1e-5, name="memory after a changed token")


def spy_sdpa(monkeypatch) -> list:
    """Record ``(attn_mask, is_causal)`` of every ``F.scaled_dot_product_attention`` call (which still runs)."""
    import torch.nn.functional as F

    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kw):
        seen.append((attn_mask, is_causal))
        return real(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return seen
