"""Block-quantised optimizer-state formats, as pure, exact functions.

Two families of published formats (math/torch-adams-adamw-family.md §6):

- bitsandbytes 0.50.2 (``Adam8bit``/``AdamW8bit``): blocks of 256 consecutive elements of the
  flattened state, one float32 ``absmax`` per block (the last block may be partial), codes into
  bnb's signed (first moment) or unsigned (second moment) dynamic map. Encoded two ways:
  :func:`~optgen.quant.codecs.bnb_encode_cpu` as bnb's CPU library does it (a 65536-bin lookup
  table of the normalised value) and :func:`~optgen.quant.codecs.bnb_encode_nearest` as its CUDA
  optimizer kernel does (binary search, nearer of the two bracketing codes, the sign fix).
- torchao 0.18.0 (``AdamW8bit``/``AdamW4bit``/``AdamWFp8``): per-block ``scale = max|x|`` clamped
  to 1e-12 (FP8: divided by 448), codes by a branchless search with ties up (8 bits: bnb's maps;
  4 bits: a 16-entry signed dynamic map or 16 linear unsigned levels, two codes per byte), or
  float8 E4M3FN values.

:mod:`optgen.quant.codecs` is the torch reference (any device); :mod:`optgen.quant.triton_codecs`
holds the same encodings as Triton device functions on a ``(rows, block)`` tile, one block per row,
the per-block absmax a row reduction in registers. Both are bit-identical to the published code
(tests/test_quant.py).
"""

from __future__ import annotations

from optgen.quant.codecs import (
    AO_4BIT_BLOCK,
    AO_BLOCK,
    BNB_BLOCK,
    FP8_MAX,
    MIN_QUANT_SIZE,
    Format,
    ao_dequantize,
    ao_quantize,
    ao_quantized,
    bnb_dequantize,
    bnb_encode_cpu,
    bnb_encode_nearest,
    bnb_quantize,
    bnb_quantized,
    format_bytes,
    fp8_dequantize,
    fp8_quantize,
    pack_nibbles,
    unpack_nibbles,
)
from optgen.quant.maps import ao_unsigned_4bit_map, cpu_lookup_table, dynamic_map, qmap

__all__ = [
    "AO_4BIT_BLOCK", "AO_BLOCK", "BNB_BLOCK", "FP8_MAX", "MIN_QUANT_SIZE", "Format",
    "ao_dequantize", "ao_quantize", "ao_quantized", "ao_unsigned_4bit_map",
    "bnb_dequantize", "bnb_encode_cpu", "bnb_encode_nearest", "bnb_quantize", "bnb_quantized",
    "cpu_lookup_table", "dynamic_map", "format_bytes", "fp8_dequantize", "fp8_quantize",
    "pack_nibbles", "qmap", "unpack_nibbles",
]
