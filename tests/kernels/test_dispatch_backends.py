"""The dispatch table races every backend (format rmt-fast-dispatch/2): an entry names the Triton kernel, SDPA
choosing its kernel, one SDPA kernel forced (sdpa_flash, sdpa_efficient, sdpa_cudnn) or FlexAttention, and
attn_backend='auto' runs exactly that one, eager, graphed and in training. A table of the previous format
(rmt-fast-dispatch/1) still loads.

On the CPU 'auto' never consults the table and SDPA has only its math kernel (and a CPU flash kernel), so these
tests pretend the inputs are on CUDA (the one device check patched) and spy on the seam that forces the SDPA
kernel (kernels/sdpa_attention.py ``_force_kernel``), letting the math kernel compute under it."""

from __future__ import annotations

import contextlib
import copy
import json

import pytest
import torch
import transformers as tf
from models import VOCAB
from numerics import TOL, assert_close
from torch.nn.attention import SDPBackend, sdpa_kernel

from rmt_fast import FastRMT
from rmt_fast import attention as seam
from rmt_fast.kernels import dispatch, sdpa_attention
from rmt_fast.kernels.float64_reference import dense_rmt_attention_reference
from rmt_fast.kernels.layout import SegmentLayout

MODES = [(False, False), (True, False), (False, True), (True, True)]  # (needs_grad, graphed)


def _entry(
    backend,
    *,
    needs_grad=False,
    mode="eager",
    causal=True,
    padded=False,
    dtype="float32",
    head_dim=16,
    t="T<=768",
    bh="BH<=24",
    **extra,
):
    return dict(
        dtype=dtype,
        head_dim=head_dim,
        t_bucket=t,
        bh_bucket=bh,
        causal=causal,
        padded=padded,
        needs_grad=needs_grad,
        mode=mode,
        backend=backend,
        **extra,
    )


def _table(entries, fmt=dispatch.FORMAT):
    return dict(
        format=fmt,
        arch="sm90",
        measured=True,
        devices=["fake"],
        margin=0.03,
        provenance={"tool": "tests", "git_sha": "0"},
        configs=[],
        entries=list(entries),
    )


def _every_case(backend, **kw):
    """The same backend for every small float32 case (causal or not, padded or not, each mode)."""
    return [
        _entry(backend, causal=c, padded=p, needs_grad=g, mode="graphed" if gr else "eager", **kw)
        for c in (True, False)
        for p in (True, False)
        for g, gr in MODES
    ]


@pytest.fixture(autouse=True)
def _auto_as_on_cuda(clean_dispatch_state, monkeypatch):
    """A clean dispatch state (tests/kernels/conftest.py), and 'auto' consults the table as on CUDA."""
    monkeypatch.setattr(seam, "_auto_device_ok", lambda q: True)


@pytest.fixture
def forced(monkeypatch):
    """Spy on the SDPA kernel selection: records each forced kernel list, computes with the math kernel."""
    seen = []

    @contextlib.contextmanager
    def spy(backends):
        seen.append(list(backends))
        with sdpa_kernel([SDPBackend.MATH]):
            yield

    monkeypatch.setattr(sdpa_attention, "_force_kernel", spy)
    return seen


def _qkv(b=2, h=4, hkv=4, t=12, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, t, d, generator=g) for n in (h, hkv, hkv)]


def _layout(causal=True, padded=False):
    counts = torch.tensor([8, 5], dtype=torch.int32) if padded else None
    return (
        SegmentLayout(2, 8, 2, True, token_counts=counts)
        if causal
        else SegmentLayout(0, 12, 0, False, token_counts=counts)
    )


# ------------------------------------------------------------------------------------------------ format
def test_previous_format_still_loads_and_its_sdpa_means_sdpa_choosing(tmp_path):
    old = _table(
        [_entry("triton", triton_ms=0.1, sdpa_ms=0.2), _entry("sdpa", needs_grad=True, triton_ms=0.3, sdpa_ms=0.2)],
        fmt="rmt-fast-dispatch/1",
    )
    path = tmp_path / "sm90.json"
    path.write_text(json.dumps(old))
    table = dispatch.load_table(path)
    assert table.format == dispatch.FORMAT_V1 and table.measured
    cls = dispatch.ShapeClass.of(12, 12, 8, True, False)
    d = table.lookup("float32", 16, cls, needs_grad=False, graphed=False)
    assert d.backend == "triton" and "Triton 0.1 ms, SDPA 0.2 ms" in d.reason
    d = table.lookup("float32", 16, cls, needs_grad=True, graphed=False)
    assert d.backend == "sdpa" and d.configs is None  # plain SDPA, no kernel forced
    q, k, v = _qkv()
    with dispatch.use_table(table):
        assert seam.choose_backend("auto", q, k, v, _layout(), 0.0, needs_grad=True, graphed=False) == "sdpa"


def test_the_format_round_trips(tmp_path):
    times = {"triton": 0.4, "sdpa": 0.5, "sdpa_flash": 0.45, "sdpa_efficient": None, "sdpa_cudnn": 0.3, "flex": 0.6}
    data = _table(
        [
            _entry("sdpa_cudnn", ms=times),
            _entry("flex", mode="graphed", ms={"flex": 0.1, "sdpa": 0.2}),
            _entry("sdpa", needs_grad=True, ms={"sdpa": 0.2}),
        ]
    )
    data["configs"] = [dict(dtype="float32", head_dim=16, fwd=[32, 16, 4, 2])]
    table = dispatch.DispatchTable(data)
    path = tmp_path / "sm90.json"
    path.write_text(json.dumps(table.data))
    again = dispatch.load_table(path)
    assert again.data == data and again.entries == table.entries and again.configs == table.configs
    assert again.format == dispatch.FORMAT
    cls = dispatch.ShapeClass.of(12, 12, 8, True, False)
    d = again.lookup("float32", 16, cls, needs_grad=False, graphed=False)
    assert d.backend == "sdpa_cudnn" and "sdpa_cudnn 0.3 ms, triton 0.4 ms" in d.reason
    assert again.lookup("float32", 16, cls, needs_grad=False, graphed=True).backend == "flex"


# ------------------------------------------------------------------------------------- auto runs that one
@pytest.mark.parametrize("name", ["sdpa_flash", "sdpa_efficient", "sdpa_cudnn"])
@pytest.mark.parametrize("needs_grad, graphed", MODES)
@pytest.mark.parametrize("causal, padded", [(True, False), (False, True)])
def test_auto_runs_the_named_sdpa_kernel_and_equals_the_reference(forced, name, needs_grad, graphed, causal, padded):
    layout = _layout(causal, padded)
    q, k, v = _qkv(hkv=2)  # grouped-query heads: enable_gqa passes through
    mode = "graphed" if graphed else "eager"
    # the case's own entry names `name`; every other mode names plain SDPA
    entries = [
        _entry(
            name if (g, gr) == (needs_grad, graphed) else "sdpa",
            needs_grad=g,
            causal=causal,
            padded=padded,
            mode="graphed" if gr else "eager",
        )
        for g, gr in MODES
    ]
    qg, kg, vg = (t.clone().requires_grad_(needs_grad) for t in (q, k, v))
    with dispatch.use_table(_table(entries)), seam.graphed_step(graphed):
        out = seam.run_backend("auto", qg, kg, vg, layout, scale=None, dropout_p=0.0)
    assert forced == [[sdpa_attention.SDPA_KERNELS[name]]], (mode, forced)
    ref_in = [t.double().requires_grad_(needs_grad) for t in (q, k, v)]
    ref = dense_rmt_attention_reference(*ref_in, layout)
    assert out.shape == ref.shape
    assert_close(out, ref, dtype=torch.float32, name="attention out")
    if needs_grad:
        do = torch.randn_like(out)
        grads = torch.autograd.grad(out, (qg, kg, vg), do)
        ref_grads = torch.autograd.grad(ref, ref_in, do.double())
        for got, want in zip(grads, ref_grads, strict=True):
            assert_close(got, want, dtype=torch.float32, name="attention out")


def test_auto_with_plain_sdpa_forces_no_kernel(forced):
    q, k, v = _qkv()
    with dispatch.use_table(_table(_every_case("sdpa"))):
        seam.run_backend("auto", q, k, v, _layout(), scale=None, dropout_p=0.0)
    with dispatch.use_table(None):
        seam.run_backend("auto", q, k, v, _layout(), scale=None, dropout_p=0.0)
    assert forced == []


def test_a_forced_sdpa_kernel_is_really_forced_on_the_cpu():
    """No spy: the CPU build has a flash kernel, and no efficient one, which must fail rather than fall back."""
    q, k, v = _qkv()
    layout = _layout()
    out = sdpa_attention.sdpa_rmt_attention(q, k, v, layout, sdpa_kernel="sdpa_flash")
    assert_close(out, dense_rmt_attention_reference(q, k, v, layout), dtype=torch.float32, name="attention out")
    with pytest.raises(RuntimeError):
        sdpa_attention.sdpa_rmt_attention(q, k, v, layout, sdpa_kernel="sdpa_efficient")
    with pytest.raises(ValueError, match="sdpa_kernel must be one of"):
        sdpa_attention.sdpa_rmt_attention(q, k, v, layout, sdpa_kernel="cudnn")
    with pytest.raises(ValueError, match="sdpa_kernel must be one of"):
        sdpa_attention.sdpa_kernel_supported("flash", q, k, v, layout)
    assert sdpa_attention.sdpa_kernel_supported("sdpa_cudnn", q, k, v, layout) is None  # not checked off CUDA


def test_a_named_backend_that_cannot_run_the_case_falls_back_to_sdpa(forced, monkeypatch, caplog):
    q, k, v = _qkv()
    monkeypatch.setattr(seam, "sdpa_kernel_supported", lambda name, *a: f"{name} says no")
    with dispatch.use_table(_table(_every_case("sdpa_cudnn"))), caplog.at_level("INFO", logger="rmt_fast.attention"):
        assert seam.choose_backend("auto", q, k, v, _layout(), 0.0) == "sdpa"
    assert "the dispatch table names sdpa_cudnn, which cannot run this case: sdpa_cudnn says no" in caplog.text
    with dispatch.use_table(_table(_every_case("sdpa_cudnn"))):  # the forced backend ignores the table
        assert seam.choose_backend("sdpa", q, k, v, _layout(), 0.0) == "sdpa"
    assert forced == []


def test_auto_runs_flex_where_the_table_names_it(monkeypatch, caplog):
    calls = {"flex": 0, "masks": 0}
    real_flex, real_mask = seam.flex_rmt_attention, seam.flex_block_mask

    def flex(*a, **kw):
        calls["flex"] += 1
        assert kw["block_mask"] is not None  # built once per segment, passed on
        return real_flex(*a, **kw)

    def mask(*a, **kw):
        calls["masks"] += 1
        return real_mask(*a, **kw)

    monkeypatch.setattr(seam, "flex_rmt_attention", flex)
    monkeypatch.setattr(seam, "flex_block_mask", mask)
    q, k, v = _qkv(hkv=2)
    layout = _layout(True, True)
    with dispatch.use_table(_table(_every_case("flex"))), seam.active_segment(layout, "auto") as seg:
        outs = [seam.run_backend("auto", q, k, v, layout, scale=None, dropout_p=0.0, segment=seg) for _ in range(3)]
    assert calls == {"flex": 3, "masks": 1}
    ref = dense_rmt_attention_reference(q, k, v, layout)
    for o in outs:
        assert_close(o, ref, dtype=torch.float32, name="flex out")
    # training on the CPU: FlexAttention has no CPU backward, so 'auto' says so and runs SDPA
    qg = q.clone().requires_grad_(True)
    with dispatch.use_table(_table(_every_case("flex"))), caplog.at_level("INFO", logger="rmt_fast.attention"):
        assert seam.choose_backend("auto", qg, k, v, layout, 0.0) == "sdpa"
        assert seam.choose_backend("auto", q, k, v, layout, 0.1) == "sdpa"
    assert "names flex, which cannot run this case: FlexAttention has no backward on the CPU" in caplog.text
    assert "FlexAttention has no dropout" in caplog.text


def _gpt2():
    cfg = tf.GPT2Config(
        n_layer=3,
        n_embd=64,
        n_head=4,
        vocab_size=VOCAB,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return tf.GPT2LMHeadModel(cfg)


def test_fastrmt_training_runs_the_tables_sdpa_kernel(forced):
    torch.manual_seed(0)
    model = _gpt2()
    auto = FastRMT(copy.deepcopy(model), 2, 6, attn_backend="auto")
    plain = FastRMT(copy.deepcopy(model), 2, 6, attn_backend="sdpa")
    plain.load_state_dict(auto.state_dict())
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))  # 2 segments
    entries = [e for e in _every_case("sdpa_efficient", dtype="float32") if e["needs_grad"]] + [
        e for e in _every_case("sdpa_flash") if not e["needs_grad"]
    ]
    with dispatch.use_table(_table(entries)):
        a = auto(ids, labels=ids)
        a.loss.backward()
        assert forced == [[SDPBackend.EFFICIENT_ATTENTION]] * 6  # 2 segments x 3 layers, each forced
        forced.clear()
        with torch.no_grad():
            auto(ids, labels=ids)
        assert forced == [[SDPBackend.FLASH_ATTENTION]] * 6
    b = plain(ids, labels=ids)
    b.loss.backward()
    assert_close(a.loss, b.loss, tol=1e-6, name="loss")
    for (name, pa), pb in zip(auto.named_parameters(), plain.parameters(), strict=True):
        # the forced memory-efficient SDPA backward against the math one: ten times fp32's bound, as before
        assert_close(pa.grad, pb.grad, tol=10 * TOL[torch.float32], name=name)


@pytest.mark.parametrize("name", ["sdpa_flash", "sdpa_cudnn", "flex"])
def test_the_named_backend_traces_into_one_compiled_graph(forced, name):
    """A compiled segment step (torch.compile, fullgraph: no graph break) runs the table's backend too."""
    q, k, v = _qkv()
    layout = _layout(True, True)
    torch._dynamo.reset()

    def step(q, k, v):
        with seam.active_segment(layout, "auto") as seg:
            return seam.run_backend("auto", q, k, v, layout, scale=None, dropout_p=0.0, segment=seg)

    with dispatch.use_table(_table(_every_case(name))), torch.no_grad():
        out = torch.compile(step, fullgraph=True, backend="eager")(q, k, v)
    assert_close(out, dense_rmt_attention_reference(q, k, v, layout), dtype=torch.float32, name="attention out")
    if name != "flex":
        assert forced == [[sdpa_attention.SDPA_KERNELS[name]]]  # traced once, with the kernel forced


# ------------------------------------------------------------------------------------------------- GPU
def _gpu_table(name):
    # _gpt2_d64 on CUDA, fp16, batch 2, segment 60 + 2 x 2 memory: T = 64, B x H = 8
    return _table(
        [
            _entry(
                name,
                dtype="float16",
                head_dim=64,
                causal=True,
                padded=p,
                needs_grad=g,
                mode="graphed" if gr else "eager",
            )
            for p in (True, False)
            for g, gr in MODES
        ]
    )


def _spy_backend(monkeypatch, name):
    """A list that grows by one at every call of the named backend (the real one runs)."""
    used = []
    if name in sdpa_attention.SDPA_KERNELS:
        real = sdpa_attention._force_kernel

        def force(kernels):
            used.append(kernels[0])
            return real(kernels)

        monkeypatch.setattr(sdpa_attention, "_force_kernel", force)
    elif name == "flex":
        real_flex = seam.flex_rmt_attention
        monkeypatch.setattr(seam, "flex_rmt_attention", lambda *a, **kw: used.append(1) or real_flex(*a, **kw))
    else:
        mod = seam._triton()
        real_kernel = mod.rmt_attention
        monkeypatch.setattr(mod, "rmt_attention", lambda *a, **kw: used.append(1) or real_kernel(*a, **kw))
    return used


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "flex", "triton"])
def test_gpu_auto_runs_the_named_backend_eager_graphed_and_in_training(monkeypatch, name):
    cfg = tf.GPT2Config(
        n_layer=2,
        n_embd=256,
        n_head=4,
        vocab_size=VOCAB,
        n_positions=128,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(cfg)
    ids = torch.randint(3, VOCAB, (2, 120), generator=torch.Generator().manual_seed(4)).cuda()  # 2 segments

    def make(**kw):
        return FastRMT(copy.deepcopy(model), 2, 60, **kw).to("cuda", torch.float16)

    sdpa = make(attn_backend="sdpa")
    q = torch.zeros(2, 4, 64, 64, device="cuda", dtype=torch.float16)
    why = seam._auto_unsupported(name, q, q, q, SegmentLayout(2, 60, 2, True), 0.0)
    if why is not None:
        pytest.skip(f"{name} cannot run this case on this GPU: {why}")
    used = _spy_backend(monkeypatch, name)
    with dispatch.use_table(_gpu_table(name)):
        with torch.no_grad():  # eager inference
            a, b = make().eval()(ids), sdpa.eval()(ids)
        assert len(used) == 2 * 2
        # fp16 backends (flash, efficient, cuDNN, flex, Triton) against SDPA, each about TOL[fp16] from exact, through
        # 2 layers and 2 segments: ten times the fp16 bound, as before
        assert_close(a.logits, b.logits, tol=10 * TOL[torch.float16], name="logits")
        used.clear()
        train, ref = make().train(), sdpa.train()  # training: forward and backward
        la, lb = train(ids, labels=ids).loss, ref(ids, labels=ids).loss
        la.backward()
        lb.backward()
        assert len(used) == 2 * 2
        assert_close(la, lb, tol=10 * TOL[torch.float16], name="training loss")
        used.clear()
        graphed = make(cuda_graph=True).eval()
        with torch.no_grad():
            c = graphed(ids)
        assert graphed._graphs.captures >= 1 and len(used) > 0  # warm-up and capture ran it
        assert_close(c.logits, b.logits, tol=10 * TOL[torch.float16], name="graphed logits")
