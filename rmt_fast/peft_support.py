"""PEFT models inside RMT: which transformers model a ``PeftModel`` wraps, and saving / loading its adapter.

A ``PeftModel`` from ``peft.get_peft_model`` (LoRA and the other tuners that live in the layers) injects its
adapter layers into the transformers model it wraps, in place. RMT therefore calls that inner model
(``peft_model.get_base_model()``): the adapters run, and the attention switch, the forward hook,
``logits_to_keep`` and ``generate`` work as on a plain model. The ``PeftModel`` itself is kept only to save
the adapter with peft's own ``save_pretrained``. Checkpoints hold the adapter, not the base weights (peft's
convention): the base model is given again at load time. peft is imported only when a checkpoint needs it.
"""

from __future__ import annotations

import os
import sys

from transformers import PreTrainedModel

ADAPTER_DIR = "adapter"
# What a PeftModel's state_dict puts before the wrapped model's own keys.
PEFT_KEY_PREFIX = "base_model.model."


def split_peft(model):
    """``model`` -> (the transformers model to call, the PeftModel or None).

    Raises a ValueError for a prompt-learning adapter (it adds virtual tokens, which the segment layout has no
    room for) and for a transformers model that holds adapter layers without its PeftModel (its checkpoint
    would silently lose the adapter)."""
    peft = sys.modules.get("peft")  # a PeftModel exists only once peft is imported
    if peft is None:
        return model, None
    if isinstance(model, peft.PeftModel):
        config = model.active_peft_config
        if config.is_prompt_learning:
            raise ValueError(
                f"model: a PeftModel with a {config.peft_type.value} adapter adds virtual tokens to every input, "
                "which the RMT segment layout cannot hold; use an adapter that lives in the layers (e.g. LoRA)"
            )
        return model.get_base_model(), model
    if isinstance(model, PreTrainedModel):
        injected = _adapter_layer(model)
        if injected is not None:
            raise ValueError(
                f"model: {type(model).__name__} holds peft adapter layers ({injected}) but is not a PeftModel; "
                "pass the PeftModel that peft.get_peft_model / PeftModel.from_pretrained returned, so that "
                "save_pretrained keeps the adapter"
            )
    return model, None


def _adapter_layer(model) -> str | None:
    """The name of the first peft adapter layer inside ``model``, or None."""
    peft = sys.modules.get("peft")
    if peft is None:
        return None
    tuner_layer = peft.tuners.tuners_utils.BaseTunerLayer
    return next((name for name, mod in model.named_modules() if isinstance(mod, tuner_layer)), None)


def save_adapter(peft_model, save_directory, **kwargs) -> None:
    """The adapter (weights and ``adapter_config.json``, every adapter of the model) into ``dir/adapter``."""
    peft_model.save_pretrained(os.path.join(save_directory, ADAPTER_DIR), **kwargs)


def load_adapter(save_directory, base_model, backbone_class: str, is_trainable: bool, model_kwargs: dict):
    """A PeftModel: the adapter in ``dir/adapter`` loaded by peft onto ``base_model``.

    ``base_model``: the transformers model the adapter was trained on (a ``backbone_class`` instance; peft
    injects the adapter into it in place), or a path / hub name loaded with ``backbone_class.from_pretrained(
    base_model, **model_kwargs)``, or None for the ``base_model_name_or_path`` that adapter_config.json names."""
    import peft
    import transformers

    path = os.path.join(save_directory, ADAPTER_DIR)
    if base_model is None:
        base_model = peft.PeftConfig.from_pretrained(path).base_model_name_or_path
        if not base_model:
            raise ValueError(
                f"base_model: {save_directory} holds a PEFT adapter, not its base weights, and its "
                "adapter_config.json names no base model; pass base_model=<the model the adapter was trained on> "
                "(a transformers model, or its path / hub name)"
            )
    if isinstance(base_model, (str, os.PathLike)):
        model_cls = getattr(transformers, backbone_class, None)
        if model_cls is None:
            raise ValueError(f"{save_directory}: cannot find the model class {backbone_class!r} in transformers")
        base_model = model_cls.from_pretrained(base_model, **model_kwargs)
    elif model_kwargs:
        raise ValueError(
            f"from_pretrained: {sorted(model_kwargs)} apply when the base model is loaded by name; "
            "base_model was given as a model, so load it with those arguments yourself"
        )
    if not isinstance(base_model, PreTrainedModel):
        raise TypeError(
            f"base_model must be a transformers PreTrainedModel (without the adapter), a path or a hub "
            f"name, got {type(base_model).__name__}"
        )
    injected = _adapter_layer(base_model)
    if injected is not None:
        raise ValueError(
            f"base_model already holds peft adapter layers ({injected}); pass the base model without "
            "them (a fresh copy: peft injects the saved adapter into it)"
        )
    if type(base_model).__name__ != backbone_class:
        raise ValueError(
            f"base_model: the adapter in {path} was trained on a {backbone_class}, got {type(base_model).__name__}"
        )
    return peft.PeftModel.from_pretrained(base_model, path, is_trainable=is_trainable)
