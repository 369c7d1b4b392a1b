"""The block-quantised formats as Triton device functions, for kernels that quantise in registers.

Every function works on a ``(rows, block)`` tile: one quantisation block per row, lanes past the
end of the tensor loaded as 0 (so the row maximum is the block's absmax, as a partial last block
has it). Code books (``qmap``, bnb's CPU lookup table) are read by gathers from small tables in
global memory. Each is bit-identical to its torch twin in :mod:`optgen.quant.codecs`, also under
Triton's interpreter (tests/test_quant.py); divisions are IEEE (``div_rn``), as torch's are.

Import this module only after ``TRITON_INTERPRET`` has its final value.
"""

from __future__ import annotations

import triton
import triton.language as tl

_FP8_MAX = tl.constexpr(448.0)
_SCALE_FLOOR = tl.constexpr(1e-12)


@triton.jit
def _signbit(x):
    return x.to(tl.int32, bitcast=True) < 0


@triton.jit
def block_absmax(x):
    """``max |x|`` of each row of a float32 tile (the per-block scale, a row reduction)."""
    return tl.max(tl.abs(x), axis=1)


@triton.jit
def dequantize(codes, scale, qmap_ptr):
    """``qmap[codes] * scale`` per row: bnb's and torchao's 8- and 4-bit decode (float32)."""
    return tl.load(qmap_ptr + codes.to(tl.int32)) * scale[:, None]


@triton.jit
def bnb_encode_cpu(x, absmax, lut_ptr):
    """bitsandbytes' CPU encoding (:func:`optgen.quant.codecs.bnb_encode_cpu`): the bin of
    ``clamp(x * (1/absmax), -1, 1)`` among 65536 over [-1, 1], looked up in ``lut_ptr``."""
    am = absmax[:, None]
    inv = tl.math.div_rn(tl.full(am.shape, 1.0, tl.float32), am)
    v = tl.minimum(tl.maximum(x * inv, -1.0), 1.0)
    # (v + 1) * 0.5 is exact apart from the add; a fused multiply-add of the last two steps gives
    # the same bin (the added 0.5 is on the product's grid below 65536)
    bins = ((v + 1.0) * 0.5 * 65535.0 + 0.5).to(tl.int32)
    bins = tl.minimum(tl.maximum(bins, 0), 65535)
    codes = tl.load(lut_ptr + bins).to(tl.int32)
    return tl.where(am == 0.0, 0, codes).to(tl.uint8)


@triton.jit
def bnb_encode_nearest(x, absmax, qmap_ptr, SIGNED: tl.constexpr):
    """bitsandbytes' CUDA kernel encoding (``quantize_2D``, then the sign fix for a signed map):
    :func:`optgen.quant.codecs.bnb_encode_nearest`."""
    xn = tl.math.div_rn(x, absmax[:, None])
    pivot = tl.full(xn.shape, 127, tl.int32)
    lower_pivot = tl.zeros(xn.shape, tl.int32)
    upper_pivot = tl.full(xn.shape, 255, tl.int32)
    lower = tl.full(xn.shape, -1.0 if SIGNED else 0.0, tl.float32)
    upper = tl.full(xn.shape, 1.0, tl.float32)
    val = tl.load(qmap_ptr + pivot)
    for i in tl.static_range(7):
        step = 64 >> i
        up = xn > val
        lower_pivot = tl.where(up, pivot, lower_pivot)
        lower = tl.where(up, val, lower)
        upper_pivot = tl.where(up, upper_pivot, pivot)
        upper = tl.where(up, upper, val)
        pivot = tl.where(up, pivot + step, pivot - step)
        val = tl.load(qmap_ptr + pivot)
    above = xn > val
    result = tl.where(above, tl.where(xn > (upper + val) * 0.5, upper_pivot, pivot),
                      tl.where(xn < (lower + val) * 0.5, lower_pivot, pivot))
    if SIGNED:
        wrong = _signbit(tl.load(qmap_ptr + result)) != _signbit(x)
        result = tl.where(wrong, tl.where(x > 0.0, result + 1, result - 1), result) & 255
    return result.to(tl.uint8)


@triton.jit
def ao_scale(absmax, FP8: tl.constexpr):
    """torchao's block scale: ``max(absmax, 1e-12)``, divided by 448 for FP8 states."""
    scale = tl.maximum(absmax, _SCALE_FLOOR)
    if FP8:
        scale = tl.math.div_rn(scale, tl.full(scale.shape, _FP8_MAX, tl.float32))
    return scale


@triton.jit
def ao_encode(x, scale, qmap_ptr, SIZE: tl.constexpr, LOG2_SIZE: tl.constexpr):
    """torchao's codes of ``x / scale`` in a ``SIZE``-entry map (256 or 16): branchless binary
    search, then the upper neighbour where the residual reaches half the gap (int32 codes)."""
    xn = tl.math.div_rn(x, scale[:, None])
    codes = tl.zeros(xn.shape, tl.int32)
    for i in tl.static_range(LOG2_SIZE):
        half = (SIZE // 2) >> i
        codes += tl.where(xn >= tl.load(qmap_ptr + codes + half), half, 0)
    codes_up = tl.minimum(codes + 1, SIZE - 1)
    down = tl.load(qmap_ptr + codes)
    up = tl.load(qmap_ptr + codes_up)
    return tl.where(xn - down >= (up - down) * 0.5, codes_up, codes)


@triton.jit
def pack_nibbles(codes, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """A ``(ROWS, BLOCK)`` tile of 4-bit codes as ``(ROWS, BLOCK // 2)`` bytes, even index high."""
    pairs = tl.reshape(codes.to(tl.int32), (ROWS, BLOCK // 2, 2))
    high, low = tl.split(pairs)
    return ((high << 4) | low).to(tl.uint8)


@triton.jit
def unpack_nibbles(packed, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """The ``(ROWS, BLOCK)`` int32 codes of :func:`pack_nibbles`' ``(ROWS, BLOCK // 2)`` bytes."""
    b = packed.to(tl.int32)
    return tl.reshape(tl.join(b >> 4, b & 15), (ROWS, BLOCK))


@triton.jit
def fp8_e4m3_encode(y):
    """float32 to float8 E4M3FN bits (uint8), round to nearest even, as torch 2.13 converts:
    saturating at 448 (from 464 up, and infinities), NaN to 0x7F, subnormals below 2^-6."""
    bits = y.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    a = bits & 0x7FFFFFFF
    # subnormal: adding 2^14 rounds |y| to a multiple of 2^-9, the E4M3 subnormal step
    small = (tl.abs(y) + 16384.0).to(tl.int32, bitcast=True) - (141 << 23)
    odd = (a >> 20) & 1
    normal = (a + (((7 - 127) << 23) + 0x7FFFF) + odd) >> 20
    r = tl.where(a > 0x7F800000, 0x7F, tl.where(a < (121 << 23), small, tl.minimum(normal, 0x7E)))
    return (r | sign).to(tl.uint8)


@triton.jit
def fp8_e4m3_decode(codes):
    """float8 E4M3FN bits (uint8) to float32."""
    b = codes.to(tl.int32)
    exponent = (b >> 3) & 15
    mantissa = b & 7
    normal = ((exponent + 120) << 23) | (mantissa << 20)
    value = tl.where(exponent == 0, mantissa.to(tl.float32) * 0.001953125, normal.to(tl.float32, bitcast=True))
    bits = tl.where((b & 0x7F) == 0x7F, 0x7FC00000, value.to(tl.int32, bitcast=True))
    # the sign as a bit: a compiled `-value` may be `0 - value`, which loses -0.0
    return (bits | ((b & 0x80) << 24)).to(tl.float32, bitcast=True)
