"""torch.compile: FastRMT compiled on the SDPA path (CPU), the Triton kernel's custom ops traced by the compiler
(CPU dry run: no kernel runs), and compiled FastRMT with the kernel inside (GPU)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from models import DECODERS, VOCAB, llama, pair
from numerics import TOL, assert_close


def _triton_llama():
    """The Llama test model widened to head dim 32 (hidden 128, 4 heads): inside the triton backend's head-dim
    range [16, 256], which the default test models (head dim 8) are not."""
    return llama(hidden_size=128)


def _ids(b, t, seed=0):
    return torch.randint(3, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def _fwd_bwd(rmt, ids, mask):
    rmt.zero_grad(set_to_none=True)
    out = rmt(ids, attention_mask=mask, labels=ids)
    (out.loss + out.memory_state.float().square().mean()).backward()
    grads = {
        n.removeprefix("_orig_mod."): p.grad.detach().clone() for n, p in rmt.named_parameters() if p.grad is not None
    }
    return out, grads


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_compiled_fastrmt_sdpa_equals_eager(name):
    torch._dynamo.reset()
    _, fast = pair(DECODERS[name], 2, 6, attn_backend="sdpa")
    ids = _ids(2, 15)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    eager, g_eager = _fwd_bwd(fast, ids, mask)
    compiled = torch.compile(fast, backend="aot_eager")
    got, g_got = _fwd_bwd(compiled, ids, mask)
    for key in ("logits", "memory_state", "loss"):
        assert_close(getattr(got, key), getattr(eager, key), dtype=torch.float32, name=key)
    assert g_got.keys() == g_eager.keys() and g_got
    for n in g_eager:
        assert_close(g_got[n], g_eager[n], dtype=torch.float32, name=n)


_DRY_RUN = textwrap.dedent(
    """
    import logging, torch, triton
    from triton.backends.compiler import GPUTarget

    class FakeDriver:  # torch's mutation analysis compiles the kernels to TTIR for the current target
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    triton.runtime.driver.set_active(FakeDriver())
    from rmt_fast.kernels import triton_attention as ra
    from rmt_fast.kernels.layout import SegmentLayout
    from torch._dynamo.backends.common import aot_autograd

    warnings = []
    class Catch(logging.Handler):
        def emit(self, record):
            warnings.append(record.getMessage())
    logging.getLogger("torch._higher_order_ops.triton_kernel_wrap").addHandler(Catch())

    joint = []
    def fw(gm, example):
        joint.append(gm.code)
        raise SystemExit(0 if ok(gm.code) else 3)
    def ok(code):
        return "rmt_attn" not in code and code.count("triton_kernel_wrapper_functional(") == 1

    def partition(joint_gm, inputs, **kw):
        joint.append(joint_gm.code)
        from torch._functorch.partitioners import default_partition
        return default_partition(joint_gm, inputs, **kw)

    B, H, T, D = 2, 4, 20, 32
    q, k, v = (torch.randn(B, T, H, D).transpose(1, 2).requires_grad_() for _ in range(3))
    layout = SegmentLayout(2, 16, 2, True, token_starts=torch.tensor([1, 0], dtype=torch.int32),
                           token_counts=torch.tensor([12, 16], dtype=torch.int32))
    f = torch.compile(lambda q, k, v: ra.rmt_attention(q, k, v, layout, check=False),
                      backend=aot_autograd(fw_compiler=fw, bw_compiler=fw, partition_fn=partition), fullgraph=True)
    try:
        f(q, k, v)
    except SystemExit as e:
        code = joint[0]
        clones = [line.split("tensors_to_clone = ")[1].split("]")[0] + "]"
                  for line in code.splitlines() if "tensors_to_clone" in line]
        print(clones)
        # forward; dQ storing delta (the default "inline" dQ: no preprocess launch); dK/dV
        assert clones == ["['Out', 'LSE']", "['DQ', 'DELTA']", "['DK', 'DV']"], clones
        assert not [w for w in warnings if "assuming every input is mutated" in w], warnings
        raise SystemExit(e.code)
    raise SystemExit(4)
    """
)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU test below compiles for real")
def test_triton_ops_trace_through_torch_compile_dry_run():
    """Without a GPU: torch.compile traces rmt_attention into the custom ops and decomposes them into the three
    kernel launches of the default variants (forward; backward dq storing delta, dk/dv), each mutating only its
    own outputs. Compiling and running the kernels needs a GPU (the test below)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _DRY_RUN], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the Triton interpreter runs on CPU-only machines")
def test_triton_model_runs_on_the_triton_backend_interpreted():
    """The GPU test's model is one the triton backend accepts: forced onto it, FastRMT runs (Triton's
    interpreter, fp32, eager) and equals the SDPA path."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest on CPU-only machines)")
    _, tri = pair(_triton_llama, 4, 32, attn_backend="triton")
    _, sdpa = pair(_triton_llama, 4, 32, attn_backend="sdpa")
    ids = _ids(2, 30)  # one segment, row 0 left-padded
    mask = torch.ones_like(ids)
    mask[0, :8] = 0
    with torch.no_grad():
        got, want = (m(ids, attention_mask=mask, labels=ids) for m in (tri, sdpa))
    for key in ("logits", "memory_state"):
        assert_close(getattr(got, key), getattr(want, key), dtype=torch.float32, name=key)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compiled_fastrmt_triton_equals_eager_gpu(dtype):
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("needs compiled Triton kernels (TRITON_INTERPRET unset)")
    torch._dynamo.reset()
    _, fast = pair(_triton_llama, 4, 32, attn_backend="triton")
    fast = fast.to("cuda", dtype)
    ids = _ids(2, 150).cuda()
    mask = torch.ones_like(ids)
    mask[0, :40] = 0  # left padding: visible runs in the kernel
    eager, g_eager = _fwd_bwd(fast, ids, mask)
    got, g_got = _fwd_bwd(torch.compile(fast), ids, mask)
    # compiled (inductor's fusions round differently) against eager, both in low precision and each about
    # TOL[dtype] from exact: 2x the bound in bf16, 5x in fp16 (whose 150-token softmax sums lose more), as before;
    # gradients another 5x (the backward through 5 segments)
    tol = 2 * TOL[torch.bfloat16] if dtype == torch.bfloat16 else 5 * TOL[torch.float16]
    for key in ("logits", "memory_state"):
        assert_close(getattr(got, key), getattr(eager, key), tol=tol, name=key)
    assert_close(got.loss, eager.loss, tol=tol, name="loss")
    for n in g_eager:
        assert_close(g_got[n], g_eager[n], tol=5 * tol, name=n)


@pytest.mark.gpu
def test_compiled_kernel_op_equals_eager_gpu():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("needs compiled Triton kernels (TRITON_INTERPRET unset)")
    from rmt_fast.kernels import triton_attention as ra
    from rmt_fast.kernels.layout import SegmentLayout

    torch._dynamo.reset()
    g = torch.Generator(device="cuda").manual_seed(0)
    B, Hq, Hkv, T, D = 3, 8, 2, 200, 64
    q = torch.randn(B, T, Hq, D, device="cuda", dtype=torch.float16, generator=g).transpose(1, 2)
    k, v = (
        torch.randn(B, T, Hkv, D, device="cuda", dtype=torch.float16, generator=g).transpose(1, 2) for _ in range(2)
    )
    layout = SegmentLayout(
        8,
        184,
        8,
        True,
        token_starts=torch.tensor([0, 30, 90], device="cuda"),
        token_counts=torch.tensor([184, 120, 90], device="cuda"),
    )

    def f(q, k, v):
        return ra.rmt_attention(q, k, v, layout, check=False)

    grads = []
    for fn in (f, torch.compile(f, fullgraph=True)):
        qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
        out = fn(qq, kk, vv)
        out.float().square().sum().backward()
        grads.append((out.detach(), qq.grad, kk.grad, vv.grad))
    for a, b in zip(*grads, strict=True):
        assert torch.isfinite(b).all()
        assert_close(b, a, dtype=torch.float16, name="compiled out/dq/dk/dv")
