"""Blockwise quantise / dequantise of optimizer states in torch: the reference for every backend.

Blocks are consecutive ``block`` elements of the flattened (contiguous) tensor; a partial last
block is allowed (bitsandbytes keeps one; torchao quantises only multiples of its block, see
:func:`ao_quantized`, and on those the two agree). Scales are float32, one per block. All
arithmetic is float32 in the published order, so results are bit-identical to the published
encoders (tests/test_quant.py); NaN inputs are not matched (bnb's CPU library skips NaNs in its
maximum, torch propagates them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from optgen.quant.maps import cpu_lookup_table

#: bitsandbytes' optimizer block (``blocksize = 256`` in the 8-bit optimizer kernels, 0.44+).
BNB_BLOCK = 256
#: torchao's blocks: 256 for 8-bit and FP8 states, 128 for 4-bit ones.
AO_BLOCK = 256
AO_4BIT_BLOCK = 128
#: Both packages keep smaller tensors' states in full precision (bnb ``min_8bit_size``; torchao's
#: ``numel >= 4096`` test).
MIN_QUANT_SIZE = 4096
#: The largest finite float8 E4M3FN value (torchao's FP8 scale is ``absmax / FP8_MAX``).
FP8_MAX = 448.0
#: torchao's floor on a block's scale.
AO_SCALE_FLOOR = 1e-12


@dataclass(frozen=True)
class Format:
    """A block-quantised state format: its block and bits per code (scales are float32)."""

    name: str
    block: int
    bits: int


FORMATS = {
    "bnb8": Format("bnb8", BNB_BLOCK, 8),
    "ao8": Format("ao8", AO_BLOCK, 8),
    "ao4": Format("ao4", AO_4BIT_BLOCK, 4),
    "aofp8": Format("aofp8", AO_BLOCK, 8),
}


def format_bytes(fmt: Format | str, numel: int) -> int:
    """Bytes one quantised state of ``numel`` elements takes: codes plus float32 block scales."""
    fmt = FORMATS[fmt] if isinstance(fmt, str) else fmt
    blocks = -(-numel // fmt.block)
    return -(-numel * fmt.bits // 8) + 4 * blocks


def bnb_quantized(numel: int, min_8bit_size: int = MIN_QUANT_SIZE) -> bool:
    """Whether bitsandbytes keeps a parameter's states 8-bit (else float32: its 32-bit path)."""
    return numel >= min_8bit_size


def ao_quantized(numel: int, block: int, min_size: int = MIN_QUANT_SIZE) -> bool:
    """torchao's rule (``_AdamBase._new_buffer``): quantise only ``numel >= 4096`` tensors whose
    size is a multiple of the block; others keep plain states of the parameter's dtype."""
    return numel >= min_size and numel % block == 0


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x`` flattened into ``(blocks, block)`` rows, the last one zero-padded."""
    flat = x.reshape(-1)
    n = flat.numel()
    blocks = -(-n // block)
    if blocks * block != n:
        flat = torch.cat([flat, flat.new_zeros(blocks * block - n)])
    return flat.view(blocks, block)


def block_absmax(x: torch.Tensor, block: int) -> torch.Tensor:
    """``max |x|`` per block (float32; 0 for an all-zero block; empty for an empty tensor)."""
    rows = _blocks(x.float(), block)
    if rows.numel() == 0:
        return rows.new_zeros(0)
    return rows.abs().amax(dim=1)


def _per_element(scale: torch.Tensor, n: int, block: int) -> torch.Tensor:
    return scale.repeat_interleave(block)[:n]


# --- bitsandbytes ----------------------------------------------------------------------------------


def bnb_encode_cpu(x: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                   block: int = BNB_BLOCK, lut: torch.Tensor | None = None) -> torch.Tensor:
    """Codes as bitsandbytes' CPU library writes them (0.50.x ``quantize_cpu_impl``).

    ``v = clamp(x * (1/absmax), -1, 1)`` (a float32 reciprocal, then a product), the bin
    ``uint16((v + 1) * 0.5 * 65535 + 0.5)``, its entry of :func:`cpu_lookup_table`; every code of
    an all-zero block is 0. The table has 65536 bins over [-1, 1], coarser than the map near zero:
    this is bnb's CPU encoding, not the nearest code.
    """
    flat = x.reshape(-1).float()
    n = flat.numel()
    lut = cpu_lookup_table(code) if lut is None else lut
    am = _per_element(absmax, n, block)
    inv = 1.0 / am
    v = torch.clamp(flat * inv, -1.0, 1.0)
    bins = ((v + 1.0) * 0.5 * 65535.0 + 0.5).to(torch.int64)
    codes = torch.where(am == 0, 0, lut.to(flat.device)[bins.clamp(0, 65535)].to(torch.int64))
    return codes.to(torch.uint8).view(x.shape)


def bnb_encode_nearest(x: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, signed: bool,
                       block: int = BNB_BLOCK) -> torch.Tensor:
    """Codes as bitsandbytes' CUDA optimizer kernel writes them (``quantize_2D``, math §6.1.2).

    A 7-level binary search over the sorted map from index 127, then the nearer of the two
    bracketing codes by comparison with their midpoint (the outer bounds are -1 or 0 and 1, not
    codes); for a signed map, a code whose sign differs from ``x``'s moves one step toward it
    (index arithmetic modulo 256, as the kernel's ``unsigned char``). The kernel divides by the
    absmax with ``__fdividef`` (within 2 ulp of IEEE); this uses IEEE division, so a normalised
    value within 2 ulp of a midpoint can take the other code. 0/0 is NaN, as in the kernel.
    """
    flat = x.reshape(-1).float()
    n = flat.numel()
    code = code.float().to(flat.device)
    xn = flat / _per_element(absmax, n, block)
    pivot = torch.full((n,), 127, dtype=torch.int64, device=flat.device)
    lower_pivot = torch.zeros_like(pivot)
    upper_pivot = torch.full_like(pivot, 255)
    lower = torch.full_like(xn, -1.0 if signed else 0.0)
    upper = torch.ones_like(xn)
    val = code[pivot]
    step = 64
    while step > 0:
        up = xn > val
        lower_pivot = torch.where(up, pivot, lower_pivot)
        lower = torch.where(up, val, lower)
        upper_pivot = torch.where(up, upper_pivot, pivot)
        upper = torch.where(up, upper, val)
        pivot = torch.where(up, pivot + step, pivot - step)
        val = code[pivot]
        step //= 2
    above = xn > val
    result = torch.where(
        above,
        torch.where(xn > (upper + val) * 0.5, upper_pivot, pivot),
        torch.where(xn < (lower + val) * 0.5, lower_pivot, pivot),
    )
    if signed:
        wrong = torch.signbit(code[result]) != torch.signbit(flat)
        result = torch.where(wrong, torch.where(flat > 0, result + 1, result - 1), result) % 256
    return result.to(torch.uint8).view(x.shape)


def bnb_quantize(x: torch.Tensor, code: torch.Tensor, *, signed: bool = True, encoder: str = "cpu",
                 block: int = BNB_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, absmax)`` of ``x`` in bitsandbytes' blockwise format: uint8 codes of ``x``'s
    shape and one float32 absmax per block. ``encoder``: ``"cpu"`` (bnb's CPU library, what
    ``Adam8bit`` runs on CPU) or ``"nearest"`` (its CUDA kernel's nearest code with the sign fix)."""
    absmax = block_absmax(x, block)
    if encoder == "cpu":
        return bnb_encode_cpu(x, absmax, code, block), absmax
    if encoder == "nearest":
        return bnb_encode_nearest(x, absmax, code, signed, block), absmax
    raise ValueError(f"encoder must be 'cpu' or 'nearest', not {encoder!r}")


def bnb_dequantize(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                   block: int = BNB_BLOCK) -> torch.Tensor:
    """float32 ``code[codes] * absmax[block]`` of ``codes``' shape (bnb ``dequantize_blockwise``)."""
    flat = codes.reshape(-1).to(torch.int64)
    values = code.float().to(codes.device)[flat] * _per_element(absmax, flat.numel(), block)
    return values.view(codes.shape)


# --- torchao ---------------------------------------------------------------------------------------


def _search(xn: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """torchao's branchless binary search then round to the nearer neighbour, ties up
    (``quantize_8bit_with_qmap`` / ``quantize_4bit_with_qmap``); int64 indices."""
    size = code.numel()
    top = size - 1
    codes = torch.zeros(xn.shape, dtype=torch.int64, device=xn.device)
    half = size // 2
    while half >= 1:
        codes = codes + torch.where(xn >= code[codes + half], half, 0)
        half //= 2
    codes_up = (codes + 1).clamp(max=top)
    down = code[codes]
    up = code[codes_up]
    return torch.where(xn - down >= (up - down) * 0.5, codes_up, codes)


def _ao_scale(x: torch.Tensor, block: int, fp8: bool) -> torch.Tensor:
    scale = block_absmax(x, block).clamp(min=AO_SCALE_FLOOR)
    return scale / FP8_MAX if fp8 else scale


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte, the even-indexed one in the high nibble (torchao's packing);
    flat uint8 of ``ceil(n/2)`` bytes (an odd count pads a zero low nibble)."""
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return (flat[0::2] << 4) | flat[1::2]


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` 4-bit codes of :func:`pack_nibbles`' bytes (uint8)."""
    return torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(-1)[:n]


def ao_quantize(x: torch.Tensor, code: torch.Tensor, bits: int = 8,
                block: int = AO_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scale)`` as torchao's ``OptimState8bit``/``OptimState4bit`` store ``x``.

    ``scale = max(max|x|, 1e-12)`` per block, codes of ``x / scale`` by :func:`_search`. 8 bits:
    uint8 of ``x``'s shape; 4 bits: flat packed bytes (:func:`pack_nibbles`).
    """
    flat = x.reshape(-1).float()
    scale = _ao_scale(flat, block, fp8=False)
    xn = flat / _per_element(scale, flat.numel(), block)
    codes = _search(xn, code.float().to(flat.device))
    if bits == 8:
        return codes.to(torch.uint8).view(x.shape), scale
    if bits == 4:
        return pack_nibbles(codes), scale
    raise ValueError(f"bits must be 8 or 4, not {bits!r}")


def ao_dequantize(codes: torch.Tensor, scale: torch.Tensor, code: torch.Tensor, shape: torch.Size | tuple,
                  bits: int = 8, block: int = AO_BLOCK) -> torch.Tensor:
    """float32 ``code[codes] * scale[block]`` of ``shape`` (torchao ``dequant_with_qmap``)."""
    n = 1
    for d in shape:
        n *= d
    idx = (codes.reshape(-1) if bits == 8 else unpack_nibbles(codes, n)).to(torch.int64)
    values = code.float().to(codes.device)[idx] * _per_element(scale, n, block)
    return values.view(shape)


def fp8_quantize(x: torch.Tensor, block: int = AO_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scale)`` as torchao's ``OptimStateFp8`` stores ``x``: ``scale = max(max|x|,
    1e-12) / 448`` per block, codes ``(x / scale)`` as float8 E4M3FN (round to nearest even, saturating at 448),
    of ``x``'s shape."""
    flat = x.reshape(-1).float()
    scale = _ao_scale(flat, block, fp8=True)
    codes = (flat / _per_element(scale, flat.numel(), block)).to(torch.float8_e4m3fn)
    return codes.view(x.shape), scale


def fp8_dequantize(codes: torch.Tensor, scale: torch.Tensor, block: int = AO_BLOCK) -> torch.Tensor:
    """float32 ``codes * scale[block]`` of ``codes``' shape."""
    flat = codes.reshape(-1).float()
    return (flat * _per_element(scale, flat.numel(), block)).view(codes.shape)
