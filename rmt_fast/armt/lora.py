"""PEFT LoRA inside FastARMT's batched layers: the projections' base layers, and their LoRA terms as batched
matmuls over adapter weights stacked per call.

A peft ``lora.Linear`` around a projection computes ``base(x) + scaling * lora_B(lora_A(dropout(x)))`` for each
of its active adapters (nothing when the adapter is merged into the base weight, or adapters are disabled).
:class:`StackedLoRA` stacks every layer's ``lora_A`` / ``lora_B`` weights (``torch.stack`` of the parameters,
so gradients reach them) per (projection part, adapter); layers where a part has no such adapter, or a smaller
rank, get zero rows (they add exactly zero). Anything else a tuner layer may do (DoRA and the other LoRA
variants, ``lora_bias``, non-LoRA tuners, quantized base layers) is refused with a ValueError.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _lora_linear_class():
    peft = sys.modules.get("peft")
    return None if peft is None else peft.tuners.lora.layer.Linear


def base_projection(module: nn.Module, kind: type, where: str) -> nn.Module:
    """The plain ``kind`` layer a projection computes with: the module itself, or the base layer of a peft LoRA
    layer. ``where`` names the projection in errors."""
    if type(module) is kind:
        return module
    lora_cls = _lora_linear_class()
    if lora_cls is not None and type(module) is lora_cls:
        base = module.get_base_layer()
        if type(base) is not kind:
            raise ValueError(
                f"model: {where} is a LoRA layer over a {type(base).__name__}, not a plain "
                f"{kind.__name__} (quantized base layers are not supported by FastARMT)"
            )
        return base
    raise ValueError(
        f"model: {where} is a {type(module).__name__}, not a plain {kind.__name__} or a peft LoRA "
        "layer over one: FastARMT's batched layers reproduce LoRA only (merge other adapters first: "
        "merge_and_unload())"
    )


def _active_terms(module: nn.Module, where: str) -> list[str]:
    """The adapters whose LoRA term ``module``'s forward adds, checked: [] for a plain layer."""
    lora_cls = _lora_linear_class()
    if lora_cls is None or type(module) is not lora_cls:
        return []
    if module.disable_adapters:
        if module.merged:
            raise ValueError(
                f"model: {where} has adapters disabled while {module.merged_adapters} are merged "
                "into its weight (peft would unmerge them in forward); call unmerge_adapter() first"
            )
        return []
    if module.merged:
        return []
    names = []
    for name in module.active_adapters:
        if name not in module.lora_A.keys():
            continue
        if name in getattr(module, "lora_variant", {}):
            option = "use_dora=True (DoRA)" if module.use_dora.get(name, False) else "a LoRA variant"
            raise ValueError(
                f"model: {where}'s adapter {name!r} uses {option}, which FastARMT does not reproduce "
                "(merge it first: merge_and_unload())"
            )
        if getattr(module, "lora_bias", {}).get(name, False) or module.lora_B[name].bias is not None:
            raise ValueError(
                f"model: {where}'s adapter {name!r} uses lora_bias=True, which FastARMT does not "
                "reproduce (merge it first: merge_and_unload())"
            )
        names.append(name)
    return names


def _dropout_p(module: nn.Module, where: str) -> float:
    if isinstance(module, nn.Identity):
        return 0.0
    if type(module) is nn.Dropout:
        return module.p
    raise ValueError(f"model: {where}'s LoRA dropout is a {type(module).__name__}, not nn.Dropout / Identity")


class StackedLoRA:
    """The LoRA terms of every projection, stacked over the layers; :meth:`add` adds them to a batched output.

    ``projections``: name -> per layer, the list of (path, module) whose outputs the projection concatenates
    (e.g. q, k, v), with their output widths ``sizes[name]``."""

    def __init__(
        self, projections: dict[str, list[list[tuple[str, nn.Module]]]], sizes: dict[str, list[int]], training: bool
    ):
        self.training = training
        self.sizes = sizes
        self.terms: dict[str, list] = {}
        for proj, per_layer in projections.items():
            terms = []
            for j in range(len(sizes[proj])):
                found: dict[str, list] = {}  # adapter -> per layer (A, B, scaling, p) or None
                for i, parts in enumerate(per_layer):
                    path, module = parts[j]
                    where = f"layer {i}'s {path}"
                    for name in _active_terms(module, where):
                        entry = (
                            module.lora_A[name].weight,
                            module.lora_B[name].weight,
                            module.scaling[name],
                            _dropout_p(module.lora_dropout[name], where),
                        )
                        found.setdefault(name, [None] * len(per_layer))[i] = entry
                for name, entries in found.items():
                    terms.append((j, *self._stack(entries, name)))
            if terms:
                self.terms[proj] = terms

    @staticmethod
    def _stack(entries, name):
        present = [e for e in entries if e is not None]
        rank = max(a.shape[0] for a, _, _, _ in present)
        a0, b0 = present[0][0], present[0][1]
        scales, ps = {s for _, _, s, _ in present}, {p for _, _, _, p in present}
        if len(ps) > 1:
            raise ValueError(
                f"model: adapter {name!r} has LoRA dropout {sorted(ps)} in different layers; FastARMT "
                "needs one lora_dropout per adapter"
            )
        a_t, b_t, scale = [], [], []
        for e in entries:
            if e is None:
                a_t.append(a0.new_zeros(a0.shape[1], rank))
                b_t.append(b0.new_zeros(rank, b0.shape[0]))
                scale.append(0.0)
                continue
            a, b, s, _ = e
            pad = rank - a.shape[0]
            a_t.append(F.pad(a.transpose(0, 1), (0, pad)) if pad else a.transpose(0, 1))
            b_t.append(F.pad(b.transpose(0, 1), (0, 0, 0, pad)) if pad else b.transpose(0, 1))
            scale.append(s)
        scaling = scales.pop() if len(scales) == 1 else torch.tensor(scale, dtype=a0.dtype, device=a0.device)
        if isinstance(scaling, Tensor):
            scaling = scaling.view(-1, 1, 1)
        return torch.stack(a_t), torch.stack(b_t), scaling, ps.pop()

    def add(self, y: Tensor, x: Tensor, proj: str, sl: slice) -> Tensor:
        """y (G, R, out) = the base output of ``proj`` on x (G, R, in), for layers ``sl``: + its LoRA terms."""
        terms = self.terms.get(proj)
        if not terms:
            return y
        sizes = self.sizes[proj]
        parts = list(y.split(sizes, dim=-1)) if len(sizes) > 1 else [y]
        for j, a_t, b_t, scaling, p in terms:
            h = x.to(a_t.dtype)
            if self.training and p > 0:
                h = F.dropout(h, p, training=True)
            s = scaling[sl] if isinstance(scaling, Tensor) else scaling
            parts[j] = parts[j] + torch.bmm(torch.bmm(h, a_t[sl]), b_t[sl]) * s
        out = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
        return out.to(y.dtype)
