"""Bad input gets a clear error naming the argument, and leaves the model unchanged."""

import copy

import pytest
import torch
import transformers as tf
from models import CLS, SEP, bert_cls, gpt2

from rmt_fast import FastRMT, ReferenceRMT

WRAPPERS = [FastRMT, ReferenceRMT]


def _state(model):
    return copy.deepcopy(model.state_dict()), model.config._attn_implementation


def _unchanged(model, before):
    params, attn = before
    assert model.config._attn_implementation == attn
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in params.items())


@pytest.mark.parametrize("cls", WRAPPERS)
@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((3, 0), {}, "segment_size"),
        ((3, -4), {}, "segment_size"),
        ((-1, 8), {}, "num_mem_tokens"),
        ((3, 8), {"bptt_depth": -2}, "bptt_depth"),
        ((3, 8), {"max_n_segments": 0}, "max_n_segments"),
        ((3, 8), {"segment_alignment": "middle"}, "segment_alignment"),
        ((3, 8), {"attn_backend": "flash"}, "attn_backend"),
        ((3, 200), {}, "maximum positions"),
    ],
)
def test_bad_constructor_arguments(cls, args, kwargs, match):
    model = gpt2()
    before = _state(model)
    with pytest.raises(ValueError, match=match):
        cls(model, *args, **kwargs)
    _unchanged(model, before)


@pytest.mark.parametrize("cls", WRAPPERS)
def test_encoder_needs_special_token_ids(cls):
    model = bert_cls()
    before = _state(model)
    with pytest.raises(ValueError, match="cls_token_id, sep_token_id"):
        cls(model, 2, 8)
    _unchanged(model, before)


class NoInterfaceGPT2(tf.GPT2LMHeadModel):
    _supports_attention_backend = False


@pytest.mark.parametrize("cls", WRAPPERS)
def test_unsupported_models(cls):
    with pytest.raises(TypeError, match="PreTrainedModel"):
        cls(torch.nn.Linear(4, 4), 2, 8)
    t5 = tf.T5ForConditionalGeneration(
        tf.T5Config(d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2, vocab_size=32)
    )
    with pytest.raises(ValueError, match="encoder-decoder"):
        cls(t5, 2, 8)
    legacy = NoInterfaceGPT2(gpt2().config)
    with pytest.raises(ValueError, match="attention interface"):
        cls(legacy, 2, 8)


@pytest.fixture(params=WRAPPERS, ids=lambda c: c.__name__)
def decoder(request):
    torch.manual_seed(0)
    return request.param(gpt2(), 2, 6, max_n_segments=3)


def _bad_inputs():
    ids = torch.randint(3, 90, (2, 12))
    return [
        (dict(input_ids=ids[0]), "input_ids must be a 2-D"),
        (dict(input_ids=ids.float()), "input_ids must be an int64"),
        (dict(input_ids=ids, attention_mask=torch.ones(2, 11)), "attention_mask must have the shape"),
        (dict(input_ids=ids, labels=ids[:, :5]), "labels of shape"),
        (dict(input_ids=ids, labels=ids, labels_mask=torch.ones(2, 3, dtype=torch.bool)), "labels_mask"),
        (dict(input_ids=ids, memory_state=torch.zeros(2, 3, 32)), r"memory_state must have shape \(2, 2, 32\)"),
        (dict(input_ids=ids, memory_state=torch.zeros(2, 2, 32, dtype=torch.float64)), "memory_state must have dtype"),
        (dict(input_ids=ids, memory_state=torch.zeros(2, 2, 32, device="meta")), "memory_state must be on"),
        (dict(input_ids=torch.randint(3, 90, (2, 19))), "max_n_segments=3"),
    ]


@pytest.mark.parametrize("inputs, match", _bad_inputs())
def test_bad_forward_inputs(decoder, inputs, match):
    before = _state(decoder.model)
    memory = decoder.memory.detach().clone()
    with pytest.raises(ValueError, match=match):
        decoder(**inputs)
    _unchanged(decoder.model, before)
    assert torch.equal(decoder.memory, memory)


def test_encoder_rejects_rows_without_content():
    rmt = FastRMT(bert_cls(), 2, 5, cls_token_id=CLS, sep_token_id=SEP)
    ids = torch.randint(3, 90, (2, 8))
    ids[1] = 0
    with pytest.raises(ValueError, match="no content tokens"):
        rmt(ids)


@pytest.mark.parametrize("cls", WRAPPERS)
def test_encoder_attention_mask_cannot_hide_content_tokens(cls):
    rmt = cls(bert_cls(), 2, 5, cls_token_id=CLS, sep_token_id=SEP)
    ids = torch.randint(3, 90, (2, 8))
    ids[1, 6:] = 0
    mask = (ids != 0).long()
    rmt(ids, attention_mask=mask)  # a mask that agrees with the padding is fine
    mask[0, 2] = 0
    with pytest.raises(ValueError, match="attention_mask masks non-pad tokens"):
        rmt(ids, attention_mask=mask)


def test_generate_is_for_decoders():
    rmt = FastRMT(bert_cls(), 2, 5, cls_token_id=CLS, sep_token_id=SEP)
    with pytest.raises(ValueError, match="decoder"):
        rmt.generate(torch.randint(3, 90, (1, 8)))
