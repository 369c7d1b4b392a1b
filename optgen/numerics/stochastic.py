"""Stochastic rounding of float32 values to bfloat16, with adv_optm's random stream.

adv_optm (util/param_update.py) draws ``torch.randint(0, 2**16, x.shape, dtype=int32)`` from one
``torch.Generator`` per device, seeded 42 whenever an optimizer with bf16 parameters is constructed,
adds it to the float32 bits and truncates the low 16 bits. The torch and reference backends draw
the same stream in the same order (one draw per parameter per step, in parameter order), so
their results are bit-identical to adv_optm's; the triton backend uses in-kernel Philox numbers
(the same distribution, another stream).
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterator

import torch

SEED = 42
_generators: dict[torch.device, torch.Generator] = {}


def reseed(devices: set[torch.device]) -> None:
    """Re-seed the generator of each device to 42 (as every adv_optm constructor does)."""
    for device in devices:
        gen = _generators.get(device)
        if gen is None:
            gen = _generators[device] = torch.Generator(device=device)
        gen.manual_seed(SEED)


def generator(device: torch.device) -> torch.Generator:
    if device not in _generators:
        reseed({device})
    return _generators[device]


#: random bits drawn ahead, in parameter order, for calls made in another order (see :func:`drawn`)
_ahead: deque[torch.Tensor] | None = None


def draw(x: torch.Tensor) -> torch.Tensor:
    """The random low 16 bits for one tensor like ``x`` (one draw from its device's stream)."""
    return torch.randint(0, 1 << 16, x.shape, device=x.device, dtype=torch.int32, generator=generator(x.device))


def draw_bits(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """``shape`` random 16-bit integers (int32) from the device's stream: a stochastic state
    codec's draw (adv_optm's ``_get_random_int_for_sr`` / ``_get_random_int_for_8bit_sr``)."""
    return torch.randint(0, 1 << 16, shape, device=device, dtype=torch.int32, generator=generator(device))


def sketch(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A Gaussian sketch of ``shape`` in ``like``'s dtype and device, from the same stream
    (adv_optm's low-rank orthogonalisation draws it there, before the parameter's rounding)."""
    return torch.randn(shape, device=like.device, dtype=like.dtype, generator=generator(like.device))


def uniform(like: torch.Tensor) -> torch.Tensor:
    """Uniform numbers in [0, 1) of ``like``'s shape and dtype from its device's stream (adv_optm's
    ``_get_random_noise_for_sso`` draws ``torch.rand`` there, before the parameter's rounding)."""
    return torch.rand(like.shape, device=like.device, dtype=like.dtype, generator=generator(like.device))


def maxabs_dim(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The largest ``|x|`` along ``dim``, kept as a size-1 dim so that it broadcasts against ``x``
    (``torch.linalg.vector_norm(x, inf, dim, keepdim=True)``, the published stochastic sign's norm)."""
    if dim >= x.dim():
        raise RuntimeError(f"maxabs_dim(): dim {dim} of a tensor with {x.dim()} dims")
    return torch.linalg.vector_norm(x, ord=float("inf"), dim=dim, keepdim=True)


@contextlib.contextmanager
def drawn(bits: list[torch.Tensor]) -> Iterator[None]:
    """Round with ``bits`` (drawn earlier by :func:`draw`) in order: the torch backend steps
    parameters in buckets, but adv_optm's stream is drawn in parameter order."""
    global _ahead
    _ahead = deque(bits)
    try:
        yield
    finally:
        _ahead = None


def round_bf16(x: torch.Tensor) -> torch.Tensor:
    """``x`` (float32) rounded to bfloat16: up in magnitude with probability (low 16 bits) / 2^16."""
    r = _ahead.popleft().view(x.shape) if _ahead else draw(x)
    r.add_(x.contiguous().view(torch.int32))
    r.bitwise_and_(-65536)
    return r.view(torch.float32).to(torch.bfloat16)
