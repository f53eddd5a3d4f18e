"""The kernels benchmark's sweep on the CPU: every method it builds runs in Triton's interpreter (the GPU's
timer replaced by one call of each step), rows and summary have their columns, and the Triton forward agrees
with SDPA's on a full causal segment."""

import os

import pytest
import torch
from numerics import TOL, assert_close

from rmt_fast.bench import kernels, runner
from rmt_fast.bench.runner import Timing
from rmt_fast.kernels import dispatch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs Triton's interpreter")


def test_kernels_sweep_in_the_interpreter(monkeypatch, tmp_path):
    monkeypatch.setattr(
        kernels,
        "settings",
        lambda quick: [dict(dtype="float16", D=16, layout=layout, B=2, T=36) for layout in ("full", "padded")],
    )
    monkeypatch.setattr(kernels, "H", 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "cpu stand-in")
    ctx = runner.Context("kernels", tmp_path, quick=True, device="cpu")
    outputs = []

    def one_call(fn, **kwargs):  # the graphed stand-in runs the step once
        outputs.append(fn())
        return Timing(1e-3, 9e-4, 1.1e-3, 1)

    monkeypatch.setattr(ctx.timer, "graphed", one_call)
    monkeypatch.setattr(ctx.timer, "eager", lambda fn, **kwargs: Timing(1.5e-3, 1.4e-3, 1.6e-3, 3))
    with dispatch.use_table(None):  # no measured table: auto is SDPA
        rows = ctx.sweep(kernels.cases(ctx), kernels.measure, series=kernels.BENCHMARK.series, after_failure="continue")
    status = {(r["method"], r["layout"], r["mode"]): r["status"] for r in rows}
    assert all(s in ("ok", "skipped", "unavailable") for s in status.values()), [
        (r["method"], r["note"]) for r in rows if r["status"] not in ("ok", "skipped", "unavailable")
    ]
    for layout in ("full", "padded"):
        for mode in ("fwd", "fwd+bwd"):
            for method in ("triton", "sdpa", "sdpa_flash_nomask"):
                assert status[(method, layout, mode)] == "ok", (method, layout, mode)
            # the CPU build has no efficient or cuDNN kernel: forced, they refuse (a row, not a crash)
            for method in ("sdpa_efficient", "sdpa_cudnn"):
                assert status[(method, layout, mode)] == "unavailable", (method, layout, mode)
        assert status[("flex", layout, "fwd")] == "ok" and status[("flex", layout, "fwd+bwd")] == "unavailable"
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(r["mode"] in ("fwd", "fwd+bwd") and r["auto_choice"] == "sdpa" and r["tflops"] > 0 for r in ok)
    assert all(r["ms"] == 1.0 and r["eager_ms"] == 1.5 and r["host_ms"] == pytest.approx(0.5) for r in ok)
    measured = dict(zip(((r["method"], r["layout"], r["mode"]) for r in ok), outputs, strict=True))
    for key, out in measured.items():
        grads = out if key[2] == "fwd+bwd" else (out,)
        assert len(grads) == (3 if key[2] == "fwd+bwd" else 1) and all(torch.isfinite(g).all() for g in grads), key
    tri, ref = measured[("triton", "full", "fwd")], measured[("sdpa_flash_nomask", "full", "fwd")].transpose(1, 2)
    # fp16 outputs of two kernels, each about TOL[fp16] from exact: twice the fp16 bound between them, as before
    assert_close(tri, ref, tol=2 * TOL[torch.float16], name="triton against SDPA")
    flex, sdpa = measured[("flex", "padded", "fwd")], measured[("sdpa", "padded", "fwd")]
    assert_close(flex, sdpa, tol=2 * TOL[torch.float16], name="flex against SDPA")
    summary, record = kernels.summarize(ctx, rows)
    assert record["env"]["gpu"] == "cpu stand-in" and "xformers" in record["env"] and "targets met" in summary
    assert not any(r["status"] == "skipped" for r in record["rows"])
