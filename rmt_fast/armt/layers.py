"""The decoder layers of GPT-2 and the Llama family (Llama, Qwen2, Mistral) as batched math over stacked
weights, so that G cells, each one layer of one segment, run as one step of batched matmuls (``bmm``).

:class:`StackedLayers` stacks every layer's weights once per call (``torch.stack`` of the layers' own
parameters: autograd carries the gradients back to them, and the stack is freed with the call; the model's
weights stay the only resident copy). A step over the consecutive layers ``l0 .. l0 + G - 1`` slices the stack
(a view). Attention goes through :func:`rmt_fast.attention.run_backend`, FastRMT's dispatch, with one
:class:`~rmt_fast.kernels.layout.SegmentLayout` over the G x B rows.

The math is the transformers layers' (same ops and dtypes; only the matmuls are batched), so the result equals
calling the layers one by one up to rounding; tests compare it with ReferenceARMT, which calls them. A peft LoRA
projection contributes its base layer's weights to the stack and its LoRA terms through :mod:`.lora`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..attention import ActiveSegment, run_backend
from ..kernels.layout import SegmentLayout
from .lora import StackedLoRA, _active_terms, base_projection

_GPT2_PARAMS = {"ln1_w": "ln_1.weight", "ln1_b": "ln_1.bias", "ln2_w": "ln_2.weight", "ln2_b": "ln_2.bias"}
_GPT2_PROJ = {"qkv": ("attn.c_attn",), "o": ("attn.c_proj",), "up": ("mlp.c_fc",), "down": ("mlp.c_proj",)}
_LLAMA_PROJ = {
    "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o": ("self_attn.o_proj",),
    "up": ("mlp.gate_proj", "mlp.up_proj"),
    "down": ("mlp.down_proj",),
}
_LLAMA_LAYERS = {"llama": "LlamaDecoderLayer", "qwen2": "Qwen2DecoderLayer", "mistral": "MistralDecoderLayer"}


def check_supported(model, layers, model_type: str, seq_len: int) -> None:
    """Raise a ValueError for a layer configuration the batched math does not reproduce."""
    config = model.config
    want = "GPT2Block" if model_type == "gpt2" else _LLAMA_LAYERS[model_type]
    for layer in layers:
        if type(layer).__name__ != want:
            raise ValueError(
                f"model: FastARMT expects {want} layers in a {model_type} model, got {type(layer).__name__}"
            )
    _check_plain_projections(layers, model_type)
    if model_type == "gpt2":
        if getattr(config, "scale_attn_by_inverse_layer_idx", False):
            raise ValueError("model: GPT-2 with scale_attn_by_inverse_layer_idx=True is not supported by FastARMT")
        if getattr(config, "add_cross_attention", False):
            raise ValueError("model: GPT-2 with cross-attention is not supported by FastARMT")
        return
    window = getattr(config, "sliding_window", None)
    uses_window = model_type == "mistral" or getattr(config, "use_sliding_window", False)
    layer_types = getattr(config, "layer_types", None) or []
    if model_type == "qwen2":
        uses_window = any(t == "sliding_attention" for t in layer_types)
    if uses_window and window is not None and window < seq_len:
        raise ValueError(
            f"model: a sliding window of {window} positions is shorter than an ARMT segment "
            f"(segment_size + num_mem_tokens = {seq_len}); FastARMT needs full attention per segment"
        )


def _projection_modules(model_type: str):
    """name -> the module paths whose outputs the batched projection concatenates, and the plain layer type."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    if model_type == "gpt2":
        return _GPT2_PROJ, Conv1D
    return _LLAMA_PROJ, nn.Linear


def _check_plain_projections(layers, model_type: str) -> None:
    """The batched math reads the projections' weights directly, and adds peft LoRA terms itself
    (:mod:`.lora`): any other wrapped projection (another tuner, a quantized linear) is an error."""
    table, kind = _projection_modules(model_type)
    for i, layer in enumerate(layers):
        for paths in table.values():
            for path in paths:
                module = layer.get_submodule(path)
                base_projection(module, kind, f"layer {i}'s {path}")
                _active_terms(module, f"layer {i}'s {path}")


def _cat(tensors):
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _stack(tensors, transpose=False):
    return torch.stack([t.transpose(0, 1) if transpose else t for t in tensors])


class StackedLayers:
    """Every layer's weights stacked along a leading layer dimension, and the batched layer step."""

    def __init__(self, model, layers, model_type: str, backend: str):
        self.gpt2 = model_type == "gpt2"
        self.backend = backend
        self.training = model.training
        first = layers[0]
        w = {}
        if self.gpt2:
            attn = first.attn
            self.n_heads, self.n_kv, self.head_dim = attn.num_heads, attn.num_heads, attn.head_dim
            self.scaling, self.eps = attn.scaling, first.ln_1.eps
            self.attn_p, self.resid_p = attn.attn_dropout.p, attn.resid_dropout.p
            self.act = _fused_activation(first.mlp.act)
            for name, path in _GPT2_PARAMS.items():
                w[name] = _stack([layer.get_parameter(path) for layer in layers])
        else:
            attn = first.self_attn
            self.head_dim = attn.head_dim
            self.n_heads = attn.q_proj.out_features // self.head_dim
            self.n_kv = attn.k_proj.out_features // self.head_dim
            self.scaling, self.eps = attn.scaling, first.input_layernorm.variance_epsilon
            self.attn_p, self.resid_p = attn.attention_dropout, 0.0
            self.act = first.mlp.act_fn
            w["ln1_w"] = _stack([layer.input_layernorm.weight for layer in layers])
            w["ln2_w"] = _stack([layer.post_attention_layernorm.weight for layer in layers])
        self._stack_projections(layers, model_type, w)
        self.w = w

    def _stack_projections(self, layers, model_type: str, w: dict) -> None:
        """Each projection's base weights (concatenated parts, as (in, out)) and biases, and its LoRA terms."""
        table, kind = _projection_modules(model_type)
        modules = {
            name: [[(path, layer.get_submodule(path)) for path in paths] for layer in layers]
            for name, paths in table.items()
        }
        sizes = {}
        for name, per_layer in modules.items():
            bases = [
                [base_projection(m, kind, f"layer {i}'s {path}") for path, m in parts]
                for i, parts in enumerate(per_layer)
            ]
            if self.gpt2:  # Conv1D: weight (in, out)
                w[name + "_w"] = _stack([parts[0].weight for parts in bases])
                sizes[name] = [bases[0][0].weight.shape[1]]
            else:
                w[name + "_w"] = _stack([_cat([b.weight for b in parts]) for parts in bases], True)
                sizes[name] = [b.weight.shape[0] for b in bases[0]]
            if bases[0][0].bias is not None:
                w[name + "_b"] = _stack([_cat([b.bias for b in parts]) for parts in bases])
        self.lora = StackedLoRA(modules, sizes, self.training)

    # ------------------------------------------------------------------------------------------- pieces
    def _linear(self, x: Tensor, name: str, sl: slice) -> Tensor:
        """x (G, R, in) @ W[sl] (G, in, out) (+ bias) (+ the LoRA terms) -> (G, R, out)."""
        weight = self.w[name + "_w"][sl]
        bias = self.w.get(name + "_b")
        y = torch.bmm(x, weight) if bias is None else torch.baddbmm(bias[sl].unsqueeze(1), x, weight)
        return self.lora.add(y, x, name, sl)

    def _norm(self, x: Tensor, name: str, sl: slice) -> Tensor:
        weight = self.w[name + "_w"][sl].unsqueeze(1)
        if self.gpt2:
            return torch.addcmul(
                self.w[name + "_b"][sl].unsqueeze(1), F.layer_norm(x, x.shape[-1:], eps=self.eps), weight
            )
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * h.to(dtype)

    def _dropout(self, x: Tensor, p: float) -> Tensor:
        return F.dropout(x, p, training=True) if self.training and p > 0 else x

    # --------------------------------------------------------------------------------------------- step
    def step(self, x: Tensor, l0: int, layout: SegmentLayout, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        """Layers ``l0 .. l0 + G - 1`` on x (G, B, S, D), cell g running layer l0 + g -> (G, B, S, D).

        ``layout`` covers the G * B rows (cell-major); ``rope`` is (cos, sin) of shape (G * B or 1, S, dh)."""
        g, b, s, d = x.shape
        sl = slice(l0, l0 + g)
        hq, hkv, dh = self.n_heads, self.n_kv, self.head_dim
        flat = x.reshape(g, b * s, d)
        qkv = self._linear(self._norm(flat, "ln1", sl), "qkv", sl)
        q, k, v = qkv.split([hq * dh, hkv * dh, hkv * dh], dim=-1)
        q = q.reshape(g * b, s, hq, dh).transpose(1, 2)
        k = k.reshape(g * b, s, hkv, dh).transpose(1, 2)
        v = v.reshape(g * b, s, hkv, dh).transpose(1, 2)
        if rope is not None:
            cos, sin = rope[0].unsqueeze(1), rope[1].unsqueeze(1)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
        p = self.attn_p if self.training else 0.0
        attn = run_backend(
            self.backend, q, k, v, layout, scale=self.scaling, dropout_p=p, segment=ActiveSegment(layout, self.backend)
        )
        attn = attn.reshape(g, b * s, hq * dh)
        flat = flat + self._dropout(self._linear(attn, "o", sl), self.resid_p)
        h = self._norm(flat, "ln2", sl)
        if self.gpt2:
            h = self.act(self._linear(h, "up", sl))
        else:
            gate, up = self._linear(h, "up", sl).chunk(2, dim=-1)
            h = self.act(gate) * up
        flat = flat + self._dropout(self._linear(h, "down", sl), self.resid_p)
        return flat.reshape(g, b, s, d)


def _fused_activation(act):
    """GPT-2's gelu_new as torch's one-kernel tanh GELU (the same function; equal up to rounding)."""
    from transformers.activations import GELUTanh, NewGELUActivation

    if isinstance(act, (NewGELUActivation, GELUTanh)):
        return lambda x: F.gelu(x, approximate="tanh")
    return act


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
