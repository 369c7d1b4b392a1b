"""State codecs: how a per-element state is stored at a lower precision (docs/state_precision.md).

A codec names the tensors it stores for one state (the codes under the state's own key, per-block
scales under ``key + suffix``), its block size, and its encode/decode in torch (the reference,
torch and compiled backends) and in Triton (in registers, inside the pass). Codecs are pure:
they import torch only, so the IR, the features, the backends and the runtime may all use them.
Random bits for a stochastic encode are drawn by the caller (adv_optm's stream lives in
:mod:`optgen.numerics.stochastic`) and passed in, so the same codec serves every backend.

The built-in codecs are adv_optm 2.5.16's (``bf16_sr``, ``int8_sr``: ``util/state_util.py``,
``util/param_update.py``; math/adv-optm.md §2.3-2.4) and the plain float ones (``bf16``,
``fp16``: round to nearest even), then bitsandbytes' and torchao's (:mod:`optgen.quant.registry`);
others register theirs with :func:`register`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as TF

from optgen.ir.codec_base import Codec, Stored
from optgen.ir.nodes import Assign, Program, walk_nodes, walk_stmts
from optgen.ir.ops import Op
from optgen.quant.registry import CODECS as QUANT_CODECS

__all__ = ["Codec", "FloatCodec", "Stored", "codec_for", "codec_names", "register", "stored_names"]


class FloatCodec(Codec):
    """A narrower float dtype, decoded by widening and encoded by round to nearest even."""

    def __init__(self, name: str, dtype: str, tl_dtype: str):
        self.name, self.dtype, self.tl_dtype = name, dtype, tl_dtype

    def stored(self, non_neg: bool) -> list[Stored]:
        return [Stored("", self.dtype, "element")]

    def decode(self, stored: dict[str, torch.Tensor], shape: tuple[int, ...], non_neg: bool) -> torch.Tensor:
        return stored[""].float()

    def encode(self, x: torch.Tensor, non_neg: bool, bits: torch.Tensor | None) -> dict[str, torch.Tensor]:
        return {"": x.to(getattr(torch, self.dtype))}

    def triton_decode(self, ptr: dict[str, str], offs: str, mask: str, non_neg: bool) -> str:
        return f"tl.load({ptr['']} + {offs}, mask={mask}).to(tl.float32)"

    def triton_encode(self, ptr: dict[str, str], offs: str, mask: str, x: str, bits: str | None,
                      non_neg: bool) -> list[str]:
        return [f"tl.store({ptr['']} + {offs}, {x}.to({self.tl_dtype}), mask={mask})"]


class Bf16SR(FloatCodec):
    """adv_optm's ``bf16_sr`` (math/adv-optm.md §2.3): add 16 random low bits, truncate."""

    stochastic = True
    triton_source = '''
@triton.jit
def _sr_bf16(x, r):
    b = (x.to(tl.int32, bitcast=True) + r) & -65536
    return b.to(tl.float32, bitcast=True).to(tl.bfloat16)
'''

    def __init__(self) -> None:
        super().__init__("bf16_sr", "bfloat16", "tl.bfloat16")

    def draws(self, numel: int) -> tuple[int, ...] | None:
        return (numel,)

    def encode(self, x: torch.Tensor, non_neg: bool, bits: torch.Tensor | None) -> dict[str, torch.Tensor]:
        assert bits is not None
        r = bits.view(x.shape) + x.contiguous().view(torch.int32)
        r.bitwise_and_(-65536)
        return {"": r.view(torch.float32).to(torch.bfloat16)}

    def triton_encode(self, ptr: dict[str, str], offs: str, mask: str, x: str, bits: str | None,
                      non_neg: bool) -> list[str]:
        return [f"tl.store({ptr['']} + {offs}, _sr_bf16({x}, {bits}), mask={mask})"]


class Int8SR(Codec):
    """adv_optm's ``int8_sr`` (math/adv-optm.md §2.4): blocks of 2048 flat elements (the last one
    padded by repeating the last value), scale ``absmax / 127`` (non-negative states:
    ``max / 255`` into uint8), codes ``clamp(floor(x / max(scale, 1e-12) + r / 2**16))`` with one
    random 16-bit draw per padded element; decoded as ``code * scale``. Every size is quantised."""

    name = "int8_sr"
    block = 2048
    stochastic = True

    def stored(self, non_neg: bool) -> list[Stored]:
        return [Stored("", "uint8" if non_neg else "int8", "element"), Stored("_scale", "float32", "blocks", 1.0)]

    def draws(self, numel: int) -> tuple[int, ...] | None:
        return (-(-numel // self.block) * self.block,)

    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        n = x.numel()
        pad = -(-n // self.block) * self.block - n
        flat = x.reshape(1, -1).float()
        if pad and n:
            flat = TF.pad(flat, (0, pad), mode="replicate")
        return flat.view(-1, self.block)

    def decode(self, stored: dict[str, torch.Tensor], shape: tuple[int, ...], non_neg: bool) -> torch.Tensor:
        codes, scale = stored[""], stored["_scale"]
        n = codes.numel()
        if n == 0:
            return torch.zeros(shape, dtype=torch.float32, device=codes.device)
        blocks = self._blocks(codes)  # the padding decodes to values nobody reads
        return (blocks * scale.unsqueeze(1)).view(-1)[:n].view(shape)

    def encode(self, x: torch.Tensor, non_neg: bool, bits: torch.Tensor | None) -> dict[str, torch.Tensor]:
        assert bits is not None
        n = x.numel()
        if n == 0:
            return {"": torch.zeros(x.shape, dtype=torch.uint8 if non_neg else torch.int8, device=x.device),
                    "_scale": torch.ones(0, dtype=torch.float32, device=x.device)}
        blocks = self._blocks(x)
        if non_neg:
            scale = blocks.amax(dim=1, keepdim=True).div_(255.0)
            lo, hi, dtype = 0, 255, torch.uint8
        else:
            scale = blocks.abs().amax(dim=1, keepdim=True).div_(127.0)
            lo, hi, dtype = -127, 127, torch.int8
        normalised = blocks / scale.clamp_min(1e-12)
        normalised = normalised + bits.reshape(blocks.shape).float().mul_(1.0 / (1 << 16))
        codes = normalised.floor_().clamp_(lo, hi).to(dtype)
        return {"": codes.view(-1)[:n].view(x.shape), "_scale": scale.squeeze(1)}

    def triton_decode(self, ptr: dict[str, str], offs: str, mask: str, non_neg: bool) -> str:
        return (f"tl.load({ptr['']} + {offs}, mask={mask}).to(tl.float32) * "
                f"tl.load({ptr['_scale']} + {offs} // {self.block}, mask={mask})")

    def triton_encode(self, ptr: dict[str, str], offs: str, mask: str, x: str, bits: str | None,
                      non_neg: bool) -> list[str]:
        # the tile holds BLOCK // 2048 whole blocks: each block's (abs)max is a row reduction of
        # the tile reshaped (rows, 2048); lanes past the end do not count (adv_optm's replicate
        # padding repeats a value the block holds, so its maximum is the same)
        rows, b = f"(BLOCK // {self.block}, )", self.block
        lo, hi, dt = ("0.0", "255.0", "tl.uint8") if non_neg else ("-127.0", "127.0", "tl.int8")
        mag = f"tl.where({mask}, {x}, 0.0)" if non_neg else f"tl.where({mask}, tl.abs({x}), 0.0)"
        return [
            f"q_max = tl.max(tl.reshape({mag}, (BLOCK // {b}, {b})), axis=1)",
            f"q_scale = L.div(q_max, tl.full({rows}, {'255.0' if non_neg else '127.0'}, tl.float32))",
            f"q_s = tl.reshape(tl.broadcast_to(q_scale[:, None], (BLOCK // {b}, {b})), (BLOCK,))",
            f"q = tl.floor(L.div({x}, tl.maximum(q_s, 1e-12)) + {bits}.to(tl.float32) * (1.0 / 65536))",
            f"q = tl.minimum(tl.maximum(q, {lo}), {hi})",
            f"tl.store({ptr['']} + {offs}, q.to({dt}), mask={mask})",
            f"q_block = tl.max(tl.reshape({offs}, (BLOCK // {b}, {b})), axis=1) // {b}",
            f"q_live = tl.max(tl.reshape({mask}.to(tl.int32), (BLOCK // {b}, {b})), axis=1) > 0",
            f"tl.store({ptr['_scale']} + q_block, q_scale, mask=q_live)",
        ]


class MinMaxBlocks(Codec):
    """adv_optm 2.5.16's blockwise anchor of centered weight decay (``util/centered_decay.py``,
    math/adv-optm.md §2.10): asymmetric quantisation of the flat tensor in blocks (8 bits: 128
    elements, 4 bits: 32; the last block padded by repeating the last value), per block
    ``scale = (max - min) / (2**bits - 1)`` (1 where it is 0) and the minimum, both stored in the
    parameter's dtype; codes ``clamp(round((x - min) / scale) - 2**(bits-1))`` as int8, of shape
    (blocks, 128) for 8 bits, and for 4 bits packed two per int8 (the even-indexed code in the
    high nibble), flat. Decoded as ``(code + 2**(bits-1)) * scale + min`` in float32, truncated to
    the tensor. Deterministic; a read-only state's codec (encoded once, from its ``init``)."""

    stem = "_data"

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.name = f"anchor_int{bits}"
        self.label = f"centered_wd_mode='int{bits}' (codec '{self.name}', the blockwise anchor)"
        self.block = 128 if bits == 8 else 32
        self.per_byte = 1 if bits == 8 else 2
        self.q_min, self.q_max = -(1 << (bits - 1)), (1 << (bits - 1)) - 1

    def stored(self, non_neg: bool) -> list[Stored]:
        return [Stored("", "int8", "padded"), Stored("_scale", "param", "blocks", 1.0),
                Stored("_min", "param", "blocks")]

    def padded_shape(self, numel: int) -> tuple[int, ...]:
        blocks = -(-numel // self.block)
        return (blocks, self.block) if self.per_byte == 1 else (blocks * self.block // 2,)

    def encode(self, x: torch.Tensor, non_neg: bool, bits: torch.Tensor | None) -> dict[str, torch.Tensor]:
        flat = x.flatten()
        pad = -flat.numel() % self.block
        if pad:
            flat = TF.pad(flat.unsqueeze(0), (0, pad), mode="replicate").squeeze(0)
        blocks = flat.reshape(-1, self.block).float().clone()  # quantised in place below: not x's storage
        lo, hi = torch.aminmax(blocks, dim=1, keepdim=True)
        scale = (hi - lo).div_(float(self.q_max - self.q_min))
        scale.masked_fill_(scale == 0, 1.0)
        codes = blocks.sub_(lo).div_(scale).add_(self.q_min).round_().clamp_(self.q_min, self.q_max).to(torch.int8)
        if self.per_byte == 2:  # high nibble | low nibble (masked: no sign extension)
            flat_codes = codes.view(-1)
            codes = ((flat_codes[0::2] & 0x0F) << 4) | (flat_codes[1::2] & 0x0F)
        return {"": codes, "_scale": scale.squeeze(1), "_min": lo.squeeze(1)}

    def decode(self, stored: dict[str, torch.Tensor], shape: tuple[int, ...], non_neg: bool) -> torch.Tensor:
        codes = stored[""]
        if self.per_byte == 2:  # arithmetic shifts sign-extend each nibble
            unpacked = torch.empty(codes.numel() * 2, dtype=torch.int8, device=codes.device)
            unpacked[0::2] = codes >> 4
            unpacked[1::2] = (codes << 4) >> 4
            codes = unpacked.view(-1, self.block)
        values = (codes.float() - self.q_min) * stored["_scale"].float().unsqueeze(1) + \
            stored["_min"].float().unsqueeze(1)
        n = 1
        for d in shape:
            n *= d
        return values.view(-1)[:n].view(shape)

    def triton_decode(self, ptr: dict[str, str], offs: str, mask: str, non_neg: bool) -> str:
        # element i is code i of the padded row-major blocks (for 4 bits: a nibble of byte i // 2,
        # the high one for even i), its block i // block
        if self.per_byte == 1:
            q = f"tl.load({ptr['']} + {offs}, mask={mask}).to(tl.float32)"
        else:
            b = f"tl.load({ptr['']} + {offs} // 2, mask={mask}).to(tl.int32)"
            q = f"tl.where({offs} % 2 == 0, {b} >> 4, (({b} & 15) ^ 8) - 8).to(tl.float32)"
        blk = f"{offs} // {self.block}"
        return (f"(({q} - {float(self.q_min)}) * tl.load({ptr['_scale']} + {blk}, mask={mask}).to(tl.float32) + "
                f"tl.load({ptr['_min']} + {blk}, mask={mask}).to(tl.float32))")


_CODECS: dict[str, Codec] = {}


def register(codec: Codec) -> None:
    """Make ``codec`` available as a state precision by its name."""
    _CODECS[codec.name] = codec


def codec_for(name: str) -> Codec:
    """The codec registered as ``name`` (KeyError: none is)."""
    return _CODECS[name]


def codec_names() -> list[str]:
    return list(_CODECS)


#: the storage dtype name of a code tensor packed two 4-bit codes per byte (flat uint8 of
#: ``ceil(numel / 2)`` bytes; optgen.runtime.base allocates and loads it in that shape)
PACKED_UINT4 = "packed_uint4"


def codecs_of(program: Program) -> frozenset[str]:
    """The names of the codecs that may store a state of ``program`` (its decode and encode nodes)."""
    return frozenset(n.attr[0] for s in walk_stmts(program.body) if isinstance(s, Assign)
                     for n in walk_nodes(s.value) if n.op in (Op.DECODE, Op.ENCODE))


def stored_names(state: str, codec: Codec, non_neg: bool) -> dict[str, str]:
    """suffix -> state-dict key of each tensor ``codec`` stores for ``state``."""
    stem = state.removesuffix(codec.stem) if codec.stem else state
    return {s.suffix: state if not s.suffix else stem + s.suffix for s in codec.stored(non_neg)}


# the built-in codecs, then bitsandbytes' and torchao's (optgen.quant.registry)
for _c in (FloatCodec("bf16", "bfloat16", "tl.bfloat16"), Bf16SR(), FloatCodec("fp16", "float16", "tl.float16"),
           Int8SR(), MinMaxBlocks(8), MinMaxBlocks(4), *QUANT_CODECS):
    register(_c)
