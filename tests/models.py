"""Small real models and a deterministic training loop for equivalence tests."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

# the models are the package's own (``optgen test`` trains them too): one definition
from optgen.authoring.models import MLP, MODELS, TinyTransformer, make_model  # noqa: F401


def train(model: nn.Module, make_opt: Callable, steps: int, dtype: torch.dtype) -> tuple[list[torch.Tensor], list[float]]:
    """Train ``model`` for ``steps`` full-batch steps; returns the final parameters and losses."""
    opt = make_opt(model.parameters())
    batch = type(model).batch(dtype)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model.loss(batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return [p.detach().clone() for p in model.parameters()], losses


def max_diffs(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[float, float]:
    """Max absolute difference, and max difference relative to the larger magnitude (floor 1)."""
    abs_d = 0.0
    rel_d = 0.0
    for x, y in zip(a, b):
        d = (x.double() - y.double()).abs()
        if d.numel() == 0:
            continue
        abs_d = max(abs_d, d.max().item())
        scale = torch.maximum(x.double().abs(), y.double().abs()).clamp_min(1.0)
        rel_d = max(rel_d, (d / scale).max().item())
    return abs_d, rel_d
