"""Bad input to FastARMT and ReferenceARMT: FastRMT's rules (the decoder cases of tests/bad_inputs.py), the ARMT memory
state, and the constructor's checks; every error is raised before the backbone runs."""

import pytest
import torch
from armt_helpers import build, ids
from bad_inputs import DECODER_CASES, _expect_error
from models import DECODERS, bert_cls, mistral

from rmt_fast import ARMTMemoryState, FastARMT, ReferenceARMT

WRAPPERS = [FastARMT, ReferenceARMT]
CASES = {k: v for k, v in DECODER_CASES.items() if not k.startswith("memory_state")}


@pytest.fixture(params=WRAPPERS, ids=lambda c: c.__name__)
def armt(request):
    return build(request.param, "gpt2", m=2, size=6, d_mem=8)


@pytest.mark.parametrize("case", list(CASES))
def test_forward_rejects(armt, case):
    inputs, match = CASES[case]
    _expect_error(armt, lambda: armt(**inputs), match)


@pytest.mark.parametrize("case", ["id >= vocab", "negative id", "batch size 0", "attention_mask 2s"])
def test_generate_rejects(armt, case):
    inputs, match = CASES[case]
    _expect_error(armt, lambda: armt.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0), match)


def _state(armt, b=2):
    return armt.mem_shape.zeros(armt.n_layers, b, torch.float32, "cpu")


def test_memory_state_checks(armt):
    x = ids(2, 12)
    good = _state(armt)
    cases = [
        (good.A, "memory_state must be an ARMTMemoryState"),
        (ARMTMemoryState(good.A[:1], good.z), r"memory_state.A must have shape \(2, 2, 1, 48, 32\)"),
        (ARMTMemoryState(good.A, good.z[:, :1]), r"memory_state.z must have shape \(2, 2, 1, 48\)"),
        (_state(armt, 1), r"memory_state.A must have shape"),
        (ARMTMemoryState(good.A.double(), good.z), "memory_state.A must have dtype torch.float32"),
        (
            ARMTMemoryState(good.A, good.z.clone().index_fill_(3, torch.tensor([2]), float("nan"))),
            "memory_state holds a non-finite value",
        ),
        (ARMTMemoryState(good.A.clone().fill_(float("inf")), good.z), "memory_state holds a non-finite value"),
    ]
    for state, match in cases:
        _expect_error(armt, lambda state=state: armt(x, memory_state=state), match)
    armt(x, memory_state=good)  # the good one runs


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(d_mem=0), "d_mem must be a positive int divisible by n_heads=1"),
        (dict(d_mem=6, n_heads=4), "d_mem must be a positive int divisible by n_heads=4"),
        (dict(d_mem=6, n_heads=3), "n_heads=3 must divide the model's hidden size 32"),
        (dict(d_mem=8, n_heads=0), "n_heads must be a positive int"),
        (dict(d_mem=8, use_denom=1), "use_denom must be True or False"),
        (dict(d_mem=8, correction=None), "correction must be True or False"),
        (dict(d_mem=8, bptt_depth=-2), "bptt_depth must be -1"),
        (dict(d_mem=8, attn_backend="flash"), "attn_backend must be one of"),
    ],
)
@pytest.mark.parametrize("cls", WRAPPERS)
def test_constructor_rejects(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(DECODERS["gpt2"](), 2, 6, **kwargs)


@pytest.mark.parametrize("cls", WRAPPERS)
def test_constructor_rejects_models_and_sizes(cls):
    with pytest.raises(ValueError, match="ARMT supports the decoders"):
        cls(bert_cls(), 2, 6, d_mem=8)
    with pytest.raises(ValueError, match="num_mem_tokens must be an int >= 1"):
        cls(DECODERS["gpt2"](), 0, 6, d_mem=8)
    with pytest.raises(ValueError, match=r"segment_size \+ 1 \* num_mem_tokens = 130 exceeds"):
        cls(DECODERS["gpt2"](), 2, 128, d_mem=8)
    cls(DECODERS["gpt2"](), 2, 126, d_mem=8)  # 126 + 2 = 128 positions fit


def test_fast_only_options():
    for kwargs, match in (
        (dict(diagonal=1), "diagonal must be True or False"),
        (dict(cuda_graph="yes"), "cuda_graph must be True or False"),
        (dict(gradient_checkpointing="yes"), "gradient_checkpointing must be True or False"),
        (dict(compile_step=3), "compile_step must be False, True or a dict"),
    ):
        with pytest.raises(ValueError, match=match):
            FastARMT(DECODERS["gpt2"](), 2, 6, d_mem=8, **kwargs)
    with pytest.raises(ValueError, match="sliding window of 4 positions"):
        FastARMT(mistral(sliding_window=4), 2, 6, d_mem=8)


def test_wrapped_projections_are_refused():
    """A projection FastARMT cannot read (a subclass standing in for a quantized linear) is an error, not dropped."""
    model = DECODERS["llama"]()

    class Wrapped(torch.nn.Linear):
        pass

    old = model.model.layers[1].self_attn.v_proj
    model.model.layers[1].self_attn.v_proj = Wrapped(old.in_features, old.out_features, bias=False)
    with pytest.raises(ValueError, match="layer 1's self_attn.v_proj is a Wrapped, not a plain Linear"):
        FastARMT(model, 2, 6, d_mem=8)
    ReferenceARMT(model, 2, 6, d_mem=8)  # the reference runs transformers' own layers
