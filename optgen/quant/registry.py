"""bitsandbytes' and torchao's formats as state-precision codecs (docs/state_precision.md).

Listed by name in :mod:`optgen.ir.codecs` beside the built-in codecs:

| name | format | small tensors (left float32) |
|---|---|---|
| ``8bit`` | bnb blockwise dynamic, CPU library encoding (what ``Adam8bit`` runs on CPU) | ``numel < min_8bit_size`` |
| ``8bit_cuda`` | bnb blockwise dynamic, CUDA kernel encoding (nearest code + sign fix) | same |
| ``ao_8bit`` | torchao ``OptimState8bit`` (block 256) | ``numel < 4096`` or not a multiple of 256 |
| ``4bit`` | torchao ``OptimState4bit`` (block 128, two codes per byte: flat uint8 of ``numel / 2``) | ``numel < 4096`` or not a multiple of 128 |
| ``fp8`` | torchao ``OptimStateFp8`` (block 256, E4M3FN codes kept as uint8 bits, scale absmax/448) | as ``ao_8bit`` |

A state proven non-negative takes the unsigned map (bnb's ``state2``, torchao's ``exp_avg_sq``).
Triton: the decode and encode expressions call :mod:`optgen.quant.triton_codecs` (imported by
the kernel modules through ``triton_source``) on the tile reshaped to ``(BLOCK // block, block)``;
the 8- and 4-bit ones read the code book from ``ptr['qmap']`` (and bnb's CPU encoding its lookup
table from ``ptr['lut']``), tables the kernel is handed with the state's tensors
(``triton_tables``/``table``, from :func:`tables`).
"""

from __future__ import annotations

from typing import Any

import torch

from optgen.ir.codec_base import Codec, Stored
from optgen.ir.nodes import Node
from optgen.quant import codecs as C
from optgen.quant.maps import cpu_lookup_table, qmap
from optgen.spec.model import HyperparameterSpec

_TABLES: dict[tuple[str, str], torch.Tensor] = {}


def tables(book: str, device: torch.device | str) -> dict[str, torch.Tensor]:
    """The code book ``qmap`` (and bnb's CPU table ``lut``) of ``book`` on ``device``, built once."""
    dev = str(torch.device(device))
    key = (book, dev)
    if key not in _TABLES:
        _TABLES[key] = qmap(book, dev)
        if book in ("signed", "unsigned"):
            _TABLES[(book + "_lut", dev)] = cpu_lookup_table(_TABLES[key])
    out = {"qmap": _TABLES[key]}
    if (book + "_lut", dev) in _TABLES:
        out["lut"] = _TABLES[(book + "_lut", dev)]
    return out


def _ge(a: Node, b: Node) -> Node:
    return Node("ge", (a, b), boolean=True)


_NUMEL = Node("meta", attr="numel")


def _tables_in(ptr: dict[str, str], *names: str) -> None:
    """The kernel hands the code-book tables over with the state's tensors (``triton_tables``)."""
    missing = [n for n in names if n not in ptr]
    if missing:
        raise NotImplementedError(f"the kernel has no pointer to the code-book table(s) {', '.join(missing)}")


_TRITON_IMPORT = "from optgen.quant import triton_codecs as _oq\n"


class BnbBlockwise(Codec):
    """bitsandbytes' 8-bit blockwise dynamic state (math §6.1.1): uint8 codes of the state's shape
    under its own key, one float32 absmax per 256 elements under ``key + '_absmax'``."""

    block = C.BNB_BLOCK
    triton_source = _TRITON_IMPORT

    def __init__(self, name: str, encoder: str):
        self.name, self.encoder = name, encoder

    def stored(self, non_neg: bool) -> list[Stored]:
        return [Stored("", "uint8", "element"), Stored("_absmax", "float32", "blocks", 0.0)]

    def applies(self) -> Node:
        return _ge(_NUMEL, Node("hyper", attr=("min_8bit_size", None)))

    def hyperparameters(self) -> dict[str, Any]:
        return {"min_8bit_size": HyperparameterSpec(default=C.MIN_QUANT_SIZE, type="int", min=0,
                                                    doc="tensors with fewer elements keep float32 states")}

    @staticmethod
    def book(non_neg: bool) -> str:
        return "unsigned" if non_neg else "signed"

    def triton_tables(self, non_neg: bool) -> dict[str, str]:
        return {"qmap": "float32", **({"lut": "uint8"} if self.encoder == "cpu" else {})}

    def table(self, key: str, non_neg: bool, device: torch.device) -> torch.Tensor:
        return tables(self.book(non_neg), device)[key]

    def decode(self, stored: dict[str, torch.Tensor], shape: tuple[int, ...], non_neg: bool) -> torch.Tensor:
        codes = stored[""]
        code = tables(self.book(non_neg), codes.device)["qmap"]
        return C.bnb_dequantize(codes, stored["_absmax"], code).view(shape)

    def encode(self, x: torch.Tensor, non_neg: bool, bits: torch.Tensor | None) -> dict[str, torch.Tensor]:
        t = tables(self.book(non_neg), x.device)
        absmax = C.block_absmax(x, self.block)
        if self.encoder == "cpu":
            codes = C.bnb_encode_cpu(x, absmax, t["qmap"], self.block, t["lut"])
        else:
            codes = C.bnb_encode_nearest(x, absmax, t["qmap"], not non_neg, self.block)
        return {"": codes, "_absmax": absmax}

    def triton_decode(self, ptr: dict[str, str], offs: str, mask: str, non_neg: bool) -> str:
        _tables_in(ptr, "qmap")
        codes = f"tl.load({ptr['']} + {offs}, mask={mask}, other=0)"
        scale = f"tl.load({ptr['_absmax']} + {offs} // {self.block}, mask={mask}, other=0.0)"
        return f"(tl.load({ptr['qmap']} + {codes}.to(tl.int32)) * {scale})"

    def triton_encode(self, ptr: dict[str, str], offs: str, mask: str, x: str, bits: str | None,
                      non_neg: bool) -> list[str]:
        _tables_in(ptr, "qmap", "lut") if self.encoder == "cpu" else _tables_in(ptr, "qmap")
        b = self.block
        tile = f"tl.reshape(tl.where({mask}, {x}, 0.0), (BLOCK // {b}, {b}))"
        if self.encoder == "cpu":
            enc = f"_oq.bnb_encode_cpu(_qt, _qa, {ptr['lut']})"
        else:
            enc = f"_oq.bnb_encode_nearest(_qt, _qa, {ptr['qmap']}, {not non_neg})"
        return [
            f"_qt = {tile}",
            "_qa = _oq.block_absmax(_qt)",
            f"tl.store({ptr['']} + {offs}, tl.reshape({enc}, (BLOCK,)), mask={mask})",
            f"_qb = {offs} // {b}",
            f"tl.store({ptr['_absmax']} + tl.reshape(tl.max(tl.reshape(_qb, (BLOCK // {b}, {b})), axis=1), "
            f"(BLOCK // {b},)), _qa, mask=tl.max(tl.reshape({mask}, (BLOCK // {b}, {b})).to(tl.int32), axis=1) > 0)",
        ]


class TorchaoBlockwise(Codec):
    """torchao 0.18.0's quantised states (math §6.2): ``scale = max(absmax, 1e-12)`` per block
    (FP8: / 448) under ``key + '_scale'``, codes under the state's own key: 8-bit codes of the
    state's shape, 4-bit ones packed two per byte (flat), FP8 E4M3FN values of the state's shape."""

    triton_source = _TRITON_IMPORT

    def __init__(self, name: str, kind: str, packed: bool = True):
        self.name, self.kind = name, kind
        self.block = C.AO_4BIT_BLOCK if kind == "4bit" else C.AO_BLOCK
        # 4-bit codes two per byte (torchao's layout); packed=False keeps one per byte
        self.packed = packed and kind == "4bit"
        self.per_byte = 2 if self.packed else 1

    def stored(self, non_neg: bool) -> list[Stored]:
        # FP8 codes are kept as their bits (uint8): the same bytes as torchao's float8_e4m3fn codes
        codes = {"8bit": Stored("", "uint8", "element"), "fp8": Stored("", "uint8", "element"),
                 "4bit": Stored("", "uint8", "packed" if self.packed else "element")}[self.kind]
        return [codes, Stored("_scale", "float32", "blocks", 0.0)]

    @property
    def _bits(self) -> int:
        return 4 if self.packed else 8  # the unpacked 4-bit codes take the 8-bit layout

    def applies(self) -> Node:
        big = _ge(_NUMEL, Node("const", attr=C.MIN_QUANT_SIZE))
        whole = Node("eq", (Node("mod", (_NUMEL, Node("const", attr=self.block))), Node("const", attr=0)),
                     boolean=True)
        return Node("and", (big, whole), boolean=True)

    def book(self, non_neg: bool) -> str:
        return ("unsigned" if non_neg else "signed") + ("4" if self.kind == "4bit" else "")

    def triton_tables(self, non_neg: bool) -> dict[str, str]:
        return {} if self.kind == "fp8" else {"qmap": "float32"}

    def table(self, key: str, non_neg: bool, device: torch.device) -> torch.Tensor:
        return tables(self.book(non_neg), device)[key]

    def decode(self, stored: dict[str, torch.Tensor], shape: tuple[int, ...], non_neg: bool) -> torch.Tensor:
        codes, scale = stored[""], stored["_scale"]
        if self.kind == "fp8":
            return C.fp8_dequantize(codes.view(torch.float8_e4m3fn), scale, self.block).view(shape)
        code = tables(self.book(non_neg), codes.device)["qmap"]
        return C.ao_dequantize(codes, scale, code, tuple(shape), self._bits, self.block)

    def encode(self, x: torch.Tensor, non_neg: bool, bits: torch.Tensor | None) -> dict[str, torch.Tensor]:
        if self.kind == "fp8":
            codes, scale = C.fp8_quantize(x, self.block)
            codes = codes.view(torch.uint8)
        else:
            code = tables(self.book(non_neg), x.device)["qmap"]
            codes, scale = C.ao_quantize(x, code, self._bits, self.block)
        return {"": codes, "_scale": scale}

    def triton_decode(self, ptr: dict[str, str], offs: str, mask: str, non_neg: bool) -> str:
        _tables_in(ptr, *(() if self.kind == "fp8" else ("qmap",)))
        scale = f"tl.load({ptr['_scale']} + {offs} // {self.block}, mask={mask}, other=0.0)"
        if self.kind == "fp8":
            raw = f"tl.load({ptr['']} + {offs}, mask={mask}, other=0)"
            return f"(_oq.fp8_e4m3_decode({raw}) * {scale})"
        if self.packed:
            byte = f"tl.load({ptr['']} + {offs} // 2, mask={mask}, other=0).to(tl.int32)"
            code = f"tl.where({offs} % 2 == 0, {byte} >> 4, {byte} & 15)"
        else:
            code = f"tl.load({ptr['']} + {offs}, mask={mask}, other=0).to(tl.int32)"
        return f"(tl.load({ptr['qmap']} + {code}) * {scale})"

    def triton_encode(self, ptr: dict[str, str], offs: str, mask: str, x: str, bits: str | None,
                      non_neg: bool) -> list[str]:
        _tables_in(ptr, *(() if self.kind == "fp8" else ("qmap",)))
        b = self.block
        rows = f"(BLOCK // {b}, {b})"
        out = [f"_qt = tl.reshape(tl.where({mask}, {x}, 0.0), {rows})",
               f"_qs = _oq.ao_scale(_oq.block_absmax(_qt), {self.kind == 'fp8'})"]
        if self.kind == "fp8":
            out.append("_qc = _oq.fp8_e4m3_encode(tl.math.div_rn(_qt, _qs[:, None]))")
        else:
            size, log2 = (16, 4) if self.kind == "4bit" else (256, 8)
            out.append(f"_qc = _oq.ao_encode(_qt, _qs, {ptr['qmap']}, {size}, {log2})")
        if self.packed:
            out += [f"_qc = _oq.pack_nibbles(tl.where(tl.reshape({mask}, {rows}), _qc, 0), BLOCK // {b}, {b})",
                    f"_qo = tl.reshape({offs}, (BLOCK // 2, 2))",
                    f"tl.store({ptr['']} + tl.reshape(tl.max(_qo, axis=1) // 2, (BLOCK // {b}, {b // 2})), _qc, "
                    f"mask=tl.reshape(tl.max(tl.reshape({mask}, (BLOCK // 2, 2)).to(tl.int32), axis=1) > 0, "
                    f"(BLOCK // {b}, {b // 2})))"]
        else:
            out.append(f"tl.store({ptr['']} + {offs}, tl.reshape(_qc, (BLOCK,)).to(tl.uint8), mask={mask})")
        out.append(f"tl.store({ptr['_scale']} + tl.reshape(tl.max(tl.reshape({offs} // {b}, {rows}), axis=1), "
                   f"(BLOCK // {b},)), _qs, mask=tl.max(tl.reshape({mask}, {rows}).to(tl.int32), axis=1) > 0)")
        return out


CODECS = [BnbBlockwise("8bit", "cpu"), BnbBlockwise("8bit_cuda", "nearest"), TorchaoBlockwise("ao_8bit", "8bit"),
          TorchaoBlockwise("4bit", "4bit"), TorchaoBlockwise("fp8", "fp8")]
