"""ARMT's associative memory: the per-layer parameters, the state, and the read and write rules.

Per layer l the state is ``A_l`` (B, H, dk, dv) and ``z_l`` (B, H, dk): H memory heads, dv = D / H and
dk = 6 * d_mem / H (the DPFP feature map with nu = 3 applied per head). Both start at zero.

* read (before layer l, at every position): ``q = normalize(phi(W_mq x))`` per head,
  ``x <- x + (q A) / (q . z + 1e-5)`` (``use_denom=False``: ``x + q A``);
* write (after layer l, from the layer's outputs h at the m memory positions):
  ``k = normalize(phi(W_mk h))``, ``v = W_mv h``, ``beta = sigmoid(W_mb h)`` (one gate per head),
  ``vbar = (k A) / (k . z + 1e-5)``, ``gamma = clip(1 - (k . z + 1e-5) / |k|^2, 0, 1)`` detached
  (``correction=False``: 1); in the first segment ``vbar = 0`` and ``gamma = 1``; then
  ``A += sum_j beta_j k_j (v_j - vbar_j)^T`` and ``z += sum_j gamma_j k_j``.

Every function here takes tensors with any number of leading dimensions in front of the batch: the plain
reference calls them per layer, FastARMT's diagonal schedule with a leading "cell" dimension (one layer per
cell, weights stacked along it). The weights are passed in the nn.Linear layout (out, in).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NU = 3  # DPFP order
EPS = 1e-5  # the published denominator epsilon


@dataclass
class ARMTMemoryState:
    """Every layer's associative memory after a call: ``A`` (L, B, H, dk, dv), ``z`` (L, B, H, dk).
    Pass it back as ``memory_state`` to continue the stream (its segments then all read the memory)."""

    A: Tensor
    z: Tensor

    def detach(self) -> ARMTMemoryState:
        return ARMTMemoryState(self.A.detach(), self.z.detach())


class AssocParams(nn.Module):
    """One layer's memory projections, named as in the published ``AssociativeLayerWrapper``."""

    def __init__(self, d_model: int, d_mem: int, n_heads: int, dtype=None, device=None):
        super().__init__()
        kw = dict(bias=False, dtype=dtype, device=device)
        self.W_mq = nn.Linear(d_model, d_mem, **kw)
        self.W_mk = nn.Linear(d_model, d_mem, **kw)
        self.W_mv = nn.Linear(d_model, d_model, **kw)
        self.W_mb = nn.Linear(d_model, n_heads, dtype=dtype, device=device)
        nn.init.zeros_(self.W_mv.weight)  # a fresh ARMT computes what its backbone computes


@dataclass(frozen=True)
class MemoryShape:
    d_model: int
    d_mem: int
    n_heads: int
    use_denom: bool = True
    correction: bool = True

    @property
    def d_key(self) -> int:
        return 2 * NU * self.d_mem // self.n_heads

    @property
    def d_value(self) -> int:
        return self.d_model // self.n_heads

    def zeros(self, n_layers: int, batch: int, dtype, device) -> ARMTMemoryState:
        h, dk, dv = self.n_heads, self.d_key, self.d_value
        return ARMTMemoryState(
            torch.zeros(n_layers, batch, h, dk, dv, dtype=dtype, device=device),
            torch.zeros(n_layers, batch, h, dk, dtype=dtype, device=device),
        )


def upcast(t: Tensor) -> Tensor:
    """Logits for the loss: at least float32 (float64 stays float64)."""
    return t if t.dtype == torch.float64 else t.float()


def dpfp(x: Tensor) -> Tensor:
    """Deterministic parameter-free projection (nu = 3): (..., d) -> (..., 6 d).

    ``x2 = [relu(x) | relu(-x)]`` (n = 2d), then block j - 1 is ``x2 * roll(x2, j)`` for j = 1 .. NU; each roll
    is a slice of ``[x2 | x2]`` (no per-roll copy), and the blocks are joined once."""
    x = torch.cat([F.relu(x), F.relu(-x)], dim=-1)
    n = x.shape[-1]
    xx = torch.cat([x, x], dim=-1)
    return torch.cat([x * xx[..., n - j : 2 * n - j] for j in range(1, NU + 1)], dim=-1)


def _project(x: Tensor, weight: Tensor) -> Tensor:
    """x (..., B, S, D) @ weight (..., out, D)^T -> (..., B, S, out); weight leading dims align with x's."""
    if weight.ndim == 2:
        return F.linear(x, weight)
    lead = x.shape[:-3]
    b, s, d = x.shape[-3:]
    flat = x.reshape(-1, b * s, d)
    out = torch.bmm(flat, weight.reshape(-1, *weight.shape[-2:]).transpose(1, 2))
    return out.reshape(*lead, b, s, weight.shape[-2])


def _heads(x: Tensor, n_heads: int) -> Tensor:
    """(..., S, n) -> (..., H, S, n / H)."""
    *lead, s, n = x.shape
    return x.reshape(*lead, s, n_heads, n // n_heads).transpose(-2, -3)


def _from_heads(x: Tensor) -> Tensor:
    """(..., H, S, d) -> (..., S, H d)."""
    *lead, h, s, d = x.shape
    return x.transpose(-2, -3).reshape(*lead, s, h * d)


def features(x: Tensor, weight: Tensor, n_heads: int) -> Tensor:
    """normalize(phi(W x)) per head: (..., B, S, D) -> (..., B, H, S, dk)."""
    return F.normalize(dpfp(_heads(_project(x, weight), n_heads)), dim=-1, p=2.0)


def read(x: Tensor, A: Tensor, z: Tensor, w_q: Tensor, shape: MemoryShape) -> Tensor:
    """x + the memory's answer at every position. x (..., B, S, D), A (..., B, H, dk, dv), z (..., B, H, dk)."""
    q = features(x, w_q, shape.n_heads)
    num = torch.matmul(q, A)
    if shape.use_denom:
        num = num / (torch.matmul(q, z.unsqueeze(-1)) + EPS)
    return x + _from_heads(num)


def write(
    h: Tensor,
    A: Tensor,
    z: Tensor,
    w_k: Tensor,
    w_v: Tensor,
    w_b: Tensor,
    b_b: Tensor,
    shape: MemoryShape,
    first: Tensor | bool,
) -> tuple[Tensor, Tensor]:
    """The new (A, z) after writing the memory-position outputs h (..., B, m, D).

    ``first``: True (a bool) when every cell is a stream's first segment; or a bool tensor broadcastable to
    (..., B, 1, 1, 1), True for the cells that are (there vbar = 0 and gamma = 1)."""
    k = features(h, w_k, shape.n_heads)  # (..., B, H, m, dk)
    v = _heads(_project(h, w_v), shape.n_heads)  # (..., B, H, m, dv)
    beta = torch.sigmoid(_project(h, w_b) + b_b.unsqueeze(-2).unsqueeze(-2)).transpose(-1, -2)  # (..., B, H, m)
    if first is True:
        delta, gamma = v, None
    else:
        num = torch.matmul(k, A)
        if shape.use_denom:
            denom = torch.matmul(k, z.unsqueeze(-1)) + EPS  # (..., B, H, m, 1)
            vbar = num / denom
            gamma = None
            if shape.correction:
                gamma = (1 - denom / k.square().sum(-1, keepdim=True)).clip(0, 1).detach()
        else:
            vbar, gamma = num, None
        if first is not False:  # some cells are first segments
            vbar = torch.where(first, 0.0, vbar)
            if gamma is not None:
                gamma = torch.where(first, 1.0, gamma)
        delta = v - vbar
    A = A + torch.matmul((k * beta.unsqueeze(-1)).transpose(-1, -2), delta)
    if shape.use_denom:
        z = z + (k if gamma is None else gamma * k).sum(-2)
    return A, z
