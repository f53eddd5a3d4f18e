"""Names that reach one tensor in a state dict: tied weights (GPT-2's ``lm_head.weight`` and
``transformer.wte.weight``) and registered aliases. safetensors keeps one name of each shared tensor, so a loader
accepts any one of them; where several are present they must hold equal values."""

from __future__ import annotations

import torch
from torch import Tensor


def tied_names(own: dict) -> dict[str, str]:
    """name -> the first name of its group, for the names of ``own`` (a state dict) that are one tensor."""
    groups: dict[tuple, list[str]] = {}
    for name, value in own.items():
        if value.numel():
            ident = (value.device, value.data_ptr(), value.dtype, tuple(value.shape), value.stride())
            groups.setdefault(ident, []).append(name)
    return {name: names[0] for names in groups.values() if len(names) > 1 for name in names}


def same_values(a: Tensor, b: Tensor) -> bool:
    """Exactly equal (NaN equal to NaN), shapes and dtypes included."""
    if a is b:
        return True
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.device == b.device and a.numel() and a.data_ptr() == b.data_ptr() and a.stride() == b.stride():
        return True
    b = b.to(a.device)
    if torch.equal(a, b):
        return True
    return a.is_floating_point() and bool(((a == b) | (a.isnan() & b.isnan())).all())


def fill_tied(loaded: dict[str, Tensor], own: dict, key_of) -> None:
    """Complete ``loaded`` (our names -> values) with the tied names it lacks, from a present name of the same
    group; raise a ValueError naming both published keys (``key_of(name)``) when two present names of one group
    hold different values. Nothing but ``loaded`` is touched."""
    groups: dict[str, list[str]] = {}
    for name, first in tied_names(own).items():
        groups.setdefault(first, []).append(name)
    for names in groups.values():
        present = [n for n in names if n in loaded]
        if not present:
            continue
        for other in present[1:]:
            if not same_values(loaded[present[0]], loaded[other]):
                raise ValueError(
                    f"state_dict: {key_of(present[0])} and {key_of(other)} are one tied tensor of the "
                    "backbone but hold different values"
                )
        for name in names:
            loaded.setdefault(name, loaded[present[0]])
