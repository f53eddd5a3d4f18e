"""The Triton RMT attention kernel on a real GPU at real sizes (skipped without CUDA).

Relative errors ||out - ref|| / ||ref|| against a float64 reference (float32 for the 8k sequence, to save
memory). Forward tolerances: TOL[dtype] (bf16 1e-2, fp16 1e-3); gradients grad_tol(dtype) (bf16 1e-2, fp16
2e-3: dq/dk go through one more rounding of dS to the input dtype), both from tests/numerics.py.
"""

import os

import pytest

pytest.importorskip("triton")
torch = pytest.importorskip("torch")

if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
    pytest.skip("needs a CUDA device (and TRITON_INTERPRET unset)", allow_module_level=True)

from numerics import TOL, assert_close, grad_tol, rel_err  # noqa: E402

from rmt_fast.kernels.float64_reference import dense_rmt_attention_reference  # noqa: E402
from rmt_fast.kernels.layout import SegmentLayout  # noqa: E402
from rmt_fast.kernels.triton_attention import rmt_attention, rmt_attention_dropout_mask  # noqa: E402

pytestmark = pytest.mark.gpu

DEV = "cuda"


def qkv_views(B, T, Hq, Hkv, D, dtype, seed=0):
    """q, k, v as transposed views of one fused projection output (B, T, (Hq + 2 Hkv) * D)."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    qkv = torch.randn(B, T, (Hq + 2 * Hkv) * D, device=DEV, dtype=dtype, generator=g)
    q = qkv[..., : Hq * D].view(B, T, Hq, D).transpose(1, 2)
    k = qkv[..., Hq * D : (Hq + Hkv) * D].view(B, T, Hkv, D).transpose(1, 2)
    v = qkv[..., (Hq + Hkv) * D :].view(B, T, Hkv, D).transpose(1, 2)
    return q, k, v


def kernel_fwd_bwd(q, k, v, layout, grad_out, **kw):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    B, Hq, Tq, D = q.shape
    out = torch.full((B, Tq, Hq, D), float("nan"), device=DEV, dtype=q.dtype)
    o = rmt_attention(q, k, v, layout, out=out, **kw)
    o.backward(grad_out)
    return o.detach(), q.grad, k.grad, v.grad


def reference_fwd_bwd(q, k, v, layout, grad_out, upcast=torch.float64, **kw):
    q, k, v = (t.detach().to(upcast).requires_grad_() for t in (q, k, v))
    r = dense_rmt_attention_reference(q, k, v, layout, upcast=upcast, **kw)
    r.backward(grad_out.to(upcast))
    return r.detach(), q.grad, k.grad, v.grad


def compare(got, want, dtype):
    names = ("out", "dq", "dk", "dv")
    errs = {name: f"{rel_err(a, b):.2e}" for name, a, b in zip(names, got, want, strict=False)}
    print(errs)
    for name, a, b in zip(names, got, want, strict=False):
        bound = TOL[dtype] if name == "out" else grad_tol(dtype)
        assert_close(a, b, tol=bound, name=f"{name} (all: {errs})")  # NaN or infinity fails too


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
def test_segment_532(dtype, D, causal, padded):
    B, Hq, Hkv = 2, 8, 2
    counts = torch.tensor([512, 301], device=DEV) if padded else None
    layout = SegmentLayout(10, 512, 10, causal, token_counts=counts)
    q, k, v = qkv_views(B, layout.seq_len, Hq, Hkv, D, dtype)
    grad_out = torch.randn(B, layout.seq_len, Hq, D, device=DEV, dtype=dtype)
    compare(kernel_fwd_bwd(q, k, v, layout, grad_out), reference_fwd_bwd(q, k, v, layout, grad_out), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_visible_runs_532(dtype, causal):
    """Decoder attention masks as per-row runs [start, end): left padding, right padding, all visible, an empty
    run, and a run that starts and ends inside one key block."""
    starts = torch.tensor([0, 137, 0, 300, 20], device=DEV, dtype=torch.int32)
    ends = torch.tensor([512, 512, 401, 300, 45], device=DEV, dtype=torch.int32)
    layout = SegmentLayout(10, 512, 10, causal, token_counts=ends, token_starts=starts)
    q, k, v = qkv_views(5, layout.seq_len, 8, 2, 64, dtype, seed=7)
    grad_out = torch.randn(5, layout.seq_len, 8, 64, device=DEV, dtype=dtype)
    compare(kernel_fwd_bwd(q, k, v, layout, grad_out), reference_fwd_bwd(q, k, v, layout, grad_out), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(
    "dq_cfg,dkdv_cfg",
    [
        ((128, 32, 4, 3, "inline"), (32, 128, 8, 3)),
        ((128, 32, 4, 3), (64, 64, 8, 3, "inline")),
        ((128, 32, 4, 3), (64, 64, 8, 2, "fused")),
        ((128, 32, 4, 3), (32, 128, 8, 3, "fused")),
    ],
    ids=["dq-inline", "dkdv-inline", "fused-64x64", "fused-32x128"],
)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_backward_variants_532(dtype, dq_cfg, dkdv_cfg, causal):
    """Every backward variant (launch_configs.VARIANTS) compiled and run on the GPU, padded by token runs, GQA."""
    from rmt_fast.kernels import launch_configs

    starts = torch.tensor([0, 137, 20], device=DEV, dtype=torch.int32)
    ends = torch.tensor([512, 512, 45], device=DEV, dtype=torch.int32)
    layout = SegmentLayout(10, 512, 10, causal, token_counts=ends, token_starts=starts)
    q, k, v = qkv_views(3, layout.seq_len, 8, 2, 64, dtype, seed=11)
    grad_out = torch.randn(3, layout.seq_len, 8, 64, device=DEV, dtype=dtype)
    with launch_configs.override_configs(dq=dq_cfg, dkdv=dkdv_cfg):
        got = kernel_fwd_bwd(q, k, v, layout, grad_out)
    compare(got, reference_fwd_bwd(q, k, v, layout, grad_out), dtype)


@pytest.mark.parametrize("D", [64, 80, 96, 128, 256])
def test_head_dims_fp16(D):
    layout = SegmentLayout(4, 200, 4, True, token_counts=torch.tensor([150, 200], device=DEV))
    q, k, v = qkv_views(2, layout.seq_len, 4, 4, D, torch.float16, seed=D)
    grad_out = torch.randn(2, layout.seq_len, 4, D, device=DEV, dtype=torch.float16)
    compare(kernel_fwd_bwd(q, k, v, layout, grad_out), reference_fwd_bwd(q, k, v, layout, grad_out), torch.float16)


def test_fp32_ieee():
    layout = SegmentLayout(10, 300, 10, True, token_counts=torch.tensor([300, 17], device=DEV))
    q, k, v = qkv_views(2, layout.seq_len, 4, 2, 64, torch.float32)
    grad_out = torch.randn(2, layout.seq_len, 4, 64, device=DEV)
    compare(kernel_fwd_bwd(q, k, v, layout, grad_out), reference_fwd_bwd(q, k, v, layout, grad_out), torch.float32)


@pytest.mark.parametrize("D", [64, 128])
def test_8k_causal_bf16(D):
    B, Hq, Hkv, T = 1, 4, 2, 8192
    layout = SegmentLayout(0, T, 0, True)
    q, k, v = qkv_views(B, T, Hq, Hkv, D, torch.bfloat16, seed=1)
    grad_out = torch.randn(B, T, Hq, D, device=DEV, dtype=torch.bfloat16)
    got = kernel_fwd_bwd(q, k, v, layout, grad_out)
    want = reference_fwd_bwd(q, k, v, layout, grad_out, upcast=torch.float32)
    compare(got, want, torch.bfloat16)


@pytest.mark.parametrize("tq", [1, 7, 128])
def test_decode(tq):
    layout = SegmentLayout(10, 512, 10, True, token_counts=torch.tensor([400, 512], device=DEV))
    q, k, v = qkv_views(2, layout.seq_len, 8, 2, 128, torch.float16, seed=tq)
    q = q[:, :, -tq:]
    grad_out = torch.randn(2, tq, 8, 128, device=DEV, dtype=torch.float16)
    compare(kernel_fwd_bwd(q, k, v, layout, grad_out), reference_fwd_bwd(q, k, v, layout, grad_out), torch.float16)


def test_repeated_runs_bit_identical():
    layout = SegmentLayout(10, 512, 10, True, token_counts=torch.tensor([512, 100], device=DEV))
    q, k, v = qkv_views(2, layout.seq_len, 8, 2, 128, torch.bfloat16)
    grad_out = torch.randn(2, layout.seq_len, 8, 128, device=DEV, dtype=torch.bfloat16)
    first = kernel_fwd_bwd(q, k, v, layout, grad_out, dropout_p=0.1, seed=3)
    for _ in range(3):
        again = kernel_fwd_bwd(q, k, v, layout, grad_out, dropout_p=0.1, seed=3)
        for a, b in zip(first, again, strict=False):
            assert torch.equal(a, b)


def test_dropout_against_reference_and_keep_rate():
    B, Hq, Hkv, p, seed = 2, 4, 2, 0.1, 1234
    layout = SegmentLayout(10, 512, 10, True, token_counts=torch.tensor([512, 256], device=DEV))
    T = layout.seq_len
    q, k, v = qkv_views(B, T, Hq, Hkv, 64, torch.float16)
    grad_out = torch.randn(B, T, Hq, 64, device=DEV, dtype=torch.float16)
    keep = rmt_attention_dropout_mask(B, Hq, T, T, p, seed, DEV)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.01
    got = kernel_fwd_bwd(q, k, v, layout, grad_out, dropout_p=p, seed=seed)
    want = reference_fwd_bwd(q, k, v, layout, grad_out, dropout_mask=keep, dropout_p=p)
    compare(got, want, torch.float16)


def test_no_host_sync_in_launch_path():
    layout = SegmentLayout(10, 512, 10, True, token_counts=torch.tensor([512, 3], device=DEV))
    q, k, v = qkv_views(2, layout.seq_len, 8, 2, 64, torch.bfloat16)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    rmt_attention(q, k, v, layout, dropout_p=0.1).sum().backward()  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        o = rmt_attention(q, k, v, layout, dropout_p=0.1)
        o.backward(torch.ones_like(o))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_fast_launch_is_taken_and_matches_run_bit_for_bit():
    """On the GPU's Triton (3.6 on the lent machine) the fast launch is built for every kernel of a cached plan,
    later launches skip ``JITFunction.run``, and the results equal those of launches through ``run`` exactly."""
    from triton.runtime.jit import JITFunction

    from rmt_fast.kernels import fast_launch, launch_configs

    if not fast_launch.ENABLED:
        pytest.skip("a Triton version whose run was not read: no fast launch")
    layout = SegmentLayout(10, 512, 10, True, token_counts=torch.tensor([512, 100], device=DEV))
    q, k, v = qkv_views(2, layout.seq_len, 8, 2, 64, torch.float16)
    grad_out = torch.randn(2, layout.seq_len, 8, 64, device=DEV, dtype=torch.float16)
    runs = []
    real_run = JITFunction.run

    def counting_run(self, *args, **kwargs):
        runs.append(self.fn.__name__)
        return real_run(self, *args, **kwargs)

    launch_configs.clear_launch_cache()
    first = kernel_fwd_bwd(q, k, v, layout, grad_out, dropout_p=0.1, seed=3)  # through run; builds the fast launches
    plans = launch_configs.cache_snapshot().shape_plans.values()
    assert plans and all(p.fast and None not in p.fast.values() for p in plans), "fast launch not built"
    JITFunction.run = counting_run
    try:
        fast = kernel_fwd_bwd(q, k, v, layout, grad_out, dropout_p=0.1, seed=3)
        assert runs == []
        fast_launch.ENABLED = False
        launch_configs.clear_launch_cache()
        slow = kernel_fwd_bwd(q, k, v, layout, grad_out, dropout_p=0.1, seed=3)
        assert len(runs) >= 3
    finally:
        JITFunction.run = real_run
        fast_launch.ENABLED = True
        launch_configs.clear_launch_cache()
    for a, b, c in zip(first, fast, slow, strict=True):
        assert torch.equal(a, b) and torch.equal(b, c)
