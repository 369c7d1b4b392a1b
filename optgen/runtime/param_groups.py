"""Parameter-group helpers of published training recipes (AdamWPrune's AdamWAdv and AdamWPrune)."""

from __future__ import annotations

from typing import Any

from torch import nn

#: the normalisation layers whose parameters AdamWPrune never decays
NORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)


def param_groups_for_weight_decay(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamWPrune's ``param_groups_for_weight_decay``: a decay group (``weight_decay``) of every
    parameter except biases (names ending in ``bias``) and the parameters of BatchNorm1d/2d,
    LayerNorm and GroupNorm layers, which form a group with ``weight_decay=0``; parameters in
    ``model.named_modules()`` order, each once, frozen ones left out."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for _, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if name.endswith("bias") or isinstance(module, NORM_LAYERS) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def mark_prunable(model: nn.Module) -> list[nn.Parameter]:
    """AdamWPrune's prunable tensors: set ``prunable = True`` on the ``.weight`` of every
    ``nn.Linear`` and ``nn.Conv2d`` of ``model`` (feature ``adamw_prune`` reads it); returns them."""
    marked = []
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and isinstance(module.weight, nn.Parameter):
            module.weight.prunable = True
            marked.append(module.weight)
    return marked
