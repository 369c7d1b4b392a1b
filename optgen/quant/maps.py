"""The code books of the published block-quantised formats.

``dynamic_map`` is the construction bitsandbytes 0.50.2 (``functional.create_dynamic_map``) and
torchao 0.18.0 (``optim.quant_utils.create_dynamic_map``) share (math §6.1.1): for exponent
``i = 0 .. E-1``, the midpoints of ``linspace(0.1, 1, n_i + 1)`` (float32) scaled by
``10^(i - E + 1)``, both signs for a signed map, then 0 and 1, sorted. The float32 rounding of every
entry is the published one: the scaling is a float32 tensor times a Python number, as there.
"""

from __future__ import annotations

import functools

import torch


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The dynamic quantisation map, a sorted float32 tensor of ``2**total_bits`` entries.

    8 bits, 7 exponent bits: bnb's ``dynamic`` (signed; no -1.0) and ``udynamic`` maps, used by
    bitsandbytes and torchao's 8-bit states. 4 bits, 3 exponent bits, signed: torchao's 4-bit
    first-moment map.
    """
    magnitude_bits = total_bits - 1
    extra = 2 ** (magnitude_bits - max_exponent_bits) - 1
    pieces: list[torch.Tensor] = []

    def add(count: int, exponent: int) -> None:
        edges = torch.linspace(0.1, 1, count + 1, dtype=torch.float32)
        centres = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (exponent - (max_exponent_bits - 1))
        pieces.append(scale * centres)  # float32 tensor times a Python number: float32 products
        if signed:
            pieces.append(-scale * centres)

    for i in range(max_exponent_bits):
        # a signed map spends one bit on the sign, so each exponent has half the fractions
        add(2 ** (i + magnitude_bits - max_exponent_bits + (0 if signed else 1)), i)
    if extra > 0:
        add(extra, max_exponent_bits - 1)
    values = torch.cat([*pieces, torch.tensor([0.0, 1.0])])
    if values.numel() != 2**total_bits:
        raise ValueError(f"dynamic map of {max_exponent_bits} exponent bits has {values.numel()} entries, "
                         f"not {2**total_bits}")
    return torch.sort(values).values


def ao_unsigned_4bit_map() -> torch.Tensor:
    """torchao's 4-bit second-moment map: 16 linear levels ``k/16``, ``k = 1..16`` (no zero)."""
    return torch.linspace(0, 1, 17, dtype=torch.float32)[1:].contiguous()


@functools.cache
def _qmap_cpu(name: str) -> torch.Tensor:
    if name == "signed":
        return dynamic_map(True)
    if name == "unsigned":
        return dynamic_map(False)
    if name == "signed4":
        return dynamic_map(True, 3, 4)
    if name == "unsigned4":
        return ao_unsigned_4bit_map()
    raise ValueError(f"unknown code book {name!r} (signed, unsigned, signed4, unsigned4)")


def qmap(name: str, device: torch.device | str | None = None) -> torch.Tensor:
    """One of the four code books by name (a fresh tensor on ``device``; built once per process)."""
    return _qmap_cpu(name).to(device, copy=True)


def cpu_lookup_table(code: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' CPU encoder table (``csrc/cpu_ops.cpp``, 0.50.x): for each of 65536 bins
    ``val_i = -1 + 2i/65535`` (float32), the index of the first code whose midpoint with the next
    code is not below ``val_i``. uint8, 65536 entries, on ``code``'s device."""
    code = code.float()
    midpoints = 0.5 * (code[:-1] + code[1:])
    bins = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32, device=code.device)) / 65535.0
    return torch.searchsorted(midpoints, bins, right=False).to(torch.uint8)
