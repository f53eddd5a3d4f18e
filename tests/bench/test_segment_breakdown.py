"""One segment step: the SDPA mask is built once per segment (not once per layer), the kernel kinds, and the
segment-breakdown benchmark on the CPU (its kernel count by kind and its FLOPs against hand counts)."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from models import CLS, PAD, SEP, VOCAB, bert_bare, gpt2
from numerics import assert_close

from rmt_fast import FastRMT
from rmt_fast.kernels.layout import SegmentLayout


def _count_masks(monkeypatch) -> list:
    calls = []
    original = SegmentLayout.dense_mask

    def counted(self, *args, **kwargs):
        calls.append(None)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SegmentLayout, "dense_mask", counted)
    return calls


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_graphed_segment_builds_its_mask_once(monkeypatch, kind):
    """The graphed runner gives every segment per-row counts (a padded layout), so the SDPA backend needs a
    dense mask: one per segment, shared by the layers; the results are those of a mask built in every layer
    (bitwise) and of the eager path (to fp32 rounding: there SDPA runs without a mask)."""
    from rmt_fast.attention import ActiveSegment

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    if kind == "encoder":
        model, size, kw = bert_bare(num_hidden_layers=3), 9, dict(cls_token_id=CLS, sep_token_id=SEP, pad_token_id=PAD)
    else:
        model, size, kw = gpt2(n_layer=3), 8, {}
    ids = torch.randint(3, VOCAB, (2, 3 * size), generator=gen)
    eager = FastRMT(model, 4, size, attn_backend="sdpa", **kw).eval()
    graphed = FastRMT(model, 4, size, attn_backend="sdpa", cuda_graph=True, **kw).eval()
    graphed.load_state_dict(eager.state_dict())  # the same initial memory
    calls = _count_masks(monkeypatch)
    with torch.no_grad():
        eager_out = eager(ids)
        assert calls == []  # full segments: SDPA without a mask
        with monkeypatch.context() as m:  # every layer builds its own mask, as before
            m.setattr(
                ActiveSegment,
                "dense_mask",
                lambda self, q_len, device, dtype=None: self.layout.dense_mask(q_len, device),
            )
            per_layer = graphed(ids)
        assert len(calls) == 9  # 3 segments x 3 layers
        got = graphed(ids)
    assert len(calls) == 9 + 3  # one per segment
    assert torch.equal(got.memory_state, per_layer.memory_state) and torch.equal(got.logits, per_layer.logits)
    assert_close(got.memory_state, eager_out.memory_state, dtype=torch.float32, name="memory")  # was 1e-4
    assert_close(got.logits, eager_out.logits, dtype=torch.float32, name="logits")


def test_kernel_kinds():
    from rmt_fast.bench.segment_breakdown import by_kind, kind_of

    expect = {
        "aten::linear": "matmul",
        "aten::addmm": "matmul",
        "sm90_xmma_gemm_f16f16_f16f32": "matmul",
        "triton_tem_fused_addmm_0": "matmul",
        "ampere_fp16_s16816gemm_fp16_128x128": "matmul",
        "aten::scaled_dot_product_attention": "attention",
        "fmha_cutlassF_f16_aligned_64x64_rf_sm80": "attention",
        "_rmt_attn_fwd_kernel": "attention",
        "pytorch_flash::flash_fwd_kernel": "attention",
        "aten::layer_norm": "norm & elementwise",
        "aten::gelu": "norm & elementwise",
        "aten::add": "norm & elementwise",
        "graph_0_cpp_fused__scaled_dot_product_flash_attention_for_cpu_arange_lt_1": "norm & elementwise",
        "triton_per_fused_add_native_layer_norm_3": "norm & elementwise",
        "aten::copy_": "copies & fills",
        "aten::cat": "copies & fills",
        "aten::embedding": "copies & fills",
        "aten::new_ones": "copies & fills",
        "Memcpy HtoD (Pageable -> Device)": "copies & fills",
        "CatArrayBatchedCopy": "copies & fills",
    }
    assert {name: kind_of(name) for name in expect} == expect
    assert by_kind({"aten::linear": 2.0, "aten::gelu": 1.0})["matmul"] == 2.0


def test_bad_tree(tmp_path):
    from rmt_fast.bench import runner, segment_breakdown

    with pytest.raises(ValueError, match="--tree: expected LABEL=PATH"):
        runner.run(segment_breakdown, tmp_path, tree=["nolabel"])
    with pytest.raises(ValueError, match="no rmt_fast"):
        runner.run(segment_breakdown, tmp_path, tree=[f"old={tmp_path}"])
    with pytest.raises(ValueError, match="--variants"):
        runner.run(segment_breakdown, tmp_path, variants=["fastest"])


@pytest.mark.slow  # ~15 s of CPU, two probe processes (46 s wall on a loaded 2-core machine)
def test_breakdown_counts_and_flops_on_the_cpu(tmp_path):
    """One layer, eager and graphed: per layer 6 linears and one attention; the FLOPs equal the hand count of
    the layer's products; the graphed step adds a fixed number of mask and copy kernels per segment."""
    from rmt_fast.bench import runner, segment_breakdown

    summary = runner.run(
        segment_breakdown, tmp_path, quick=True, variants=["eager", "graphed"], layers=1, segments=1, device="cpu"
    )
    with open(tmp_path / "segment_breakdown.csv") as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"eager", "graphed"} and all(r["status"] == "ok" for r in rows.values())
    m = segment_breakdown.QUICK_CPU_MODEL
    t, d, f = m["positions"], m["hidden"], m["ffn"]
    flops = 2 * t * (4 * d * d + 2 * d * f) + 4 * t * t * d  # one layer: projections, FFN, QK^T and PV
    for r in rows.values():
        assert float(r["kernels: matmul"]) == 6 and float(r["kernels: attention"]) == 1
        assert float(r["flops_per_segment"]) == flops
        ops = json.loads(r["ops"])
        assert float(r["kernels_per_segment"]) == sum(ops.values())
    assert float(rows["graphed"]["host_ops_per_segment"]) == 2  # the ids copied in, the counts filled
    assert summary["now/eager kernels/segment"] == float(rows["eager"]["kernels_per_segment"])
    assert "| now |" in (tmp_path / "segment_breakdown.md").read_text()


def test_count_events_top_level_scope_and_device():
    """The probe's counting on stand-in profiler events: top-level ops only (a view or `to` is transparent, an op
    inside another op is not counted), in / out of the step scope, and every device event when on a GPU."""
    from types import SimpleNamespace as E

    from rmt_fast.bench import breakdown_probe as bp

    def ev(name, parent=None, device="CPU", us=1.0):
        e = E(name=name, cpu_parent=parent, device_type=device, cpu_time_total=us, time_range=E(elapsed_us=lambda: 2.0))
        return e

    scope = ev(bp.STEP_SCOPE)
    linear = ev("aten::linear", scope, us=5.0)
    to = ev("aten::to", scope)
    events = [
        scope,
        linear,
        ev("aten::addmm", linear),
        ev("aten::view", scope),
        to,
        ev("aten::_to_copy", to),
        ev("graph_0_cpp_fused_gelu_1", scope),
        ev("aten::copy_"),
        ev("aten::fill_"),
        ev("sm90_xmma_gemm", device="DeviceType.CUDA"),
        ev("Memcpy DtoD", device="DeviceType.CUDA"),
    ]
    got = bp._count_events(events, cuda=False)
    assert dict(got["ops_in"]) == {"aten::linear": 1, "aten::_to_copy": 1, "graph_0_cpp_fused_gelu_1": 1}
    assert dict(got["ops_out"]) == {"aten::copy_": 1, "aten::fill_": 1} and got["op_us_in"]["aten::linear"] == 5.0
    assert "kernels" not in got
    got = bp._count_events(events, cuda=True)
    assert dict(got["kernels"]) == {"sm90_xmma_gemm": 1, "Memcpy DtoD": 1} and got["kernel_us"]["Memcpy DtoD"] == 2.0
