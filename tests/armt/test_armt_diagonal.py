"""The anti-diagonal schedule is exact: FastARMT(diagonal=True) equals the sequential schedule (and so
ReferenceARMT) in fp32: logits, loss, final A and z and every gradient, in training, at batch > 1, with
padding masks and a short last segment; the state dict does not depend on the schedule."""

import copy

import pytest
import torch
from armt_helpers import assert_equivalent, build, ids, pair, randomize_memory
from models import DECODERS, assert_grads_equal
from numerics import TOL, assert_close

from rmt_fast import FastARMT, ReferenceARMT
from rmt_fast.armt import schedule

LAYERS = {"gpt2": "n_layer", "llama": "num_hidden_layers", "qwen2": "num_hidden_layers"}


def _deeper(model, n_layers):
    """The tiny test model's architecture with n_layers layers (fresh weights)."""
    config = model.config.to_dict()
    config.pop("layer_types", None)
    config[LAYERS[config["model_type"]]] = n_layers
    return type(model)(type(model.config)(**config))


def _pair(name, n_layers=4, **kw):
    """(sequential, diagonal) FastARMT over copies of one backbone with n_layers layers."""
    torch.manual_seed(0)
    base = _deeper(DECODERS[name](), n_layers)
    seq = FastARMT(copy.deepcopy(base), kw.pop("m", 3), kw.pop("size", 8), **{"d_mem": 32, **kw})
    randomize_memory(seq)
    diag = copy.deepcopy(seq)
    diag.diagonal = True
    return seq, diag


@pytest.mark.parametrize("n,L", [(1, 1), (1, 4), (3, 3), (5, 2), (2, 6), (32, 8)])
def test_schedules_run_every_cell_after_its_inputs(n, L):
    schedule.check_order(schedule.sequential(n, L), n, L)
    steps = schedule.diagonal(n, L)
    schedule.check_order(steps, n, L)
    assert len(steps) == n + L - 1
    assert max(len(segs) for _, segs in steps) == min(n, L)


def test_check_order_catches_a_bad_order():
    steps = schedule.diagonal(3, 3)
    with pytest.raises(AssertionError, match="before its"):
        schedule.check_order([steps[1], steps[0]] + steps[2:], 3, 3)
    with pytest.raises(AssertionError, match="never run"):
        schedule.check_order(steps[:-1], 3, 3)


@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen2"])
@pytest.mark.parametrize("n_heads", [1, 2])
def test_diagonal_equals_sequential(name, n_heads):
    seq, diag = _pair(name, n_heads=n_heads)
    x = ids(2, 45)  # 6 segments over 4 layers, the last one short
    assert_equivalent(seq, diag, dict(input_ids=x, labels=x))


@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen2"])
def test_diagonal_float64(name):
    """In float64, with few memory features (d_mem = 8, where fp32 rounding is amplified): 1e-10."""
    seq, diag = _pair(name, n_heads=2, d_mem=8)
    seq.double(), diag.double()
    x = ids(2, 45)
    mask = torch.ones_like(x)
    mask[0, :11] = 0
    mask[1, 20] = 0
    assert_equivalent(
        seq, diag, dict(input_ids=x, attention_mask=mask, labels=x.masked_fill(mask == 0, -100)), tol=TOL[torch.float64]
    )


@pytest.mark.parametrize("length", [5, 16, 19])  # fewer segments than layers, exactly 2, a short last one
def test_diagonal_few_segments(length):
    seq, diag = _pair("llama", n_heads=2)
    x = ids(1, length)
    assert_equivalent(seq, diag, dict(input_ids=x, labels=x))


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_diagonal_padding_masks(name):
    seq, diag = _pair(name, n_heads=2)
    x = ids(3, 37)
    mask = torch.ones_like(x)
    mask[0, :11] = 0  # left padding over more than a segment
    mask[1, 30:] = 0  # right padding
    mask[2, 12] = 0  # a hole: that segment's layout is a token mask, the others' are runs or plain
    labels = x.masked_fill(mask == 0, -100)
    assert_equivalent(seq, diag, dict(input_ids=x, attention_mask=mask, labels=labels))


@pytest.mark.slow
@pytest.mark.parametrize("options", [dict(bptt_depth=1), dict(use_denom=False), dict(correction=False)])
def test_diagonal_options(options):
    seq, diag = _pair("qwen2", n_heads=2, **options)
    x = ids(2, 40)
    assert_equivalent(seq, diag, dict(input_ids=x, labels=x))


@pytest.mark.slow
def test_diagonal_streaming_and_labels_mask():
    seq, diag = _pair("gpt2", n_heads=2)
    x = ids(2, 30)
    state = seq(ids(2, 16, seed=7)).memory_state.detach()
    labels_mask = torch.rand(x.shape, generator=torch.Generator().manual_seed(3)) < 0.5
    assert_equivalent(seq, diag, dict(input_ids=x, labels=x, labels_mask=labels_mask, memory_state=state))


def test_diagonal_matches_reference():
    ref, diag = pair("llama", n_heads=2, fast_kw=dict(diagonal=True))
    x = ids(2, 27)
    assert_equivalent(ref, diag, dict(input_ids=x, labels=x))


@pytest.mark.slow
def test_diagonal_gradient_checkpointing():
    seq, diag = _pair("llama", n_heads=2)
    diag.gradient_checkpointing = True
    x = ids(2, 30)
    assert_equivalent(seq, diag, dict(input_ids=x, labels=x))


def test_diagonal_no_grad_and_generate():
    seq, diag = _pair("gpt2", n_heads=2)
    x = ids(2, 30)
    with torch.no_grad():
        a, b = seq(x, labels=x, return_logits=False), diag(x, labels=x, return_logits=False)
    assert b.logits is None
    assert_close(b.loss, a.loss, tol=1e-6, name="loss")  # ~log(96): tighter than the old 1e-5 absolute
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(seq.generate(x, **kw), diag.generate(x, **kw))


def test_state_dict_does_not_depend_on_the_schedule(tmp_path):
    seq, diag = _pair("llama")
    a, b = seq.state_dict(), diag.state_dict()
    assert list(a) == list(b) and all(a[k].shape == b[k].shape for k in a)
    diag.save_pretrained(tmp_path)
    loaded = FastARMT.from_pretrained(tmp_path, diagonal=False)
    x = ids(1, 30)
    assert_close(loaded(x).logits, diag(x).logits, tol=1e-6, name="logits after loading")  # was atol 1e-5
    ref = ReferenceARMT.from_pretrained(tmp_path)  # a schedule-free checkpoint: the reference loads it too
    assert_close(ref(x).logits, diag(x).logits, tol=1e-6, name="reference logits")


@pytest.mark.slow
def test_one_training_step_matches():
    """An optimizer step on each gives the same parameters (training through the schedule)."""
    seq, diag = _pair("gpt2", n_heads=2)
    x = ids(2, 30)
    for armt in (seq, diag):
        opt = torch.optim.SGD(armt.parameters(), lr=0.1)
        armt(x, labels=x).loss.backward()
        opt.step()
    assert_grads_equal(seq, diag)
    for (k, p), q in zip(seq.named_parameters(), diag.parameters()):
        assert_close(p, q, dtype=torch.float32, name=k)


def test_diagonal_build_helper():
    armt = build(FastARMT, "gpt2", diagonal=True)
    assert armt.diagonal


@pytest.mark.slow
def test_compile_step():
    """compile_step compiles the per-step cell function (dynamo with the eager backend: no compiler on CI)."""
    seq, diag = _pair("llama", n_layers=2, n_heads=2)
    comp = copy.deepcopy(diag)
    comp._compile_kwargs = {"backend": "eager", "dynamic": False}
    x = ids(2, 27)
    assert_equivalent(diag, comp, dict(input_ids=x, labels=x))
    assert comp._compiled is not None
