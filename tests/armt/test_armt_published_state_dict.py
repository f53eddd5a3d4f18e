"""The published AssociativeRecurrentWrapper's own state dict loads into FastARMT (issue 23, section 2).

The state dicts come from stand-ins of the published classes that register their modules as the published ones do
(tests/armt_published.py): each wrapped layer's tensors are named twice, ``memory_cell.model.<layers>.<l>.*`` and
``memory_cell.layers.<l>.*``. Forms: torch.save (both names, one storage); safetensors' own ``save_model`` (0.8: one
name of each shared tensor, the first in sorted order: ``memory_cell.layers.*``, and of GPT-2's tied embeddings
``lm_head.weight``); safetensors files that keep only ``memory_cell.layers.*`` (and ``transformer.wte.weight``) or
only ``memory_cell.model.*`` (and ``lm_head.weight``). After loading, FastARMT (both schedules) equals the
ReferenceARMT whose weights the stand-in holds: logits, loss, final A and z and every gradient, in fp32. Names of
one tensor that hold different values, unknown, missing and misshapen keys are refused before anything loads."""

import functools
import io

import pytest
import torch
from armt_helpers import assert_same_run, build, ids, run
from armt_published import published_wrapper
from models import DECODERS, assert_grads_equal
from numerics import assert_close, assert_differs
from safetensors.torch import load_file, save_file, save_model

from rmt_fast import FastARMT, ReferenceARMT

ALIAS = "memory_cell.layers."
LAYERS = {"gpt2": "memory_cell.model.transformer.h.", "llama": "memory_cell.model.model.layers."}


def _shared_groups(sd: dict) -> list[list[str]]:
    """The names of ``sd`` that share one tensor (the aliases, tied weights), in the dict's order."""
    groups: dict[tuple, list[str]] = {}
    for key, value in sd.items():
        groups.setdefault((value.data_ptr(), tuple(value.shape), value.stride()), []).append(key)
    return [names for names in groups.values() if len(names) > 1]


def _safetensors_keeping(sd: dict, keep, path) -> dict:
    """A safetensors round trip of ``sd`` that keeps, of each group of names sharing a tensor, ``keep(group)``."""
    drop = {name for group in _shared_groups(sd) for name in group if name != keep(group)}
    save_file({k: v.contiguous() for k, v in sd.items() if k not in drop}, str(path))
    return load_file(str(path))


def _form(wrapper, form: str, layers: str, tmp_path) -> dict:
    sd = wrapper.state_dict()
    if form == "torch.save":
        buf = io.BytesIO()
        torch.save(sd, buf)
        buf.seek(0)
        return torch.load(buf, weights_only=True)
    if form == "safetensors.save_model":
        save_model(wrapper, str(tmp_path / "model.safetensors"))
        return load_file(str(tmp_path / "model.safetensors"))
    if form == "only layers.*":  # and, of tied weights, the last name in sorted order
        return _safetensors_keeping(
            sd, lambda g: next((k for k in g if k.startswith(ALIAS)), max(g)), tmp_path / "layers.safetensors"
        )
    assert form == "only model.*"  # and, of tied weights, the first name in sorted order
    return _safetensors_keeping(
        sd, lambda g: next((k for k in g if k.startswith(layers)), min(g)), tmp_path / "model.safetensors"
    )


def _check_form(sd: dict, form: str, layers: str, full: dict) -> None:
    """The form holds what it claims: both names of every wrapped-layer tensor, or exactly one."""
    pairs = [(layers + k[len(ALIAS) :], k) for k in full if k.startswith(ALIAS)]
    assert pairs and any(k.endswith(".W_mb.bias") for _, k in pairs) and any(".layer." in k for _, k in pairs)
    present = [(a in sd, b in sd) for a, b in pairs]
    if form == "torch.save":
        assert set(sd) == set(full) and all(a and b for a, b in present)
        assert sd[pairs[0][0]].data_ptr() == sd[pairs[0][1]].data_ptr()  # torch.save keeps one storage
    else:
        assert all(a != b for a, b in present), "safetensors keeps exactly one name of each shared tensor"
    if form == "only layers.*":
        assert all(b for _, b in present)
    if form == "only model.*":
        assert all(a for a, _ in present)


def _snapshot(armt) -> dict:
    return {k: v.detach().clone() for k, v in armt.state_dict().items()}


def _assert_unchanged(armt, before: dict) -> None:
    after = armt.state_dict()
    assert set(after) == set(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{key} changed before the error"


FORMS = ["torch.save", "safetensors.save_model", "only layers.*", "only model.*"]
NAMES = ["gpt2", "llama"]  # llama-test has grouped KV heads (4 query heads, 2 KV heads)


@functools.cache
def _reference(name: str, n_heads: int):
    """A ReferenceARMT with random memory weights and its run with gradients (kept on its parameters: no test
    runs it again), shared by the cases that load its weights."""
    ref = build(ReferenceARMT, name, n_heads=n_heads)
    x = ids(2, 19)  # 3 segments, the last one short
    return ref, x, run(ref, dict(input_ids=x, labels=x))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("diagonal", [False, True])
@pytest.mark.parametrize("n_heads", [1, 2])
@pytest.mark.parametrize("name", NAMES)
def test_published_state_dict_loads(name, n_heads, diagonal, form, tmp_path):
    ref, x, want = _reference(name, n_heads)
    wrapper = published_wrapper(ref)
    sd = _form(wrapper, form, LAYERS[name], tmp_path)
    _check_form(sd, form, LAYERS[name], wrapper.state_dict())
    torch.manual_seed(5)
    fast = FastARMT(DECODERS[name](), 3, 8, d_mem=32, n_heads=n_heads, diagonal=diagonal)
    with torch.no_grad():
        assert_differs(fast(x).logits, want.logits, by=1e-2, name="logits before loading")  # a different model
    fast.load_reference_state_dict(sd)
    assert_same_run(want, run(fast, dict(input_ids=x, labels=x)))
    assert_grads_equal(ref, fast)


def test_reference_armt_loads_the_published_state_dict_too():
    """ReferenceARMT shares the loader (ARMTBase): the torch.save form, both names of each wrapped layer."""
    ref, x, want = _reference("llama", 2)
    torch.manual_seed(5)
    other = ReferenceARMT(DECODERS["llama"](), 3, 8, d_mem=32, n_heads=2)
    other.load_reference_state_dict(published_wrapper(ref).state_dict())
    with torch.no_grad():
        assert_same_run(want, other(x, labels=x))


def _nudged(value: torch.Tensor) -> torch.Tensor:
    """A copy of ``value`` whose first element is the next float up: the smallest difference there is."""
    out = value.detach().clone()
    flat = out.view(-1)
    flat[0] = torch.nextafter(flat[0], torch.tensor(float("inf"), dtype=out.dtype))
    return out


CONFLICTS = {  # (model, the key whose copy differs from its other name's)
    "alias W_mq": ("llama", ALIAS + "1.W_mq.weight"),
    "alias W_mb.bias": ("gpt2", ALIAS + "0.W_mb.bias"),
    "alias layer weight": ("llama", ALIAS + "0.layer.self_attn.k_proj.weight"),
    "model-side layer weight": ("gpt2", LAYERS["gpt2"] + "1.layer.attn.c_attn.weight"),
    "tied embedding": ("gpt2", "memory_cell.model.lm_head.weight"),
}


@pytest.mark.parametrize("case", list(CONFLICTS))
def test_names_of_one_tensor_that_differ_are_refused(case):
    name, key = CONFLICTS[case]
    ref = build(ReferenceARMT, name, n_heads=2)
    sd = dict(published_wrapper(ref).state_dict())
    sd[key] = _nudged(sd[key])
    fast = FastARMT(DECODERS[name](), 3, 8, d_mem=32, n_heads=2)
    before = _snapshot(fast)
    with pytest.raises(ValueError, match=rf"state_dict: .*{key.replace('.', '[.]')}.*hold different values"):
        fast.load_reference_state_dict(sd)
    _assert_unchanged(fast, before)


@pytest.mark.parametrize(
    "extra",
    [
        ALIAS + "0.W_extra.weight",  # a parameter the published layer wrapper does not have
        ALIAS + "2.W_mq.weight",  # a layer the model does not have (2 layers)
        ALIAS + "0.layer.attn.extra.weight",  # a wrapped-layer key the decoder layer does not have
        ALIAS + "first.W_mq.weight",  # no layer index
        "memory_cell.other.weight",
    ],
)
def test_unknown_keys_are_refused_by_name(extra):
    ref = build(ReferenceARMT, "gpt2", n_heads=2)
    sd = dict(published_wrapper(ref).state_dict())
    sd[extra] = torch.zeros(2, 32)
    fast = FastARMT(DECODERS["gpt2"](), 3, 8, d_mem=32, n_heads=2)
    before = _snapshot(fast)
    with pytest.raises(ValueError, match=rf"unknown keys \['{extra.replace('.', '[.]')}'\]"):
        fast.load_reference_state_dict(sd)
    _assert_unchanged(fast, before)


def test_missing_and_misshapen_keys_are_refused_before_loading():
    ref = build(ReferenceARMT, "llama", n_heads=2)
    full = published_wrapper(ref).state_dict()
    fast = FastARMT(DECODERS["llama"](), 3, 8, d_mem=32, n_heads=2)
    before = _snapshot(fast)
    # both names of a tensor dropped: missing, named by our key
    sd = {k: v for k, v in full.items() if not k.endswith("1.W_mk.weight")}
    with pytest.raises(ValueError, match=r"missing keys \['assoc\.1\.W_mk\.weight'\]"):
        fast.load_reference_state_dict(sd)
    sd = {k: v for k, v in full.items() if not k.endswith("0.layer.mlp.up_proj.weight")}
    with pytest.raises(ValueError, match=r"missing keys \['model\.layers\.0\.mlp\.up_proj\.weight'\]"):
        fast.load_reference_state_dict(sd)
    # a backbone weight of the wrong shape (after the other keys would have loaded)
    sd = dict(full)
    sd["memory_cell.model.model.norm.weight"] = torch.ones(7)
    with pytest.raises(ValueError, match=r"memory_cell\.model\.model\.norm\.weight has shape \(7,\), expected"):
        fast.load_reference_state_dict(sd)
    _assert_unchanged(fast, before)


def test_published_state_dict_over_a_peft_model():
    """The published wrapper around a PeftModel: the aliases are ``memory_cell.layers.<l>.layer.<peft keys>``;
    either name alone loads, and both."""
    peft = pytest.importorskip("peft")
    from armt_helpers import randomize_memory

    def lora(seed):
        torch.manual_seed(seed)
        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        p = peft.get_peft_model(DECODERS["llama"](), cfg)
        with torch.no_grad():
            for n, q in p.named_parameters():
                if "lora_B" in n:
                    q.normal_()
        return p

    src = FastARMT(lora(0), 3, 8, d_mem=32)
    randomize_memory(src)
    sd = published_wrapper(src).state_dict()
    assert ALIAS + "0.layer.self_attn.q_proj.lora_A.default.weight" in sd
    x = ids(2, 20)
    layers = "memory_cell.model.base_model.model.model.layers."
    for drop in (layers, ALIAS):  # only memory_cell.layers.*, only memory_cell.model.*
        dst = FastARMT(lora(5), 3, 8, d_mem=32)
        dst.load_reference_state_dict({k: v for k, v in sd.items() if not k.startswith(drop)})
        with torch.no_grad():
            assert_close(dst(x).logits, src(x).logits, tol=1e-6, name="dst(x).logits")
    dst = FastARMT(lora(5), 3, 8, d_mem=32)
    dst.load_reference_state_dict(sd)
    with torch.no_grad():
        assert_close(dst(x).logits, src(x).logits, tol=1e-6, name="dst(x).logits")
