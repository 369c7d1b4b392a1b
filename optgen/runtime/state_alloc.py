"""Allocating per-parameter state buffers: their shapes, storage dtypes (a state's dtype rules:
feature state_precision's codes, factored states' float32) and initial values. Shared by the
optimizer's eager allocation and the backends that create a state on its first write."""

from __future__ import annotations

from typing import Any

import torch

from optgen.ir.codecs import PACKED_UINT4, Codec, codec_for, stored_names
from optgen.ir.nodes import Kind, StateDecl
from optgen.numerics import stochastic
from optgen.numerics.dtypes import storage_dtype
from optgen.numerics.host import HostContext, evaluate
from optgen.numerics.matrix_view import decl_view, packed_shape


def _dtype(name: str, param: torch.Tensor) -> torch.dtype:
    return storage_dtype(name, param.dtype)


def state_shape(kind: Kind, param: torch.Tensor, name: str, view: tuple[int, ...] | None = None,
                stride: int | None = None) -> tuple[int, ...]:
    """The shape of a state buffer of ``kind`` for ``param`` (stepped as ``view``, if given;
    ``stride``: k of a per-slice state)."""
    shape = tuple(param.shape) if view is None else tuple(view)
    if kind == Kind.ELEMENT:
        return shape
    if kind == Kind.SLICE:
        return (-(-param.numel() // stride),)
    if kind == Kind.BLOCK:  # a codec's per-block values; ``stride``: the block size
        return (-(-param.numel() // stride),)
    if kind in (Kind.TENSOR, Kind.HOST):
        return ()
    if len(shape) < 2:
        raise RuntimeError(f"state '{name}' is {kind.label}, which needs a parameter with at least 2 dims, "
                           f"got shape {shape}; guard it with an 'if:' on ndim")
    if kind == Kind.ROW:
        return shape[:-1]
    if kind == Kind.COL:
        return shape[:-2] + shape[-1:]
    return shape[:-2]  # MATRIX


def new_state(decl: StateDecl, p: torch.Tensor, group: dict[str, Any], view: tuple[int, int] | None,
              ctx: HostContext, stride: int | None, init: Any = None) -> torch.Tensor:
    """A new buffer of state ``decl`` for ``p``, filled with its ``init`` (or ``init``, for a state
    created by its first write, whose value the step then writes whole)."""
    dtype = _dtype(decl.dtype, p)
    rule = next((t for c, t in decl.dtype_rules if evaluate(c, ctx)), None)
    if rule is not None:
        dtype = _dtype(rule, p)
    elif decl.dtype_when is not None and evaluate(decl.dtype_when[0], ctx):
        dtype = _dtype(decl.dtype_when[1], p)
    device = torch.device("cpu") if decl.kind == Kind.HOST else p.device
    init = decl.init if init is None else init
    if init == "param":  # a copy of the parameter (of its slice)
        if decl.scalar_if_zero and not p.any():
            return torch.tensor(0, dtype=dtype, device=device)
        src = p.detach().flatten()[::stride] if decl.kind == Kind.SLICE else p.detach()
        return src.to(dtype=dtype, copy=True).contiguous()
    if init == "unit_randn":  # adv_optm's spectral vectors: randn from its stream, over (norm + 1e-12)
        shape = state_shape(decl.kind, p, decl.name, decl_view(decl.view, p, view), stride)
        t = torch.randn(shape, device=device, dtype=dtype, generator=stochastic.generator(p.device))
        return t.div_(t.norm().add_(1e-12))
    if isinstance(init, tuple) and init[0] == "random_subset":
        return random_subset(p, group[init[1]], device)
    if isinstance(init, tuple):
        init = group[init[1]]
    value = {"zeros": 0.0, "ones": 1.0}.get(init, init) if isinstance(init, str) else init
    if decl.dtype == "bits":
        return torch.full(packed_shape(view or tuple(p.shape)), value, dtype=dtype, device=device)
    if rule == PACKED_UINT4:
        return torch.full((-(-p.numel() // 2),), value, dtype=dtype, device=device)
    if decl.kind == Kind.ELEMENT and dtype == p.dtype:
        return torch.full_like(p, value, memory_format=torch.preserve_format)
    shape = state_shape(decl.kind, p, decl.name, None if decl.kind == Kind.ELEMENT else decl_view(decl.view, p, view),
                        stride)
    return torch.full(shape, value, dtype=dtype, device=device)


def state_codec(decl: StateDecl, ctx: HostContext) -> Codec | None:
    """The codec that stores read-only coded state ``decl`` for the parameter of ``ctx`` (its
    ``codec_rules``, the first that holds), or None: the state is a plain tensor there."""
    return next((codec_for(c) for cond, c in decl.codec_rules if evaluate(cond, ctx)), None)


def new_coded_state(decl: StateDecl, p: torch.Tensor, ctx: HostContext) -> dict[str, torch.Tensor] | None:
    """Every tensor the codec of read-only coded state ``decl`` stores, by state-dict key: its
    ``init`` (the parameter) encoded, each tensor in its storage dtype; None where no codec
    stores it (:func:`new_state` allocates it)."""
    codec = state_codec(decl, ctx)
    if codec is None:
        return None
    if decl.init != "param":
        raise RuntimeError(f"state '{decl.name}': a read-only coded state is encoded from init 'param', "
                           f"not {decl.init!r}")
    names = stored_names(decl.name, codec, False)
    dtypes = {s.suffix: storage_dtype(s.dtype, p.dtype) for s in codec.stored(False)}
    coded = codec.encode(p.detach(), False, None)
    return {names[k]: v.to(dtype=dtypes[k]).contiguous() for k, v in coded.items()}


def coded_shapes(decl: StateDecl, codec: Codec, key: str, p: torch.Tensor) -> tuple[int, ...]:
    """The shape of ``key``, a tensor ``codec`` stores for read-only coded state ``decl`` of ``p``."""
    suffix = next(k for k, v in stored_names(decl.name, codec, False).items() if v == key)
    kind = next(s.shape for s in codec.stored(False) if s.suffix == suffix)
    n = p.numel()
    if kind == "padded":
        return codec.padded_shape(n)
    if kind == "blocks":
        return (-(-n // codec.block),)
    if kind == "packed":
        return (-(-n // codec.per_byte),)
    return tuple(p.shape)


def random_subset(p: torch.Tensor, fraction: float, device: torch.device) -> torch.Tensor:
    """A bool mask of ``p``'s shape with ``int(fraction * numel)`` true elements, at the first
    positions of ``torch.randperm(numel)`` (pytorch-optimizer's SPAM masks: the same random stream)."""
    n = p.numel()
    mask = torch.zeros(n, dtype=torch.bool, device=device)
    k = int(fraction * n)
    if k > 0:
        mask[torch.randperm(n, device=device)[:k]] = True
    return mask.view(p.shape)
