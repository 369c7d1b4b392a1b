"""The values a hyperparameter accepts: one rule, used by the generated constructors (at run time)
and by ``optgen check`` (for the settings a spec's ``matches:`` lists)."""

from __future__ import annotations

from typing import Any

import torch


def validate_hyperparameter(name: str, h: Any, value: Any) -> None:
    """Raise torch.optim's error for a value of hyperparameter ``name`` (declared as ``h``) that the
    constructor must refuse: its type, its range, its choices, the length of a tuple."""
    kind = h.inferred_type()
    if h.as_ is not None:
        if not isinstance(value, (tuple, list)) or len(value) != len(h.as_):
            raise ValueError(f"Invalid {name}: expected {len(h.as_)} values, got {value!r}")
        items = list(enumerate(value))
        tensors = [isinstance(v, torch.Tensor) for v in value]
        if h.tensor_ok and any(tensors) and not all(tensors):
            raise ValueError(f"{name} must be either {'both' if len(value) == 2 else 'all'} floats or "
                             f"{'both' if len(value) == 2 else 'all'} Tensors")
    else:
        items = [(None, value)]
    if h.choices is not None and value not in h.choices:
        raise ValueError(f"{name}={value!r} is not supported; supported: {', '.join(map(repr, h.choices))}")
    for idx, v in items:
        if v is None and (h.nullable if h.as_ is not None else (h.default is None or h.nullable)):
            continue  # an optional number left unset
        if kind in ("any", "dtype"):
            if kind == "dtype" and not isinstance(v, torch.dtype):
                raise TypeError(f"{name} must be a torch.dtype, got {v!r}")
            continue
        if isinstance(v, torch.Tensor):
            if not h.tensor_ok:
                raise TypeError(f"{name} must be a number, not a Tensor")
            if v.numel() != 1:
                raise ValueError(f"Tensor {name if idx is None else f'{name}[{idx}]'} must be 1-element")
            if h.tensor_dtypes is not None and str(v.dtype).removeprefix("torch.") not in h.tensor_dtypes:
                raise ValueError(f"Tensor {name if idx is None else f'{name}[{idx}]'} must be "
                                 f"{' or '.join(h.tensor_dtypes)}, got {v.dtype} (the step computes with a "
                                 f"tensor {name} in its dtype only for these)")
            v = v.item()
        if kind == "bool":
            if not isinstance(v, bool):
                raise TypeError(f"{name} must be True or False, got {v!r}")
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name} must be a number, got {v!r}")
        bad = (
            (h.min is not None and not v >= h.min)
            or (h.max is not None and not v <= h.max)
            or (h.min_exclusive is not None and not v > h.min_exclusive)
            or (h.max_exclusive is not None and not v < h.max_exclusive)
        )
        if bad:
            if h.message:
                raise ValueError(h.message.format(value=v, index=idx))
            where = f"{name}[{idx}]" if idx is not None else name
            raise ValueError(f"Invalid {where}: {v} (must be {range_text(h)})")


def range_text(h: Any) -> str:
    """A hyperparameter's range as ``>= 0 and < 1`` (empty when unbounded)."""
    parts = []
    if h.min is not None:
        parts.append(f">= {h.min}")
    if h.min_exclusive is not None:
        parts.append(f"> {h.min_exclusive}")
    if h.max is not None:
        parts.append(f"<= {h.max}")
    if h.max_exclusive is not None:
        parts.append(f"< {h.max_exclusive}")
    return " and ".join(parts)
