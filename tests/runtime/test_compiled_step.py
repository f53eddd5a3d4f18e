"""FastRMT(compile_step=...): the per-segment step under torch.compile equals eager FastRMT and ReferenceRMT.

Judged against a float64 ReferenceRMT: every compared quantity of the compiled fp32 model is within 1e-5 of the
float64 one (relative), or within twice the error of eager fp32 FastRMT where fp32 itself is ill-conditioned
(BERT's memory gradient passes through the embedding LayerNorm's backward, ~3e-4 in fp32 eager already).
CPU, SDPA backend; inductor compiles (compile_step=True) only where the compiler itself is under test."""

import copy
import os
from pathlib import Path

import compile_diag as diag
import pytest
import torch
from models import CLS, SEP, VOCAB, bert_cls, gpt2, llama, run
from numerics import TOL, assert_close, rel_err

import rmt_fast.attention as seam
from rmt_fast import FastRMT, ReferenceRMT
from rmt_fast.compiled import CompiledStep, compile_options


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


def _check_against_float64(name, got, eager, want):
    """``got`` (compiled) within TOL[float32] of the float64 ``want``, or within twice eager fp32's own error;
    relative to ||want|| with an absolute floor of 1e-6 (a gradient zero in exact arithmetic)."""
    bound = max(TOL[torch.float32], 2 * rel_err(eager, want, floor=1e-6))
    assert_close(got, want, tol=bound, floor=1e-6, name=name)


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
            _check_against_float64(name, getattr(c, name), getattr(e, name), getattr(want, name))
            assert_close(getattr(c, name), getattr(e, name), dtype=torch.float32, name=name)  # compiled = eager
    ref_params = dict(ref64.named_parameters())
    eager_params = dict(eager.named_parameters())
    checked = 0
    for name, p in compiled.named_parameters():
        q = ref_params[name]
        if q.grad is None:
            assert p.grad is None or not p.grad.any(), name
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        _check_against_float64(name, p.grad, eager_params[name].grad, q.grad)
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
        assert_close(getattr(b, name), getattr(a, name), dtype=torch.float32, name=name)


def test_options_and_bad_values():
    assert compile_options(False) is None and compile_options(None) is None
    assert compile_options(True) == {"dynamic": False}
    assert compile_options({"mode": "max-autotune"}) == {"mode": "max-autotune", "dynamic": False}
    # inside the runner's CUDA graph, inductor must not capture graphs of its own
    assert compile_options({"mode": "max-autotune"}, cuda_graph=True)["mode"] == "max-autotune-no-cudagraphs"
    assert "mode" not in compile_options({"mode": "reduce-overhead", "dynamic": True}, cuda_graph=True)
    model = gpt2()
    for bad, match in (
        ("yes", "compile_step must be"),
        ({"mode": "fastest"}, "torch.compile rejects"),
        ({"backend": "no-such-backend"}, "torch.compile rejects"),
        ({"fullgraph": True, "bogus": 1}, "torch.compile rejects"),
    ):
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
    assert_close(b.loss, a.loss, dtype=torch.float32, name="loss")
    assert_close(b.memory_state, a.memory_state, dtype=torch.float32, name="memory")


# ----------------------------------------------------- the GPU test's shape, each run against float64
def _compiled_against_float64(model, device, dtype, backend="inductor"):
    """tests/compile_diag.py at the GPU test's shape (auto backend, m = 3, segments of 64, 2 x 160 tokens: three
    segments, one short): eager and ``backend``-compiled FastRMT each against a float64 run of the same weights.
    Returns the result and what the compiled run gets wrong: the quantities (memory, logits, loss, worst
    gradient, each segment's memory and logits) whose error against float64 exceeds
    ``max(4 x eager's own error, TOL[dtype])``. Compiled vs eager directly is no test: it hinges on how far the
    low-precision eager run itself is off."""
    result = diag.diagnose(model, device, dtype, backends=(backend,))
    return result, diag.failures(result["variants"][backend], result["variants"]["eager"], dtype)


def _plant_mask_drop(monkeypatch):
    """A planted compile-only bug: while torch.compile traces, a padded segment's SDPA call loses its mask (the
    padded key slots become visible). Eager runs are untouched."""
    from rmt_fast.kernels.layout import SegmentLayout

    real = seam.sdpa_rmt_attention

    def planted(q, k, v, layout, *, mask=None, **kw):
        if torch.compiler.is_compiling() and layout.is_padded:
            layout = SegmentLayout(layout.num_read, layout.num_tokens, layout.num_write, layout.causal)
            mask = None
        return real(q, k, v, layout, mask=mask, **kw)

    monkeypatch.setattr(seam, "sdpa_rmt_attention", planted)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("model", ["llama", "bert_cls"])
def test_inductor_step_on_cpu_against_float64(model, dtype):
    """Inductor on the CPU (C++ codegen), at the GPU test's shape, with the GPU test's check. Measured (torch
    2.13 CPU, final memory vs float64, eager / inductor): llama fp32 1.25e-7 / 1.18e-7, bf16 4.45e-3 / 4.44e-3,
    fp16 9.11e-4 / 8.09e-4; bert_cls fp32 1.50e-7 / 1.51e-7, bf16 9.14e-3 / 9.25e-3, fp16 1.05e-3 / 1.17e-3
    (docs/testing.md has the table): no compile effect on the CPU."""
    result, bad = _compiled_against_float64(model, "cpu", dtype)
    assert not bad, diag.table(result)
    if dtype == torch.float32:
        errors = result["variants"]["inductor"]
        assert all(errors[k] <= TOL[torch.float32] for k in ("memory", "logits", "loss")), diag.table(result)
        # gradients carry the rounding of three segments' backward: ten times the bound
        assert errors["grad"] <= 10 * TOL[torch.float32], diag.table(result)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_the_float64_check_catches_a_planted_compile_bug(monkeypatch, backend):
    """The GPU test's comparison fails for a real compile bug: with the planted mask drop (compiled runs only)
    the padded segment's memory (llama: the last, short segment) and the final memory are flagged, the full
    segments before it are not."""
    _plant_mask_drop(monkeypatch)
    result, bad = _compiled_against_float64("llama", "cpu", torch.float32, backend)
    assert "memory" in bad and "segment 2 memory" in bad, diag.table(result)
    assert "segment 0 memory" not in bad and "segment 1 memory" not in bad, diag.table(result)
    assert result["verdict"] == f"compile-bug:{backend}", diag.table(result)


def test_the_h200_mismatch_is_fp16_noise_in_the_memory_gradient():
    """The first CUDA test's failure on the H200 ('AssertionError: memory', 0.0714 llama and 1.656 bert_cls
    against 0.03) was its gradient check, compiled vs eager, of the parameter named ``memory`` (the test at 72a01e2:
    ``assert rel(p.grad, grads[n].grad) <= 3e-2, n``), not the final memory. bert_cls's memory gradient is noise in
    fp16: its float64 norm is 6.5e-5, eager fp16 is 15.5 times that far from it, and two eager fp16 runs one SDPA
    kernel apart differ by 0.33 in it (measured, CPU): far over 0.03, no compiler involved."""
    res = diag.diagnose("bert_cls", "cpu", torch.float16, backends=(), kernels=("sdpa_math",))
    assert res["variants"]["eager"]["memory_grad"] > 1, diag.table(res)
    assert res["eager_vs_eager"]["eager+sdpa_math"]["memory_grad"] > 0.03, diag.table(res)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["llama", "bert_cls"])
def test_the_h200_mismatch_reproduces_on_cpu_as_fp16_rounding(model):
    """On the CPU, inductor vs eager fp16 differ in the memory gradient by 0.047 (llama) and 1.33 (bert_cls),
    like the H200's 0.0714 and 1.656: the first CUDA test's 0.03 fails here too. Against float64 the compiled run
    is as far off as eager (memory gradient: llama 0.046 vs 0.052, bert_cls 20.9 vs 15.5): fp16-effect."""
    result, bad = _compiled_against_float64(model, "cpu", torch.float16)
    assert result["compiled_vs_eager"]["inductor"]["memory_grad"] > 0.03, diag.table(result)
    assert not bad and result["verdict"] == "fp16-effect", diag.table(result)


@pytest.mark.gpu
@pytest.mark.parametrize("model", ["bert_cls", "llama"])
def test_compiled_step_on_cuda_auto_backend(model, tmp_path):
    """fp16 on CUDA with the auto backend: eager and compiled (inductor) FastRMT each against a float64 run of
    the same weights on the same GPU; every quantity of the compiled run (memory, logits, loss, worst gradient,
    and each segment's memory and logits) within max(4 x eager fp16's own error, TOL[fp16]). On a failure (or
    with RMT_FAST_COMPILE_DIAG=1) tests/compile_diag.py adds Dynamo alone, aot_eager and the SDPA kernels
    forced, and writes its JSON (verdict: fp16-effect, compile-bug:<stage>, ...) to $RMT_FAST_DIAG_DIR
    (benchmarks/device_check.sh: the results folder's compile_diag/) or the test's tmp_path, after every run (the
    compile_tests step's 50 s limit may stop it: the stages come first, the forced kernels last). With
    $RMT_FAST_DIAG_DIR set, a passing run writes its eager and inductor numbers there too (no extra runs).

    The first version of this test compared compiled with eager directly and failed on the H200 in the memory
    parameter's gradient (0.0714 llama, 1.656 bert_cls, bound 0.03): fp16 noise, which the CPU reproduces
    (test_the_h200_mismatch_reproduces_on_cpu_as_fp16_rounding)."""
    result, bad = _compiled_against_float64(model, "cuda", torch.float16)
    out = Path(os.environ.get("RMT_FAST_DIAG_DIR") or tmp_path) / f"compile_diag-{model}-float16.json"
    if bad or os.environ.get("RMT_FAST_COMPILE_DIAG") == "1":
        result = diag.diagnose(model, "cuda", torch.float16, kernels=CUDA_DIAG_KERNELS, reuse=result, out=out)
        print(diag.table(result), f"\n-> {out}")
    elif os.environ.get("RMT_FAST_DIAG_DIR"):
        diag.write(result, out)
    assert not bad, f"{bad}\n{diag.table(result)}"


CUDA_DIAG_KERNELS = ("sdpa_math", "sdpa_efficient")  # the kernels a masked fp16 call with head dim 8 can take


@pytest.mark.parametrize(
    "device,dtype",
    [
        pytest.param("cpu", torch.bfloat16),
        pytest.param("cuda", torch.float16, marks=pytest.mark.gpu),
        pytest.param("cuda", torch.float32, marks=pytest.mark.gpu),
    ],
    ids=["cpu-bf16", "cuda-fp16", "cuda-fp32"],
)
def test_compiled_sdpa_with_the_padded_segment_mask(device, dtype):
    """The one attention call of a padded segment, alone: SDPA with the layout's boolean mask (70 keys, not a
    multiple of 8; broadcast over heads) under inductor equals eager, against float64. Isolates inductor's
    lowering of SDPA with a mask from the rest of the step."""
    from rmt_fast.kernels.layout import SegmentLayout
    from rmt_fast.kernels.sdpa_attention import sdpa_rmt_attention

    torch._dynamo.reset()
    g = torch.Generator(device=device).manual_seed(0)
    B, H, T, D = 2, 4, 70, 8
    q, k, v = (torch.randn(B, H, T, D, device=device, dtype=torch.float64, generator=g) for _ in range(3))
    for causal in (False, True):
        counts = torch.tensor([64, 32], dtype=torch.int32, device=device)
        layout = SegmentLayout(3, 64, 3, causal, counts)
        want = sdpa_rmt_attention(q, k, v, layout)
        low = [t.to(dtype) for t in (q, k, v)]
        eager = sdpa_rmt_attention(*low, layout)
        got = torch.compile(lambda a, b, c, lay=layout: sdpa_rmt_attention(a, b, c, lay), dynamic=False)(*low)
        # within 3x eager's own error against float64 (+1e-3: eager may be all but exact)
        assert_close(got, want, tol=3 * rel_err(eager, want) + 1e-3, name=f"compiled, causal={causal}")
        torch._dynamo.reset()
