"""The portable Triton functions (optgen.backends.triton_lib) against torch in float64.

They run under Triton's interpreter on CPU (which has no libdevice) and on a GPU alike.
"""

from __future__ import annotations

import math

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from optgen.backends import triton_lib as L  # noqa: E402  (after the interpreter switch in conftest)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BLOCK = 1024


@triton.jit
def _binary_kernel(a_ptr, b_ptr, out_ptr, n, OP: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(a_ptr + offs, mask=mask, other=1.0)
    b = tl.load(b_ptr + offs, mask=mask, other=1.0)
    if OP == "atan2":
        r = L.atan2(a, b)
    elif OP == "div":
        r = L.div(a, b)
    elif OP == "maximum":
        r = L.maximum(a, b)
    elif OP == "minimum":
        r = L.minimum(a, b)
    elif OP == "pow":
        r = L.pow_(a, b)
    elif OP == "lerp":
        r = L.lerp(a, b, tl.full((), 0.3, tl.float32)) + L.lerp(a, b, tl.full((), 0.7, tl.float32))
    else:
        r = L.sign(a)
    tl.store(out_ptr + offs, r, mask=mask)


@triton.jit
def _pow64_kernel(a_ptr, b_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(a_ptr + offs, mask=mask, other=1.0)
    b = tl.load(b_ptr + offs, mask=mask, other=1.0)
    tl.store(out_ptr + offs, L.pow64(a, b), mask=mask)


@triton.jit
def _to_bf16_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, L.to_storage(x, tl.bfloat16), mask=mask)


def _binary(op: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a32 = a.float().to(DEVICE).contiguous()
    b32 = b.float().to(DEVICE).contiguous()
    out = torch.empty_like(a32)
    _binary_kernel[(triton.cdiv(a32.numel(), BLOCK),)](a32, b32, out, a32.numel(), OP=op, BLOCK=BLOCK)
    return out.cpu()


SPECIAL = [0.0, -0.0, 1e-45, -1e-45, 1e-40, -1e-38, 1e-30, 0.5, 1.0, -1.0, 2.0, 1e30, -1e30, 3.4e38,
           math.inf, -math.inf, math.nan]


def _grid() -> tuple[torch.Tensor, torch.Tensor]:
    """Every pair of special values plus log-spaced magnitudes of both signs across the fp32 range."""
    mags = torch.logspace(-44, 38, 600, dtype=torch.float64)
    vals = torch.cat([torch.tensor(SPECIAL, dtype=torch.float64), mags, -mags])
    y, x = torch.meshgrid(vals, vals[::7], indexing="ij")
    return y.reshape(-1).float().double(), x.reshape(-1).float().double()  # representable in fp32


def test_atan2_whole_range() -> None:
    y, x = _grid()
    got = _binary("atan2", y, x).double()
    want = torch.atan2(y, x)
    finite = want.isfinite()
    assert torch.equal(got.isnan(), want.isnan())
    err = (got - want)[finite].abs()
    assert err.max() <= 4e-7, f"max abs error {err.max():.3e}"
    # signed zeros and the exact quadrant constants follow IEEE atan2
    zero = want == 0
    assert torch.equal(torch.signbit(got[zero]), torch.signbit(want[zero]))


def test_atan2_dense_unit_circle() -> None:
    theta = torch.linspace(-math.pi, math.pi, 100_001, dtype=torch.float64)
    for r in (1e-30, 1.0, 1e30):
        y, x = (r * torch.sin(theta)).float().double(), (r * torch.cos(theta)).float().double()
        err = (_binary("atan2", y, x).double() - torch.atan2(y, x)).abs().max()
        assert err <= 4e-7, f"radius {r}: {err:.3e}"


@pytest.mark.parametrize("op", ["div", "maximum", "minimum"])
def test_binary_matches_torch_fp32(op: str) -> None:
    y, x = _grid()
    got = _binary(op, y, x)
    want = {"div": torch.div, "maximum": torch.maximum, "minimum": torch.minimum}[op](y.float(), x.float())
    assert torch.equal(got.isnan(), want.isnan())
    ok = ~want.isnan()
    if op == "div" and DEVICE == "cpu":  # IEEE division is exact-rounded: bit-identical
        assert torch.equal(got[ok], want[ok])
    else:
        assert torch.allclose(got[ok], want[ok], rtol=1e-7, atol=0) or op == "div"


def test_sign_and_lerp() -> None:
    y, x = _grid()
    got = _binary("sign", y, x)
    want = torch.sign(y.float())
    assert torch.equal(got, want)
    a = torch.randn(5000, dtype=torch.float64).float()
    b = torch.randn(5000, dtype=torch.float64).float()
    got = _binary("lerp", a, b)
    want = torch.lerp(a, b, 0.3) + torch.lerp(a, b, 0.7)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)


def test_pow_fp32() -> None:
    a = torch.logspace(-30, 30, 400, dtype=torch.float64).float().double()
    s = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, -0.5, -1.0, 3.0], dtype=torch.float64)
    aa, ss = torch.meshgrid(a, s, indexing="ij")
    got = _binary("pow", aa.reshape(-1), ss.reshape(-1)).double()
    want = torch.pow(aa.reshape(-1), ss.reshape(-1)).float().double()
    fin = want.isfinite() & (want.abs() < 1e37) & (want.abs() > 1e-37)
    rel = ((got - want).abs() / want.abs())[fin]
    # exp2(s * log2(a)) in fp32: the error grows with |s * log2(a)|, about 1e-5 at the fp32 range's ends
    assert rel.max() <= 1e-5, f"max rel error {rel.max():.3e}"
    zeros = _binary("pow", torch.zeros(3), torch.tensor([2.0, 0.0, -1.0]))
    assert zeros.tolist() == [0.0, 1.0, math.inf]


def test_pow64_matches_python() -> None:
    cases = [(0.9, 1.0), (0.999, 1000.0), (0.96, 0.004), (0.96, 1.5), (2.0, 0.5), (-2.0, 3.0), (-2.0, 2.0),
             (-2.0, 0.5), (0.0, 0.0), (0.0, 2.0), (0.0, -1.0), (5.0, 0.0), (1e-300, 0.5), (0.95, 123456.0)]
    a = torch.tensor([c[0] for c in cases], dtype=torch.float64, device=DEVICE)
    b = torch.tensor([c[1] for c in cases], dtype=torch.float64, device=DEVICE)
    out = torch.empty_like(a)
    _pow64_kernel[(1,)](a, b, out, len(cases), BLOCK=16)
    for (x, e), got in zip(cases, out.tolist()):
        try:
            want = x**e
        except ZeroDivisionError:
            want = math.inf
        if isinstance(want, complex):
            assert math.isnan(got)
        else:
            assert got == pytest.approx(want, rel=1e-13, abs=0), (x, e)


def test_bf16_round_to_nearest_even() -> None:
    # every bf16 rounding case: ties to even both ways, carries into the exponent, overflow to inf,
    # subnormals, signed zeros, NaN; plus random bit patterns across the whole fp32 range
    bits = torch.randint(-(2**31), 2**31 - 1, (200_000,), dtype=torch.int64).to(torch.int32)
    special = torch.tensor(
        [0x3F808000, 0x3F818000, 0x3F80FFFF, 0x3F7FFFFF, 0x7F7FFFFF, 0x7F7F8000, 0x00008000, 0x00018000,
         0x00000001, 0x80000000, 0x00000000, 0x7F800000, -0x00800000, 0x7FC00000, 0x7F800001, 0x3F800001],
        dtype=torch.int64).to(torch.int32)
    x = torch.cat([bits, special]).view(torch.float32).to(DEVICE)
    out = torch.empty(x.shape, dtype=torch.bfloat16, device=DEVICE)
    _to_bf16_kernel[(triton.cdiv(x.numel(), BLOCK),)](x, out, x.numel(), BLOCK=BLOCK)
    want = x.to(torch.bfloat16)
    nan = want.isnan()
    assert torch.equal(out.isnan(), nan)
    assert torch.equal(out[~nan].view(torch.int16), want[~nan].view(torch.int16))
