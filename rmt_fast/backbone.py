"""What RMT needs to know about a wrapped transformers model, found once and checked with clear errors."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from .peft_support import split_peft


@dataclass(frozen=True)
class BackboneInfo:
    kind: str  # "decoder" or "encoder"
    hidden_size: int
    base_model: nn.Module
    word_embeddings: nn.Embedding
    max_positions: int | None
    accepts_logits_to_keep: bool
    model: nn.Module  # the transformers model RMT calls (for PEFT: the one the PeftModel wraps, adapters inside)
    peft_model: nn.Module | None = None  # the PeftModel as given, or None


def inspect_backbone(model) -> BackboneInfo:
    """``model``: a transformers PreTrainedModel, or a peft PeftModel over one (:mod:`rmt_fast.peft_support`);
    every check below applies to the transformers model, with the same errors either way."""
    model, peft_model = split_peft(model)
    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"model must be a transformers PreTrainedModel (or a peft PeftModel of one), got {type(model).__name__}"
        )
    cls = type(model).__name__
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"model: {cls} is an encoder-decoder model; RMT wraps decoders and encoders only")
    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError(
            f"model: {cls} does not route attention through the transformers attention interface "
            "(_supports_attention_backend is False), so FastRMT cannot give it the segment layout"
        )
    base = model.base_model
    emb = model.get_input_embeddings()
    if not isinstance(emb, nn.Embedding):
        kind = f"{type(emb).__module__}.{type(emb).__qualname__}"
        hint = "; RMT does not support adapters on the input embedding" if peft_model is not None else ""
        raise ValueError(f"model: {cls} has no nn.Embedding input embedding (got {kind}){hint}")
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if hidden is None:
        raise ValueError(f"model: cannot find the hidden size of {cls} (config.hidden_size / n_embd)")
    if emb.embedding_dim != hidden:
        raise ValueError(
            f"model: {cls}'s input embedding has dimension {emb.embedding_dim} but its hidden size is {hidden}; "
            "memory vectors must live in both spaces (projected embeddings are not supported)"
        )
    max_pos = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    is_decoder_lm = cls.endswith("ForCausalLM") or cls.endswith("LMHeadModel")
    word_emb_module = getattr(getattr(base, "embeddings", None), "word_embeddings", None)
    if is_decoder_lm and not getattr(config, "is_decoder", False) and word_emb_module is not None:
        is_decoder_lm = False  # e.g. BertLMHeadModel without is_decoder: an encoder with an LM head
    if is_decoder_lm:
        kind = "decoder"
    elif word_emb_module is not None and not getattr(config, "is_decoder", False):
        kind = "encoder"
    else:
        raise ValueError(
            f"model: FastRMT cannot drive {cls}: a decoder must be a *ForCausalLM / *LMHeadModel, and an "
            "encoder must be a BERT-style model with embeddings.word_embeddings and is_decoder=False"
        )
    accepts = "logits_to_keep" in inspect.signature(model.forward).parameters
    return BackboneInfo(kind, hidden, base, emb, max_pos, accepts, model, peft_model)


def config_token_id(config, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def encoder_initial_memory(word_embeddings: nn.Embedding, num_mem_tokens: int) -> torch.Tensor:
    """The initial memory of the encoder reference: m new embedding rows, drawn the way transformers'
    ``resize_token_embeddings`` (mean_resizing=True) draws added rows: from N(mean, 1e-9 * cov) of the old rows."""
    w = word_embeddings.weight.detach().float()
    mean = w.mean(0)
    centered = w - mean
    z = torch.randn(num_mem_tokens, w.shape[0], device=w.device) / w.shape[0] ** 0.5
    return (mean + (1e-9**0.5) * (z @ centered)).to(word_embeddings.weight.dtype)


def decoder_initial_memory(word_embeddings: nn.Embedding, num_mem_tokens: int) -> torch.Tensor:
    """The decoder reference's initial memory: standard normal noise times the embedding matrix's std."""
    w = word_embeddings.weight.detach()
    d = w.shape[1]
    return (torch.randn(num_mem_tokens, d, device=w.device) * w.float().std()).to(w.dtype)
