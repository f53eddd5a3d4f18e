"""FastRMT equals ReferenceRMT in fp32 with dropout off: logits, loss, final memory and every gradient."""

import pytest
import torch
from models import DECODERS, ENCODERS, PAD, VOCAB, assert_equivalent, encoder_ids, pair
from numerics import assert_close


def _ids(b, t, seed=1, low=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, VOCAB, (b, t), generator=g)


@pytest.mark.parametrize("name", list(DECODERS))
@pytest.mark.parametrize("length", [5, 8, 27, 40])  # one short segment, one full, many with a short last, many
def test_decoder_matches_reference(name, length):
    ref, fast = pair(DECODERS[name], 3, 8)
    ids = _ids(2, length)
    assert_equivalent(ref, fast, dict(input_ids=ids, labels=ids))


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_decoder_attention_mask_and_padding(name):
    ref, fast = pair(DECODERS[name], 2, 6)
    ids = _ids(3, 20)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[1, 15:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    assert_equivalent(ref, fast, dict(input_ids=ids, attention_mask=mask, labels=labels))


def test_decoder_labels_mask_and_right_alignment():
    ref, fast = pair(DECODERS["llama"], 2, 6, segment_alignment="right")
    ids = _ids(2, 17)
    labels_mask = torch.zeros_like(ids, dtype=torch.bool)
    labels_mask[:, 10:] = True
    assert_equivalent(ref, fast, dict(input_ids=ids, labels=ids, labels_mask=labels_mask))


def test_decoder_without_memory_tokens():
    ref, fast = pair(DECODERS["gpt2"], 0, 8)
    ids = _ids(2, 19)
    assert_equivalent(ref, fast, dict(input_ids=ids, labels=ids))


@pytest.mark.parametrize("name", list(ENCODERS))
def test_encoder_matches_reference(name):
    ref, fast = pair(ENCODERS[name], 3, 7, **encoder_ids(name))
    ids = _ids(3, 30)
    ids[1, 12:] = PAD if not name.startswith("roberta") else 1  # a shorter row: rows have different lengths
    ids[2, 25:] = PAD if not name.startswith("roberta") else 1
    inputs = dict(input_ids=ids)
    if name.endswith("cls"):
        inputs["labels"] = torch.tensor([0, 2, 1])
    elif name.endswith("mlm"):
        inputs["labels"] = torch.where(torch.rand(ids.shape) < 0.3, ids, -100)
    assert_equivalent(ref, fast, inputs)


@pytest.mark.parametrize("sum_loss", [False, True])
@pytest.mark.parametrize("max_n_segments", [None, 6])
def test_encoder_sum_loss_and_empty_segments(sum_loss, max_n_segments):
    ref, fast = pair(
        ENCODERS["bert_cls"], 2, 5, cls_token_id=1, sep_token_id=2, sum_loss=sum_loss, max_n_segments=max_n_segments
    )
    ids = _ids(3, 23)
    ids[0, 6:] = PAD  # 2 segments against 5
    ids[1, 0] = 1  # a CLS and SEP inside the input are dropped, as in the reference
    ids[1, 9] = 2
    assert_equivalent(ref, fast, dict(input_ids=ids, labels=torch.tensor([1, 0, 2])))


def test_encoder_one_full_segment_has_no_mask():
    ref, fast = pair(ENCODERS["bert_cls"], 2, 5, cls_token_id=1, sep_token_id=2)
    assert_equivalent(ref, fast, dict(input_ids=_ids(2, 10), labels=torch.tensor([1, 0])))


@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_streaming_with_memory_state(kind):
    if kind == "decoder":
        ref, fast = pair(DECODERS["gpt2"], 3, 6)
        ids = _ids(2, 30)
        whole = fast(ids)
        a = fast(ids[:, :12])
        b = fast(ids[:, 12:], memory_state=a.memory_state)
        # the same ops either way (bit-equal on the CPU): tighter than tol(float32)
        assert_close(torch.cat([a.logits, b.logits], 1), whole.logits, tol=1e-6, name="streamed logits")
        assert_close(b.memory_state, whole.memory_state, tol=1e-6, name="streamed memory")
        r = ref(ids[:, 12:], memory_state=ref(ids[:, :12]).memory_state)
        assert_close(b.memory_state, r.memory_state, tol=1e-6, name="memory against the reference")
    else:
        ref, fast = pair(ENCODERS["bert_cls"], 2, 5, cls_token_id=1, sep_token_id=2, segment_alignment="left")
        ids = _ids(2, 20)
        whole = fast(ids)
        a = fast(ids[:, :10])
        b = fast(ids[:, 10:], memory_state=a.memory_state)
        assert_close(b.memory_state, whole.memory_state, tol=1e-6, name="streamed memory")
        assert_close(b.logits, whole.logits, tol=1e-6, name="streamed logits")
        want = ref(ids[:, 10:], memory_state=a.memory_state).memory_state
        assert_close(b.memory_state, want, tol=1e-6, name="memory against the reference")


@pytest.mark.parametrize("bptt_depth", [-1, 0, 1, 2, 3])
def test_bptt_depth_matches_reference(bptt_depth):
    ref, fast = pair(DECODERS["llama"], 2, 4, bptt_depth=bptt_depth)
    ids = _ids(2, 22)
    assert_equivalent(ref, fast, dict(input_ids=ids, labels=ids))


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_generate_matches_reference(name):
    ref, fast = pair(DECODERS[name], 3, 6)
    ids = _ids(2, 16)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    a = ref.generate(ids, **kw)
    b = fast.generate(ids, **kw)
    assert a.shape == (2, 5)
    assert torch.equal(a, b)


def test_inference_without_logits():
    ref, fast = pair(DECODERS["gpt2"], 3, 6)
    ids = _ids(2, 20)
    with torch.no_grad():
        a = ref(ids, labels=ids)
        b = fast(ids, labels=ids, return_logits=False)
        c = fast(ids, return_logits=False)
    assert b.logits is None and c.logits is None
    assert_close(b.loss, a.loss, tol=1e-6, name="loss")  # ~log(96): tighter than the old 1e-5 absolute
    assert_close(c.memory_state, a.memory_state, tol=1e-6, name="memory")  # was atol 1e-5 over a ~14-norm


@pytest.mark.parametrize("name", ["gpt2", "bert_cls"])
def test_inference_keeps_no_activations_from_earlier_segments(name):
    """Under no_grad, when segment t runs, at most the previous segment's last hidden state (whose write slots
    are the memory) is still alive: memory use does not grow with the number of segments."""
    import gc
    import weakref

    from rmt_fast import FastRMT

    factory = DECODERS.get(name) or ENCODERS[name]
    rmt = FastRMT(factory(), 2, 6, **(encoder_ids(name) if name in ENCODERS else {})).eval()
    outputs, alive = [], []

    def hook(module, args, output):
        gc.collect()
        alive.append(sum(ref() is not None for ref in outputs))
        outputs.append(weakref.ref(output[0] if isinstance(output, tuple) else output.last_hidden_state))

    rmt._info.base_model.register_forward_hook(hook)
    with torch.no_grad():
        rmt(_ids(2, 6 * 8), return_logits=False)
    assert len(alive) == 8
    assert max(alive) <= 1, alive
