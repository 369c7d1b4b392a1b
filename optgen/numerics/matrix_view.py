"""The matrix view of factored parameters, and 1-bit state storage (feature ``factored``).

A program with ``matrix_views`` rules steps each parameter that meets one as a matrix of its flat
memory (the closest-to-square ``(d1, d2)``, or ``(shape[0], -1)``): the runtime hands the backends views of
the parameter, the gradient and the per-element states, so per-row / per-column states are the
rank-1 factors. ``bits`` states (a boolean per element) are stored packed 8 per ``uint8`` along
the last dim, least significant bit first (adv_optm's layout); the torch and reference backends
see them unpacked, the triton kernels read and write the packed bytes.
"""

from __future__ import annotations

from typing import Any

import torch

from optgen.ir.nodes import Kind, Program
from optgen.numerics.host import HostContext, evaluate
from optgen.numerics.shapes import effective_shape

_SHIFTS = (1, 2, 4, 8, 16, 32, 64, 128)


def view_shape(program: Program, p: torch.Tensor, group: dict[str, Any], state: dict) -> tuple[int, int] | None:
    """The ``(d1, d2)`` shape ``p`` is stepped as, or None when the program steps it as it is."""
    if not program.matrix_views:
        return None
    ctx = HostContext(group, p, state, tensor_math=False)
    for cond, shape in program.matrix_views:
        if evaluate(cond, ctx):
            if shape == "square":
                return effective_shape(p.numel())
            if p.dim() < 2:
                raise RuntimeError(f"a (rows, -1) matrix view needs a parameter with 2 or more dims, got {tuple(p.shape)}")
            return (p.shape[0], p.numel() // p.shape[0]) if p.shape[0] else (0, 0)
    return None


def decl_view(view_name: str | None, p: torch.Tensor, view: tuple[int, int] | None) -> tuple[int, int] | None:
    """The view a state's kind refers to: its own (``StateDecl.view``, ``"square"``: the closest-to-square
    matrix of ``p``, whatever view ``p`` is stepped as) or else the one ``p`` is stepped as."""
    return effective_shape(p.numel()) if view_name == "square" else view


def as_square(t: torch.Tensor) -> torch.Tensor:
    """``t``'s flat memory as its closest-to-square ``(d1, d2)`` matrix (row-major)."""
    return t.reshape(effective_shape(t.numel()))


def square_outer(r: torch.Tensor, c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``outer(r, c)`` of the factors of a closest-to-square view, in ``like``'s (stepped) shape."""
    return torch.einsum("...n,...m->...nm", r, c).reshape(like.shape)


def as_view(t: torch.Tensor, shape: tuple[int, int] | None, what: str) -> torch.Tensor:
    """``t`` viewed as ``shape`` (its flat memory, row-major)."""
    if shape is None:
        return t
    try:
        return t.view(shape)
    except RuntimeError as exc:
        raise RuntimeError(f"factored states need a contiguous {what} to view it as {shape}: {exc}") from None


def packed_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The storage shape of a ``bits`` state for a (viewed) parameter of ``shape``."""
    if not shape:
        raise RuntimeError("a 1-bit state needs a parameter with at least one dim")
    return (*shape[:-1], -(-shape[-1] // 8))


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Booleans ``(..., n)`` as ``uint8`` ``(..., ceil(n/8))``, bit ``b`` of byte ``j`` = element ``8j+b``."""
    n = bits.shape[-1]
    padded = torch.nn.functional.pad(bits.to(torch.uint8), (0, -(-n // 8) * 8 - n))
    shifter = torch.tensor(_SHIFTS, dtype=torch.uint8, device=bits.device)
    return (padded.view(*bits.shape[:-1], -(-n // 8), 8) * shifter).sum(dim=-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of :func:`pack_bits`: booleans ``(..., n)``."""
    shifter = torch.tensor(_SHIFTS, dtype=torch.uint8, device=packed.device)
    bits = ((packed.unsqueeze(-1) & shifter) != 0).view(*packed.shape[:-1], packed.shape[-1] * 8)
    # contiguous: elementwise ops on a sliced boolean tensor are several times slower
    return bits if bits.shape[-1] == n else bits[..., :n].contiguous()


_DECLS: dict[int, tuple[Program, tuple[str, ...], frozenset[str], frozenset[str]]] = {}


def _decls(program: Program) -> tuple[tuple[str, ...], frozenset[str]]:
    """A program's 1-bit states and its other per-element states (computed once per program; the
    cache also keeps its read-only coded states, ``StateDecl.codec_rules``)."""
    hit = _DECLS.get(id(program))
    if hit is None or hit[0] is not program:
        hit = _DECLS[id(program)] = (program, tuple(d.name for d in program.state if d.dtype == "bits"),
                                     frozenset(d.name for d in program.state if d.kind == Kind.ELEMENT
                                               and d.dtype != "bits"),
                                     frozenset(d.name for d in program.state if d.codec_rules))
    return hit[1], hit[2]


class ViewedState:
    """A parameter's state as the backends see it under its view: per-element states viewed, 1-bit
    states unpacked. :meth:`write_back` packs the bits again and keeps states created meanwhile."""

    def __init__(self, program: Program, state: dict, shape: tuple[int, int] | None, p: torch.Tensor):
        self.program, self.state, self.shape, self.param = program, state, shape, p
        bits, self.elements = _decls(program)
        self.bits = [n for n in bits if state.get(n) is not None]
        if shape is None and not self.bits:  # the common case, on the hot path: the state itself
            self.view = state
            return
        self.view = dict(state)
        self.elements_coded = _DECLS[id(program)][3]
        for name in self.elements:
            value = self.view.get(name)
            # a read-only coded state's integer codes (padded blocks, packed) are no view of the
            # parameter: its decode takes the parameter's shape
            if isinstance(value, torch.Tensor) and (name not in self.elements_coded or value.is_floating_point()):
                self.view[name] = as_view(value, shape, f"state '{name}'")
        width = shape[-1] if shape is not None else (p.shape[-1] if p.dim() else 1)
        for name in self.bits:
            self.view[name] = unpack_bits(state[name], width)

    def write_back(self) -> None:
        if self.view is self.state:
            return
        for name in self.bits:
            self.state[name].copy_(pack_bits(self.view[name]))
        for name, value in self.view.items():
            if name not in self.state and isinstance(value, torch.Tensor):
                self.state[name] = value.view(self.param.shape) if name in self.elements else value
