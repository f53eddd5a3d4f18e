"""The Triton RMT attention kernel against the float64 dense reference, on CPU through Triton's interpreter.

Tiny shapes and 16-wide blocks keep the whole file fast; lengths are deliberately not multiples of the block.
bf16 is not tested here: the interpreter's bf16 ``tl.dot`` is not faithful (see test_rmt_attention_gpu.py).
"""

import os
import sys

if "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

import pytest  # noqa: E402
import torch  # noqa: E402

if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    # On a GPU machine the interpreter would leak into the whole pytest process; the GPU file covers it.
    pytest.skip(
        "interpreter tests run on CPU-only machines (or with TRITON_INTERPRET=1 set by the caller); "
        "tests/kernels/test_rmt_attention_gpu.py covers the GPU",
        allow_module_level=True,
    )
os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

if not isinstance(tl.cdiv, InterpretedFunction):
    # Triton decides at import time: something imported it (e.g. via ``import kernels``) before this module
    # could switch the interpreter on. tests/conftest.py should set TRITON_INTERPRET=1 on CPU-only machines.
    pytest.skip(
        "triton was imported before TRITON_INTERPRET=1 was set: run this file on its own, or set the "
        "variable in conftest.py / the environment",
        allow_module_level=True,
    )

from numerics import TOL, assert_close, grad_tol  # noqa: E402

from rmt_fast.kernels import launch_configs as lc  # noqa: E402
from rmt_fast.kernels import triton_attention as ta  # noqa: E402
from rmt_fast.kernels.float64_reference import dense_rmt_attention_reference  # noqa: E402
from rmt_fast.kernels.layout import SegmentLayout, mask_runs  # noqa: E402

rmt_attention = ta.rmt_attention
rmt_attention_dropout_mask = ta.rmt_attention_dropout_mask
rmt_attention_supported = ta.rmt_attention_supported


# Every kernel-written buffer starts as NaN, interpreter blocks 16 x 16 (tests/kernels/conftest.py).
pytestmark = pytest.mark.usefixtures("poison_buffers")


def make_qkv(B, Hq, Hkv, Tq, Tk, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Tq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Tk, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Tk, D, generator=g).to(dtype)
    return q, k, v


def run_kernel(q, k, v, layout, grad_out, **kw):
    """Forward into a NaN-filled out= buffer, then backward; returns out, dq, dk, dv."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    B, Hq, Tq, D = q.shape
    out = torch.full((B, Tq, Hq, D), float("nan"), dtype=q.dtype)
    o = rmt_attention(q, k, v, layout, out=out, **kw)
    assert o is out
    o.backward(grad_out)
    return o.detach(), q.grad, k.grad, v.grad


def run_reference(q, k, v, layout, grad_out, **kw):
    q, k, v = (t.detach().to(torch.float64).requires_grad_() for t in (q, k, v))
    r = dense_rmt_attention_reference(q, k, v, layout, **kw)
    r.backward(grad_out.to(torch.float64))
    return r.detach(), q.grad, k.grad, v.grad


def check_against_reference(q, k, v, layout, *, tol=None, seed=1, kernel_kw=None, ref_kw=None):
    """The kernel's out, dq, dk, dv against the float64 reference: each within ``tol`` if given, else the output
    within TOL[q.dtype] and the gradients within grad_tol(q.dtype)."""
    B, Hq, Tq, D = q.shape
    grad_out = torch.randn(B, Tq, Hq, D, generator=torch.Generator().manual_seed(seed)).to(q.dtype)
    got = run_kernel(q, k, v, layout, grad_out, **(kernel_kw or {}))
    want = run_reference(q, k, v, layout, grad_out, **(ref_kw or {}))
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=False):
        bound = tol if tol is not None else TOL[q.dtype] if name == "out" else grad_tol(q.dtype)
        assert_close(a, b, tol=bound, name=name)  # fails on NaN or infinity too (an unwritten buffer)
    return got


# ------------------------------------------------------------------------------------------ correctness
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("padding", ["none", "counts"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_segment_gqa(causal, padding, dtype):
    # 3 + 13 + 3 = 19 positions: two 16-blocks, the second mostly out of range.
    counts = torch.tensor([0, 13]) if padding == "counts" else None  # one empty row, one full row
    layout = SegmentLayout(3, 13, 3, causal, token_counts=counts)
    q, k, v = make_qkv(2, 4, 2, 19, 19, 32, dtype)
    check_against_reference(q, k, v, layout)


@pytest.mark.parametrize("hkv", [1, 2, 4])
def test_gqa_groups(hkv):
    counts = torch.tensor([7, 2])
    layout = SegmentLayout(2, 11, 4, True, token_counts=counts)
    q, k, v = make_qkv(2, 4, hkv, 17, 17, 16, torch.float32, seed=hkv)
    check_against_reference(q, k, v, layout)


@pytest.mark.parametrize(
    "D,dtype",
    [
        (16, torch.float32),
        (64, torch.float32),
        (80, torch.float32),
        (80, torch.float16),
        (96, torch.float16),
        (128, torch.float32),
        (256, torch.float16),
    ],
)
def test_head_dims(D, dtype):
    layout = SegmentLayout(3, 13, 3, True, token_counts=torch.tensor([9]))
    q, k, v = make_qkv(1, 2, 1, 19, 19, D, dtype, seed=D)
    check_against_reference(q, k, v, layout)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_padded_blocks_are_skipped_correctly(causal):
    # Token region [3, 38); with count 2 the padded tail [5, 38) holds the whole key block [16, 32).
    counts = torch.tensor([2, 35, 0])
    layout = SegmentLayout(3, 35, 2, causal, token_counts=counts)
    q, k, v = make_qkv(3, 2, 1, 40, 40, 16, torch.float32, seed=7)
    _, _, dk, dv = check_against_reference(q, k, v, layout)
    # padded keys get exactly zero gradient
    assert (dk[0, :, 5:38] == 0).all() and (dv[0, :, 5:38] == 0).all()
    assert (dk[2, :, 3:38] == 0).all() and (dv[2, :, 3:38] == 0).all()


@pytest.mark.parametrize("blocks", [(32, 16), (16, 32)])
@pytest.mark.parametrize("boundary_only", [True, False], ids=["mask-boundary", "mask-all"])
def test_block_shapes_and_mask_modes(blocks, boundary_only, monkeypatch):
    with lc.interpreter_mode(blocks=blocks):
        monkeypatch.setattr(ta, "_MASK_BOUNDARY_ONLY", boundary_only)
        layout = SegmentLayout(5, 50, 3, True, token_counts=torch.tensor([1, 37]))
        q, k, v = make_qkv(2, 2, 1, 50, 58, 16, torch.float32, seed=5)  # decode-shifted, 58 keys
        check_against_reference(q, k, v, layout)


# ------------------------------------------------------------------------- visible runs [start, end) per row
def _random_runs(B, num_tokens, seed):
    """Random per-row runs, always including an empty run (start == end), a run ending at the capacity and
    one starting at 0; an empty run with start > end too."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, num_tokens + 1, (B,), generator=g)
    b = torch.randint(0, num_tokens + 1, (B,), generator=g)
    starts, ends = torch.minimum(a, b), torch.maximum(a, b)
    starts[0], ends[0] = 5, 5  # empty
    if B > 1:
        starts[1], ends[1] = 3, num_tokens  # left padding
    if B > 2:
        starts[2], ends[2] = 0, num_tokens - 4  # right padding
    if B > 3:
        starts[3], ends[3] = 7, 2  # end before start: empty
    return starts.to(torch.int32), ends


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("hkv", [1, 4])
def test_visible_runs_against_reference(causal, dtype, hkv):
    num_read, num_tokens, num_write = 3, 45, 3  # token slots [3, 48): several 16-blocks, some fully hidden
    starts, ends = _random_runs(5, num_tokens, seed=hkv + 10 * causal)
    layout = SegmentLayout(num_read, num_tokens, num_write, causal, token_counts=ends, token_starts=starts)
    q, k, v = make_qkv(5, 4, hkv, 51, 51, 32, dtype, seed=hkv)
    _, _, dk, dv = check_against_reference(q, k, v, layout)
    # hidden keys get exactly zero gradient
    valid = layout.key_valid()
    for b in range(5):
        hidden = ~valid[b]
        assert (dk[b][:, hidden] == 0).all() and (dv[b][:, hidden] == 0).all()


@pytest.mark.parametrize("blocks", [(16, 16), (32, 16), (16, 32)])
@pytest.mark.parametrize("boundary_only", [True, False], ids=["mask-boundary", "mask-all"])
@pytest.mark.parametrize("tq", [70, 9])
def test_visible_runs_block_shapes_and_decode(blocks, boundary_only, tq, monkeypatch):
    with lc.interpreter_mode(blocks=blocks):
        monkeypatch.setattr(ta, "_MASK_BOUNDARY_ONLY", boundary_only)
        # runs that start/end on and off block boundaries (token slot j is key 2 + j)
        starts = torch.tensor([14, 0, 30, 62, 5])
        ends = torch.tensor([46, 31, 30, 64, 64])
        layout = SegmentLayout(2, 64, 4, True, token_counts=ends, token_starts=starts)
        q, k, v = make_qkv(5, 2, 1, tq, 70, 16, torch.float32, seed=tq)
        check_against_reference(q, k, v, layout)


def test_visible_runs_out_of_range_are_clamped():
    starts = torch.tensor([-4, 2, 9, 6])
    ends = torch.tensor([3, 40, 12, 1])
    layout = SegmentLayout(1, 9, 1, False, token_counts=ends, token_starts=starts)
    ref_layout = SegmentLayout(
        1, 9, 1, False, token_counts=torch.tensor([3, 9, 9, 0]), token_starts=torch.tensor([0, 2, 9, 0])
    )
    q, k, v = make_qkv(4, 2, 2, 11, 11, 16, torch.float32)
    grad_out = torch.randn(4, 11, 2, 16)
    got = run_kernel(q, k, v, layout, grad_out)
    want = run_reference(q, k, v, ref_layout, grad_out)
    assert torch.equal(layout.key_valid(), ref_layout.key_valid())
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=False):
        assert_close(a, b, dtype=torch.float32, name=name)


def test_visible_runs_equal_the_same_token_mask_through_the_reference():
    """A run layout and the equivalent token_mask layout give one dense mask (SDPA and the reference read it)."""
    starts, ends = _random_runs(6, 20, seed=3)
    runs = SegmentLayout(2, 20, 2, True, token_counts=ends, token_starts=starts)
    idx = torch.arange(20)
    tok = (idx >= starts[:, None]) & (idx < ends[:, None])
    masked = SegmentLayout(2, 20, 2, True, token_mask=tok)
    assert torch.equal(runs.dense_mask(), masked.dense_mask())
    q, k, v = make_qkv(6, 2, 1, 24, 24, 16, torch.float32, seed=2)
    a = rmt_attention(q, k, v, runs)
    b = dense_rmt_attention_reference(q, k, v, masked)
    assert_close(a, b, dtype=torch.float32, name="out")


def test_mask_runs():
    mask = torch.tensor(
        [
            [0, 0, 1, 1, 1, 0],  # a run in the middle
            [1, 1, 1, 1, 1, 1],  # all ones
            [0, 0, 0, 0, 0, 0],  # nothing visible
            [1, 0, 1, 0, 0, 0],  # a hole
            [0, 0, 0, 0, 0, 1],  # the last only
            [1, 1, 0, 0, 0, 0],  # right padding
        ]
    )
    starts, ends, holes = mask_runs(mask)
    assert starts.tolist() == [2, 0, 0, 0, 5, 0]
    assert ends.tolist() == [5, 6, 0, 3, 6, 2]
    assert holes.tolist() == [False, False, False, True, False, False]
    assert starts.dtype == ends.dtype == torch.int32
    # any leading shape; bool input
    s3, e3, h3 = mask_runs(mask.bool().reshape(2, 3, 6))
    assert torch.equal(s3.flatten(), starts) and torch.equal(e3.flatten(), ends) and torch.equal(h3.flatten(), holes)
    # random masks: a row without holes is exactly its run
    g = torch.Generator().manual_seed(0)
    rnd = torch.rand(200, 9, generator=g) < 0.6
    s, e, h = mask_runs(rnd)
    idx = torch.arange(9)
    run = (idx >= s[:, None]) & (idx < e[:, None])
    assert torch.equal(run[~h], rnd[~h])
    assert (rnd & ~run).sum() == 0  # the span covers every visible token
    assert ((run != rnd).any(1) == h).all()


def test_layout_token_starts_validation():
    with pytest.raises(ValueError, match="token_starts needs token_counts"):
        SegmentLayout(1, 4, 1, True, token_starts=torch.tensor([0]))
    with pytest.raises(ValueError, match="token_starts must be a 1-D integer tensor"):
        SegmentLayout(1, 4, 1, True, token_counts=torch.tensor([2]), token_starts=torch.tensor([0.0]))
    with pytest.raises(ValueError, match="one shape and device"):
        SegmentLayout(1, 4, 1, True, token_counts=torch.tensor([2, 3]), token_starts=torch.tensor([0]))


def test_counts_dtype_and_out_of_range_counts_are_clamped():
    # int32 counts, one above the capacity (treated as full)
    layout = SegmentLayout(1, 9, 1, False, token_counts=torch.tensor([4, 30], dtype=torch.int32))
    ref_layout = SegmentLayout(1, 9, 1, False, token_counts=torch.tensor([4, 9]))
    q, k, v = make_qkv(2, 2, 2, 11, 11, 16, torch.float32)
    grad_out = torch.randn(2, 11, 2, 16)
    got = run_kernel(q, k, v, layout, grad_out)
    want = run_reference(q, k, v, ref_layout, grad_out)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=False):
        assert_close(a, b, dtype=torch.float32, name=name)


def test_query_with_no_visible_key_gives_zeros():
    # Encoder-style layout (no memory slots): a row with count 0 has no visible key at all.
    layout = SegmentLayout(0, 8, 0, False, token_counts=torch.tensor([0, 5]))
    q, k, v = make_qkv(2, 2, 2, 8, 8, 16, torch.float32)
    grad_out = torch.randn(2, 8, 2, 16)
    out, dq, dk, dv = run_kernel(q, k, v, layout, grad_out)
    assert (out[0] == 0).all() and (dq[0] == 0).all() and (dk[0] == 0).all() and (dv[0] == 0).all()
    sub = SegmentLayout(0, 8, 0, False, token_counts=torch.tensor([5]))
    want = run_reference(q[1:], k[1:], v[1:], sub, grad_out[1:])
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out[1:], dq[1:], dk[1:], dv[1:]), want, strict=False):
        assert_close(a, b, dtype=torch.float32, name=name)


def test_custom_scale():
    layout = SegmentLayout(2, 10, 2, True)
    q, k, v = make_qkv(1, 2, 2, 14, 14, 32, torch.float32)
    check_against_reference(q, k, v, layout, kernel_kw={"scale": 0.37}, ref_kw={"scale": 0.37})


# ------------------------------------------------------------------------------------------------ decode
@pytest.mark.parametrize("tq", [1, 5, 17])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_decode_queries_at_the_end(tq, causal):
    layout = SegmentLayout(3, 13, 3, causal, token_counts=torch.tensor([10, 4]))
    q, k, v = make_qkv(2, 4, 2, tq, 19, 16, torch.float32, seed=tq)
    check_against_reference(q, k, v, layout)


# ----------------------------------------------------------------------------------------------- strides
def test_strided_inputs_equal_contiguous():
    B, T, Hq, Hkv, D = 2, 19, 4, 2, 32
    layout = SegmentLayout(3, 13, 3, True, token_counts=torch.tensor([13, 6]))
    g = torch.Generator().manual_seed(3)
    # a fused qkv projection output (B, T, (Hq + 2 Hkv) * D), split into views: nothing is contiguous
    qkv = torch.randn(B, T, (Hq + 2 * Hkv) * D, generator=g)
    q = qkv[..., : Hq * D].view(B, T, Hq, D).transpose(1, 2)
    k = qkv[..., Hq * D : (Hq + Hkv) * D].view(B, T, Hkv, D).transpose(1, 2)
    v = qkv[..., (Hq + Hkv) * D :].view(B, T, Hkv, D).transpose(1, 2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    grad_out = torch.randn(B, T, Hq, D, generator=g)
    strided = run_kernel(q, k, v, layout, grad_out)
    contig = run_kernel(q.contiguous(), k.contiguous(), v.contiguous(), layout, grad_out)
    for a, b in zip(strided, contig, strict=False):
        assert a.dtype == b.dtype and torch.equal(a, b)  # bit for bit
    # transposed views of (B, T, H, D) tensors and a non-contiguous upstream gradient
    qt = torch.randn(B, T, Hq, D, generator=g).transpose(1, 2)
    kt = torch.randn(B, T, Hkv, D, generator=g).transpose(1, 2)
    vt = torch.randn(B, T, Hkv, D, generator=g).transpose(1, 2)
    go = torch.randn(B, Hq, T, D, generator=g).transpose(1, 2)  # (B, T, Hq, D), not contiguous
    strided = run_kernel(qt, kt, vt, layout, go)
    contig = run_kernel(qt.contiguous(), kt.contiguous(), vt.contiguous(), layout, go.contiguous())
    for a, b in zip(strided, contig, strict=False):
        assert a.dtype == b.dtype and torch.equal(a, b)  # bit for bit
    want = run_reference(qt, kt, vt, layout, go)
    for name, a, b in zip(("out", "dq", "dk", "dv"), strided, want, strict=False):
        assert_close(a, b, dtype=torch.float32, name=name)


def test_output_layout_and_gradient_layout():
    layout = SegmentLayout(1, 6, 1, False)
    q, k, v = make_qkv(2, 2, 1, 8, 8, 16, torch.float32)
    o = rmt_attention(q, k, v, layout)
    assert o.shape == (2, 8, 2, 16) and o.is_contiguous()
    q.requires_grad_()
    rmt_attention(q, k, v, layout).sum().backward()
    assert q.grad.shape == q.shape and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_an_out_that_is_a_view_receives_the_result_and_gradients_flow(dtype):
    """``out`` a strided view into a bigger buffer (with grad: autograd cannot rebase a Function's dirty view, the
    result is copied in): the buffer holds the output, the rest of it is untouched, gradients match the float64
    reference, and the buffer's own graph reaches q, k, v."""
    layout = SegmentLayout(2, 9, 2, True, token_counts=torch.tensor([5, 9]))
    q, k, v = make_qkv(2, 4, 2, 13, 13, 16, dtype)
    B, Hq, T, D = q.shape
    base = torch.full((B, T, Hq + 1, D), float("nan"), dtype=dtype)
    out = base[:, :, 1:]  # (B, T, Hq, D), not contiguous
    grad_out = torch.randn(B, T, Hq, D, generator=torch.Generator().manual_seed(3)).to(dtype)
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o = rmt_attention(qg, kg, vg, layout, out=out)
    assert o is out and o.grad_fn is not None
    torch.autograd.backward(base[:, :, 1:], grad_out)  # through the buffer's own history
    want = run_reference(q, k, v, layout, grad_out)
    assert torch.isnan(base[:, :, 0]).all()
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out.detach(), qg.grad, kg.grad, vg.grad), want):
        assert_close(a, b, tol=TOL[dtype] if name == "out" else grad_tol(dtype), name=name)


def test_no_grad_inference_and_default_out():
    layout = SegmentLayout(2, 9, 2, True, token_counts=torch.tensor([3]))
    q, k, v = make_qkv(1, 2, 2, 13, 13, 16, torch.float32)
    with torch.no_grad():
        o = rmt_attention(q, k, v, layout)
    ref = dense_rmt_attention_reference(q, k, v, layout)
    assert o.grad_fn is None
    assert_close(o, ref, dtype=torch.float32, name="out")


# ----------------------------------------------------------------------------------------------- dropout
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_dropout_matches_reference_with_kernel_mask(causal):
    B, Hq, Hkv, T, D, p, seed = 2, 4, 2, 19, 16, 0.3, 1234
    layout = SegmentLayout(3, 13, 3, causal, token_counts=torch.tensor([5, 13]))
    q, k, v = make_qkv(B, Hq, Hkv, T, T, D, torch.float32, seed=11)
    keep = rmt_attention_dropout_mask(B, Hq, T, T, p, seed, "cpu")
    assert keep.dtype == torch.bool and keep.shape == (B, Hq, T, T)
    check_against_reference(
        q,
        k,
        v,
        layout,
        kernel_kw={"dropout_p": p, "seed": seed},
        ref_kw={"dropout_mask": keep, "dropout_p": p},
    )


def test_dropout_decode_and_gqa_offsets():
    B, Hq, Hkv, Tq, Tk, D, p, seed = 1, 4, 1, 6, 19, 16, 0.2, 99
    layout = SegmentLayout(3, 13, 3, True, token_counts=torch.tensor([9]))
    q, k, v = make_qkv(B, Hq, Hkv, Tq, Tk, D, torch.float32, seed=12)
    keep = rmt_attention_dropout_mask(B, Hq, Tq, Tk, p, seed, "cpu")
    check_against_reference(
        q,
        k,
        v,
        layout,
        kernel_kw={"dropout_p": p, "seed": seed},
        ref_kw={"dropout_mask": keep, "dropout_p": p},
    )


@pytest.mark.parametrize("i64", [False, True], ids=["offsets-i32", "offsets-i64"])
def test_dropout_offset_width_gives_the_same_stream(i64, monkeypatch):
    # The kernels use int32 Philox offsets when B*Hq*Tq*Tk < 2**31 and int64 otherwise: same numbers.
    monkeypatch.setattr(ta, "_FORCE_DROPOUT_I64", i64)
    B, Hq, Hkv, T, D, p, seed = 1, 2, 1, 19, 16, 0.3, 77
    layout = SegmentLayout(3, 13, 3, True, token_counts=torch.tensor([8]))
    q, k, v = make_qkv(B, Hq, Hkv, T, T, D, torch.float32, seed=13)
    keep = rmt_attention_dropout_mask(B, Hq, T, T, p, seed, "cpu")
    monkeypatch.setattr(ta, "_FORCE_DROPOUT_I64", not i64)
    assert torch.equal(keep, rmt_attention_dropout_mask(B, Hq, T, T, p, seed, "cpu"))
    monkeypatch.setattr(ta, "_FORCE_DROPOUT_I64", i64)
    check_against_reference(
        q,
        k,
        v,
        layout,
        kernel_kw={"dropout_p": p, "seed": seed},
        ref_kw={"dropout_mask": keep, "dropout_p": p},
    )


def test_dropout_keep_rate():
    p = 0.25
    keep = rmt_attention_dropout_mask(1, 4, 64, 128, p, 2024, "cpu")  # 32768 draws: sd of the rate 0.0024
    assert abs(keep.float().mean().item() - (1 - p)) < 0.02
    small = rmt_attention_dropout_mask(1, 2, 20, 30, p, 2024, "cpu")
    assert torch.equal(small, rmt_attention_dropout_mask(1, 2, 20, 30, p, 2024, "cpu"))
    assert not torch.equal(small, rmt_attention_dropout_mask(1, 2, 20, 30, p, 2025, "cpu"))
    assert rmt_attention_dropout_mask(1, 1, 16, 16, 0.0, 5, "cpu").all()


def test_dropout_same_seed_is_deterministic():
    layout = SegmentLayout(2, 12, 2, True)
    q, k, v = make_qkv(1, 2, 2, 16, 16, 16, torch.float32)
    a = rmt_attention(q, k, v, layout, dropout_p=0.5, seed=7)
    b = rmt_attention(q, k, v, layout, dropout_p=0.5, seed=7)
    c = rmt_attention(q, k, v, layout, dropout_p=0.5, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    d = rmt_attention(q, k, v, layout, dropout_p=0.5)  # seed drawn from torch's CPU generator
    assert torch.isfinite(d).all()


# -------------------------------------------------------------------------------------------- validation
def _good(**over):
    q, k, v = make_qkv(1, 4, 2, 8, 8, 16, torch.float32)
    args = {"q": q, "k": k, "v": v, "layout": SegmentLayout(1, 6, 1, True)}
    args.update(over)
    return args


@pytest.mark.parametrize(
    "over,match",
    [
        ({"q": torch.randn(4, 8, 16)}, "q must be 4-D"),
        ({"k": torch.randn(1, 2, 8, 16, 1)}, "k must be 4-D"),
        ({"v": torch.randn(1, 2, 8, 16, dtype=torch.float16)}, "share a dtype"),
        ({"q": torch.randn(1, 4, 8, 16, dtype=torch.float64)}, "dtype"),
        (
            {"q": torch.randn(1, 4, 8, 8), "k": torch.randn(1, 2, 8, 8), "v": torch.randn(1, 2, 8, 8)},
            "head dim 8",
        ),
        (
            {"q": torch.randn(1, 4, 8, 300), "k": torch.randn(1, 2, 8, 300), "v": torch.randn(1, 2, 8, 300)},
            "head dim 300",
        ),
        ({"k": torch.randn(1, 3, 8, 16), "v": torch.randn(1, 3, 8, 16)}, "multiple of k/v heads"),
        ({"k": torch.randn(1, 2, 9, 16), "v": torch.randn(1, 2, 9, 16)}, "seq_len 8"),
        ({"k": torch.randn(1, 2, 8, 32), "v": torch.randn(1, 2, 8, 32)}, "head dims differ"),
        (
            {"layout": SegmentLayout(1, 6, 1, True, token_counts=torch.tensor([1, 2]))},
            "token_counts has length",
        ),
        (
            {"layout": SegmentLayout(1, 6, 1, True, token_mask=torch.ones(1, 6, dtype=torch.bool))},
            "token_mask has holes",
        ),
        ({"q": torch.randn(1, 4, 9, 16)}, "more than k"),
    ],
)
def test_bad_inputs_raise(over, match):
    args = _good(**over)
    assert rmt_attention_supported(args["q"], args["k"], args["v"], args["layout"]) is not None
    with pytest.raises((ValueError, TypeError), match=match):
        rmt_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("layout"))


def test_bad_dropout_and_out():
    args = _good()
    with pytest.raises(ValueError, match="dropout_p"):
        rmt_attention(args["q"], args["k"], args["v"], args["layout"], dropout_p=1.0)
    with pytest.raises(ValueError, match="out must have shape"):
        rmt_attention(args["q"], args["k"], args["v"], args["layout"], out=torch.empty(1, 4, 8, 16))


def test_supported():
    args = _good()
    assert rmt_attention_supported(args["q"], args["k"], args["v"], args["layout"]) is None
    bf = [t.to(torch.bfloat16) for t in (args["q"], args["k"], args["v"])]
    assert rmt_attention_supported(*bf, args["layout"]) is None
    assert "dropout_p" in rmt_attention_supported(args["q"], args["k"], args["v"], args["layout"], 1.5)
    masked = SegmentLayout(1, 6, 1, True, token_mask=torch.ones(1, 6, dtype=torch.bool))
    assert "holes" in rmt_attention_supported(args["q"], args["k"], args["v"], masked)


def test_cpu_without_interpreter_is_unsupported():
    args = _good()
    with lc.interpreter_mode(False):  # the flag is read once at import, as triton does
        reason = rmt_attention_supported(args["q"], args["k"], args["v"], args["layout"])
    assert reason is not None and "TRITON_INTERPRET" in reason


# ----------------------------------------------------------------------------- launch configuration hooks
class _Recorder:
    """Stands in for a jit kernel: records the launch kwargs, then launches the real kernel."""

    def __init__(self, kernel, log, kind):
        self.kernel, self.log, self.kind = kernel, log, kind

    def run(self, *args, grid, warmup, **kwargs):
        self.log.append((self.kind, kwargs["BLOCK_M"], kwargs["BLOCK_N"], kwargs["num_warps"]))
        return self.kernel.run(*args, grid=grid, warmup=warmup, **kwargs)


def _record_launches(monkeypatch):
    log = []
    for kind, name in (
        ("fwd", "_rmt_attn_fwd_kernel"),
        ("dq", "_rmt_attn_bwd_dq_kernel"),
        ("dkdv", "_rmt_attn_bwd_dkdv_kernel"),
    ):
        monkeypatch.setattr(ta, name, _Recorder(getattr(ta, name), log, kind))
    return log


def test_override_configs_sets_every_launch_inside_the_block(monkeypatch):
    log = _record_launches(monkeypatch)
    layout = SegmentLayout(2, 30, 2, True, token_counts=torch.tensor([7, 30]))
    q, k, v = make_qkv(2, 2, 1, 34, 34, 16, torch.float32, seed=3)
    with lc.override_configs(fwd=(32, 16, 2, 1), dkdv=lc.LaunchConfig(16, 32, 2, 1)):
        with lc.override_configs(dq=(16, 32, 2, 1)):  # nests: fwd and dkdv still overridden
            check_against_reference(q, k, v, layout)
    assert sorted(log) == [("dkdv", 16, 32, 2), ("dq", 16, 32, 2), ("fwd", 32, 16, 2)]
    log.clear()
    check_against_reference(q, k, v, layout)  # outside: the heuristic again
    assert {entry[1:] for entry in log} == {(16, 16, 4)}
    assert not lc.override_active()


def test_set_launch_configs_table_is_used_and_cleared(monkeypatch):
    log = _record_launches(monkeypatch)
    layout = SegmentLayout(1, 20, 1, False)
    q, k, v = make_qkv(1, 2, 2, 22, 22, 16, torch.float32, seed=4)
    try:
        lc.set_launch_configs({("fwd", 16, torch.float32): (32, 32, 2, 1), ("dkdv", 16, torch.float32): (16, 32, 2, 1)})
        assert lc.launch_config("fwd", 16, torch.float32) == lc.LaunchConfig(32, 32, 2, 1)
        assert lc.launch_config("fwd", 16, torch.float16) == lc.heuristic_config("fwd", 16, torch.float16)
        check_against_reference(q, k, v, layout)
        assert sorted(log) == [("dkdv", 16, 32, 2), ("dq", 16, 16, 4), ("fwd", 32, 32, 2)]
    finally:
        lc.set_launch_configs(None)
    assert lc.launch_config("fwd", 16, torch.float32) == lc.heuristic_config("fwd", 16, torch.float32)


@pytest.mark.parametrize(
    "table,match",
    [
        ({("bwd", 16, torch.float32): (16, 16, 4, 1)}, "keys must be"),
        ({("fwd", 16): (16, 16, 4, 1)}, "keys must be"),
        ({("fwd", 16, torch.float32): (16, 16, 4)}, "BLOCK_M, BLOCK_N, num_warps, num_stages"),
        ({("fwd", 16, torch.float32): (24, 16, 4, 1)}, "BLOCK_M must be a power of two"),
        ({("fwd", 16, torch.float32): (16, 16, 0, 1)}, "num_warps must be a positive int"),
    ],
)
def test_set_launch_configs_rejects_bad_entries_and_keeps_the_old_table(table, match):
    lc.set_launch_configs({("dq", 32, torch.float16): (16, 16, 4, 1)})
    try:
        with pytest.raises(ValueError, match=match):
            lc.set_launch_configs(table)
        assert lc.launch_config("dq", 32, torch.float16) == lc.LaunchConfig(16, 16, 4, 1)
    finally:
        lc.set_launch_configs(None)


def test_check_false_skips_validation_and_gives_the_same_result():
    layout = SegmentLayout(2, 12, 2, True, token_counts=torch.tensor([5, 12]))
    q, k, v = make_qkv(2, 4, 2, 16, 16, 16, torch.float32, seed=8)
    a = rmt_attention(q, k, v, layout)
    b = rmt_attention(q, k, v, layout, check=False)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="dropout_p"):
        rmt_attention(q, k, v, layout, dropout_p=2.0)
    calls = []
    real = ta._problem
    try:
        ta._problem = lambda *a, **k: calls.append(1) or real(*a, **k)
        rmt_attention(q, k, v, layout, check=False)
    finally:
        ta._problem = real
    assert calls == []


def test_kernel_buffers_start_as_nan():
    """The poison fixture is in force here (a kernel that skips a slot leaves NaN)."""
    assert torch.isnan(ta._empty((3,), torch.float32, "cpu")).all()
