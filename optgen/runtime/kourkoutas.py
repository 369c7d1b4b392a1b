"""Kourkoutas-beta's per-layer state: the dynamic beta2 of each bucket of parameters (adv_optm).

A bucket ("layer") is every parameter with the same shape by default (adv_optm's
``layer_key_fn``; 2.2.3 gives embedding-like 2-D tensors a bucket of their own), or what the
optimizer's ``layer_key_fn`` returns. Once per step, before any parameter is stepped, each bucket's
beta2 is computed from the *previous* step's pooled gradient norm, in float32 tensors exactly as
adv_optm does (math/adv-optm.md §2.7):

    n = sqrt(sum of |g|^2 over the bucket);  r_ema = ema_alpha r_ema + (1 - ema_alpha) n
    sun = (n / (r_ema + tiny_spike)) / (1 + n / (r_ema + tiny_spike))
    beta2 = beta2_max - (beta2_max - beta2_min) sun     (with adv_optm's warm-up)

The generated step reads it as the ``input`` ``kourkoutas_beta2`` and leaves each parameter's
``sum(g^2)`` in its state ``kourkoutas_sq``; the next prepare pools those in parameter order (the
same float32 additions as adv_optm's running accumulator).
"""

from __future__ import annotations

from typing import Any

import torch

from optgen.features.kourkoutas_beta import BETA2, SQ

R_EMA = "kourkoutas_r_ema"
_TAGS = ("_is_oft", "_is_lora_A", "_is_lora_B", "_is_dora_scale")


def default_key_2_5(p: torch.Tensor) -> tuple:
    return (id(p),) if any(getattr(p, t, False) for t in _TAGS) else tuple(p.shape)


def default_key_2_2(p: torch.Tensor) -> tuple:
    return (id(p),) if p.dim() == 2 and 1 <= p.shape[0] <= 10 and p.shape[1] in {768, 1280, 4096} else tuple(p.shape)


class Kourkoutas:
    """The buckets of one optimizer and their dynamic beta2."""

    def __init__(self, optimizer: Any, warmup: str) -> None:
        self.optimizer = optimizer
        self.warmup = warmup  # "blend" (adv_optm 2.5.16) or "switch" (2.2.3)
        key_fn = getattr(optimizer, "layer_key_fn", None)
        if key_fn is None:
            key_fn = default_key_2_5 if warmup == "blend" else default_key_2_2
        self.key_fn = key_fn
        self.buckets: dict[Any, dict[str, Any]] = {}
        self.of: dict[int, dict[str, Any]] = {}
        for group in optimizer.param_groups:
            if not group.get("kourkoutas_beta"):
                continue
            for p in group["params"]:
                b = self.buckets.setdefault(key_fn(p), {"params": [], "group": group, "r_ema": None, "beta2": None})
                b["params"].append(p)
                self.of[id(p)] = b
        self.prepared = -1

    def maybe_prepare(self, current_step: int) -> None:
        """Prepare once per step (``current_step``: completed steps of the first parameter stepped)."""
        if self.prepared < current_step:
            self.prepare(current_step)
        self.prepared = current_step

    def prepare(self, t: int) -> None:
        state = self.optimizer.state
        for b in self.buckets.values():
            g = b["group"]
            first = b["params"][0]
            r_ema = b["r_ema"]
            saved = state[first].get(R_EMA) if first in state else None
            if isinstance(saved, torch.Tensor) and saved is not r_ema:  # loaded from a state dict
                r_ema = saved
            if r_ema is None:
                r_ema = torch.zeros((), device=first.device, dtype=torch.float32)
            b["r_ema"] = r_ema
            acc = torch.zeros((), device=first.device, dtype=torch.float32)
            for p in b["params"]:
                st = state[p]
                st[R_EMA] = r_ema  # one tensor shared by the bucket, saved with every param (as adv_optm)
                sq = st.get(SQ)
                if isinstance(sq, torch.Tensor):
                    acc += sq
                    sq.zero_()
            n = torch.sqrt(acc)
            alpha, beta2_max = g["ema_alpha"], g["betas"][1]
            r_ema.mul_(alpha).add_(n, alpha=1.0 - alpha)
            warm = g["k_warmup_steps"]
            if self.warmup == "switch" and t < warm:
                b["beta2"] = beta2_max
                continue
            raw = n / (r_ema + g["tiny_spike"])
            sun = raw / (1.0 + raw)
            target = beta2_max - (beta2_max - g["beta2_min"]) * sun
            if self.warmup == "blend":
                weight = min(1.0, t / warm) if warm > 0 else 1.0
                target = (1.0 - weight) * beta2_max + weight * target
            b["beta2"] = target.item()

    def inputs(self, p: torch.Tensor) -> dict[str, float]:
        b = self.of.get(id(p))
        return {} if b is None or b["beta2"] is None else {BETA2: b["beta2"]}
