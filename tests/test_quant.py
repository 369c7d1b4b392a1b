"""optgen.quant: the block-quantised state formats against the published encoders.

The oracles are the pinned packages: bitsandbytes 0.50.2's ``functional.create_dynamic_map``,
``quantize_blockwise``/``dequantize_blockwise`` (its CPU library) and torchao 0.18.0's
``optim.quant_utils`` / ``subclass_fp8`` functions. bnb's CUDA-kernel encoding cannot run here: it
is checked against a scalar transcription of the kernel's search written in this file from
math/torch-adams-adamw-family.md §6.1.2. The Triton device functions are checked against the torch
ones (under the interpreter on CPU), bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from optgen import quant as Q

bnbf = pytest.importorskip("bitsandbytes.functional")
ao_q = pytest.importorskip("torchao.optim.quant_utils")
from torchao.optim.subclass_fp8 import quantize_fp8  # noqa: E402

SHAPES = [(), (0,), (1,), (7,), (256,), (3, 300), (33, 257), (2, 3, 129)]


def _sample(shape: tuple, seed: int, positive: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 10 ** (2 * torch.randn(shape, generator=g))
    if x.numel() > 3:
        x.view(-1)[::5] = 0.0  # exact zeros, and a block maximum repeated
        x.view(-1)[1] = x.reshape(-1).abs().max()
    return x.abs() if positive else x


def test_maps_are_the_published_ones():
    assert torch.equal(Q.qmap("signed"), bnbf.create_dynamic_map(signed=True))
    assert torch.equal(Q.qmap("unsigned"), bnbf.create_dynamic_map(signed=False))
    assert torch.equal(Q.qmap("signed"), torch.tensor(ao_q.create_dynamic_map(True), dtype=torch.float32))
    assert torch.equal(Q.qmap("signed4"), torch.tensor(ao_q.create_dynamic_map(True, 3, 4), dtype=torch.float32))
    from torchao.optim import subclass_4bit
    assert torch.equal(Q.qmap("unsigned4"), torch.tensor(subclass_4bit.get_qmap_unsigned(), dtype=torch.float32))
    s = Q.qmap("signed")
    assert s[127] == 0 and s[255] == 1 and s.numel() == 256 and bool((s[1:] > s[:-1]).all())


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bnb_cpu_encoding_is_bitsandbytes(shape, signed):
    code = Q.qmap("signed" if signed else "unsigned")
    x = _sample(shape, 1 + len(shape), positive=not signed)
    ref, qs = bnbf.quantize_blockwise(x, code=code, blocksize=256)
    codes, absmax = Q.bnb_quantize(x, code)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert torch.equal(absmax, qs.absmax) and torch.equal(codes, ref)
    back = bnbf.dequantize_blockwise(ref, qs)
    assert torch.equal(Q.bnb_dequantize(codes, absmax, code), back)


def test_bnb_cpu_encoding_at_bin_edges():
    """Values within a few ulp of the CPU table's bin edges and of the code midpoints."""
    code = Q.qmap("signed")
    k = torch.arange(1, 65535, 3, dtype=torch.float64)
    edges = ((k - 0.5) / 65535.0 * 2.0 - 1.0).float()
    mids = (0.5 * (code[:-1] + code[1:]))
    centre = torch.cat([edges, mids])
    vals = torch.cat([torch.nextafter(centre, torch.full_like(centre, d)) for d in (-2.0, 2.0)] + [centre])
    vals = vals.clamp(-1, 1)
    x = torch.cat([vals, torch.ones(256 - vals.numel() % 256)])  # every block's absmax is 1
    ref, qs = bnbf.quantize_blockwise(x, code=code, blocksize=256)
    assert torch.equal(Q.bnb_quantize(x, code)[0], ref)


def _kernel_search(x: float, code: list[float], signed: bool) -> int:
    """bnb's ``quantize_2D`` + the optimizer kernel's sign fix, one value (math §6.1.2)."""
    import math
    pivot, lo_p, hi_p = 127, 0, 255
    lo, hi = (-1.0 if signed else 0.0), 1.0
    val = code[pivot]
    for step in (64, 32, 16, 8, 4, 2, 1):
        if x > val:
            lo_p, lo, pivot = pivot, val, pivot + step
        else:
            hi_p, hi, pivot = pivot, val, pivot - step
        val = code[pivot]
    f32 = lambda v: torch.tensor(v, dtype=torch.float32).item()  # noqa: E731
    if x > val:
        c = hi_p if x > f32((hi + val) * 0.5) else pivot
    else:
        c = lo_p if x < f32((lo + val) * 0.5) else pivot
    if signed and math.copysign(1, code[c]) != math.copysign(1, x):
        c = (c + 1 if x > 0 else c - 1) % 256
    return c


@pytest.mark.parametrize("signed", [True, False])
def test_bnb_nearest_encoding_is_the_kernel_search(signed):
    code = Q.qmap("signed" if signed else "unsigned")
    x = _sample((700,), 5, positive=not signed)
    x[3] = -0.0
    codes, absmax = Q.bnb_quantize(x, code, signed=signed, encoder="nearest")
    xn = (x / absmax.repeat_interleave(256)[:700]).tolist()
    table = code.tolist()
    assert codes.tolist() == [_kernel_search(v, table, signed) for v in xn]
    # the nearest code up to the midpoint rule, and never the wrong sign
    got = code[codes.long()]
    if signed:
        assert not bool(((got > 0) & (x < 0)).any() | ((got < 0) & (x > 0)).any())


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape", [(256,), (4096,), (16, 512), (2, 64)], ids=str)
def test_torchao_codes_are_torchao(shape, signed, bits):
    block = 256 if bits == 8 else 128
    if (torch.Size(shape).numel()) % block:
        pytest.skip("torchao quantises only multiples of its block")
    name = ("signed" if signed else "unsigned") + ("4" if bits == 4 else "")
    code = Q.qmap(name)
    x = _sample(shape, 11, positive=not signed)
    scaled, scale = ao_q.scale_tensor(x.reshape(-1), block)
    ref = (ao_q.quantize_8bit_with_qmap if bits == 8 else ao_q.quantize_4bit_with_qmap)(scaled, code)
    codes, s = Q.ao_quantize(x, code, bits, block)
    assert torch.equal(s, scale)
    if bits == 4:
        assert torch.equal(codes, (ref[::2] << 4) | ref[1::2])
        unpacked = torch.stack([codes >> 4, codes & 0xF], dim=-1).reshape(-1)
    else:
        assert torch.equal(codes.reshape(-1), ref.reshape(-1)) and codes.shape == x.shape
        unpacked = codes.reshape(-1)
    back = ao_q.dequant_with_qmap(unpacked, code, scale).reshape(x.shape)
    assert torch.equal(Q.ao_dequantize(codes, s, code, x.shape, bits, block), back)


def test_torchao_fp8_is_torchao():
    x = _sample((8, 512), 3)
    x[0, :256] = 0.0  # an all-zero block: scale 1e-12 / 448
    ref_codes, ref_scale = quantize_fp8(x, 256)
    codes, scale = Q.fp8_quantize(x)
    assert torch.equal(scale, ref_scale) and torch.equal(codes.view(torch.uint8), ref_codes.view(torch.uint8))
    want = (ref_codes.float().view(-1, 256) * ref_scale.view(-1, 1)).view(x.shape)
    assert torch.equal(Q.fp8_dequantize(codes, scale), want)


def test_quantised_size_rules():
    from torchao.optim import AdamW4bit, AdamW8bit
    params = [torch.zeros(n, requires_grad=True) for n in (4095, 4096, 4224, 4100, 8192)]
    for cls, block in ((AdamW8bit, 256), (AdamW4bit, 128)):
        opt = cls(params)
        for p in params:
            quantised = type(opt._new_buffer(p, True)) is not torch.Tensor
            assert quantised == Q.ao_quantized(p.numel(), block), (cls.__name__, p.numel())
    assert not Q.bnb_quantized(4095) and Q.bnb_quantized(4096) and Q.bnb_quantized(4100)
    assert Q.format_bytes("bnb8", 4100) == 4100 + 4 * 17
    assert Q.format_bytes("ao4", 4096) == 2048 + 4 * 32


# --- the Triton device functions -------------------------------------------------------------------

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
from optgen.quant import triton_codecs as TQ  # noqa: E402  (after the interpreter switch in conftest)

ROWS = 4


@triton.jit
def _encode_kernel(x_ptr, codes_ptr, scale_ptr, table_ptr, n, blocks, MODE: tl.constexpr,
                   SIGNED: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    offs = rows[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    absmax = TQ.block_absmax(x)
    if MODE == "bnb_cpu":
        codes = TQ.bnb_encode_cpu(x, absmax, table_ptr)
        scale = absmax
    elif MODE == "bnb_nearest":
        codes = TQ.bnb_encode_nearest(x, absmax, table_ptr, SIGNED)
        scale = absmax
    elif MODE == "fp8":
        scale = TQ.ao_scale(absmax, True)
        codes = TQ.fp8_e4m3_encode(tl.math.div_rn(x, scale[:, None]))
    else:
        scale = TQ.ao_scale(absmax, False)
        codes = TQ.ao_encode(x, scale, table_ptr, 256 if MODE == "ao8" else 16, 8 if MODE == "ao8" else 4)
    if MODE == "ao4":
        boffs = rows[:, None] * (BLOCK // 2) + tl.arange(0, BLOCK // 2)[None, :]
        # lanes past the end pack as code 0 (an odd count's last low nibble), as the torch packing
        packed = TQ.pack_nibbles(tl.where(mask, codes, 0), ROWS, BLOCK)
        tl.store(codes_ptr + boffs, packed, mask=boffs < (n + 1) // 2)
    else:
        tl.store(codes_ptr + offs, codes.to(tl.uint8), mask=mask)
    tl.store(scale_ptr + rows, scale, mask=rows < blocks)


@triton.jit
def _decode_kernel(codes_ptr, scale_ptr, table_ptr, out_ptr, n, MODE: tl.constexpr, BLOCK: tl.constexpr,
                   ROWS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    offs = rows[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    mask = offs < n
    scale = tl.load(scale_ptr + rows, mask=rows * BLOCK < n, other=0.0)
    if MODE == "fp8":
        v = TQ.fp8_e4m3_decode(tl.load(codes_ptr + offs, mask=mask, other=0)) * scale[:, None]
    elif MODE == "ao4":
        boffs = rows[:, None] * (BLOCK // 2) + tl.arange(0, BLOCK // 2)[None, :]
        packed = tl.load(codes_ptr + boffs, mask=boffs < (n + 1) // 2, other=0)
        v = TQ.dequantize(TQ.unpack_nibbles(packed, ROWS, BLOCK), scale, table_ptr)
    else:
        v = TQ.dequantize(tl.load(codes_ptr + offs, mask=mask, other=0), scale, table_ptr)
    tl.store(out_ptr + offs, v, mask=mask)


def _triton_roundtrip(x: torch.Tensor, mode: str, table: torch.Tensor, signed: bool = True,
                      decode_table: torch.Tensor | None = None):
    block = 128 if mode == "ao4" else 256
    flat = x.reshape(-1).float().contiguous()
    n = flat.numel()
    blocks = -(-n // block)
    codes = torch.zeros((n + 1) // 2 if mode == "ao4" else n, dtype=torch.uint8)
    scale = torch.zeros(blocks)
    grid = (max(1, -(-blocks // ROWS)),)
    _encode_kernel[grid](flat, codes, scale, table, n, blocks, MODE=mode, SIGNED=signed, BLOCK=block, ROWS=ROWS)
    out = torch.zeros(n)
    dt = table if decode_table is None else decode_table
    _decode_kernel[grid](codes, scale, dt, out, n, MODE=mode, BLOCK=block, ROWS=ROWS)
    return codes, scale, out


@pytest.mark.parametrize("shape", [(), (0,), (5,), (300,), (3, 129), (1030,)], ids=str)
def test_triton_bnb_encoders_equal_torch(shape):
    for signed in (True, False):
        code = Q.qmap("signed" if signed else "unsigned")
        x = _sample(shape, 21, positive=not signed)
        c_ref, a_ref = Q.bnb_quantize(x, code)
        codes, absmax, back = _triton_roundtrip(x, "bnb_cpu", Q.cpu_lookup_table(code), decode_table=code)
        assert torch.equal(codes, c_ref.reshape(-1)) and torch.equal(absmax, a_ref)
        assert torch.equal(back, Q.bnb_dequantize(c_ref, a_ref, code).reshape(-1))
        c_ref, _ = Q.bnb_quantize(x, code, signed=signed, encoder="nearest")
        codes, _, _ = _triton_roundtrip(x, "bnb_nearest", code, signed)
        assert torch.equal(codes, c_ref.reshape(-1))


@pytest.mark.parametrize("shape", [(), (0,), (5,), (256,), (3, 300), (1024,)], ids=str)
def test_triton_torchao_encoders_equal_torch(shape):
    for bits, names in ((8, ("signed", "unsigned")), (4, ("signed4", "unsigned4"))):
        block = 256 if bits == 8 else 128
        for name in names:
            code = Q.qmap(name)
            x = _sample(shape, 31, positive=not name.startswith("signed"))
            c_ref, s_ref = Q.ao_quantize(x, code, bits, block)
            codes, scale, back = _triton_roundtrip(x, "ao8" if bits == 8 else "ao4", code)
            assert torch.equal(codes, c_ref.reshape(-1)) and torch.equal(scale, s_ref)
            assert torch.equal(back, Q.ao_dequantize(c_ref, s_ref, code, x.shape, bits, block).reshape(-1))
    x = _sample(shape, 41)
    c_ref, s_ref = Q.fp8_quantize(x)
    codes, scale, back = _triton_roundtrip(x, "fp8", Q.qmap("signed"))
    assert torch.equal(codes, c_ref.view(torch.uint8).reshape(-1)) and torch.equal(scale, s_ref)
    assert torch.equal(back, Q.fp8_dequantize(c_ref, s_ref).reshape(-1))


@triton.jit
def _fp8_kernel(x_ptr, codes_ptr, back_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    c = TQ.fp8_e4m3_encode(x[None, :])
    tl.store(codes_ptr + offs[None, :], c, mask=offs[None, :] < n)
    tl.store(back_ptr + offs[None, :], TQ.fp8_e4m3_decode(c), mask=offs[None, :] < n)


def test_triton_fp8_conversion_every_rounding_case():
    """Around every E4M3 value and midpoint (and past 448, and subnormals): torch's conversion."""
    e4m3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    finite = e4m3[~e4m3.isnan()].unique()
    mids = (finite[:-1] + finite[1:]) / 2
    centre = torch.cat([finite, mids, torch.tensor([460.0, 464.0, 470.0, 479.9, 480.0, 1e6, 1e-9, 2**-10])])
    vals = torch.cat([torch.nextafter(centre, torch.full_like(centre, d)) for d in (-1e9, 1e9)] + [centre])
    vals = torch.cat([vals, -vals])
    n = vals.numel()
    codes = torch.zeros(n, dtype=torch.uint8)
    back = torch.zeros(n)
    _fp8_kernel[(-(-n // 1024),)](vals, codes, back, n, BLOCK=1024)
    ref = vals.to(torch.float8_e4m3fn)
    assert torch.equal(codes, ref.view(torch.uint8))
    assert torch.equal(back.view(torch.int32)[~back.isnan()], ref.float().view(torch.int32)[~back.isnan()])
    assert torch.equal(back.isnan(), ref.float().isnan())


def test_registered_codecs_store_the_published_tensors():
    """The state-precision codecs (optgen.quant.registry) encode and decode as the functions do."""
    codecs = pytest.importorskip("optgen.ir.codecs")
    x = _sample((4096,), 51)
    for name, non_neg in (("8bit", False), ("8bit", True), ("8bit_cuda", False)):
        c = codecs.codec_for(name)
        xx = x.abs() if non_neg else x
        book = Q.qmap("unsigned" if non_neg else "signed")
        stored = c.encode(xx, non_neg, None)
        codes, absmax = Q.bnb_quantize(xx, book, signed=not non_neg, encoder="cpu" if name == "8bit" else "nearest")
        assert torch.equal(stored[""], codes) and torch.equal(stored["_absmax"], absmax)
        assert torch.equal(c.decode(stored, (64, 64), non_neg), Q.bnb_dequantize(codes, absmax, book).view(64, 64))
        assert [s.suffix for s in c.stored(non_neg)] == ["", "_absmax"]
    for name, bits in (("ao_8bit", 8), ("4bit", 4)):
        c = codecs.codec_for(name)
        block = 128 if bits == 4 else 256
        stored = c.encode(x.abs(), True, None)
        book = Q.qmap("unsigned4" if bits == 4 else "unsigned")
        codes, scale = Q.ao_quantize(x.abs(), book, bits, block)
        if bits == 4:  # torchao's layout: two codes per byte
            assert c.packed and c.per_byte == 2 and codes.shape == (2048,)
            assert [s.shape for s in c.stored(True)] == ["packed", "blocks"]
        assert torch.equal(stored[""], codes) and torch.equal(stored["_scale"], scale)
        assert torch.equal(c.decode(stored, (64, 64), True),
                           Q.ao_dequantize(codes, scale, book, (64, 64), bits, block))
    stored = codecs.codec_for("fp8").encode(x, False, None)
    assert torch.equal(stored[""].view(torch.uint8), Q.fp8_quantize(x)[0].view(torch.uint8))
