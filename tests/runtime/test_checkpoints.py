"""Published RMT checkpoints load into FastRMT/ReferenceRMT; save_pretrained/from_pretrained round-trip."""

import pytest
import torch
from models import CLS, SEP, VOCAB, bert_cls, gpt2, pair
from numerics import assert_close

from rmt_fast import FastRMT, ReferenceRMT


def _published_decoder_state(m=3):
    torch.manual_seed(7)
    backbone = gpt2()
    state = {f"memory_cell.model.{k}": v for k, v in backbone.state_dict().items()}
    state["memory_cell.memory"] = torch.randn(m, 32)
    return state


def _published_encoder_state(m=2):
    torch.manual_seed(7)
    backbone = bert_cls()
    backbone.resize_token_embeddings(VOCAB + m)  # the published encoder extends the vocabulary
    state = {f"model.{k}": v for k, v in backbone.state_dict().items()}
    state["model.embeddings.weight"] = state["model.bert.embeddings.word_embeddings.weight"]
    state["mem_token_ids"] = torch.arange(VOCAB, VOCAB + m)
    state["cls_token"] = torch.tensor([CLS])
    state["sep_token"] = torch.tensor([SEP])
    return state


@pytest.mark.parametrize("cls", [FastRMT, ReferenceRMT])
def test_load_published_decoder_checkpoint(cls):
    state = _published_decoder_state()
    rmt = cls(gpt2(), 3, 6)
    rmt.load_reference_state_dict(state)
    assert torch.equal(rmt.memory, state["memory_cell.memory"])
    own = rmt.model.state_dict()
    assert all(
        torch.equal(own[k[len("memory_cell.model.") :]], v)
        for k, v in state.items()
        if k.startswith("memory_cell.model.")
    )


@pytest.mark.parametrize("keep", ["lm_head.weight", "transformer.wte.weight"])
@pytest.mark.parametrize("cls", [FastRMT, ReferenceRMT])
def test_a_checkpoint_with_one_name_of_the_tied_embedding_loads(cls, keep):
    """safetensors keeps one name of GPT-2's tied lm_head / wte weight (save_model keeps the first in sorted
    order): either one alone loads, into both."""
    state = _published_decoder_state()
    drop = {"lm_head.weight": "transformer.wte.weight", "transformer.wte.weight": "lm_head.weight"}[keep]
    kept = state.pop(f"memory_cell.model.{drop}").clone()
    state[f"memory_cell.model.{keep}"] = kept
    rmt = cls(gpt2(), 3, 6)
    assert not torch.equal(rmt.model.get_input_embeddings().weight, kept)
    rmt.load_reference_state_dict(state)
    assert torch.equal(rmt.model.get_input_embeddings().weight, kept)
    assert torch.equal(rmt.model.get_output_embeddings().weight, kept)


@pytest.mark.parametrize("cls", [FastRMT, ReferenceRMT])
def test_load_published_encoder_checkpoint(cls):
    state = _published_encoder_state()
    rmt = cls(bert_cls(), 2, 5, cls_token_id=CLS, sep_token_id=SEP)
    rmt.load_reference_state_dict(state)
    full = state["model.bert.embeddings.word_embeddings.weight"]
    assert torch.equal(rmt.memory, full[VOCAB:])
    assert rmt.model.get_input_embeddings().weight.shape[0] == VOCAB  # the backbone keeps its vocabulary
    assert torch.equal(rmt.model.get_input_embeddings().weight, full[:VOCAB])


def test_loaded_checkpoints_agree_between_wrappers():
    state = _published_encoder_state()
    ref, fast = pair(bert_cls, 2, 5, cls_token_id=CLS, sep_token_id=SEP)
    ref.load_reference_state_dict(state)
    fast.load_reference_state_dict(state)
    ids = torch.randint(3, VOCAB, (2, 17))
    assert_close(fast(ids).logits, ref(ids).logits, tol=1e-6, name="logits")  # one checkpoint: tighter than fp32's


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda s: s.update({"memory_cell.extra": torch.zeros(1)}), "unknown keys"),
        (lambda s: s.pop("memory_cell.memory"), "missing keys"),
        (lambda s: s.pop("memory_cell.model.transformer.ln_f.weight"), "missing keys"),
        (
            lambda s: s.update({"memory_cell.model.lm_head.weight": s["memory_cell.model.lm_head.weight"] + 1}),
            "tied tensor",
        ),
        (lambda s: s.update({"memory_cell.memory": torch.zeros(4, 32)}), "memory has shape"),
    ],
)
def test_bad_decoder_checkpoint_is_a_clear_error(mutate, match):
    state = _published_decoder_state()
    mutate(state)
    rmt = FastRMT(gpt2(), 3, 6)
    before = rmt.memory.detach().clone()
    with pytest.raises(ValueError, match=match):
        rmt.load_reference_state_dict(state)
    assert torch.equal(rmt.memory, before)


def test_bad_encoder_checkpoint_is_a_clear_error():
    rmt = FastRMT(bert_cls(), 2, 5, cls_token_id=CLS, sep_token_id=SEP)
    state = _published_encoder_state(m=3)
    with pytest.raises(ValueError, match="memory rows"):
        rmt.load_reference_state_dict(state)
    state = _published_encoder_state()
    state.pop("mem_token_ids")
    with pytest.raises(ValueError, match="mem_token_ids"):
        rmt.load_reference_state_dict(state)


@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_save_and_load_round_trip(tmp_path, kind):
    torch.manual_seed(0)
    if kind == "decoder":
        rmt = FastRMT(gpt2(), 3, 6, bptt_depth=2)
    else:
        rmt = FastRMT(bert_cls(), 2, 5, cls_token_id=CLS, sep_token_id=SEP, sum_loss=True)
    with torch.no_grad():
        rmt.memory.add_(1.0)
    rmt.save_pretrained(tmp_path)
    loaded = FastRMT.from_pretrained(tmp_path)
    assert loaded.settings == rmt.settings
    assert torch.equal(loaded.memory, rmt.memory)
    ids = torch.randint(3, VOCAB, (2, 14))
    rmt.eval(), loaded.eval()
    assert_close(loaded(ids).logits, rmt(ids).logits, tol=1e-6, name="logits after loading")  # the same weights
    assert rmt.model.config._attn_implementation == "rmt_fast"  # saving did not change the live model
    import json

    saved = json.loads((tmp_path / "backbone" / "config.json").read_text())
    assert saved.get("_attn_implementation", saved.get("attn_implementation")) in (None, "sdpa", "eager")
