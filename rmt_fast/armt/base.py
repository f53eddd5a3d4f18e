"""What FastARMT and ReferenceARMT share: the constructor and its checks, the memory tokens and the per-layer
memory parameters, input checks, the published checkpoint layout, saving and loading.

The RMT parts (argument checks, the (m, D) memory-token parameter and its initialisation, the BPTT rule, the
input value checks) come from :class:`rmt_fast.base.RMTBase`; ARMT adds the per-layer memory projections
(``assoc.<l>.W_mq / W_mk / W_mv / W_mb``) and its own memory state (:class:`ARMTMemoryState`).
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from transformers.utils import ModelOutput

from ..base import BACKBONE_DIR, RMT_CONFIG_NAME, RMT_MEMORY_NAME, RMTBase, _shape, load_backbone
from ..input_checks import _finite_check, _run
from ..peft_support import ADAPTER_DIR, PEFT_KEY_PREFIX, save_adapter
from .memory import ARMTMemoryState, AssocParams, MemoryShape
from .state_dict import split_published

ARMT_LAYERS_NAME = "armt_layers.pt"
_SCHEDULE_KEYS = ("diagonal", "gradient_checkpointing")
# model_type -> the decoder layer list inside the *ForCausalLM model (the published ``layers_attr``)
FAMILIES = {"gpt2": "transformer.h", "llama": "model.layers", "qwen2": "model.layers", "mistral": "model.layers"}


@dataclass
class ARMTOutput(ModelOutput):
    """loss; logits (B, T, V) over the token positions; memory_state: every layer's A and z after the call."""

    loss: Tensor | None = None
    logits: Tensor | None = None
    memory_state: ARMTMemoryState | None = None


@dataclass
class ARMTSettings:
    d_mem: int
    n_heads: int = 1
    use_denom: bool = True
    correction: bool = True


def _get(module, dotted: str):
    for name in dotted.split("."):
        module = getattr(module, name)
    return module


class ARMTBase(RMTBase):
    DECODER_MEMORY_SLOTS = 1  # [tokens | m memory tokens]

    def __init__(
        self,
        model,
        num_mem_tokens: int,
        segment_size: int,
        *,
        d_mem: int,
        n_heads: int = 1,
        use_denom: bool = True,
        correction: bool = True,
        bptt_depth: int = -1,
        attn_backend: str = "auto",
        check_inputs: bool = True,
    ):
        # --- every check first: nothing is touched before an error
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in FAMILIES:
            raise ValueError(
                f"model: ARMT supports the decoders {sorted(FAMILIES)} (GPT-2 and the Llama family), "
                f"got {type(model).__name__} (model_type {model_type!r})"
            )
        if not isinstance(num_mem_tokens, int) or isinstance(num_mem_tokens, bool) or num_mem_tokens < 1:
            raise ValueError(
                f"num_mem_tokens must be an int >= 1 (ARMT writes from its memory tokens), got {num_mem_tokens!r}"
            )
        if not isinstance(n_heads, int) or isinstance(n_heads, bool) or n_heads < 1:
            raise ValueError(f"n_heads must be a positive int, got {n_heads!r}")
        if not isinstance(d_mem, int) or isinstance(d_mem, bool) or d_mem < 1 or d_mem % n_heads:
            raise ValueError(f"d_mem must be a positive int divisible by n_heads={n_heads}, got {d_mem!r}")
        for name, value in (("use_denom", use_denom), ("correction", correction)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        super().__init__(
            model,
            num_mem_tokens,
            segment_size,
            bptt_depth=bptt_depth,
            attn_backend=attn_backend,
            check_inputs=check_inputs,
        )
        if self.hidden_size % n_heads:
            raise ValueError(f"n_heads={n_heads} must divide the model's hidden size {self.hidden_size}")
        # --- then build
        self.armt_settings = ARMTSettings(d_mem, n_heads, use_denom, correction)
        self.mem_shape = MemoryShape(self.hidden_size, d_mem, n_heads, use_denom, correction)
        self.layers_attr = FAMILIES[model_type]
        layers = self.decoder_layers
        weight = self.word_embeddings.weight
        self.assoc = nn.ModuleList(
            AssocParams(self.hidden_size, d_mem, n_heads, dtype=weight.dtype, device=weight.device) for _ in layers
        )

    # ------------------------------------------------------------------------------------------ properties
    @property
    def decoder_layers(self) -> nn.ModuleList:
        return _get(self.model, self.layers_attr)

    @property
    def n_layers(self) -> int:
        return len(self.assoc)

    @property
    def input_size(self) -> int:
        """Model positions per segment: segment_size + m."""
        return self.segment_size + self.num_mem_tokens

    def initial_state(self, batch: int, memory_state: ARMTMemoryState | None) -> tuple[list, list, bool]:
        """Per-layer lists of A and z, and whether the first segment is a stream's first (no memory yet)."""
        if memory_state is None:
            weight = self.memory
            zeros = self.mem_shape.zeros(self.n_layers, batch, weight.dtype, weight.device)
            return list(zeros.A.unbind(0)), list(zeros.z.unbind(0)), True
        return list(memory_state.A.unbind(0)), list(memory_state.z.unbind(0)), False

    # ------------------------------------------------------------------------------------------- checks
    def _check_inputs(self, input_ids, attention_mask, labels, labels_mask, memory_state) -> int:
        b = super()._check_inputs(input_ids, attention_mask, labels, labels_mask, None)
        if memory_state is not None:
            if not isinstance(memory_state, ARMTMemoryState):
                raise ValueError(
                    "memory_state must be an ARMTMemoryState (out.memory_state of an earlier call), "
                    f"got {type(memory_state).__name__}"
                )
            sh, L = self.mem_shape, self.n_layers
            device, dtype = self.memory.device, self.memory.dtype
            for name, t, want in (
                ("A", memory_state.A, (L, b, sh.n_heads, sh.d_key, sh.d_value)),
                ("z", memory_state.z, (L, b, sh.n_heads, sh.d_key)),
            ):
                if not isinstance(t, Tensor) or tuple(t.shape) != want:
                    raise ValueError(
                        f"memory_state.{name} must have shape {want} (layers, batch, heads, ...), got {_shape(t)}"
                    )
                if t.dtype != dtype:
                    raise ValueError(f"memory_state.{name} must have dtype {dtype}, got {t.dtype}")
                if t.device != device:
                    raise ValueError(f"memory_state.{name} must be on {device}, got {t.device}")
            if self.settings.check_inputs:
                checks = [_finite_check(memory_state.A.flatten(0, 2)), _finite_check(memory_state.z.flatten(0, 1))]
                try:
                    _run(checks)
                except ValueError:
                    raise ValueError(
                        "memory_state holds a non-finite value (NaN or inf): it would spread into "
                        "every later segment and call"
                    ) from None
        return b

    # ---------------------------------------------------------------------------------------- checkpoints
    def load_reference_state_dict(self, state_dict: dict, strict: bool = True):
        """Load the published ``AssociativeRecurrentWrapper``'s state dict: ``memory_cell.memory``, the wrapped
        layers' ``memory_cell.model.<layers>.<l>.layer.*`` and memory projections ``...<l>.W_mq.weight`` etc.,
        and the rest of the backbone under ``memory_cell.model.``. Over a PEFT model the backbone keys are the
        published wrapper's around a PeftModel (``memory_cell.model.base_model.model.<layers>...``).

        The published cell registers its wrapped layers twice, so its own ``state_dict()`` also names each of
        their tensors ``memory_cell.layers.<l>.*``; a safetensors checkpoint keeps either name (and either of
        two tied weights). Both names or one load; two names holding different values, an unknown key, a
        missing one (``strict``) or a wrong shape raise a ValueError before anything is loaded
        (:mod:`.state_dict`)."""
        prefix = "memory_cell.model." + (PEFT_KEY_PREFIX if self.peft_model is not None else "")
        parts = split_published(
            state_dict,
            self.model.state_dict(),
            self.assoc.state_dict(),
            tuple(self.memory.shape),
            prefix,
            self.layers_attr,
            strict,
        )
        self.model.load_state_dict(parts.backbone, strict=strict)
        self.assoc.load_state_dict(parts.assoc, strict=strict)
        if parts.memory is not None:
            with torch.no_grad():
                self.memory.copy_(parts.memory)

    def _schedule_settings(self) -> dict:
        return {}

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs):
        """Write ``dir/rmt_config.json`` (the settings), ``dir/rmt_memory.pt`` (the memory tokens),
        ``dir/armt_layers.pt`` (the memory projections) and the backbone: ``dir/backbone`` (transformers'
        ``save_pretrained``), or over a PEFT model ``dir/adapter`` (peft's: the adapter only, no base weights)."""
        os.makedirs(save_directory, exist_ok=True)
        extra = {}
        if self.peft_model is not None:
            save_adapter(self.peft_model, save_directory, **kwargs)
            extra = {"peft_adapter": ADAPTER_DIR, "backbone_class": type(self.model).__name__}
        else:
            self._backbone_for_saving().save_pretrained(os.path.join(save_directory, BACKBONE_DIR), **kwargs)
        torch.save(self.memory.detach().cpu(), os.path.join(save_directory, RMT_MEMORY_NAME))
        torch.save(
            {k: v.detach().cpu() for k, v in self.assoc.state_dict().items()},
            os.path.join(save_directory, ARMT_LAYERS_NAME),
        )
        st = self.settings
        config = {
            "class": type(self).__name__,
            "num_mem_tokens": st.num_mem_tokens,
            "segment_size": st.segment_size,
            "bptt_depth": st.bptt_depth,
            "attn_backend": st.attn_backend,
            "check_inputs": st.check_inputs,
            **asdict(self.armt_settings),
            **self._schedule_settings(),
            **extra,
        }
        with open(os.path.join(save_directory, RMT_CONFIG_NAME), "w") as f:
            json.dump(config, f, indent=2)

    @classmethod
    def from_pretrained(
        cls,
        save_directory: str | os.PathLike,
        *,
        model_kwargs: dict | None = None,
        base_model=None,
        is_trainable: bool = False,
        **overrides,
    ):
        """Load a saved ARMT; ``overrides`` replace saved settings (e.g. ``diagonal=True``: a schedule, so any
        checkpoint loads under either), ``model_kwargs`` go to the backbone's ``from_pretrained``.

        A PEFT checkpoint (``dir/adapter``) holds no base weights: ``base_model`` is the transformers model the
        adapter was trained on (or its path / hub name, or None for the one adapter_config.json names);
        ``is_trainable`` is peft's (False: adapter, memory tokens and memory projections load frozen), as in
        :meth:`rmt_fast.base.RMTBase.from_pretrained`."""

        with open(os.path.join(save_directory, RMT_CONFIG_NAME)) as f:
            settings = json.load(f)
        settings.pop("class", None)
        model, adapter = load_backbone(save_directory, settings, base_model, is_trainable, model_kwargs or {})
        accepted = inspect.signature(cls.__init__).parameters
        for key in _SCHEDULE_KEYS:  # a schedule is not a model: FastARMT's settings do not bind ReferenceARMT
            if key not in accepted:
                settings.pop(key, None)
        settings.update(overrides)
        m, size = settings.pop("num_mem_tokens"), settings.pop("segment_size")
        armt = cls(model, m, size, **settings)
        memory = torch.load(os.path.join(save_directory, RMT_MEMORY_NAME), map_location="cpu", weights_only=True)
        layers = torch.load(os.path.join(save_directory, ARMT_LAYERS_NAME), map_location="cpu", weights_only=True)
        with torch.no_grad():
            armt.memory.copy_(memory.to(armt.memory.dtype))
        armt.assoc.load_state_dict(layers)
        if adapter is not None:
            armt.memory.requires_grad_(is_trainable)
            armt.assoc.requires_grad_(is_trainable)
        return armt
