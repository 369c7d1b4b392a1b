"""Triton device functions that generated kernels call.

Everything here is written from plain ``tl`` operations so that it runs both on a GPU and under
Triton's CPU interpreter (``TRITON_INTERPRET=1``), which cannot call libdevice (no ``atan2``,
``pow``...) and mis-handles bf16 arithmetic and rounding. Each function is tested against torch
in float64 (tests/test_triton_lib.py).

Import this module only after ``TRITON_INTERPRET`` has its final value: Triton reads it when the
``@triton.jit`` decorators run.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

#: True when kernels run on Triton's CPU interpreter.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

_INF = tl.constexpr(float("inf"))
# No NaN global: Triton checks that globals are unchanged with `!=`, which NaN never passes.
_NAN32_BITS = tl.constexpr(0x7FC00000)
_NAN64_BITS = tl.constexpr(0x7FF8000000000000)
_SIGN_BIT = tl.constexpr(-0x80000000)
_PI = tl.constexpr(3.141592653589793)
_PI_2 = tl.constexpr(1.5707963267948966)
_PI_4 = tl.constexpr(0.7853981633974483)
_TAN_PI_8 = tl.constexpr(0.41421356237309503)


@triton.jit
def signbit(x):
    """True where the sign bit of fp32 ``x`` is set (also for -0.0 and negative NaNs)."""
    return x.to(tl.int32, bitcast=True) < 0


@triton.jit
def atan2(y, x):
    """atan2(y, x) in fp32 from plain operations (max abs error about 2.4e-7 rad).

    Octant reduction to a ratio in [0, 1], a second reduction at tan(pi/8), then the Cephes
    ``atanf`` odd polynomial; zeros, signed zeros, infinities and NaNs follow IEEE atan2.
    """
    y, x = tl.broadcast(y, x)  # a per-tensor operand against a block: one shape for the bit tests
    ax = tl.abs(x)
    ay = tl.abs(y)
    mx = tl.maximum(ax, ay)
    mn = tl.minimum(ax, ay)
    both_inf = (mx == _INF) & (mn == _INF)
    safe_mx = tl.where(mx == 0.0, 1.0, mx)
    a = tl.math.div_rn(mn, safe_mx)
    a = tl.where(both_inf, 1.0, a)
    big = a > _TAN_PI_8
    z = tl.where(big, tl.math.div_rn(a - 1.0, a + 1.0), a)
    z2 = z * z
    p = (((8.05374449538e-2 * z2 - 1.38776856032e-1) * z2 + 1.99777106478e-1) * z2 - 3.33329491539e-1) * z2 * z + z
    r = tl.where(big, _PI_4 + p, p)
    r = tl.where(ay > ax, _PI_2 - r, r)
    r = tl.where(signbit(x), _PI - r, r)
    r = tl.where((x != x) | (y != y), x + y, r)
    # the sign of y by flipping the sign bit: compiled `-r` can be `0 - r`, which loses -0.0
    flipped = (r.to(tl.int32, bitcast=True) ^ _SIGN_BIT).to(tl.float32, bitcast=True)
    return tl.where(signbit(y), flipped, r)


@triton.jit
def div(a, b):
    """IEEE-rounded fp32 division (``/`` on a GPU is an approximation)."""
    a, b = tl.broadcast(a, b)
    return tl.math.div_rn(a, b)


@triton.jit
def remainder(a, b):
    """torch.remainder (Python's %): fmod (exact), moved into the divisor's sign."""
    a, b = tl.broadcast(a, b)
    m = a % b  # fmod on floats, compiled and interpreted
    return tl.where((m != 0.0) & ((m < 0.0) != (b < 0.0)), m + b, m)


@triton.jit
def finfo_eps(DT: tl.constexpr):
    """torch.finfo(DT).eps in float64, for a parameter dtype ``DT``."""
    if DT == tl.bfloat16:
        return tl.full((), 0.0078125, tl.float64)
    elif DT == tl.float16:
        return tl.full((), 0.0009765625, tl.float64)
    elif DT == tl.float64:
        return tl.full((), 2.220446049250313e-16, tl.float64)
    else:
        return tl.full((), 1.1920928955078125e-07, tl.float64)


@triton.jit
def sqrt(x):
    """IEEE-rounded fp32 square root."""
    return tl.sqrt_rn(x)


@triton.jit
def sign(x):
    """torch.sign, computed as (0 < x) - (x < 0): -1, 0 or 1, and 0 for NaN."""
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))


@triton.jit
def maximum(a, b):
    """torch.maximum (NaN-propagating)."""
    a, b = tl.broadcast(a, b)
    return tl.where((a != a) | (b != b), a + b, tl.maximum(a, b))


@triton.jit
def minimum(a, b):
    """torch.minimum (NaN-propagating)."""
    a, b = tl.broadcast(a, b)
    return tl.where((a != a) | (b != b), a + b, tl.minimum(a, b))


@triton.jit
def lerp(a, b, w):
    """torch.lerp with its two branches: a + w (b - a) for |w| < 0.5, else b - (b - a)(1 - w)."""
    d = b - a
    return tl.where(tl.abs(w) < 0.5, a + w * d, b - d * (1.0 - w))


@triton.jit
def pow_(a, s):
    """a ** s for a >= 0 (fp32, through exp2/log2); negative bases give NaN."""
    safe = tl.where(a == 0.0, 1.0, a)
    r = tl.exp2(s * tl.log2(safe))
    r = tl.where(a == 0.0, tl.where(s > 0, 0.0, _INF), r)
    r = tl.where(a < 0.0, tl.full((), _NAN32_BITS, tl.int32).to(tl.float32, bitcast=True), r)
    return tl.where(s == 0, 1.0, r)


@triton.jit
def pow64(a, b):
    """``a ** b`` in float64 for host scalars, as Python computes it (integer powers of negatives too)."""
    la = tl.abs(a)
    r = tl.exp(b * tl.log(tl.where(la == 0.0, 1.0, la)))
    r = tl.where(la == 0.0, tl.where(b > 0, 0.0, _INF), r)
    fb = tl.floor(b)
    integral = fb == b
    odd = integral & ((fb - 2.0 * tl.floor(fb * 0.5)) != 0.0)
    r = tl.where((a < 0) & odd, -r, r)
    nan = tl.full((), _NAN64_BITS, tl.int64).to(tl.float64, bitcast=True)
    r = tl.where((a < 0) & (integral == 0), nan, r)
    return tl.where(b == 0.0, 1.0, r)


@triton.jit
def masked(x, mask):
    """``x`` with the lanes outside ``mask`` zeroed (``mask`` None: every lane is live)."""
    if mask is None:
        return x
    else:
        return tl.where(mask, x, 0.0)


@triton.jit
def slice_lanes(offs, stride, mask):
    """The lanes holding every ``stride``-th element (a per-slice value's lanes), within ``mask``."""
    lanes = (offs % stride) == 0
    if mask is None:
        return lanes
    else:
        return lanes & mask


@triton.jit
def sr_bf16(x, seed, offs):
    """fp32 ``x`` stochastically rounded to a bf16 value (returned as fp32 with zero low bits):
    adv_optm's add-random-low-16-bits-then-truncate, with Philox numbers for the random bits."""
    low = (tl.randint(seed, offs) & 0xFFFF).to(tl.int32)
    bits = (x.to(tl.int32, bitcast=True) + low) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _store_bits_bf16(x):
    # Round-to-nearest-even by integer arithmetic on the fp32 bits (the interpreter's own
    # fp32 -> bf16 conversion truncates); NaNs stay NaNs.
    bits = x.to(tl.int32, bitcast=True)
    r = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    r = tl.where(x != x, 0x7FC00000, r)
    return (r >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def to_storage(x, DT: tl.constexpr):
    """Convert fp32 ``x`` to the storage dtype ``DT`` with round-to-nearest-even."""
    if DT == tl.bfloat16:
        if INTERPRETING_C:
            return _store_bits_bf16(x)
        else:
            return x.to(tl.bfloat16)
    else:
        return x.to(DT)


INTERPRETING_C = tl.constexpr(INTERPRETING)
