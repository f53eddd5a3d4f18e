"""The benchmarks' shared pieces: the attention step the kernel benchmarks time, and the line plot."""

import pytest
import torch
import torch.nn.functional as F
from numerics import assert_close

from rmt_fast.bench.common import attention_step, plot_lines, pyplot


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)  # (B, T, H, D), as the runtime


@pytest.mark.parametrize("mode, grads", [("fwd+bwd", "qkv"), ("dq", "q"), ("dkdv", "kv")])
def test_attention_step_gives_the_gradients_of_its_mode(mode, grads):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 5, generator=g, dtype=torch.float64) for _ in range(3))
    do = torch.randn(2, 7, 3, 5, generator=g, dtype=torch.float64)
    got = attention_step(mode, _sdpa, q, k, v, do)()
    # the expected gradients from a separate autograd pass over a hand-written attention
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    scores = (qr @ kr.transpose(-1, -2)) / 5**0.5
    scores = scores.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf"))
    (torch.softmax(scores, -1) @ vr).transpose(1, 2).backward(do)
    want = [t.grad for t, name in zip((qr, kr, vr), "qkv") if name in grads]
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert_close(a, b, dtype=torch.float64, name=f"{mode} gradient")


def test_attention_step_forward_runs_without_grad():
    q = torch.randn(1, 2, 4, 8, requires_grad=True)
    out = attention_step("fwd", _sdpa, q, q, q)()
    assert out.shape == (1, 4, 2, 8) and not out.requires_grad


def test_plot_lines_one_line_per_series_from_ok_rows():
    rows = [
        dict(m="a", n=1, t=1.0, status="ok"),
        dict(m="a", n=4, t=3.0, status="ok"),
        dict(m="a", n=2, t=2.0, status="ok"),
        dict(m="b", n=1, t=None, status="ok"),
        dict(m="b", n=2, t=5.0, status="oom"),
        dict(m="c", n=1, t=7.0, status="ok"),
    ]
    fig, ax = pyplot().subplots()
    plot_lines(ax, rows, "n", "t", "m", labels={"c": "method c"}, xlabel="tokens")
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == ["a", "method c"]  # b has no ok row with a value
    assert list(lines[0].get_xdata()) == [1, 2, 4] and list(lines[0].get_ydata()) == [1.0, 2.0, 3.0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log" and ax.get_xlabel() == "tokens"
    assert ax.get_legend() is not None
    pyplot().close(fig)
