"""The decoder loss without logits (rmt_fast/loss.py): chunked head + cross-entropy, checkpointed per chunk."""

import pytest
import torch
import torch.nn.functional as F
from models import VOCAB, assert_grads_equal, bert_cls, gpt2, llama, pair
from numerics import assert_close
from torch import nn

import rmt_fast.loss as L


def _plain(h, head, t):
    return F.cross_entropy(head(h).float().flatten(0, -2), t.flatten(), ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunk", [7 * 37, 37, 10**9])  # several chunks (odd split), one row per chunk, one chunk
def test_equals_plain_loss_and_gradients(bias, chunk):
    g = torch.Generator().manual_seed(0)
    head = nn.Linear(24, 37, bias=bias)
    h = torch.randn(3, 11, 24, generator=g, requires_grad=True)
    t = torch.randint(0, 37, (3, 11), generator=g)
    t[0, :4] = -100
    t[2, -1] = -100
    ref = _plain(h, head, t)
    ref_grads = torch.autograd.grad(ref, [h, *head.parameters()])
    got = L.linear_cross_entropy(h, head, t, chunk_elements=chunk)
    grads = torch.autograd.grad(got, [h, *head.parameters()])
    assert_close(got, ref, tol=1e-6, name="chunked loss")
    for i, (a, b) in enumerate(zip(grads, ref_grads)):
        assert_close(a, b, tol=1e-6, name=f"grad {i}")


def test_no_logits_saved_for_backward():
    """Under autograd only chunk inputs are kept: no saved tensor has a row-by-vocabulary shape."""
    head = nn.Linear(16, 50)
    h = torch.randn(4, 9, 16, requires_grad=True)
    t = torch.randint(0, 50, (4, 9))
    saved = []

    def pack(x):
        saved.append(tuple(x.shape))
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = L.linear_cross_entropy(h, head, t, chunk_elements=50 * 10)
    loss.backward()
    assert saved, "nothing saved at all? the hook did not run"
    assert not [s for s in saved if s and s[-1] == 50 and len(s) >= 2 and s[0] > 1], saved
    # the plain path does keep logits: the check can fail
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        _plain(h, head, t)
    assert [s for s in saved if s and s[-1] == 50 and len(s) >= 2 and s[0] > 1]


def test_plain_head_only_for_plain_families():
    assert L.plain_head(gpt2()) is not None and L.plain_head(llama()) is not None
    assert L.plain_head(bert_cls()) is None
    capped = llama()
    capped.config.final_logit_softcapping = 30.0
    assert L.plain_head(capped) is None


@pytest.mark.parametrize("factory", [gpt2, llama])
@pytest.mark.parametrize("ckpt", [False, True])
def test_fastrmt_chunked_loss_equals_reference(monkeypatch, factory, ckpt):
    """return_logits=False with labels: FastRMT takes the chunked path (forced here for a tiny vocabulary) and
    still equals ReferenceRMT in fp32: loss, final memory and every parameter gradient."""
    monkeypatch.setattr(L, "MIN_ELEMENTS", 0)
    monkeypatch.setattr(L, "CHUNK_ELEMENTS", VOCAB * 5)  # 5 rows per chunk: several chunks per segment
    calls = []
    real = L.linear_cross_entropy
    monkeypatch.setattr("rmt_fast.fast.linear_cross_entropy", lambda *a, **k: calls.append(1) or real(*a, **k))
    ref, fast = pair(factory, 2, 6)
    fast.gradient_checkpointing = ckpt
    ids = torch.randint(3, VOCAB, (2, 15), generator=torch.Generator().manual_seed(3))
    a = ref(ids, labels=ids)
    b = fast(ids, labels=ids, return_logits=False)
    assert calls, "the chunked path was not taken"
    assert b.logits is None
    assert_close(b.loss, a.loss, dtype=torch.float32, floor=1.0, name="loss")  # <= tol * max(1, |a|)
    assert_close(b.memory_state, a.memory_state, dtype=torch.float32, name="memory")
    (a.loss + a.memory_state.square().mean()).backward()
    (b.loss + b.memory_state.square().mean()).backward()
    assert_grads_equal(ref, fast)  # TOL[float32]


def test_small_segments_keep_the_plain_path(monkeypatch):
    calls = []
    monkeypatch.setattr("rmt_fast.fast.linear_cross_entropy", lambda *a, **k: calls.append(1))
    _, fast = pair(gpt2, 2, 6)
    ids = torch.randint(3, VOCAB, (2, 12))
    assert fast(ids, labels=ids, return_logits=False).loss is not None
    assert not calls  # 2 x 6 x 96 logits: far under MIN_ELEMENTS, nothing to save by chunking
