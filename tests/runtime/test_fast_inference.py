"""FastRMT(fast_inference=True): the path each call takes, the logged fall-backs, and results equal to the eager
path's (the graphed path's no-capture logic on the CPU through the ``graphs_supported`` seam)."""

from __future__ import annotations

import logging

import pytest
import torch
from models import CLS, PAD, SEP, VOCAB, bert_cls, gpt2
from numerics import assert_close

from rmt_fast import FastRMT
from rmt_fast import fast_inference as fi

BERT_IDS = dict(cls_token_id=CLS, sep_token_id=SEP, pad_token_id=PAD)


def _ids(b, t, seed=3):
    return torch.randint(3, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def _pair(factory, size, **kw):
    """(plain FastRMT, FastRMT(fast_inference=True, **kw)) on one backbone, with one memory."""
    torch.manual_seed(0)
    model = factory()
    extra = BERT_IDS if factory is bert_cls else {}
    plain = FastRMT(model, 4, size, attn_backend="sdpa", **extra).eval()
    fast = FastRMT(model, 4, size, attn_backend="sdpa", fast_inference=True, **extra, **kw).eval()
    fast.load_state_dict(plain.state_dict())
    return plain, fast


def _fallbacks(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "fast_inference=True) falls back" in r.getMessage()]


def test_bad_value_is_refused_by_name():
    with pytest.raises(ValueError, match="fast_inference must be True or False"):
        FastRMT(gpt2(), 4, 8, fast_inference="yes")
    with pytest.raises(ValueError, match="compile_step"):
        FastRMT(gpt2(), 4, 8, fast_inference=True, compile_step="fast")


@pytest.mark.parametrize("factory", [gpt2, bert_cls])
def test_cpu_falls_back_to_eager_and_logs_once(caplog, factory):
    plain, fast = _pair(factory, 8)
    ids = _ids(2, 20)
    caplog.set_level(logging.WARNING, logger="rmt_fast")
    with torch.no_grad():
        path, reason = fast.inference_path()
        assert path == "eager" and "the model is on cpu" in reason
        got, again, want = fast(ids), fast(ids), plain(ids)
    assert torch.equal(got.logits, want.logits) and torch.equal(got.memory_state, want.memory_state)
    assert torch.equal(again.logits, want.logits)
    logged = _fallbacks(caplog)
    assert len(logged) == 1 and "CUDA graphs need a CUDA device" in logged[0]
    assert "decoder_step" not in vars(fast) and "encoder_step" not in vars(fast)  # nothing compiled


def test_training_runs_the_eager_step_with_gradients(caplog):
    plain, fast = _pair(gpt2, 8)
    ids = _ids(2, 20)
    caplog.set_level(logging.WARNING, logger="rmt_fast")
    path, reason = fast.inference_path()
    assert path == "eager" and "gradients are enabled" in reason
    fast(ids, labels=ids).loss.backward()
    plain(ids, labels=ids).loss.backward()
    assert "gradients are enabled" in _fallbacks(caplog)[0]
    for (name, a), b in zip(fast.named_parameters(), plain.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad), name


@pytest.mark.parametrize("factory", [gpt2, bert_cls])
def test_graphed_compiled_path_equals_eager(monkeypatch, caplog, factory):
    """Where graphs apply (the seam says yes on the CPU): the compiled step runs in the graph runner, only for
    the call; results equal the eager path's to fp32 rounding (the runner gives SDPA a mask of all-visible
    keys, the eager path none)."""
    monkeypatch.setattr(fi, "graphs_supported", lambda device: True)
    plain, fast = _pair(factory, 8, compile_step={"backend": "aot_eager"})
    ids = _ids(2, 20)
    caplog.set_level(logging.WARNING, logger="rmt_fast")
    with torch.no_grad():
        assert fast.inference_path() == ("graphed+compiled", None)
        got, want = fast(ids), plain(ids)
    assert_close(got.logits, want.logits, dtype=torch.float32, name="logits")
    assert_close(got.memory_state, want.memory_state, dtype=torch.float32, name="memory")
    assert fast._fast.compiled._fn is not None and fast._fast.runner.steps  # compiled, and run by the runner
    assert "decoder_step" not in vars(fast) and "encoder_step" not in vars(fast) and fast._graphs is None
    assert _fallbacks(caplog) == []


def test_a_failing_compiler_falls_back_to_graphed(monkeypatch, caplog):
    def broken_backend(gm, example_inputs):
        raise RuntimeError("no compiler on this machine")

    monkeypatch.setattr(fi, "graphs_supported", lambda device: True)
    plain, fast = _pair(gpt2, 8, compile_step={"backend": broken_backend})
    ids = _ids(2, 20)
    caplog.set_level(logging.WARNING, logger="rmt_fast")
    with torch.no_grad():
        got, again, want = fast(ids), fast(ids), plain(ids)
        path, reason = fast.inference_path()
    assert torch.equal(again.logits, got.logits)
    assert_close(got.logits, want.logits, dtype=torch.float32, name="logits")
    assert path == "graphed" and "no compiler on this machine" in reason
    logged = _fallbacks(caplog)
    assert len(logged) == 1 and "compiling the step failed" in logged[0]


def test_without_the_flag_the_path_is_the_configured_one():
    torch.manual_seed(0)
    assert FastRMT(gpt2(), 4, 8).inference_path() == ("eager", None)
    graphed = FastRMT(gpt2(), 4, 8, cuda_graph=True, compile_step={"backend": "aot_eager"})
    assert graphed.inference_path() == ("graphed+compiled", None)


@pytest.mark.slow  # the CPU version of the 1M-token run: compiles a tiny BERT (aot_eager), ~1 min on 2 busy cores
def test_million_run_has_the_one_switch_row(tmp_path):
    import csv

    from rmt_fast.bench import cuda_graph, runner

    summary = runner.run(cuda_graph, tmp_path, quick=True, million=True, device="cpu")
    with open(tmp_path / "million.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["method"] == "fast_inference"]
    assert len(rows) == 1 and rows[0]["status"] == "ok" and rows[0]["path"] == "eager"
    assert "CUDA graphs need a CUDA device" in rows[0]["note"]
    assert summary["seconds_fast_inference"] == pytest.approx(float(rows[0]["seconds"]))
