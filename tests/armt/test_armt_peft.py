"""FastARMT / ReferenceARMT over a peft PeftModel (LoRA): FastARMT's batched layers add the LoRA terms exactly as
peft's layers (which ReferenceARMT calls) do; only the adapter and ARMT's own parameters train; save_pretrained /
from_pretrained and the published PEFT key layout round-trip. Expected values come from ReferenceARMT (peft's own
forward) or from the model before the round trip."""

import copy
import os

import pytest
import torch
from armt_helpers import assert_equivalent, ids, randomize_memory, run
from models import gpt2, llama
from numerics import TOL, assert_close, assert_differs

from rmt_fast import FastARMT, ReferenceARMT
from rmt_fast.armt.layers import StackedLayers

peft = pytest.importorskip("peft")

TARGETS = {gpt2: ["c_attn", "c_proj", "c_fc"], llama: ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]}


def _peft(factory, seed=0, **cfg):
    """(a fresh base, a PeftModel over an identical copy) with random LoRA B (peft starts it at zero, which would
    hide a dropped LoRA term)."""
    torch.manual_seed(seed)
    base = factory()
    kw = {"r": 4, "lora_alpha": 12, "target_modules": TARGETS[factory], "lora_dropout": 0.0, **cfg}
    if factory is gpt2:
        kw["fan_in_fan_out"] = True
    p = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for name, q in p.named_parameters():
            if "lora_B" in name:
                q.copy_(torch.randn(q.shape, generator=g) * 0.3)
    return base, p


def _pair(factory, m=3, size=8, fast_kw=None, **cfg):
    _, p = _peft(factory, **cfg)
    ref = ReferenceARMT(copy.deepcopy(p), m, size, d_mem=32)
    randomize_memory(ref)
    fast = FastARMT(copy.deepcopy(p), m, size, d_mem=32, **(fast_kw or {}))
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def _lora_params(armt):
    return {n: q for n, q in armt.named_parameters() if "lora_" in n}


# ----------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("diagonal", [False, True])
@pytest.mark.parametrize("factory", [gpt2, llama])
def test_fast_equals_reference_on_a_lora_model(factory, diagonal):
    ref, fast = _pair(factory, fast_kw={"diagonal": diagonal})
    assert fast.peft_model is not None and fast.model is fast.peft_model.get_base_model()
    inputs = {"input_ids": ids(2, 21), "labels": ids(2, 21, seed=2)}
    assert_equivalent(ref, fast, inputs)
    lora = _lora_params(fast)
    assert lora and all(q.grad is not None and q.grad.abs().max() > 0 for q in lora.values())
    frozen = [n for n, q in fast.named_parameters() if not q.requires_grad]
    assert frozen and all(fast.get_parameter(n).grad is None for n in frozen)
    stacked = StackedLayers(fast.model, fast.decoder_layers, fast.model.config.model_type, "sdpa")
    assert not stacked.w["qkv_w"].requires_grad and not stacked.w["down_w"].requires_grad  # frozen base stacks
    assert all(t[1].requires_grad and t[2].requires_grad for t in stacked.lora.terms["qkv"])
    # the adapter matters: without it the logits move (so the comparison above can fail)
    with fast.peft_model.disable_adapter(), torch.no_grad():
        bare = fast(inputs["input_ids"]).logits
    assert_differs(bare, run(fast, inputs, grad=False).logits, by=1e-3, name="logits without the adapter")


PATTERNS = {"rank_pattern": {"layers.1.self_attn.q_proj": 2}, "alpha_pattern": {"layers.0.mlp.down_proj": 5}}


STATES = ["merged", "disabled", "eval-dropout", "two-adapters", "patterns", "one-layer", "checkpointed"]


@pytest.mark.parametrize("state", STATES)
def test_adapter_states_match_peft(state):
    """Merged (adds nothing), disabled, dropout in eval (identity), two active adapters of different ranks,
    per-layer ranks and scalings, an adapter on one layer only (the other layer's stack is zero), FastARMT's
    gradient checkpointing. In float64:
    exact up to 1e-10, so a rounding-sized error cannot hide behind the fp32 tolerance."""
    cfg = {"lora_dropout": 0.2} if state == "eval-dropout" else {}
    if state == "patterns":
        cfg = PATTERNS
    elif state == "one-layer":
        cfg = {"layers_to_transform": [1]}
    ref, fast = _pair(llama, fast_kw={"diagonal": True, "gradient_checkpointing": state == "checkpointed"}, **cfg)
    if state == "two-adapters":
        for armt in (ref, fast):
            armt.peft_model.add_adapter(
                "second", peft.LoraConfig(r=2, target_modules=["q_proj", "up_proj"], init_lora_weights=False)
            )
            armt.peft_model.base_model.set_adapter(["default", "second"])
        fast.load_state_dict(ref.state_dict())
    for armt in (ref, fast):
        if state == "merged":
            armt.peft_model.merge_adapter()
        elif state == "disabled":
            armt.peft_model.base_model.disable_adapter_layers()
        elif state == "eval-dropout":
            armt.eval()
    ref.double(), fast.double()
    inputs = {"input_ids": ids(2, 19), "labels": ids(2, 19, seed=2)}
    assert_equivalent(ref, fast, inputs, tol=TOL[torch.float64], grad=state != "merged")


def test_lora_dropout_in_training_is_applied():
    _, fast = _pair(llama, lora_dropout=0.5)
    x = ids(1, 16)
    with torch.no_grad():
        fast.eval()
        a = fast(x).logits
        fast.train()
        torch.manual_seed(0)
        b = fast(x).logits
        torch.manual_seed(1)
        c = fast(x).logits
    assert_differs(b, a, by=1e-4, name="train-mode logits")
    assert_differs(c, b, by=1e-4, name="logits under another seed")


def test_generate_on_a_lora_model():
    ref, fast = _pair(llama)
    x = ids(2, 20)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    a, b = ref.generate(x, **kw), fast.generate(x, **kw)
    assert torch.equal(a, b)
    assert torch.equal(b[:, 0], fast(x).logits[:, -1].argmax(-1))  # the adapter runs in generate's prompt step


# ------------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("factory", [gpt2, llama])
def test_one_adamw_step_trains_the_adapter_and_memory_only(factory):
    _, fast = _pair(factory, fast_kw={"diagonal": True})
    assert fast.memory.requires_grad and all(q.requires_grad for q in fast.assoc.parameters())
    trainable = [q for q in fast.parameters() if q.requires_grad]
    before = {n: q.detach().clone() for n, q in fast.named_parameters()}
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    run(fast, {"input_ids": ids(2, 20), "labels": ids(2, 20, seed=2)})
    opt.step()
    for n, q in fast.named_parameters():
        if q.requires_grad:
            assert not torch.equal(q, before[n]), f"{n} did not change"
        else:
            assert torch.equal(q, before[n]), f"frozen {n} changed"
    assert sum(not q.requires_grad for q in fast.parameters()) > 0


# ---------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("factory", [gpt2, llama])
def test_save_and_load_round_trip_with_the_adapter(factory, tmp_path):
    base, p = _peft(factory)
    torch.manual_seed(0)
    fast = FastARMT(p, 3, 8, d_mem=32)
    randomize_memory(fast)
    x = ids(2, 20)
    with torch.no_grad():
        want = fast(x)
    fast.save_pretrained(tmp_path)
    assert os.path.isfile(tmp_path / "adapter" / "adapter_config.json")
    assert not os.path.exists(tmp_path / "backbone")
    loaded = FastARMT.from_pretrained(tmp_path, base_model=copy.deepcopy(base), is_trainable=True, diagonal=True)
    assert loaded.peft_model is not None and loaded.diagonal
    assert loaded.memory.requires_grad and all(q.requires_grad for q in loaded.assoc.parameters())
    with torch.no_grad():
        got = loaded(x)
    assert_close(got.logits, want.logits, tol=1e-6, name="logits")
    assert_close(got.memory_state.A, want.memory_state.A, tol=1e-6, name="got.memory_state.A")
    frozen = FastARMT.from_pretrained(tmp_path, base_model=copy.deepcopy(base))
    assert not any(q.requires_grad for q in frozen.parameters())
    ref = ReferenceARMT.from_pretrained(tmp_path, base_model=copy.deepcopy(base))
    with torch.no_grad():
        assert_close(ref(x).logits, want.logits, dtype=torch.float32, name="ref(x).logits")


def test_load_reference_state_dict_over_a_peft_model():
    """The published wrapper around a PeftModel: ``memory_cell.model.base_model.model.<layers>.<l>.layer.*``."""
    base, p = _peft(llama)
    src = FastARMT(p, 3, 8, d_mem=32)
    randomize_memory(src)
    published = {"memory_cell.memory": src.memory.detach()}
    layers = "base_model.model.model.layers."
    for key, value in p.state_dict().items():
        if key.startswith(layers):
            index, rest = key[len(layers) :].split(".", 1)
            key = f"{layers}{index}.layer.{rest}"
        published["memory_cell.model." + key] = value
    for key, value in src.assoc.state_dict().items():
        index, rest = key.split(".", 1)
        published[f"memory_cell.model.{layers}{index}.{rest}"] = value
    assert any(".layer.self_attn.q_proj.lora_A.default.weight" in k for k in published)
    _, fresh = _peft(llama, seed=5)
    dst = FastARMT(fresh, 3, 8, d_mem=32)
    dst.load_reference_state_dict(published)
    x = ids(2, 20)
    with torch.no_grad():
        assert_close(dst(x).logits, src(x).logits, tol=1e-6, name="dst(x).logits")
    with pytest.raises(ValueError, match="unknown keys"):
        dst.load_reference_state_dict({k.replace("base_model.model.", ""): v for k, v in published.items()})


# ------------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    "option, match",
    [
        ({"use_dora": True}, "use_dora=True"),
        ({"lora_bias": True}, "lora_bias=True"),
    ],
)
def test_unsupported_lora_options_are_refused(option, match):
    _, p = _peft(llama, **option)
    with pytest.raises(ValueError, match=rf"layer 0's self_attn\.q_proj.*{match}"):
        FastARMT(p, 2, 8, d_mem=8)


def test_non_lora_tuners_are_refused():
    torch.manual_seed(0)
    p = peft.get_peft_model(
        llama(), peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    )
    with pytest.raises(ValueError, match=r"layer 0's self_attn\.k_proj is a Linear, not a plain Linear or a peft"):
        FastARMT(p, 2, 8, d_mem=8)


def test_disabled_while_merged_is_refused_at_the_call():
    _, p = _peft(llama)
    fast = FastARMT(p, 2, 8, d_mem=8)
    p.merge_adapter()
    p.base_model.disable_adapter_layers()
    with pytest.raises(ValueError, match="unmerge_adapter"):
        fast(ids(1, 10))


def test_bf16_base_with_fp32_adapter_matches_peft():
    """peft keeps LoRA weights in fp32 over a bf16 base: the term is computed in fp32 and cast back, as peft does."""
    torch.manual_seed(0)
    p = peft.get_peft_model(
        llama().to(torch.bfloat16),
        peft.LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False),
    )
    assert {q.dtype for n, q in p.named_parameters() if "lora_" in n} == {torch.float32}
    ref = ReferenceARMT(copy.deepcopy(p), 3, 8, d_mem=32)
    randomize_memory(ref)
    fast = FastARMT(copy.deepcopy(p), 3, 8, d_mem=32, diagonal=True)
    fast.load_state_dict(ref.state_dict())
    inputs = {"input_ids": ids(2, 21), "labels": ids(2, 21, seed=2)}
    a, b = run(ref, inputs), run(fast, inputs)
    assert b.logits.dtype == torch.bfloat16 and b.memory_state.A.dtype == torch.bfloat16
    # Two bf16 paths (fused against peft's), each about TOL[bf16] from exact: twice the bound between them, and
    # five times for the LoRA gradients, which carry the bf16 rounding of every segment's backward.
    assert_close(b.logits, a.logits, tol=2 * TOL[torch.bfloat16], name="logits")
    assert_close(b.memory_state.A, a.memory_state.A, tol=2 * TOL[torch.bfloat16], name="A")
    grads = {n: q.grad for n, q in ref.named_parameters() if "lora_" in n}
    for n, q in fast.named_parameters():
        if "lora_" in n:
            assert_close(q.grad, grads[n], tol=5 * TOL[torch.bfloat16], name=f"grad of {n}")


def test_cuda_graph_runner_on_a_lora_model():
    """FastARMT(cuda_graph=True) over a PeftModel (the graph runner's static-buffer logic on the CPU) equals eager
    FastARMT bit for bit, and follows an update of the adapter's weights (its stacked copy is refreshed)."""
    _, eager = _pair(llama, fast_kw={"diagonal": True})
    graphed = FastARMT(copy.deepcopy(eager.peft_model), 3, 8, d_mem=32, diagonal=True, cuda_graph=True)
    graphed.load_state_dict(eager.state_dict())
    x = ids(2, 21)
    for _ in range(2):
        with torch.no_grad():
            a, b = eager.eval()(x, labels=x), graphed.eval()(x, labels=x)
        assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)
        assert torch.equal(a.memory_state.A, b.memory_state.A) and torch.equal(a.memory_state.z, b.memory_state.z)
        with torch.no_grad():  # an optimizer-like in-place update of one LoRA B, in both
            for armt in (eager, graphed):
                next(q for n, q in armt.named_parameters() if "lora_B" in n).add_(0.5)
