"""One test for each behaviour stated in docs/reference.md, run against ReferenceRMT."""

import pytest
import torch
import torch.nn.functional as F
from models import CLS, PAD, SEP, VOCAB, bert_cls, check_padding_and_causality, gpt2, llama
from numerics import assert_close

from rmt_fast import ReferenceRMT, memory_detached_before


def _ids(b, t, seed=3):
    return torch.randint(3, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


class Calls:
    """Records the keyword arguments of every backbone call."""

    def __init__(self, model):
        self.kwargs = []
        self.outputs = []
        model.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output):
        self.kwargs.append(kwargs)
        self.outputs.append(output)


# ------------------------------------------------------------------------------------------------- decoder
def test_decoder_memory_init_and_vocab():
    torch.manual_seed(0)
    model = gpt2()
    rmt = ReferenceRMT(model, 48, 8)
    emb_std = model.get_input_embeddings().weight.std().item()
    assert rmt.memory.shape == (48, 32)
    assert abs(rmt.memory.std().item() / emb_std - 1) < 0.1
    assert abs(rmt.memory.mean().item()) < 0.1 * emb_std
    assert model.get_input_embeddings().weight.shape[0] == VOCAB  # vocabulary not extended


def test_decoder_segments_and_inputs():
    torch.manual_seed(0)
    rmt = ReferenceRMT(gpt2(), 3, 6)
    calls = Calls(rmt.model)
    ids = _ids(2, 20)
    out = rmt(ids)
    lengths = [kw["inputs_embeds"].shape[1] for kw in calls.kwargs]
    assert lengths == [12, 12, 12, 8]  # 2m + L, the last segment short and unpadded
    first = calls.kwargs[0]["inputs_embeds"]
    mem = rmt.memory.expand(2, -1, -1)
    assert torch.equal(first[:, :3], mem) and torch.equal(first[:, -3:], mem)  # the same memory, read and write
    assert torch.equal(first[:, 3:9], rmt.model.get_input_embeddings()(ids[:, :6]))
    assert all(kw.get("position_ids") is None for kw in calls.kwargs)  # positions restart at 0 per segment
    second = calls.kwargs[1]["inputs_embeds"]
    new_memory = calls.outputs[0].hidden_states[-1][:, -3:]
    assert torch.equal(second[:, :3], new_memory) and torch.equal(second[:, -3:], new_memory)
    assert out.logits.shape == (2, 20, VOCAB)
    assert torch.equal(out.logits[:, :6], calls.outputs[0].logits[:, 3:9])  # token positions only


def test_decoder_new_memory_is_after_final_norm():
    torch.manual_seed(0)
    rmt = ReferenceRMT(gpt2(), 3, 6)
    calls = Calls(rmt.model)
    out = rmt(_ids(2, 6))
    embeds = calls.kwargs[0]["inputs_embeds"]
    last = rmt.model.transformer(inputs_embeds=embeds).last_hidden_state  # GPT2Model applies ln_f
    assert_close(out.memory_state, last[:, -3:], tol=1e-7, name="memory")  # the same forward (was atol 1e-6)


def test_decoder_attention_mask_memory_visible_padding_masked_causal():
    torch.manual_seed(0)
    check_padding_and_causality(ReferenceRMT(llama(), 2, 6).eval(), _ids(1, 12))


def test_decoder_loss_counts_boundary_token_and_labels_mask():
    torch.manual_seed(0)
    rmt = ReferenceRMT(gpt2(), 2, 5)
    ids = _ids(2, 13)
    out = rmt(ids, labels=ids)
    manual = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    assert_close(out.loss, manual, dtype=torch.float32, name="loss")
    labels = torch.full_like(ids, -100)
    labels[:, 5] = ids[:, 5]  # first token of segment 2: predicted by the last token of segment 1
    only_boundary = rmt(ids, labels=labels).loss
    expected = F.cross_entropy(out.logits[:, 4], ids[:, 5])
    assert_close(only_boundary, expected, dtype=torch.float32, name="boundary loss")
    labels_mask = torch.zeros_like(ids, dtype=torch.bool)
    labels_mask[:, 5] = True  # shifted like the labels: position 5's label, predicted from position 4
    assert_close(rmt(ids, labels=ids, labels_mask=labels_mask).loss, expected, dtype=torch.float32, name="masked loss")


@pytest.mark.parametrize("bptt_depth", [-1, 0, 1, 2, 3])
def test_bptt_depth_reaches_exactly_the_intended_segments(bptt_depth):
    """The loss of segment j reaches segment i < j's token embeddings only through the memory; it must do
    so exactly when no detach happens between them, and through at most bptt_depth transitions."""
    n, size = 5, 4
    torch.manual_seed(0)
    rmt = ReferenceRMT(llama(), 2, size, bptt_depth=bptt_depth)
    # Each segment uses its own token ids, so embedding-row gradients tell which segments were reached.
    ids = torch.stack([torch.arange(s * 10 + 5, s * 10 + 5 + size) for s in range(n)]).reshape(1, -1)
    emb = rmt.model.get_input_embeddings().weight
    for j in range(n):
        labels = torch.full_like(ids, -100)
        labels[:, j * size + 1 : (j + 1) * size] = ids[:, j * size + 1 : (j + 1) * size]
        rmt.zero_grad(set_to_none=True)
        rmt(ids, labels=labels).loss.backward()
        for i in range(j):
            reached = emb.grad[ids[0, i * size : (i + 1) * size]].abs().sum().item() > 0
            hops = j - i
            cut = any(memory_detached_before(t, n, bptt_depth) for t in range(i + 1, j + 1))
            assert reached == (not cut), (i, j)
            if bptt_depth >= 0:
                assert not reached or hops <= bptt_depth
        assert (rmt.memory.grad is not None and rmt.memory.grad.abs().sum() > 0) == (
            not any(memory_detached_before(t, n, bptt_depth) for t in range(1, j + 1))
        )


def test_bptt_rule_examples():
    n = 5
    detached = {k: [t for t in range(n) if memory_detached_before(t, n, k)] for k in (-1, 0, 1, 2, 3, 4)}
    assert detached == {-1: [], 0: [1, 2, 3, 4], 1: [1, 3], 2: [2], 3: [1], 4: []}


def test_decoder_generate_uses_memory_and_prompt_without_write_slots():
    torch.manual_seed(0)
    rmt = ReferenceRMT(gpt2(), 3, 6)
    ids = _ids(1, 15)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    out = rmt.generate(ids, **kw)
    memory = rmt(ids[:, :12]).memory_state
    prompt = torch.cat([memory, rmt.model.get_input_embeddings()(ids[:, 12:])], dim=1)
    direct = rmt.model.generate(inputs_embeds=prompt, attention_mask=torch.ones(1, 6, dtype=torch.long), **kw)
    assert torch.equal(out, direct)


# ------------------------------------------------------------------------------------------------- encoder
def _encoder(**kw):
    torch.manual_seed(0)
    return ReferenceRMT(bert_cls(), 2, 5, cls_token_id=CLS, sep_token_id=SEP, **kw)


def test_encoder_memory_init_is_a_new_embedding_row():
    rmt = _encoder()
    emb = rmt.model.get_input_embeddings().weight
    assert rmt.memory.shape == (2, 32)
    # drawn from N(mean, 1e-9 cov): sqrt(1e-9) x the rows' spread is ~3e-4 of the mean here, not a rounding error
    assert_close(rmt.memory, emb.mean(0).expand(2, -1), tol=1e-3, name="initial memory")
    assert emb.shape[0] == VOCAB


def test_encoder_segmentation_layout_and_mask():
    rmt = _encoder(max_n_segments=3)
    calls = Calls(rmt.model)
    ids = torch.tensor(
        [
            [CLS] + list(range(10, 22)) + [SEP],  # 12 content tokens: segments of 2, 5, 5
            list(range(30, 37)) + [PAD] * 7,
        ]
    )  # 7 content tokens: empty, 2, 5
    rmt(ids, labels=torch.tensor([0, 1]))
    batch = [kw["inputs_embeds"].shape[0] for kw in calls.kwargs]
    assert batch == [1, 2, 2]  # the short row skips its empty first segment
    mask0 = calls.kwargs[0]["attention_mask"]
    assert mask0.tolist() == [[1] * (2 + 3 + 2) + [0] * 3]  # CLS, 2 memory, SEP, 2 tokens, SEP, then PAD
    assert all((kw["token_type_ids"] == 0).all() for kw in calls.kwargs)
    assert all(kw.get("position_ids") is None for kw in calls.kwargs)  # positions 0..input_size-1
    embeds = calls.kwargs[0]["inputs_embeds"]
    word = rmt.model.get_input_embeddings()
    assert torch.equal(embeds[0, 1:3], rmt.memory)  # memory overwrites the word embeddings at 1..m
    assert torch.equal(embeds[0, 0], word.weight[CLS]) and torch.equal(embeds[0, 3], word.weight[SEP])
    assert torch.equal(embeds[0, 4:6], word(torch.tensor([10, 11])))  # right-aligned: the first segment is short
    assert torch.equal(embeds[0, 6], word.weight[SEP]) and torch.equal(embeds[0, 7], word.weight[PAD])


def test_encoder_truncates_to_max_n_segments():
    rmt = _encoder(max_n_segments=2)
    calls = Calls(rmt.model)
    ids = torch.arange(10, 10 + 23)[None]  # 23 tokens; only the first 10 are kept
    rmt(ids, labels=torch.tensor([1]))
    word = rmt.model.get_input_embeddings()
    assert len(calls.kwargs) == 2
    assert torch.equal(calls.kwargs[1]["inputs_embeds"][0, 4:9], word(torch.arange(15, 20)))


def test_encoder_memory_output_and_loss():
    rmt = _encoder()
    calls = Calls(rmt.model)
    ids = _ids(2, 12)
    labels = torch.tensor([1, 2])
    out = rmt(ids, labels=labels)
    assert torch.equal(out.memory_state, calls.outputs[-1].hidden_states[-1][:, 1:3])
    assert torch.equal(calls.kwargs[1]["inputs_embeds"][:, 1:3], calls.outputs[0].hidden_states[-1][:, 1:3])
    assert torch.equal(out.logits, calls.outputs[-1].logits)
    assert torch.equal(out.loss, calls.outputs[-1].loss)
    summed = _encoder(sum_loss=True)
    calls = Calls(summed.model)
    out = summed(ids, labels=labels)
    assert_close(out.loss, torch.stack([o.loss for o in calls.outputs]).mean(), dtype=torch.float32, name="loss")
