"""Gradient clipping over every parameter of the optimizer: the first phase of a step.

The ``clip_grad`` feature (optgen.features.clip_grad) adds the optimizer-wide hyperparameters
``max_grad_norm``, ``grad_norm_type``, ``error_if_nonfinite`` and ``clip_grad_value``. When one of
``max_grad_norm`` / ``clip_grad_value`` is set, :func:`clipped_gradients` reduces over the
gradients of all the parameters the step is about to step (every group, in group order: the list
``torch.nn.utils.clip_grad_norm_(model.parameters(), ...)`` sees when the optimizer holds the
model's parameters in that order) and hands the executors scaled copies in place of ``.grad``
for the duration of the step; the user's gradients are restored untouched afterwards.

Bit-identical to torch.nn.utils 2.13 followed by the step: the same ops on the same tensors in the
same order (``get_total_norm``: ``torch._foreach_norm`` per device and dtype, the norm of the
stacked norms; ``clip_coef = max_norm / (total + 1e-6)`` clamped to 1.0; ``_foreach_mul`` of the
gradients by the coefficient, a device tensor, so no host sync unless ``error_if_nonfinite``).
The out-of-place foreach ops compute what torch's in-place ones compute, into new tensors.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype, _has_foreach_support

FEATURE = "clip_grad"


def active(opt: Any) -> bool:
    """Whether ``opt``'s program has the feature and one of its clippings is switched on."""
    return FEATURE in opt._program.features and (
        getattr(opt, "max_grad_norm", None) is not None or getattr(opt, "clip_grad_value", None) is not None)


def clip(grads: list[torch.Tensor], max_norm: float | None, norm_type: float = 2.0, error_if_nonfinite: bool = False,
         clip_value: float | None = None) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Clipped copies of ``grads`` (value first, then norm) and the total norm (None without norm
    clipping); ``grads`` are not modified."""
    out = list(grads)
    copied = False
    if clip_value is not None:
        v = float(clip_value)
        out = _by_group(out, lambda gs: _clamp(gs, v), lambda g: g.clamp(min=-v, max=v))
        copied = True
    total = None
    if max_norm is not None:
        total = torch.nn.utils.get_total_norm(out, norm_type, error_if_nonfinite)
        coef = torch.clamp(float(max_norm) / (total + 1e-6), max=1.0)
        if copied:
            _by_group(out, lambda gs: _scale_(gs, coef), lambda g: g.mul_(coef.to(g.device)))
        else:
            out = _by_group(out, lambda gs: torch._foreach_mul(gs, coef.to(gs[0].device)),
                            lambda g: g.mul(coef.to(g.device)))
    return out, total


def _clamp(gs: list[torch.Tensor], v: float) -> list[torch.Tensor]:
    out = torch._foreach_clamp_min(gs, -v)  # clip_grad_value_'s clamp_min_ then clamp_max_, on copies
    torch._foreach_clamp_max_(out, v)
    return out


def _scale_(gs: list[torch.Tensor], coef: torch.Tensor) -> list[torch.Tensor]:
    torch._foreach_mul_(gs, coef.to(gs[0].device))
    return gs


def _by_group(grads: list[torch.Tensor], foreach: Any, single: Any) -> list[torch.Tensor]:
    """Apply ``foreach`` to each device/dtype group of ``grads`` (``single`` to each tensor where
    foreach is not supported, as torch.nn.utils falls back), results in the original order."""
    out: list[Any] = [None] * len(grads)
    for (device, _), ([group], idx) in _group_tensors_by_device_and_dtype([grads], with_indices=True).items():
        if _has_foreach_support(group, device):
            results = foreach(group)
        else:
            results = [single(g) for g in group]
        for i, r in zip(idx, results):
            out[i] = r
    return out


@contextmanager
def clipped_gradients(opt: Any, params: list[torch.Tensor]) -> Iterator[None]:
    """Step ``params`` (every parameter with a gradient, all groups) on clipped copies of their
    gradients; their ``.grad`` is restored on exit. Sets ``opt.last_grad_norm`` (a device tensor)."""
    if not params or not active(opt):
        yield
        return
    grads = [p.grad for p in params]
    clipped, total = clip(grads, opt.max_grad_norm, opt.grad_norm_type, opt.error_if_nonfinite, opt.clip_grad_value)
    opt.last_grad_norm = total
    try:
        for p, g in zip(params, clipped):
            p.grad = g
        yield
    finally:
        for p, g in zip(params, grads):
            p.grad = g
