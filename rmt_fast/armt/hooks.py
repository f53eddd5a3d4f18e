"""The associative memory attached to transformers' own decoder layers with forward hooks, as the published
``AssociativeLayerWrapper`` attaches it: a read before every layer, a write after it. ReferenceARMT runs
every segment this way; both wrappers' ``generate`` runs the backbone with reads only."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import Tensor

from .memory import MemoryShape, read, write


class LayerMemory:
    """The per-layer state lists A[l], z[l] (mutated in place by the write hooks)."""

    def __init__(self, A: list[Tensor], z: list[Tensor], first: bool):
        self.A, self.z, self.first = A, z, first


@contextlib.contextmanager
def memory_hooks(
    layers, assoc, shape: MemoryShape, mem: LayerMemory, *, reads: bool, write_slots: int | None
) -> Iterator[None]:
    """Hooks on every decoder layer while the block runs: a read of ``mem`` before the layer (if ``reads``),
    and a write from the layer's outputs at the last ``write_slots`` positions after it (if not None)."""
    handles = []

    def pre(index):
        def hook(module, args, kwargs):
            p = assoc[index]
            if args:
                return (read(args[0], mem.A[index], mem.z[index], p.W_mq.weight, shape), *args[1:]), kwargs
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = read(kwargs["hidden_states"], mem.A[index], mem.z[index], p.W_mq.weight, shape)
            return args, kwargs

        return hook

    def post(index):
        def hook(module, args, output):
            hidden = output if isinstance(output, Tensor) else output[0]
            p = assoc[index]
            mem.A[index], mem.z[index] = write(
                hidden[:, -write_slots:],
                mem.A[index],
                mem.z[index],
                p.W_mk.weight,
                p.W_mv.weight,
                p.W_mb.weight,
                p.W_mb.bias,
                shape,
                mem.first,
            )
            return output

        return hook

    try:
        for i, layer in enumerate(layers):
            if reads:
                handles.append(layer.register_forward_pre_hook(pre(i), with_kwargs=True))
            if write_slots is not None:
                handles.append(layer.register_forward_hook(post(i)))
        yield
    finally:
        for h in handles:
            h.remove()
