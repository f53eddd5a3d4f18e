"""FastRMT / ReferenceRMT over a peft PeftModel (LoRA): the adapter runs, only it and the memory train, and
save_pretrained / from_pretrained round-trip it. Expected values come from peft itself (``merge_and_unload``
folds the adapter into plain weights), from ReferenceRMT, or from the saved model before the round trip."""

import copy
import json
import os

import pytest
import torch
import transformers as tf
from models import CLS, SEP, VOCAB, assert_equivalent, bert_cls, gpt2, llama, run
from numerics import assert_close, assert_differs

import rmt_fast.loss as L
from rmt_fast import FastRMT, ReferenceRMT

peft = pytest.importorskip("peft")

WRAPPERS = [FastRMT, ReferenceRMT]
ENC = dict(cls_token_id=CLS, sep_token_id=SEP)


def _lora(factory, seed=0):
    """(a fresh base, a PeftModel over an identical copy). init_lora_weights=False: LoRA B is random, not zero,
    so the adapter changes the outputs from the start and every LoRA weight gets a gradient."""
    torch.manual_seed(seed)
    base = factory()
    if factory is gpt2:
        cfg = peft.LoraConfig(
            r=4, target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.0, init_lora_weights=False
        )
    elif factory is llama:
        cfg = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False)
    else:  # SEQ_CLS: peft trains the classifier head too (modules_to_save)
        cfg = peft.LoraConfig(
            task_type="SEQ_CLS", r=4, target_modules=["query", "value"], lora_dropout=0.0, init_lora_weights=False
        )
    return base, peft.get_peft_model(copy.deepcopy(base), cfg)


def _ids(b=2, t=15, seed=3):
    return torch.randint(3, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def _pair(factory, m, size, **kw):
    _, p = _lora(factory)
    ref = ReferenceRMT(copy.deepcopy(p), m, size, **kw)
    fast = FastRMT(copy.deepcopy(p), m, size, **kw)
    with torch.no_grad():
        fast.memory.copy_(ref.memory)
    return ref, fast


# ------------------------------------------------------------------------------------------------- wrapping
@pytest.mark.parametrize("cls", WRAPPERS)
@pytest.mark.parametrize("factory", [gpt2, llama, bert_cls])
def test_the_adapter_runs_inside_the_wrapper(cls, factory):
    """A PEFT RMT computes what the same RMT over the LoRA-merged plain model computes (and not the base's)."""
    kw = ENC if factory is bert_cls else {}
    base, p = _lora(factory)
    merged = copy.deepcopy(p).merge_and_unload()
    assert type(merged) is type(base)
    torch.manual_seed(1)
    rmt = cls(p, 2, 6, **kw)
    assert rmt.peft_model is p and rmt.model is p.get_base_model()
    plain, bare = cls(merged, 2, 6, **kw), cls(base, 2, 6, **kw)
    with torch.no_grad():
        plain.memory.copy_(rmt.memory)
        bare.memory.copy_(rmt.memory)
        ids = _ids()
        got, want, without = rmt(ids), plain(ids), bare(ids)
    assert_close(got.logits, want.logits, dtype=torch.float32, name="logits")
    assert_close(got.memory_state, want.memory_state, dtype=torch.float32, name="memory")
    assert_differs(got.logits, without.logits, by=1e-3, name="logits without the adapter")  # the check above can fail


def test_fast_switches_and_restores_the_inner_models_attention():
    _, p = _lora(llama)
    inner = p.get_base_model()
    original = inner.config._attn_implementation
    fast = FastRMT(p, 2, 6)
    assert inner.config._attn_implementation == "rmt_fast"
    assert fast._info.accepts_logits_to_keep and fast._hook is not None  # logits_to_keep path, hidden-state hook
    assert fast.unwrap() is p
    assert inner.config._attn_implementation == original


@pytest.mark.parametrize("factory", [gpt2, llama])
@pytest.mark.parametrize("mask", [False, True])
def test_fast_equals_reference_decoder(factory, mask):
    ref, fast = _pair(factory, 2, 6)
    ids = _ids()
    inputs = dict(input_ids=ids, labels=ids)
    if mask:
        inputs["attention_mask"] = torch.ones_like(ids)
        inputs["attention_mask"][0, :4] = 0
    assert_equivalent(ref, fast, inputs)
    lora = [q for n, q in fast.named_parameters() if "lora_" in n]
    assert lora and all(q.grad is not None and q.grad.abs().max() > 0 for q in lora)
    assert fast.memory.grad.abs().max() > 0


def test_fast_equals_reference_encoder_classifier():
    ref, fast = _pair(bert_cls, 2, 5, **ENC)
    ids = _ids(3, 17)
    assert_equivalent(ref, fast, dict(input_ids=ids, labels=torch.tensor([0, 2, 1])))
    head = [q for n, q in fast.named_parameters() if "modules_to_save" in n]
    assert head and all(q.grad is not None for q in head)


def test_generate_equals_reference():
    ref, fast = _pair(llama, 2, 6)
    ids = _ids(1, 14)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(fast.generate(ids, **kw), ref.generate(ids, **kw))


# ------------------------------------------------------------------------------------------------- fast paths
def test_chunked_loss_through_the_adapter(monkeypatch):
    monkeypatch.setattr(L, "MIN_ELEMENTS", 0)
    monkeypatch.setattr(L, "CHUNK_ELEMENTS", VOCAB * 5)
    calls = []
    real = L.linear_cross_entropy
    monkeypatch.setattr("rmt_fast.fast.linear_cross_entropy", lambda *a, **k: calls.append(1) or real(*a, **k))
    ref, fast = _pair(llama, 2, 6)
    ids = _ids()
    a = run(ref, dict(input_ids=ids, labels=ids))
    b = run(fast, dict(input_ids=ids, labels=ids, return_logits=False))
    assert calls and b.logits is None
    assert_close(b.loss, a.loss, dtype=torch.float32, name="loss")
    grads = {n: q.grad for n, q in ref.named_parameters()}
    for n, q in fast.named_parameters():
        if grads[n] is not None:
            assert_close(q.grad, grads[n], dtype=torch.float32, name=n)


@pytest.mark.parametrize(
    "option",
    [
        pytest.param(dict(cuda_graph=True), id="cuda_graph"),
        pytest.param(dict(compile_step={"backend": "aot_eager"}), id="compile_step", marks=pytest.mark.slow),
    ],
)
def test_graph_and_compiled_steps_through_the_adapter(option):
    """cuda_graph on the CPU runs the static-buffer logic without capture; compile_step traces the LoRA layers."""
    torch._dynamo.reset()
    ref, _ = _pair(gpt2, 2, 6)
    fast = FastRMT(copy.deepcopy(ref.peft_model), 2, 6, **option)
    with torch.no_grad():
        fast.memory.copy_(ref.memory)
    ids = _ids(2, 17)
    with torch.no_grad():
        a, b = ref(ids, labels=ids), fast(ids, labels=ids)
    assert_close(b.logits, a.logits, dtype=torch.float32, name="logits")
    assert_close(b.memory_state, a.memory_state, dtype=torch.float32, name="memory")
    assert_close(b.loss, a.loss, dtype=torch.float32, name="loss")
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize(
    "factory, kw",
    [(gpt2, {}), (llama, dict(gradient_checkpointing=True)), (bert_cls, ENC)],
    ids=["gpt2", "llama-ckpt", "bert_cls"],
)
def test_training_moves_only_the_adapter_and_the_memory(factory, kw):
    _, p = _lora(factory)
    flags = {n: q.requires_grad for n, q in p.get_base_model().named_parameters()}
    rmt = FastRMT(p, 2, 6, **kw)
    frozen = {n: q.detach().clone() for n, q in rmt.model.named_parameters() if not q.requires_grad}
    trained = {n: q.detach().clone() for n, q in rmt.named_parameters() if q.requires_grad}
    assert frozen and "memory" in trained and any("lora_" in n for n in trained)
    opt = torch.optim.AdamW([q for q in rmt.parameters() if q.requires_grad], lr=1e-2)
    ids = _ids()
    labels = ids if rmt.is_decoder else torch.tensor([0, 2])
    rmt(ids, labels=labels).loss.backward()
    opt.step()
    assert {n: q.requires_grad for n, q in rmt.model.named_parameters()} == flags  # as PEFT set them
    now = dict(rmt.model.named_parameters())
    assert all(torch.equal(now[n], v) for n, v in frozen.items())
    now["memory"] = rmt.memory
    moved = [n for n, v in trained.items() if not torch.equal(now[n.removeprefix("model.")], v)]
    assert sorted(moved) == sorted(trained)


# ------------------------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("cls", WRAPPERS)
@pytest.mark.parametrize("factory", [gpt2, bert_cls])
def test_save_and_load_round_trip(tmp_path, cls, factory):
    kw = ENC if factory is bert_cls else {}
    base, p = _lora(factory)
    rmt = cls(p, 2, 6, **kw)
    with torch.no_grad():
        rmt.memory.add_(0.5)  # not the initial draw: the memory must come from the checkpoint
        next(q for n, q in rmt.named_parameters() if "lora_B" in n).add_(0.25)
    ids = _ids()
    with torch.no_grad():
        want = rmt(ids)
    rmt.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter", "rmt_config.json", "rmt_memory.pt"]  # no base weights
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "adapter"))
    with open(tmp_path / "rmt_config.json") as f:
        assert json.load(f)["backbone_class"] == type(base).__name__
    loaded = cls.from_pretrained(tmp_path, base_model=copy.deepcopy(base), is_trainable=True)
    assert isinstance(loaded.peft_model, peft.PeftModel)
    with torch.no_grad():
        got = loaded(ids)
    assert torch.equal(got.logits, want.logits) and torch.equal(got.memory_state, want.memory_state)
    assert torch.equal(loaded.memory, rmt.memory)
    trainable = sorted(n for n, q in loaded.named_parameters() if q.requires_grad)
    assert trainable == sorted(n for n, q in rmt.named_parameters() if q.requires_grad)


def test_load_by_path_and_frozen_by_default(tmp_path):
    base, p = _lora(gpt2)
    rmt = FastRMT(p, 2, 6)
    rmt.save_pretrained(tmp_path / "rmt")
    base.save_pretrained(tmp_path / "base")
    loaded = FastRMT.from_pretrained(tmp_path / "rmt", base_model=str(tmp_path / "base"))
    assert not any(q.requires_grad for q in loaded.parameters())  # peft's is_trainable=False: inference
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, rmt(ids).logits)


def test_load_errors(tmp_path):
    base, p = _lora(gpt2)
    FastRMT(p, 2, 6).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="base_model: .* names no base model"):
        FastRMT.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="trained on a GPT2LMHeadModel, got LlamaForCausalLM"):
        FastRMT.from_pretrained(tmp_path, base_model=llama())
    with pytest.raises(TypeError, match="base_model must be a transformers PreTrainedModel"):
        FastRMT.from_pretrained(tmp_path, base_model=p)
    with pytest.raises(ValueError, match="already holds peft adapter layers"):
        FastRMT.from_pretrained(tmp_path, base_model=p.get_base_model())
    plain = tmp_path / "plain"
    FastRMT(gpt2(), 2, 6).save_pretrained(plain)
    with pytest.raises(ValueError, match="PEFT checkpoints only"):
        FastRMT.from_pretrained(plain, base_model=gpt2())


@pytest.mark.parametrize("cls", WRAPPERS)
def test_load_published_peft_decoder_checkpoint(cls):
    """The published wrapper around a PeftModel: keys memory_cell.model.base_model.model.<inner keys>."""
    _, p = _lora(gpt2, seed=5)
    state = {f"memory_cell.model.{k}": v for k, v in p.state_dict().items()}
    state["memory_cell.memory"] = torch.randn(3, 32)
    rmt = cls(_lora(gpt2, seed=6)[1], 3, 6)
    rmt.load_reference_state_dict(state)
    assert torch.equal(rmt.memory, state["memory_cell.memory"])
    inner = p.get_base_model().state_dict()
    assert all(torch.equal(v, inner[k]) for k, v in rmt.model.state_dict().items())


@pytest.mark.parametrize("cls", WRAPPERS)
def test_load_published_peft_encoder_checkpoint(cls):
    """The published encoder around a PeftModel: model.base_model.model.<inner keys>, m extra embedding rows."""
    torch.manual_seed(5)
    published = bert_cls()
    published.resize_token_embeddings(VOCAB + 2)
    p = peft.get_peft_model(
        published, peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query"], init_lora_weights=False)
    )
    state = {f"model.{k}": v for k, v in p.state_dict().items()}
    state.update(
        mem_token_ids=torch.arange(VOCAB, VOCAB + 2), cls_token=torch.tensor([CLS]), sep_token=torch.tensor([SEP])
    )
    own = peft.get_peft_model(bert_cls(), peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query"]))
    rmt = cls(own, 2, 5, **ENC)
    rmt.load_reference_state_dict(state)
    full = state["model.base_model.model.bert.embeddings.word_embeddings.weight"]
    assert torch.equal(rmt.memory, full[VOCAB:])
    inner = p.get_base_model().state_dict()
    for k, v in rmt.model.state_dict().items():
        assert torch.equal(v, inner[k][:VOCAB] if "word_embeddings" in k else inner[k]), k


# ------------------------------------------------------------------------------------------------ bad input
class NoInterfaceGPT2(tf.GPT2LMHeadModel):
    _supports_attention_backend = False


@pytest.mark.parametrize("cls", WRAPPERS)
def test_unsupported_backbones_inside_peft_get_todays_errors(cls):
    t5 = tf.T5ForConditionalGeneration(
        tf.T5Config(d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2, vocab_size=32)
    )
    lora = dict(r=2, target_modules=["q", "v"], lora_dropout=0.0)
    with pytest.raises(ValueError, match="encoder-decoder"):
        cls(peft.get_peft_model(t5, peft.LoraConfig(**lora)), 2, 8)
    legacy = peft.get_peft_model(NoInterfaceGPT2(gpt2().config), peft.LoraConfig(r=2, target_modules=["c_attn"]))
    attn = legacy.get_base_model().config._attn_implementation
    with pytest.raises(ValueError, match="attention interface"):
        cls(legacy, 2, 8)
    assert legacy.get_base_model().config._attn_implementation == attn


@pytest.mark.parametrize("cls", WRAPPERS)
def test_peft_misuse_is_refused(cls):
    prompt = peft.get_peft_model(gpt2(), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with pytest.raises(ValueError, match="PROMPT_TUNING adapter adds virtual tokens"):
        cls(prompt, 2, 8)
    _, p = _lora(gpt2)
    with pytest.raises(ValueError, match="holds peft adapter layers .* not a PeftModel"):
        cls(p.get_base_model(), 2, 8)
    with pytest.raises(TypeError, match="PreTrainedModel \\(or a peft PeftModel of one\\), got LoraModel"):
        cls(p.base_model, 2, 8)
    embedding = peft.get_peft_model(gpt2(), peft.LoraConfig(r=2, target_modules=["wte"]))
    with pytest.raises(ValueError, match="got peft.tuners.lora.layer.Embedding.* adapters on the input embedding"):
        cls(embedding, 2, 8)
