"""The published ``AssociativeRecurrentWrapper``'s state dict, sorted into ARMT's own parts (backbone, memory
projections, memory tokens) with every check done before anything is loaded.

The published ``AssociativeMemoryCell`` keeps the backbone as ``self.model``, replaces each decoder layer by an
``AssociativeLayerWrapper`` (its ``W_mq``, ``W_mk``, ``W_mv``, ``W_mb`` and the wrapped ``layer``), and then
assigns ``self.layers = <the backbone's layer ModuleList>``. That registers the same modules a second time, so
``state_dict()`` names each wrapped layer's tensors twice:

* ``memory_cell.model.<layers_attr>.<l>.W_mq.weight`` ... ``.layer.<the decoder layer's keys>``;
* ``memory_cell.layers.<l>.W_mq.weight`` ... ``.layer.<the decoder layer's keys>``.

``torch.save`` keeps both names (over one storage). safetensors keeps one name of each shared tensor
(``safetensors.torch.save_model`` the first in sorted order, ``memory_cell.layers.*``; other savers may keep
either), and likewise one of the backbone's tied weights (GPT-2's ``lm_head.weight`` / ``transformer.wte.weight``).

Rules: all names that reach one of our tensors (the two aliases of a wrapped layer's tensor, the tied names of one
backbone weight) must hold equal tensors, else a ValueError names both keys; any one of them suffices; a key that
reaches none of our tensors is refused by its name.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..state_dict_aliases import same_values, tied_names

MEMORY_KEY = "memory_cell.memory"
ALIAS_PREFIX = "memory_cell.layers."  # the published cell's second registration of the wrapped layers
_PUBLISHED = "(ARMT loads the published AssociativeRecurrentWrapper without ACT or gating)"


@dataclass
class PublishedParts:
    """What to load: ``backbone`` (every name of ``model.state_dict()`` that the state dict reaches, tied names
    included), ``assoc`` (``assoc.state_dict()`` names) and ``memory`` (None if absent)."""

    backbone: dict[str, Tensor]
    assoc: dict[str, Tensor]
    memory: Tensor | None


def split_published(
    state_dict: dict,
    own_backbone: dict,
    own_assoc: dict,
    memory_shape: tuple,
    prefix: str,
    layers_attr: str,
    strict: bool = True,
) -> PublishedParts:
    """Sort ``state_dict`` (the published wrapper's) into our parts; raise a ValueError, before anything is
    loaded, for an unknown key, a missing one (``strict``), two names of one tensor holding different values, or
    a shape that differs from ours. ``prefix``: the backbone's keys in the published dict
    (``memory_cell.model.``, over PEFT ``memory_cell.model.base_model.model.``); ``layers_attr``: the decoder
    layer list inside the backbone (``transformer.h``, ``model.layers``)."""
    tied = tied_names(own_backbone)
    sources: dict[tuple[str, str], list[tuple[str, Tensor]]] = {}  # (part, canonical name) -> (key, value)
    unknown = []
    for key, value in state_dict.items():
        target = _target(key, prefix, layers_attr, own_backbone, own_assoc)
        if target is None:
            unknown.append(key)
            continue
        part, name = target
        if part == "backbone":
            name = tied.get(name, name)
        sources.setdefault((part, name), []).append((key, value))
    missing = [] if ("memory", "") in sources else [MEMORY_KEY]
    missing += sorted(n for n in own_backbone if ("backbone", tied.get(n, n)) not in sources)
    missing += sorted("assoc." + n for n in own_assoc if ("assoc", n) not in sources)
    if unknown or (strict and missing):
        raise ValueError(f"state_dict: unknown keys {sorted(unknown)[:10]}, missing keys {missing[:10]} {_PUBLISHED}")
    for (part, name), named in sources.items():
        _check_same(named, "the memory tokens" if part == "memory" else f"our {part} tensor {name!r}")
    own = {"backbone": own_backbone, "assoc": own_assoc}
    for (part, name), named in sources.items():
        key, value = named[0]
        want = tuple(memory_shape) if part == "memory" else tuple(own[part][name].shape)
        if tuple(value.shape) != want:
            hint = " (check d_mem, n_heads; gating is not supported)" if part == "assoc" else ""
            raise ValueError(f"state_dict: {key} has shape {tuple(value.shape)}, expected {want}{hint}")
    backbone = {}
    for name in own_backbone:
        named = sources.get(("backbone", tied.get(name, name)))
        if named is not None:
            backbone[name] = named[0][1]
    assoc = {name: named[0][1] for (part, name), named in sources.items() if part == "assoc"}
    memory = sources.get(("memory", ""), [(None, None)])[0][1]
    return PublishedParts(backbone, assoc, memory)


def _target(key: str, prefix: str, layers_attr: str, own_backbone: dict, own_assoc: dict):
    """(part, our name) that a published key loads into, or None for a key that reaches none of our tensors."""
    if key == MEMORY_KEY:
        return "memory", ""
    layers_prefix = prefix + layers_attr + "."
    for head in (layers_prefix, ALIAS_PREFIX):
        if key.startswith(head):
            index, _, rest = key[len(head) :].partition(".")
            if not index.isdigit():
                break  # e.g. the alias prefix followed by no layer index: unknown
            if rest.startswith("layer."):
                name = f"{layers_attr}.{index}.{rest[len('layer.') :]}"
                return ("backbone", name) if name in own_backbone else None
            name = f"{index}.{rest}"
            return ("assoc", name) if name in own_assoc else None
    if key.startswith(prefix) and not key.startswith(layers_prefix) and key[len(prefix) :] in own_backbone:
        return "backbone", key[len(prefix) :]
    return None


def _check_same(named: list[tuple[str, Tensor]], what: str) -> None:
    key, value = named[0]
    for other, v in named[1:]:
        if not same_values(value, v):
            raise ValueError(
                f"state_dict: {key} and {other} both name {what} (the published cell registers each "
                "wrapped layer twice; tied weights share one tensor) but hold different values "
                f"({_describe(value)} vs {_describe(v)}); a consistent checkpoint holds one tensor "
                "under both names"
            )


def _describe(t: Tensor) -> str:
    return f"shape {tuple(t.shape)} {t.dtype}"
