"""tests/compile_diag.py, the compiled-step diagnosis: its verdict rules on planted numbers, and one real CPU run
(float32, Dynamo alone) end to end, JSON included."""

import json
import math
import subprocess
import sys
from pathlib import Path

import compile_diag as diag
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _errors(memory, logits=None, loss=None, grad=None, segments=None):
    """A run's errors against float64: the outputs, and per segment (three segments; the last one = memory)."""
    seg = segments if segments is not None else [memory / 2, memory / 1.5, memory]
    logits = memory if logits is None else logits
    return dict(
        segments=dict(memory=list(seg), logits=[logits] * 3),
        memory=memory,
        logits=logits,
        loss=memory if loss is None else loss,
        grad=memory * 10 if grad is None else grad,
        grad_worst="w",
    )


def _result(dtype="float16", apart=None, **variants):
    """A planted diagnose() result: ``variants`` name -> errors; ``apart``: compiled vs eager, final memory."""
    names = [n for n in variants if n != "eager"]
    return dict(
        dtype=dtype,
        variants=variants,
        compiled_vs_eager={n: dict(memory=apart if apart is not None else 0.0) for n in names},
    )


def test_verdict_ok_when_compiled_is_as_close_as_eager():
    eager = _errors(1e-3)
    res = _result(eager=eager, dynamo=eager, aot_eager=eager, inductor=_errors(1.5e-3), apart=5e-4)
    assert diag.verdict(res)[0] == "ok"


def test_verdict_fp16_effect_when_both_are_far_from_float64():
    """Compiled and eager 0.06 apart, each within 4x of the other's error against float64: the dtype's effect."""
    res = _result(
        eager=_errors(0.05), dynamo=_errors(0.05), aot_eager=_errors(0.05), inductor=_errors(0.07), apart=0.06
    )
    assert diag.verdict(res)[0] == "fp16-effect"
    res["dtype"] = "bfloat16"
    assert diag.verdict(res)[0] == "bf16-effect"


def test_verdict_compile_bug_names_the_first_stage_that_fails():
    """The H200 numbers' shape: eager fp16 1e-3 from float64, inductor 1.656 (bert_cls's final memory)."""
    eager, bad = _errors(1e-3), _errors(1.656)
    assert diag.verdict(_result(eager=eager, dynamo=eager, aot_eager=eager, inductor=bad))[0] == "compile-bug:inductor"
    assert diag.verdict(_result(eager=eager, dynamo=eager, aot_eager=bad, inductor=bad))[0] == "compile-bug:aot_eager"
    assert diag.verdict(_result(eager=eager, dynamo=bad, aot_eager=bad, inductor=bad))[0] == "compile-bug:dynamo"
    assert diag.verdict(_result(eager=eager, inductor=bad))[0] == "compile-bug:inductor"  # only inductor ran


def test_verdict_catches_one_segment_and_nan():
    """A bad padded segment whose error the later segments wash out, a bad gradient alone, and NaN, each fail."""
    eager = _errors(1e-3)
    one_segment = _errors(1e-3, segments=[0.5, 1e-3, 1e-3])
    assert diag.failures(one_segment, eager, torch.float16) == ["segment 0 memory"]
    assert diag.verdict(_result(eager=eager, inductor=one_segment))[0] == "compile-bug:inductor"
    assert diag.failures(_errors(1e-3, grad=0.5), eager, torch.float16) == ["grad"]
    nan = _errors(1e-3, loss=float("nan"))
    assert diag.failures(nan, eager, torch.float16) == ["loss"]
    assert diag.verdict(_result(eager=eager, inductor=nan))[0] == "compile-bug:inductor"


def test_verdict_compile_error_when_a_compiled_run_raises():
    eager = _errors(1e-3)
    res = _result(eager=eager, dynamo=eager, aot_eager=dict(error="TorchRuntimeError: x"), inductor=_errors(0.5))
    assert diag.verdict(res)[0] == "compile-error:aot_eager"
    res = _result(eager=eager, dynamo=dict(error="InterpreterError: y"))
    assert diag.verdict(res)[0] == "compile-error:dynamo"


def test_verdict_eager_nonfinite():
    res = _result(eager=_errors(float("inf")), inductor=_errors(float("nan")))
    assert diag.verdict(res)[0] == "eager-nonfinite"


def test_bound_is_factor_times_eager_with_the_dtype_floor():
    assert diag.bound(1e-2, torch.float16) == pytest.approx(4e-2)
    assert diag.bound(0.0, torch.float16) == 1e-3 and diag.bound(None, torch.float32) == 1e-5
    eager = _errors(0.0, grad=0.0, segments=[0.0] * 3)  # eager exact: the floor TOL[dtype] applies
    assert diag.failures(_errors(9e-4, grad=9e-4, segments=[9e-4] * 3), eager, torch.float16) == []
    over = diag.failures(_errors(2e-3, grad=0.0, segments=[0.0] * 3), eager, torch.float16)
    assert over == ["memory", "logits", "loss"] + [f"segment {t} logits" for t in range(3)]


def test_verdict_forced_kernel_against_eager_with_that_kernel():
    """inductor+sdpa_efficient is judged against eager+sdpa_efficient; only it failing names it; a kernel that could
    not run (an error entry) is listed, not judged."""
    eager = _errors(1e-3)
    res = _result(
        eager=eager,
        inductor=eager,
        **{
            "eager+sdpa_efficient": _errors(0.2),
            "inductor+sdpa_efficient": _errors(0.5),  # within 4 x 0.2: fine
            "eager+sdpa_math": eager,
            "inductor+sdpa_math": _errors(0.5),
            "inductor+sdpa_flash": dict(error="RuntimeError: No available kernel"),
        },
    )
    assert diag.verdict(res)[0] == "compile-bug:inductor+sdpa_math"
    res["variants"]["inductor+sdpa_math"] = eager
    verdict, why = diag.verdict(res)
    assert verdict == "ok" and "inductor+sdpa_flash" in why


def test_diagnose_on_cpu_end_to_end(tmp_path):
    """llama, fp32, Dynamo alone: per-segment errors for three segments, every compiled number within the bound,
    verdict ok, and the JSON as written after the last run."""
    out = tmp_path / "d.json"
    res = diag.diagnose("llama", "cpu", torch.float32, backends=("dynamo",), out=out)
    assert res["verdict"] == "ok", diag.table(res)
    assert res["segments"] == 3 and set(res["variants"]) == {"eager", "dynamo"}
    for name in ("eager", "dynamo"):
        e = res["variants"][name]
        assert len(e["segments"]["memory"]) == 3 and all(v <= 1e-5 for v in e["segments"]["memory"]), e
        assert e["grad"] <= 1e-4 and math.isfinite(e["loss"]), e
    assert all(v <= 1e-5 for k, v in res["compiled_vs_eager"]["dynamo"].items() if k != "grad_worst")
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))


@pytest.mark.slow
def test_command_line(tmp_path):
    """``python tests/compile_diag.py ...`` as the issue writes it (CPU, forward only, one backend)."""
    out = tmp_path / "x.json"
    cmd = [sys.executable, "tests/compile_diag.py", "--device", "cpu", "--dtype", "bfloat16", "--model", "bert_cls"]
    cmd += ["--backends", "dynamo", "--no-grad", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["verdict"] == "ok" and res["dtype"] == "bfloat16" and "grad" not in res["variants"]["dynamo"]
    assert "bert_cls cpu bfloat16" in done.stdout


def _drop_sdpa_masks(graph):
    """A planted inductor-only bug (a post-grad pass: inductor runs it, aot_eager does not): every forward SDPA
    call loses its attention mask."""
    for node in graph.nodes:
        name = str(node.target)
        if node.op == "call_function" and "scaled_dot_product" in name and "backward" not in name:
            if "attn_mask" in node.kwargs:
                node.kwargs = {k: v for k, v in node.kwargs.items() if k != "attn_mask"}


@pytest.mark.slow
def test_diagnose_names_inductor_for_an_inductor_only_bug():
    """With the planted post-grad pass, Dynamo alone and aot_eager stay within the bound and inductor does not:
    verdict compile-bug:inductor, flagged from the padded segment (llama's last) on."""
    import torch._inductor.config as inductor_config

    with inductor_config.patch(post_grad_custom_post_pass=_drop_sdpa_masks):
        res = diag.diagnose("llama", "cpu", torch.float32, grad=False)
    assert res["verdict"] == "compile-bug:inductor", diag.table(res)
    bad = diag.failures(res["variants"]["inductor"], res["variants"]["eager"], torch.float32)
    assert "segment 2 memory" in bad and "segment 0 memory" not in bad, bad
