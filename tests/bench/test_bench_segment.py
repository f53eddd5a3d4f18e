"""pytest-benchmark microbenchmarks, run only when asked for (``--benchmark-only``); the models are presets.

    pytest tests/bench/test_bench_segment.py --benchmark-only -q
    pytest tests/bench/test_bench_segment.py --benchmark-only --benchmark-autosave     # saves into .benchmarks/
    pytest tests/bench/test_bench_segment.py --benchmark-only --benchmark-compare      # against the last saved run

* ``segment-gpt2`` / ``segment-bert``: one forward of a one-segment input through FastRMT and ReferenceRMT
  (the ``gpt2-cpu`` / ``bert-cpu`` presets, 128 positions, CPU, ``no_grad``, one torch thread);
* ``attention-cuda``: the Triton RMT kernel against SDPA on the same segment (skipped without CUDA).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from rmt_fast.bench import presets  # noqa: E402

MEM, POSITIONS = 10, 128


@pytest.fixture(autouse=True)
def _only_when_benchmarking(request):
    if not request.config.getoption("benchmark_only", default=False):
        pytest.skip("a microbenchmark: run with --benchmark-only")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _segment(backbone: str, wrapper: str):
    name = {"gpt2": "gpt2-cpu", "bert": "bert-cpu"}[backbone]
    p = presets.preset(name)
    model = presets.model(name, "lm" if backbone == "gpt2" else "bare")
    size = p.segment_size(POSITIONS, MEM)
    rmt = presets.rmt("fast" if wrapper == "FastRMT" else "reference", model, name, MEM, size).eval()
    return rmt, presets.content_ids(1, size, p.vocab, seed=1)


@pytest.mark.parametrize("wrapper", ["ReferenceRMT", "FastRMT"])
@pytest.mark.parametrize("backbone", ["gpt2", "bert"])
def test_segment_forward(benchmark, backbone, wrapper):
    rmt, ids = _segment(backbone, wrapper)
    benchmark.group = f"segment-{backbone}"
    benchmark.extra_info.update(backbone=backbone, wrapper=wrapper, positions=POSITIONS, mem=MEM)

    def step():
        with torch.no_grad():
            return rmt(ids, return_logits=False)

    out = benchmark(step)
    assert out.memory_state.shape == (1, MEM, 64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["triton", "sdpa"])
def test_attention_kernel(benchmark, method):
    from rmt_fast.bench.common import bench_layout
    from rmt_fast.kernels.sdpa_attention import sdpa_rmt_attention

    B, H, T, D = 8, 12, 532, 64
    layout = bench_layout(B, T, device="cuda", mem=MEM)
    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.float16) for _ in range(3))
    if method == "triton":
        from rmt_fast.kernels.triton_attention import rmt_attention, rmt_attention_supported

        reason = rmt_attention_supported(q, k, v, layout)
        if reason:
            pytest.skip(reason)
        fn = lambda: rmt_attention(q, k, v, layout)
    else:
        fn = lambda: sdpa_rmt_attention(q, k, v, layout)
    benchmark.group = "attention-cuda"
    benchmark.extra_info.update(B=B, H=H, T=T, D=D, dtype="float16")

    def step():
        fn()
        torch.cuda.synchronize()

    benchmark(step)
