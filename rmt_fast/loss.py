"""The decoder loss without the (B, L, V) logits: the LM head and cross-entropy, chunk by chunk.

When a caller wants the loss and not the logits (``rmt(ids, labels=ids, return_logits=False)``, the training
case), a segment's logits exist only to be reduced to one number. For a large vocabulary they are the largest
tensors of the step: batch 4 x 1024 tokens x a 128k vocabulary is 1 GB in bf16, 2 GB once upcast to fp32 for the
loss, and autograd keeps them (and the softmax) until backward — for every segment of a BPTT window.

:func:`linear_cross_entropy` computes ``sum(cross_entropy(head(hidden), targets))`` over row chunks of at most
``CHUNK_ELEMENTS`` logits. Under autograd each chunk runs under non-reentrant checkpointing, so only the chunk's
hidden rows are kept and backward recomputes that chunk's logits (one more head matmul per chunk; the price of
not storing them). The arithmetic is the same ops in the same dtypes as the plain path (autocast included):
the results agree to rounding (the fp32 sum is split into chunk sums).

:func:`plain_head` decides which backbones qualify: the head must be a plain ``nn.Linear`` applied to the base
model's last hidden state, with no logit scaling or soft-capping in between.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

# Logits per chunk (rows x vocabulary): 2**26 fp32 logits = 256 MiB.
CHUNK_ELEMENTS = 2**26
# Segments whose logits stay under this many elements use the plain path: nothing to save, no recompute.
MIN_ELEMENTS = 2**24

# Model families whose causal-LM forward is exactly ``lm_head(base_model(...).last_hidden_state)``.
_PLAIN_HEAD_FAMILIES = frozenset({"gpt2", "llama", "mistral", "qwen2", "qwen3"})
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def plain_head(model) -> nn.Linear | None:
    """The LM head when the logits are ``head(last_hidden_state)`` and nothing else, else None."""
    config = model.config
    if getattr(config, "model_type", None) not in _PLAIN_HEAD_FAMILIES:
        return None
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return None
    head = model.get_output_embeddings()
    return head if type(head) is nn.Linear else None


def _chunk_loss(hidden: Tensor, targets: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    logits = F.linear(hidden, weight, bias)
    return F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="sum")


def linear_cross_entropy(
    hidden: Tensor, head: nn.Linear, targets: Tensor, chunk_elements: int = CHUNK_ELEMENTS
) -> Tensor:
    """Summed cross-entropy of ``head(hidden)`` (..., V) against ``targets`` (...), -100 ignored, without keeping
    more than one chunk of logits alive, in forward or backward."""
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    vocab = head.out_features
    rows = max(1, chunk_elements // vocab)
    grad = torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in head.parameters()))
    total = None
    for start in range(0, h.shape[0], rows):
        args = (h[start : start + rows], t[start : start + rows], head.weight, head.bias)
        part = checkpoint(_chunk_loss, *args, use_reentrant=False) if grad else _chunk_loss(*args)
        total = part if total is None else total + part
    return total


def wants_chunked_loss(batch: int, tokens: int, head: nn.Linear | None) -> bool:
    """Chunk (and recompute) only where the logits are large enough for it to matter."""
    return head is not None and batch * tokens * head.out_features >= MIN_ELEMENTS
