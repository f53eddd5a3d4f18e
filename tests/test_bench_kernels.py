"""The kernels benchmark's sweep on the CPU: every method it builds runs in Triton's interpreter (the GPU's
timer replaced by one call of each step), rows and summary have their columns, and the Triton forward agrees
with SDPA's on a full causal segment."""

import os

import pytest
import torch
from rmt_fast.bench import kernels, runner
from rmt_fast.bench.runner import Timing
from rmt_fast.kernels import dispatch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs Triton's interpreter")


def test_kernels_sweep_in_the_interpreter(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "settings", lambda quick: [dict(dtype="float16", D=16, layout=layout, B=2, T=36)
                                                            for layout in ("full", "padded")])  # fmt: skip
    monkeypatch.setattr(kernels, "H", 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "cpu stand-in")
    ctx = runner.Context("kernels", tmp_path, quick=True, device="cpu")
    outputs = []

    def one_call(fn, **kwargs):
        outputs.append(fn())
        return Timing(1e-3, 9e-4, 1.1e-3, 1)

    monkeypatch.setattr(ctx.timer, "kernel", one_call)
    with dispatch.use_table(None):  # no measured table: auto is SDPA
        rows = ctx.sweep(kernels.cases(ctx), kernels.measure, series=kernels.BENCHMARK.series, after_failure="continue")
    assert all(r["status"] in ("ok", "skipped") for r in rows), [(r["method"], r["note"]) for r in rows]
    ok = [r for r in rows if r["status"] == "ok"]
    assert {(r["method"], r["layout"]) for r in ok} == {
        ("triton", "full"), ("triton", "padded"), ("sdpa_flash_nomask", "full"), ("sdpa_flash_nomask", "padded"),
        ("sdpa_dense_mask", "padded")}  # fmt: skip
    assert all(r["mode"] in ("fwd", "fwd+bwd") and r["auto_choice"] == "sdpa" and r["tflops"] > 0 for r in ok)
    measured = dict(zip(((r["method"], r["layout"], r["mode"]) for r in ok), outputs, strict=True))
    for key, out in measured.items():
        grads = out if key[2] == "fwd+bwd" else (out,)
        assert len(grads) == (3 if key[2] == "fwd+bwd" else 1) and all(torch.isfinite(g).all() for g in grads), key
    tri, ref = measured[("triton", "full", "fwd")], measured[("sdpa_flash_nomask", "full", "fwd")].transpose(1, 2)
    assert ((tri.float() - ref.float()).norm() / ref.float().norm()) < 2e-3
    summary, record = kernels.summarize(ctx, rows)
    assert record["env"]["gpu"] == "cpu stand-in" and "xformers" in record["env"] and "targets met" in summary
    assert not any(r["status"] == "skipped" for r in record["rows"])
