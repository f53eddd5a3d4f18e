"""Stand-ins for the published ARMT classes (modeling_amt/language_modeling.py, branch ``experimental``) that
register their modules exactly as the published ones do, so that ``state_dict()`` returns the published key
layout, aliases included: ``AssociativeMemoryCell`` keeps the backbone as ``self.model``, replaces each decoder
layer by an ``AssociativeLayerWrapper`` and assigns ``self.layers = <the backbone's layer ModuleList>`` (walking
``layers_attr`` from ``self.model``, as published): the wrapped layers are registered twice, under
``memory_cell.model.<layers_attr>.<l>.`` and ``memory_cell.layers.<l>.``.

Only the registration is reproduced (no forward): the expected outputs come from ReferenceARMT, whose weights
:func:`published_wrapper` copies into the stand-in tree parameter by parameter (not through the loader under
test)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from rmt_fast.armt.base import ARMTBase
from rmt_fast.peft_support import PEFT_KEY_PREFIX


class DPFP(nn.Module):
    """The published feature map: a module without parameters or buffers."""

    def __init__(self, nu: int = 3):
        super().__init__()
        self.nu = nu


class AssociativeLayerWrapper(nn.Module):
    """The published layer wrapper's registrations (without ACT; ``gating=False``)."""

    def __init__(
        self, layer, d_model, num_mem_tokens, d_mem, n_heads=1, correction=True, info=None, use_denom=True, gating=False
    ):
        super().__init__()
        self.info = info
        self.seg_num = 0
        self.d_model = d_model
        self.num_mem_tokens = num_mem_tokens
        self.d_mem = d_mem
        self.n_heads = n_heads
        self.gating = gating
        nu = 3
        self.d_key = 2 * nu * d_mem
        self.phi = DPFP(nu)
        self.use_denom = use_denom
        layer_dtype = next(layer.parameters()).dtype
        self.W_mq = nn.Linear(d_model, d_mem, bias=False, dtype=layer_dtype)
        self.W_mk = nn.Linear(d_model, d_mem, bias=False, dtype=layer_dtype)
        self.W_mv = nn.Linear(d_model, d_model, bias=False, dtype=layer_dtype)
        self.W_mb = nn.Linear(d_model, d_model if gating else n_heads, dtype=layer_dtype)
        nn.init.zeros_(self.W_mv.weight)
        self.layer = layer
        self.generate_mode = False
        self.first_seg = True
        self.correction = correction


class AssociativeMemoryCell(nn.Module):
    """The published memory cell's registrations: ``model``, then ``layers`` (the same ModuleList again), then
    the ``memory`` parameter."""

    def __init__(
        self,
        base_model,
        num_mem_tokens,
        d_mem,
        layers_attr: str = "model.layers",
        wrap_pos=False,
        correction=True,
        n_heads=1,
        use_denom=True,
        gating=False,
    ):
        super().__init__()
        self.model = base_model
        self.num_mem_tokens = num_mem_tokens
        self.d_mem = d_mem
        self.d_model = base_model.get_input_embeddings().embedding_dim
        self.W_mem = []
        self.layers_attrs = layers_attr.split(".")
        self.layers = self.model  # as published: registers a submodule "layers", re-pointed below
        for attr in self.layers_attrs:
            self.layers = getattr(self.layers, attr)
        for i in range(len(self.layers)):
            self.layers[i] = AssociativeLayerWrapper(
                self.layers[i],
                self.d_model,
                num_mem_tokens,
                d_mem,
                n_heads,
                correction,
                use_denom=use_denom,
                gating=gating,
            )
        self.create_memory(num_mem_tokens)
        self.wrap_pos = wrap_pos

    def create_memory(self, num_mem_tokens):
        self.num_mem_tokens = num_mem_tokens
        embeddings = self.model.get_input_embeddings()
        memory_dim = getattr(self.model.config, "n_embd", self.model.config.hidden_size)
        memory_weights = (
            torch.randn(
                (num_mem_tokens, memory_dim), device=embeddings.weight.data.device, dtype=embeddings.weight.data.dtype
            )
            * embeddings.weight.data.std()
        )
        self.register_parameter("memory", nn.Parameter(memory_weights, requires_grad=True))


class AssociativeRecurrentWrapper(nn.Module):
    def __init__(self, memory_cell, **rmt_kwargs):
        super().__init__()
        self.memory_cell = memory_cell
        self.rmt_config = rmt_kwargs
        self.last_state = None


def published_wrapper(armt: ARMTBase) -> AssociativeRecurrentWrapper:
    """The published wrapper around a copy of ``armt``'s backbone (its PeftModel, if any), holding ``armt``'s
    memory tokens and memory projections (copied parameter by parameter)."""
    peft = armt.peft_model is not None
    backbone = copy.deepcopy(armt.peft_model if peft else armt.model)
    st = armt.armt_settings
    layers_attr = (PEFT_KEY_PREFIX if peft else "") + armt.layers_attr
    cell = AssociativeMemoryCell(
        backbone,
        armt.num_mem_tokens,
        st.d_mem,
        layers_attr=layers_attr,
        correction=st.correction,
        n_heads=st.n_heads,
        use_denom=st.use_denom,
    )
    with torch.no_grad():
        cell.memory.copy_(armt.memory)
        for wrapped, params in zip(cell.layers, armt.assoc, strict=True):
            for name in ("W_mq", "W_mk", "W_mv", "W_mb"):
                for p, q in zip(getattr(wrapped, name).parameters(), getattr(params, name).parameters(), strict=True):
                    p.copy_(q)
    return AssociativeRecurrentWrapper(cell, segment_size=armt.segment_size)
