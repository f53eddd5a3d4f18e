"""The stream's fixed-shape step (rmt_fast/stream_steps.py FastSlotStep): built (captured) once, refills are
masked copies inside its static buffers, capture failure falls back; on the CPU with the stand-ins FastRMT's
graph tests use (StaticStep without capture; capture=True failing without CUDA), replay on a GPU."""

import pytest
import torch
from models import CLS, SEP, VOCAB, bert_cls, gpt2, pair
from numerics import TOL, assert_close

from rmt_fast import stream_steps
from rmt_fast.cuda_graph import StaticStep
from rmt_fast.stream import DocumentStream


def _docs(lengths, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g) for n in lengths]


def _wrappers():
    torch.manual_seed(0)
    return {
        "decoder": pair(gpt2, 2, 5)[1].eval(),
        "encoder": pair(bert_cls, 2, 5, cls_token_id=CLS, sep_token_id=SEP)[1].eval(),
    }


WRAPPERS = _wrappers()


def _alone(rmt, doc):
    with torch.no_grad():
        return rmt(doc[None], labels=doc[None] if rmt.is_decoder else None)


def _check(rmt, docs, results, tol=TOL[torch.float32]):
    for doc, res in zip(docs, results):
        alone = _alone(rmt, doc)
        assert_close(res.memory_state, alone.memory_state, tol=tol, name="memory")
        if rmt.is_decoder and torch.isnan(alone.loss):  # a one-token document: 0 / 0, alone too
            assert torch.isnan(res.loss)
        elif rmt.is_decoder:
            assert_close(res.loss, alone.loss, tol=tol, floor=1.0, name="loss")  # <= tol * max(1, |alone|)
        else:
            assert_close(res.logits, alone.logits, tol=tol, name="logits")


@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_step_is_built_once_and_refills_reuse_its_buffers(kind, monkeypatch):
    rmt = WRAPPERS[kind]
    built, calls = [], []

    class Recording(StaticStep):
        def __init__(self, fn, inputs, capture, warmup=2):
            built.append({k: v.data_ptr() for k, v in inputs.items()})

            def recorded(**kw):
                calls.append({k: (v.data_ptr(), tuple(v.shape)) for k, v in kw.items()})
                return fn(**kw)

            super().__init__(recorded, inputs, capture, warmup)

    monkeypatch.setattr(stream_steps, "StaticStep", Recording)
    docs = _docs([12, 3, 7, 1, 22, 5, 9, 2, 14])  # many refills of 3 slots
    stream = DocumentStream(rmt, 3, use_tqdm=False, admission="input")
    results = stream.run(docs)
    _check(rmt, docs, results)
    assert len(built) == 1 and stream.stepper.builds == 1  # one shape: one build (one capture on a GPU)
    assert len(calls) == stream.stats.steps
    assert all(c == calls[0] for c in calls)  # every step: the same buffers, the same shapes
    assert {k: v[0] for k, v in calls[0].items()} == built[0]


@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_refill_resets_memory_inside_the_step(kind):
    """The reset is a masked copy inside the step: garbage (NaN) left in the memory buffer by anything before
    never reaches a new document, and idle slots never reach the results."""
    rmt = WRAPPERS[kind]
    stream = DocumentStream(rmt, 4, use_tqdm=False)
    docs = _docs([9, 4, 13])
    stream.run(docs)
    stream.stepper.step.inputs["memory"].fill_(float("nan"))  # what a previous stream left behind, at worst
    results = stream.run(docs)  # 3 documents in 4 slots: one idle slot
    _check(rmt, docs, results)
    assert stream.stepper.builds == 1


def test_reset_flag_is_read_from_the_packed_inputs():
    """Plant check for the test above: a step whose reset flags are cleared keeps the garbage."""
    rmt = WRAPPERS["decoder"]
    stream = DocumentStream(rmt, 2, use_tqdm=False)
    stream.run(_docs([4]))
    stream.stepper.step.inputs["memory"].fill_(float("nan"))
    docs = _docs([4, 6])
    original = stream_steps.FastSlotStep.run

    def no_reset(self, work):
        for d in work:
            if d is not None:
                d.packs[:, -1] = 0
        return original(self, work)

    stream.stepper.run = no_reset.__get__(stream.stepper)
    results = stream.run(docs)
    assert all(torch.isnan(r.memory_state).all() for r in results)


def test_capture_failure_warns_and_runs_the_same_step_eagerly():
    rmt = WRAPPERS["decoder"]
    stream = DocumentStream(rmt, 2, use_tqdm=False, cuda_graph=True)  # on the CPU, capture fails (no CUDA)
    docs = _docs([8, 3, 11])
    with pytest.warns(RuntimeWarning, match="capture failed"):
        results = stream.run(docs)
    _check(rmt, docs, results)
    assert stream.stepper.step.graph is None and stream.stepper.builds == 1


# ------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_gpu_stream_captures_once_and_equals_each_document_alone(kind):
    rmt = WRAPPERS[kind].cuda()
    try:
        docs = [d.cuda() for d in _docs([12, 3, 7, 1, 22, 5, 9, 2, 14])]
        stream = DocumentStream(rmt, 3, use_tqdm=False)
        results = stream.run(docs)
        assert stream.stepper.step.graph is not None and stream.stepper.builds == 1
        # on CUDA a batched step and a lone document may run other GEMM kernels: ten times fp32's bound, as before
        _check(rmt, docs, results, tol=10 * TOL[torch.float32])
    finally:
        rmt.cpu()
