"""The rmt_fast attention implementation: masks come from the layout, are never dropped, and the wrapped
backbone still works on its own."""

import pytest
import torch
from models import VOCAB, check_padding_and_causality, gpt2, llama, mistral, spy_sdpa
from numerics import assert_close
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from rmt_fast import FastRMT
from rmt_fast.attention import ATTN_NAME, active_segment, rmt_attention_forward
from rmt_fast.kernels.layout import SegmentLayout


def _ids(b, t, seed=5):
    return torch.randint(3, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def test_mask_function_is_registered():
    # transformers passes attention_mask=None to a custom attention name without a mask function
    assert ATTN_NAME in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping


@pytest.mark.parametrize("factory", [gpt2, llama])
def test_backbone_alone_is_unchanged_and_unwrap_restores(factory):
    torch.manual_seed(0)
    model = factory().eval()
    ids = _ids(2, 10)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    before = model(ids, attention_mask=mask).logits
    original = model.config._attn_implementation
    rmt = FastRMT(model, 2, 4)
    assert model.config._attn_implementation == ATTN_NAME
    # the backbone alone, before and after wrapping: the same computation (bit-equal on the CPU); 1e-7 relative is
    # below the old elementwise atol 1e-6 over these ~5-norm logits
    assert_close(model(ids, attention_mask=mask).logits, before, tol=1e-7, name="backbone logits, wrapped")
    assert rmt.unwrap() is model
    assert model.config._attn_implementation == original
    assert_close(model(ids, attention_mask=mask).logits, before, tol=1e-7, name="backbone logits, unwrapped")


def test_sdpa_gets_is_causal_or_a_layout_mask(monkeypatch):
    torch.manual_seed(0)
    rmt = FastRMT(gpt2(), 2, 6)
    seen = spy_sdpa(monkeypatch)
    rmt(_ids(1, 15))  # segments of 6, 6, 3: the last one is padded to 6
    n_layers = 2
    assert len(seen) == 3 * n_layers
    assert all(mask is None and causal for mask, causal in seen[: 2 * n_layers])
    for mask, causal in seen[2 * n_layers :]:  # one mask for the segment, in SDPA's additive form (0 / -inf)
        assert not causal and mask.dtype == torch.float32 and mask.shape == (1, 1, 10, 10)
        assert set(mask.unique().tolist()) == {0.0, float("-inf")}
        assert (mask[0, 0, -1] == 0).tolist() == [True] * 5 + [False] * 3 + [True] * 2
    assert all(mask is seen[2 * n_layers][0] for mask, _ in seen[2 * n_layers :])


def test_padding_and_causality_hold_in_fastrmt():
    torch.manual_seed(0)
    check_padding_and_causality(FastRMT(llama(), 2, 6).eval(), _ids(1, 12))


def test_a_mask_built_outside_the_interface_is_refused():
    layout = SegmentLayout(1, 2, 1, True)
    q = torch.randn(1, 2, 4, 8)
    module = torch.nn.Module()
    with active_segment(layout, "sdpa"), pytest.raises(RuntimeError, match="refusing to drop it"):
        rmt_attention_forward(module, q, q, q, torch.ones(1, 1, 4, 4, dtype=torch.bool))


def test_unsupported_mask_pattern_is_refused():
    rmt = FastRMT(mistral(sliding_window=4), 2, 6)  # a window shorter than the segment
    with pytest.raises(NotImplementedError, match="sliding windows"):
        rmt(_ids(1, 12))
    long_window = FastRMT(mistral(sliding_window=64), 2, 6)  # a window covering the segment is plain causal
    assert long_window(_ids(1, 12)).logits.shape == (1, 12, VOCAB)


def test_triton_backend_on_unsupported_case_is_an_error():
    rmt = FastRMT(gpt2(), 2, 6, attn_backend="triton")
    with pytest.raises(ValueError, match="attn_backend='triton' cannot run this case"):
        rmt(_ids(1, 12))


def test_kernels_never_import_transformers():
    import subprocess
    import sys

    code = (
        "import sys, rmt_fast.kernels, rmt_fast.kernels.layout, rmt_fast.kernels.sdpa_attention; "
        "print('transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
