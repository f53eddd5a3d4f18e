"""pytest-benchmark microbenchmarks (not in the default test run: pyproject's testpaths is ``tests``).

    pytest benchmarks --benchmark-only -q
    pytest benchmarks --benchmark-only --benchmark-autosave          # saves into .benchmarks/
    pytest benchmarks --benchmark-only --benchmark-compare           # against the last saved run

* ``segment-gpt2`` / ``segment-bert``: one forward of a one-segment input through FastRMT and ReferenceRMT
  (small backbones built from configs, CPU, ``no_grad``, one torch thread);
* ``attention-cuda``: the Triton RMT kernel against SDPA on the same segment (skipped without CUDA).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("pytest_benchmark")

VOCAB = 1000
CLS, SEP, PAD = 101, 102, 0
MEM = 10


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _gpt2(wrapper: str):
    import transformers as tf

    from rmt_fast import FastRMT, ReferenceRMT

    torch.manual_seed(0)
    cfg = tf.GPT2Config(
        n_layer=2,
        n_embd=64,
        n_head=2,
        n_inner=256,
        vocab_size=VOCAB,
        n_positions=128,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    cls = FastRMT if wrapper == "FastRMT" else ReferenceRMT
    rmt = cls(tf.GPT2LMHeadModel(cfg), MEM, 128 - 2 * MEM).eval()
    ids = torch.randint(103, VOCAB, (1, 128 - 2 * MEM), generator=torch.Generator().manual_seed(1))
    return rmt, ids


def _bert(wrapper: str):
    import transformers as tf

    from rmt_fast import FastRMT, ReferenceRMT

    torch.manual_seed(0)
    cfg = tf.BertConfig(
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=2,
        intermediate_size=256,
        vocab_size=VOCAB,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=PAD,
    )
    cls = FastRMT if wrapper == "FastRMT" else ReferenceRMT
    size = 128 - MEM - 3
    rmt = cls(
        tf.BertModel(cfg, add_pooling_layer=False), MEM, size, cls_token_id=CLS, sep_token_id=SEP
    ).eval()
    ids = torch.randint(103, VOCAB, (1, size), generator=torch.Generator().manual_seed(1))
    return rmt, ids


@pytest.mark.parametrize("wrapper", ["ReferenceRMT", "FastRMT"])
@pytest.mark.parametrize("backbone", ["gpt2", "bert"])
def test_segment_forward(benchmark, backbone, wrapper):
    rmt, ids = (_gpt2 if backbone == "gpt2" else _bert)(wrapper)
    benchmark.group = f"segment-{backbone}"
    benchmark.extra_info.update(backbone=backbone, wrapper=wrapper, positions=128, mem=MEM)

    def step():
        with torch.no_grad():
            return rmt(ids, return_logits=False)

    out = benchmark(step)
    assert out.memory_state.shape == (1, MEM, 64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["triton", "sdpa"])
def test_attention_kernel(benchmark, method):
    from rmt_fast.kernels.layout import SegmentLayout
    from rmt_fast.kernels.sdpa_attention import sdpa_rmt_attention

    B, H, T, D = 8, 12, 532, 64
    device = torch.device("cuda")
    counts = torch.full((B,), T - 2 * MEM, dtype=torch.int32, device=device)
    counts[1::2] -= 50
    layout = SegmentLayout(MEM, T - 2 * MEM, MEM, True, token_counts=counts)
    q, k, v = (torch.randn(B, H, T, D, device=device, dtype=torch.float16) for _ in range(3))
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
