"""SegmentLayout.mask_mod (the FlexAttention form of the segment mask) marks the same positions as dense_mask."""

import pytest
import torch
from numerics import assert_close

from rmt_fast.kernels.layout import SegmentLayout

COUNTS = torch.tensor([3, 7, 0], dtype=torch.int32)
STARTS = torch.tensor([1, 0, 2], dtype=torch.int32)


def _grid_mask(layout: SegmentLayout, batch: int) -> torch.Tensor:
    """mask_mod evaluated on broadcast index tensors, as FlexAttention's vmap would: (B, 1, T, T)."""
    T = layout.seq_len
    b = torch.arange(batch)[:, None, None, None]
    h = torch.zeros(1, 1, 1, 1, dtype=torch.long)
    q, kv = torch.arange(T)[None, None, :, None], torch.arange(T)[None, None, None, :]
    return layout.mask_mod()(b, h, q, kv).expand(batch, 1, T, T)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    "make",
    [
        lambda c: (SegmentLayout(2, 7, 2, c), 1),
        lambda c: (SegmentLayout(0, 7, 0, c), 1),
        lambda c: (SegmentLayout(2, 7, 2, c, token_counts=COUNTS), 3),
        lambda c: (SegmentLayout(0, 7, 0, c, token_counts=COUNTS), 3),
        lambda c: (SegmentLayout(2, 7, 3, c, token_counts=COUNTS, token_starts=STARTS), 3),
        lambda c: (SegmentLayout(2, 7, 2, c, token_counts=torch.tensor([9, -1, 4]), token_starts=STARTS), 3),
        lambda c: (
            SegmentLayout(2, 7, 2, c, token_mask=torch.rand(3, 7, generator=torch.Generator().manual_seed(0)) > 0.4),
            3,
        ),
    ],
    ids=["plain", "no-memory", "counts", "encoder-counts", "runs", "runs-clamped", "token-mask"],
)
def test_mask_mod_equals_dense_mask(make, causal):
    layout, batch = make(causal)
    want = layout.dense_mask().expand(batch, 1, layout.seq_len, layout.seq_len)
    assert torch.equal(_grid_mask(layout, batch), want)


@pytest.mark.parametrize("causal", [True, False])
def test_flex_attention_with_the_layouts_block_mask_equals_sdpa_with_its_dense_mask(causal):
    """The path the kernels benchmark takes: create_block_mask (vmap over mask_mod, index tensors beyond the
    sequence included) and FlexAttention (eager on the CPU) against SDPA with dense_mask."""
    import warnings

    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    mask = torch.rand(3, 7, generator=torch.Generator().manual_seed(1)) > 0.4
    for layout in (
        SegmentLayout(2, 7, 2, causal, token_mask=mask),
        SegmentLayout(2, 7, 3, causal, token_counts=COUNTS, token_starts=STARTS),
    ):
        T = layout.seq_len
        block = create_block_mask(layout.mask_mod(), 3, None, T, T, device="cpu", BLOCK_SIZE=4)
        q, k, v = (torch.randn(3, 2, T, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
            out = flex_attention(q, k, v, block_mask=block)
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=layout.dense_mask())
        assert_close(out, ref, dtype=torch.float32, name="flex out")
