"""What FastRMT and ReferenceRMT share: the constructor, argument checks, the memory parameter, the BPTT rule,
checkpoint loading and saving. The two differ only in how they run segments."""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from transformers.utils import ModelOutput

from .backbone import config_token_id, decoder_initial_memory, encoder_initial_memory, inspect_backbone
from .input_checks import check_encoder_mask, check_values, label_classes
from .peft_support import ADAPTER_DIR, PEFT_KEY_PREFIX, load_adapter, save_adapter
from .state_dict_aliases import fill_tied

RMT_CONFIG_NAME = "rmt_config.json"
RMT_MEMORY_NAME = "rmt_memory.pt"
BACKBONE_DIR = "backbone"


@dataclass
class RMTOutput(ModelOutput):
    """loss; logits (decoder: (B, T, V) over the token positions, encoder: the last segment's);
    memory_state (B, m, d): the memory after the last segment."""

    loss: Tensor | None = None
    logits: Tensor | None = None
    memory_state: Tensor | None = None


@dataclass
class RMTSettings:
    num_mem_tokens: int
    segment_size: int
    max_n_segments: int | None = None
    bptt_depth: int = -1
    segment_alignment: str | None = None
    sum_loss: bool = False
    cls_token_id: int | None = None
    sep_token_id: int | None = None
    pad_token_id: int | None = None
    attn_backend: str = "auto"
    check_inputs: bool = True


def memory_detached_before(segment: int, n_segments: int, bptt_depth: int) -> bool:
    """The truncated-BPTT rule shared by FastRMT and ReferenceRMT.

    ``segment`` and ``n_segments`` count the segments that run: an encoder segment that is empty in every row
    (rows shorter than ``max_n_segments`` start with empty segments) is skipped and takes no number, so
    ``segment = 0`` is the first segment that runs and its memory is the initial one.

    ``bptt_depth = k >= 0``: the memory entering segment t (t >= 1) is detached when
    ``(n - 1 - t) % (k + 1) == k``, i.e. every k + 1 segments counted back from the last one. So the gradient of
    any segment's loss reaches the memory through at most k transitions, the last segment's loss through
    exactly min(k, n - 1) of them (the published encoder's rule), and k = 0 detaches between every two segments.
    The initial memory (the ``memory`` parameter or a caller's ``memory_state``) is never detached.
    ``bptt_depth = -1``: full backpropagation through time.
    """
    if bptt_depth < 0 or segment == 0:
        return False
    return (n_segments - 1 - segment) % (bptt_depth + 1) == bptt_depth


class RMTBase(nn.Module):
    # Memory slots per decoder segment, for the maximum-positions check: RMT reads and writes (2 m); ARMT writes.
    DECODER_MEMORY_SLOTS = 2

    def __init__(
        self,
        model,
        num_mem_tokens: int,
        segment_size: int,
        *,
        max_n_segments: int | None = None,
        bptt_depth: int = -1,
        segment_alignment: str | None = None,
        sum_loss: bool = False,
        cls_token_id: int | None = None,
        sep_token_id: int | None = None,
        pad_token_id: int | None = None,
        attn_backend: str = "auto",
        check_inputs: bool = True,
    ):
        super().__init__()
        # --- every check first: nothing is touched before an error
        if not isinstance(num_mem_tokens, int) or num_mem_tokens < 0:
            raise ValueError(f"num_mem_tokens must be an int >= 0, got {num_mem_tokens!r}")
        if not isinstance(segment_size, int) or segment_size <= 0:
            raise ValueError(f"segment_size must be a positive int, got {segment_size!r}")
        if max_n_segments is not None and (not isinstance(max_n_segments, int) or max_n_segments <= 0):
            raise ValueError(f"max_n_segments must be None or a positive int, got {max_n_segments!r}")
        if not isinstance(bptt_depth, int) or bptt_depth < -1:
            raise ValueError(f"bptt_depth must be -1 (full BPTT) or an int >= 0, got {bptt_depth!r}")
        from .attention import BACKENDS

        if attn_backend not in BACKENDS:
            raise ValueError(f"attn_backend must be one of {BACKENDS}, got {attn_backend!r}")
        if not isinstance(check_inputs, bool):
            raise ValueError(f"check_inputs must be True or False, got {check_inputs!r}")
        info = inspect_backbone(model)
        model = info.model  # a PeftModel's inner transformers model: the one that is called
        k = self.DECODER_MEMORY_SLOTS
        if segment_alignment is None:
            segment_alignment = "left" if info.kind == "decoder" else "right"
        if segment_alignment not in ("left", "right"):
            raise ValueError(f"segment_alignment must be None, 'left' or 'right', got {segment_alignment!r}")
        config = model.config
        if info.kind == "encoder":
            cls_token_id = (
                cls_token_id if cls_token_id is not None else config_token_id(config, "cls_token_id", "bos_token_id")
            )
            sep_token_id = (
                sep_token_id if sep_token_id is not None else config_token_id(config, "sep_token_id", "eos_token_id")
            )
            pad_token_id = pad_token_id if pad_token_id is not None else config_token_id(config, "pad_token_id")
            missing = [
                n
                for n, v in (
                    ("cls_token_id", cls_token_id),
                    ("sep_token_id", sep_token_id),
                    ("pad_token_id", pad_token_id),
                )
                if v is None
            ]
            if missing:
                raise ValueError(
                    f"an encoder RMT needs {', '.join(missing)}: pass them (e.g. from the tokenizer); "
                    f"{type(model).__name__}'s config does not define them"
                )
            vocab = info.word_embeddings.num_embeddings
            for name, value in (
                ("cls_token_id", cls_token_id),
                ("sep_token_id", sep_token_id),
                ("pad_token_id", pad_token_id),
            ):
                if not isinstance(value, int) or not 0 <= value < vocab:
                    raise ValueError(f"{name} must be an id in the model's vocabulary [0, {vocab}), got {value!r}")
            input_size = segment_size + num_mem_tokens + 3
            if info.max_positions is not None and input_size > info.max_positions:
                raise ValueError(
                    f"segment_size + num_mem_tokens + 3 = {input_size} exceeds the model's "
                    f"max_position_embeddings ({info.max_positions})"
                )
        elif info.max_positions is not None and segment_size + k * num_mem_tokens > info.max_positions:
            raise ValueError(
                f"segment_size + {k} * num_mem_tokens = {segment_size + k * num_mem_tokens} exceeds the model's "
                f"maximum positions ({info.max_positions})"
            )
        # --- then build
        self.settings = RMTSettings(
            num_mem_tokens,
            segment_size,
            max_n_segments,
            bptt_depth,
            segment_alignment,
            sum_loss,
            cls_token_id,
            sep_token_id,
            pad_token_id,
            attn_backend,
            check_inputs,
        )
        self.model = model
        self.kind = info.kind
        self.hidden_size = info.hidden_size
        self._info = info
        self._takes_labels = "labels" in inspect.signature(model.forward).parameters
        init = encoder_initial_memory if info.kind == "encoder" else decoder_initial_memory
        self.memory = nn.Parameter(init(info.word_embeddings, num_mem_tokens))

    # ------------------------------------------------------------------------------------------ properties
    @property
    def num_mem_tokens(self) -> int:
        return self.settings.num_mem_tokens

    @property
    def segment_size(self) -> int:
        return self.settings.segment_size

    @property
    def is_decoder(self) -> bool:
        return self.kind == "decoder"

    @property
    def input_size(self) -> int:
        """Model positions per segment: 2m + segment_size (decoder), segment_size + m + 3 (encoder)."""
        m = self.num_mem_tokens
        return self.segment_size + (2 * m if self.is_decoder else m + 3)

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self._info.word_embeddings

    @property
    def peft_model(self):
        """The peft ``PeftModel`` the wrapper was built on, or None. ``self.model`` is the transformers model
        inside it (with the adapter layers), which is what runs; both share every parameter."""
        return self._info.peft_model

    # ------------------------------------------------------------------------------------------- checks
    def _check_inputs(self, input_ids, attention_mask, labels, labels_mask, memory_state) -> int:
        """Shapes, dtypes and devices (host-side, free), then the values (:mod:`rmt_fast.input_checks`: one
        host sync; skipped with ``check_inputs=False``). Raises before anything runs on the device."""
        if not isinstance(input_ids, Tensor) or input_ids.ndim != 2:
            raise ValueError(f"input_ids must be a 2-D (batch, length) tensor, got {_shape(input_ids)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be an int64 or int32 tensor, got dtype {input_ids.dtype}")
        if input_ids.shape[0] == 0:
            raise ValueError(f"input_ids has batch size 0 (shape {tuple(input_ids.shape)}): pass at least one row")
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids is empty (length 0)")
        device = self.memory.device
        if input_ids.device != device:
            raise ValueError(f"input_ids is on {input_ids.device} but the model is on {device}")
        b = input_ids.shape[0]
        if attention_mask is not None:
            if not isinstance(attention_mask, Tensor) or tuple(attention_mask.shape) != tuple(input_ids.shape):
                raise ValueError(
                    f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                    f"got {_shape(attention_mask)}"
                )
            if attention_mask.device != device:
                raise ValueError(f"attention_mask is on {attention_mask.device} but the model is on {device}")
        if labels is not None:
            if not isinstance(labels, Tensor):
                raise ValueError(f"labels must be a tensor, got {type(labels).__name__}")
            if self.is_decoder:
                ok = tuple(labels.shape) == tuple(input_ids.shape)
            else:  # (B,) classes, (B, num_labels) multi-label/regression, or (B, T) token labels (masked LM)
                ok = labels.ndim in (1, 2) and labels.shape[0] == b
            if not ok:
                raise ValueError(
                    f"labels of shape {tuple(labels.shape)} do not match input_ids {tuple(input_ids.shape)}"
                )
            if not self.is_decoder and not self._takes_labels:
                raise ValueError(
                    f"labels were given, but {type(self.model).__name__} has no head that takes labels: "
                    "drop them, or wrap a model with a head (e.g. *ForSequenceClassification)"
                )
            if labels.device != device:
                raise ValueError(f"labels is on {labels.device} but the model is on {device}")
        if labels_mask is not None:
            if labels is None:
                raise ValueError(
                    "labels_mask was given without labels: it selects which labels count in the loss, so pass "
                    "labels as well (or drop labels_mask)"
                )
            if not self.is_decoder:
                raise ValueError("labels_mask is a decoder option; encoders take per-segment labels")
            if not isinstance(labels_mask, Tensor) or tuple(labels_mask.shape) != tuple(labels.shape):
                raise ValueError(
                    f"labels_mask must have the shape of labels {_shape(labels)}, got {_shape(labels_mask)}"
                )
            if labels_mask.device != device:
                raise ValueError(f"labels_mask is on {labels_mask.device} but the model is on {device}")
        if memory_state is not None:
            want = (b, self.num_mem_tokens, self.hidden_size)
            if not isinstance(memory_state, Tensor) or tuple(memory_state.shape) != want:
                raise ValueError(f"memory_state must have shape {want}, got {_shape(memory_state)}")
            if memory_state.dtype != self.memory.dtype:
                raise ValueError(f"memory_state must have dtype {self.memory.dtype}, got {memory_state.dtype}")
            if memory_state.device != device:
                raise ValueError(f"memory_state must be on {device}, got {memory_state.device}")
        # Encoders build their mask from the pad tokens, as the reference does; a mask that hides a content token
        # cannot be honoured, so it is an error rather than silently dropped (checked even without check_inputs).
        pad_id = None if self.is_decoder or attention_mask is None else self.settings.pad_token_id
        classes = None if labels is None else label_classes(self.model, self.kind, input_ids, labels)
        if classes is not None and labels.dtype != torch.int64:  # decoders: always (token ids)
            what = "token" if self.is_decoder else "class"
            raise ValueError(f"labels must be an int64 tensor of {what} ids (or -100), got dtype {labels.dtype}")
        if self.settings.check_inputs:
            check_values(
                input_ids,
                self.word_embeddings.num_embeddings,
                attention_mask,
                labels,
                classes,
                labels_mask,
                memory_state,
                encoder_pad_id=pad_id,
            )
        elif pad_id is not None:
            check_encoder_mask(input_ids, attention_mask, pad_id)
        return b

    def _check_decoder_length(self, length: int) -> int:
        n = -(-length // self.segment_size)
        cap = self.settings.max_n_segments
        if cap is not None and n > cap:
            raise ValueError(
                f"input_ids has {length} tokens = {n} segments of {self.segment_size}, more than "
                f"max_n_segments={cap} allows (decoders do not truncate; encoders keep the first "
                "segment_size * max_n_segments content tokens, as the reference does)"
            )
        return n

    def initial_memory(self, batch_size: int, memory_state: Tensor | None) -> Tensor:
        if memory_state is not None:
            return memory_state
        return self.memory.unsqueeze(0).expand(batch_size, -1, -1)

    # ---------------------------------------------------------------------------------------- checkpoints
    def load_reference_state_dict(self, state_dict: dict, strict: bool = True):
        """Load a state dict of the published RMT wrappers (see the README for the key layout). Over a PEFT
        model the backbone keys are the published wrapper's around a PeftModel (``...model.base_model.model.``)."""
        own = self.model.state_dict()
        m = self.num_mem_tokens
        new_backbone, memory = {}, None
        unknown = []
        peft_prefix = PEFT_KEY_PREFIX if self.peft_model is not None else ""
        if self.is_decoder:
            prefix = "memory_cell.model." + peft_prefix
            for key, value in state_dict.items():
                if key == "memory_cell.memory":
                    memory = value
                elif key.startswith(prefix):
                    new_backbone[key[len(prefix) :]] = value
                else:
                    unknown.append(key)
            # safetensors keeps one name of each tied weight (GPT-2's lm_head.weight / transformer.wte.weight)
            fill_tied(new_backbone, own, lambda name: prefix + name)
        else:
            emb_key = next(
                (k for k, v in own.items() if v is self.word_embeddings.weight or k.endswith("word_embeddings.weight")),
                None,
            )
            buffers = {"mem_token_ids", "cls_token", "sep_token"}
            prefix = "model." + peft_prefix
            for key, value in state_dict.items():
                if key in buffers or key == "model.embeddings.weight":
                    continue
                if key.startswith(prefix) and key[len(prefix) :] in own:
                    sub = key[len(prefix) :]
                    if sub == emb_key:
                        vocab = own[emb_key].shape[0]
                        if value.shape[0] != vocab + m:
                            raise ValueError(
                                f"state_dict: {key} has {value.shape[0]} rows; expected the backbone's {vocab} "
                                f"plus {m} memory rows"
                            )
                        memory = value[vocab:]
                        value = value[:vocab]
                    new_backbone[sub] = value
                else:
                    unknown.append(key)
            missing_buffers = sorted(buffers - set(state_dict)) if strict else []
            if missing_buffers:
                raise ValueError(f"state_dict: missing encoder RMT buffers {missing_buffers}")
        missing = sorted(set(own) - set(new_backbone))
        if memory is None:
            missing.insert(0, "memory_cell.memory" if self.is_decoder else "model.<word_embeddings> memory rows")
        if unknown or (strict and missing):
            raise ValueError(f"state_dict: unknown keys {sorted(unknown)[:10]}, missing keys {missing[:10]}")
        if memory is not None and tuple(memory.shape) != tuple(self.memory.shape):
            raise ValueError(f"state_dict: memory has shape {tuple(memory.shape)}, expected {tuple(self.memory.shape)}")
        self.model.load_state_dict(new_backbone, strict=strict)
        with torch.no_grad():
            self.memory.copy_(memory)

    def _backbone_for_saving(self):
        return self.model

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs):
        """Write ``dir/rmt_config.json`` (the settings), ``dir/rmt_memory.pt`` (the memory) and the backbone:
        ``dir/backbone`` (transformers' ``save_pretrained``, given ``kwargs``), or over a PEFT model
        ``dir/adapter`` (peft's ``save_pretrained``, given ``kwargs``: the adapter only, no base weights)."""
        os.makedirs(save_directory, exist_ok=True)
        extra = {}
        if self.peft_model is not None:
            save_adapter(self.peft_model, save_directory, **kwargs)
            extra = {"peft_adapter": ADAPTER_DIR, "backbone_class": type(self.model).__name__}
        else:
            self._backbone_for_saving().save_pretrained(os.path.join(save_directory, BACKBONE_DIR), **kwargs)
        torch.save(self.memory.detach().cpu(), os.path.join(save_directory, RMT_MEMORY_NAME))
        with open(os.path.join(save_directory, RMT_CONFIG_NAME), "w") as f:
            json.dump({"class": type(self).__name__, **asdict(self.settings), **extra}, f, indent=2)

    @classmethod
    def from_pretrained(
        cls, save_directory: str | os.PathLike, base_model=None, is_trainable: bool = False, **model_kwargs
    ):
        """Load what :meth:`save_pretrained` wrote; ``model_kwargs`` go to the backbone's ``from_pretrained``.

        A PEFT checkpoint (``dir/adapter``) holds no base weights: ``base_model`` is the transformers model the
        adapter was trained on (peft injects the adapter into it, in place), or its path / hub name, or None for
        the base that ``adapter_config.json`` names. ``is_trainable`` is peft's: False loads the adapter and the
        memory frozen, for inference; True to train on. Both are errors for a checkpoint without an adapter."""
        with open(os.path.join(save_directory, RMT_CONFIG_NAME)) as f:
            settings = json.load(f)
        settings.pop("class", None)
        model, adapter = load_backbone(save_directory, settings, base_model, is_trainable, model_kwargs)
        num_mem_tokens, segment_size = settings.pop("num_mem_tokens"), settings.pop("segment_size")
        rmt = cls(model, num_mem_tokens, segment_size, **settings)
        memory = torch.load(os.path.join(save_directory, RMT_MEMORY_NAME), map_location="cpu", weights_only=True)
        with torch.no_grad():
            rmt.memory.copy_(memory.to(rmt.memory.dtype))
        if adapter is not None:
            rmt.memory.requires_grad_(is_trainable)
        return rmt


def load_backbone(save_directory, settings: dict, base_model, is_trainable: bool, model_kwargs: dict):
    """The backbone a checkpoint of :meth:`RMTBase.save_pretrained` holds, and whether it is a PEFT adapter.

    Pops ``peft_adapter`` and ``backbone_class`` from ``settings``. A PEFT checkpoint's base is ``base_model``
    (see :meth:`RMTBase.from_pretrained`); otherwise the full backbone in ``dir/backbone`` is loaded with its
    saved class, and ``base_model`` / ``is_trainable`` are errors."""
    import transformers

    adapter, backbone_class = settings.pop("peft_adapter", None), settings.pop("backbone_class", None)
    if adapter is not None:
        return load_adapter(save_directory, base_model, backbone_class, is_trainable, model_kwargs), adapter
    if base_model is not None or is_trainable:
        raise ValueError(
            f"base_model / is_trainable: {save_directory} holds a full backbone, not a PEFT "
            "adapter; they apply to PEFT checkpoints only"
        )
    path = os.path.join(save_directory, BACKBONE_DIR)
    config = transformers.AutoConfig.from_pretrained(path)
    arch = (config.architectures or [None])[0]
    model_cls = getattr(transformers, arch, None) if arch else None
    if model_cls is None:
        raise ValueError(f"{path}: cannot find the model class {arch!r} in transformers")
    return model_cls.from_pretrained(path, **model_kwargs), adapter


def _shape(x) -> str:
    if isinstance(x, Tensor):
        return f"a tensor of shape {tuple(x.shape)}"
    return "None" if x is None else type(x).__name__
