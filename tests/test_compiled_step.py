"""FastRMT(compile_step=...): the per-segment step under torch.compile equals eager FastRMT and ReferenceRMT.

Judged against a float64 ReferenceRMT: every compared quantity of the compiled fp32 model is within 1e-5 of the
float64 one (relative), or within twice the error of eager fp32 FastRMT where fp32 itself is ill-conditioned
(BERT's memory gradient passes through the embedding LayerNorm's backward, ~3e-4 in fp32 eager already).
CPU, SDPA backend; inductor compiles (compile_step=True) only where the compiler itself is under test."""

import copy

import pytest
import torch
from models import CLS, SEP, VOCAB, bert_cls, gpt2, llama, rel, run

import rmt_fast.attention as seam
from rmt_fast import FastRMT, ReferenceRMT
from rmt_fast.compiled import CompiledStep, compile_options

TOL = 1e-5


def _ids(b, t, seed=3):
    return torch.randint(3, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def _models(factory, compile_step, m=3, size=6, **kw):
    """float64 ReferenceRMT, eager FastRMT and compiled FastRMT over one backbone and memory."""
    torch.manual_seed(0)
    base = factory()
    ref64 = ReferenceRMT(copy.deepcopy(base), m, size, **kw).double()
    eager = FastRMT(copy.deepcopy(base), m, size, attn_backend="sdpa", **kw)
    compiled = FastRMT(copy.deepcopy(base), m, size, attn_backend="sdpa", compile_step=compile_step, **kw)
    with torch.no_grad():
        eager.memory.copy_(ref64.memory)
        compiled.memory.copy_(ref64.memory)
    return ref64, eager, compiled


def _err(a, b) -> float:
    return (a.double() - b.double()).norm().item()


def _assert_close(name, got, eager, want):
    """``got`` (compiled) within TOL of the float64 ``want``, or within twice eager fp32's own error."""
    scale = max(want.double().norm().item(), 1e-6)  # a gradient zero in exact arithmetic: an absolute floor
    bound = max(TOL * scale, 2 * _err(eager, want))
    assert _err(got, want) <= bound, (name, _err(got, want) / scale, _err(eager, want) / scale)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch (dynamo's per-code recompile limit would otherwise let a later model run
    eagerly, unnoticed)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def _check(ref64, eager, compiled, inputs):
    want, e = run(ref64, inputs), run(eager, inputs)
    before = _graphs()
    c = run(compiled, inputs)
    assert _graphs() > before  # the compiled step really ran compiled
    for name in ("loss", "logits", "memory_state"):
        assert (getattr(c, name) is None) == (getattr(e, name) is None), name
        if getattr(c, name) is not None:
            _assert_close(name, getattr(c, name), getattr(e, name), getattr(want, name))
            assert rel(getattr(c, name), getattr(e, name)) <= TOL, name  # forward: compiled equals eager
    ref_params = dict(ref64.named_parameters())
    eager_params = dict(eager.named_parameters())
    checked = 0
    for name, p in compiled.named_parameters():
        q = ref_params[name]
        if q.grad is None:
            assert p.grad is None or not p.grad.any(), name
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        _assert_close(name, p.grad, eager_params[name].grad, q.grad)
        checked += 1
    assert checked == len(ref_params)


def _step_name(rmt):
    return "decoder_step" if rmt.is_decoder else "encoder_step"


@pytest.mark.parametrize("factory", [gpt2, llama])
def test_decoder_compiled_step_equals_eager_and_reference(factory):
    ref64, eager, compiled = _models(factory, True)
    ids = _ids(2, 15)  # segments of 6: 6, 6 and a short 3 (a padded segment: counts)
    _check(ref64, eager, compiled, dict(input_ids=ids, labels=ids))


def test_encoder_compiled_step_equals_eager_and_reference():
    ref64, eager, compiled = _models(bert_cls, True, cls_token_id=CLS, sep_token_id=SEP)
    ids = _ids(2, 15)  # right-aligned: a short first segment, then two full ones
    _check(ref64, eager, compiled, dict(input_ids=ids, labels=torch.tensor([0, 2])))


def test_compiled_step_with_gradient_checkpointing():
    ref64, eager, compiled = _models(gpt2, {"backend": "aot_eager"})
    compiled.gradient_checkpointing = True
    ids = _ids(2, 18)
    _check(ref64, eager, compiled, dict(input_ids=ids, labels=ids, return_logits=False))


def test_compiled_step_in_the_graph_runner_static_buffers():
    """cuda_graph=True on the CPU runs the runner's static-buffer logic eagerly: it calls the compiled step."""
    torch.manual_seed(0)
    base = gpt2()
    eager = FastRMT(copy.deepcopy(base), 3, 6).eval()
    graphed = FastRMT(copy.deepcopy(base), 3, 6, cuda_graph=True, compile_step={"backend": "aot_eager"}).eval()
    graphed.load_state_dict(eager.state_dict())
    ids = _ids(2, 23)
    with torch.no_grad():
        a = eager(ids, labels=ids)
        before = _graphs()
        b = graphed(ids, labels=ids)
    assert _graphs() > before and len(graphed._graphs.steps) == 1
    for name in ("loss", "logits", "memory_state"):
        assert rel(getattr(b, name), getattr(a, name)) <= TOL, name


def test_options_and_bad_values():
    assert compile_options(False) is None and compile_options(None) is None
    assert compile_options(True) == {"dynamic": False}
    assert compile_options({"mode": "max-autotune"}) == {"mode": "max-autotune", "dynamic": False}
    # inside the runner's CUDA graph, inductor must not capture graphs of its own
    assert compile_options({"mode": "max-autotune"}, cuda_graph=True)["mode"] == "max-autotune-no-cudagraphs"
    assert "mode" not in compile_options({"mode": "reduce-overhead", "dynamic": True}, cuda_graph=True)
    model = gpt2()
    for bad, match in (("yes", "compile_step must be"), ({"mode": "fastest"}, "torch.compile rejects"),
                       ({"backend": "no-such-backend"}, "torch.compile rejects"),
                       ({"fullgraph": True, "bogus": 1}, "torch.compile rejects")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            FastRMT(model, 3, 6, compile_step=bad)
        assert model.config._attn_implementation != seam.ATTN_NAME  # nothing touched before the error


def test_copies_compile_their_own_step():
    rmt = FastRMT(gpt2(), 3, 6, compile_step={"backend": "eager"})
    ids = _ids(1, 12)
    rmt(ids)
    twin = copy.deepcopy(rmt)
    assert isinstance(twin.decoder_step, CompiledStep) and twin.decoder_step._rmt is twin
    assert twin.decoder_step._fn is None and rmt.decoder_step._fn is not None
    assert torch.equal(twin(ids).logits, rmt(ids).logits)


@pytest.mark.parametrize("backend", ["sdpa", "auto"])
@pytest.mark.parametrize("factory,kw", [(gpt2, {}), (llama, {}), (bert_cls, dict(cls_token_id=CLS, sep_token_id=SEP))])
def test_step_is_one_graph(factory, kw, backend):
    """The seam is traceable (rmt_fast.attention keeps the active segment in a thread-local, not a ContextVar;
    the Triton module is imported by the constructor, not inside the step; 'auto' logs its fall-back reason
    only outside tracing), so the whole step (embeddings, every layer, attention, the loss) compiles with
    fullgraph=True: no graph break of our own."""
    seam._TRITON_MODULE.clear()  # as in a fresh process: the constructor must resolve the backend module
    torch.manual_seed(0)
    eager = FastRMT(factory(), 3, 6, attn_backend=backend, **kw)
    assert bool(seam._TRITON_MODULE) == (backend != "sdpa")  # resolved eagerly, never inside a compiled step
    compiled = copy.deepcopy(eager)
    name = _step_name(eager)
    setattr(compiled, name, CompiledStep(compiled, name, {"backend": "eager", "fullgraph": True, "dynamic": False}))
    ids = _ids(2, 15)
    labels = ids if eager.is_decoder else torch.tensor([1, 0])
    a, b = eager(ids, labels=labels), compiled(ids, labels=labels)
    b.loss.backward()
    assert _graphs() >= 1
    assert rel(b.loss, a.loss) <= TOL and rel(b.memory_state, a.memory_state) <= TOL


@pytest.mark.gpu
@pytest.mark.parametrize("factory,kw", [(llama, {}), (bert_cls, dict(cls_token_id=CLS, sep_token_id=SEP))])
def test_compiled_step_on_cuda_auto_backend(factory, kw):
    """fp16 on CUDA with the auto backend (the Triton kernel where dispatch picks it): compiled equals eager
    within fp16 tolerance, forward and gradients."""
    torch.manual_seed(0)
    eager = FastRMT(factory(), 3, 64, **kw).cuda().half()
    compiled = copy.deepcopy(eager)
    name = _step_name(eager)
    setattr(compiled, name, CompiledStep(compiled, name, {"dynamic": False}))
    ids = _ids(2, 160).cuda()
    labels = ids if eager.is_decoder else torch.tensor([1, 0], device="cuda")
    a, b = run(eager, dict(input_ids=ids, labels=labels)), run(compiled, dict(input_ids=ids, labels=labels))
    assert rel(b.memory_state, a.memory_state) <= 1e-2 and abs(b.loss.item() - a.loss.item()) <= 1e-2
    grads = dict(eager.named_parameters())
    for n, p in compiled.named_parameters():
        if grads[n].grad is not None and grads[n].grad.float().norm() > 1e-3:
            assert rel(p.grad, grads[n].grad) <= 3e-2, n
