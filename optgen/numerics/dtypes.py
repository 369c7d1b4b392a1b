"""The torch dtype of each storage dtype name a state declares (``StateDecl.dtype``)."""

from __future__ import annotations

import torch

from optgen.ir.codecs import PACKED_UINT4


def storage_dtype(name: str, param_dtype: torch.dtype) -> torch.dtype:
    """The torch dtype of a state declared with dtype ``name`` for a parameter of ``param_dtype``."""
    return {
        "param": param_dtype,
        "float32": torch.float32,
        "float64": torch.float64,
        "default": torch.get_default_dtype(),
        "bits": torch.uint8,
        "float8_e4m3fn": torch.float8_e4m3fn,  # adv_optm's centered-decay anchor (feature centered_wd)
        # the storage dtypes of state precisions (docs/state_precision.md)
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
        "int8": torch.int8,
        "uint8": torch.uint8,
        PACKED_UINT4: torch.uint8,  # two 4-bit codes per byte (feature state_precision)
        "bool": torch.bool,  # a mask state (dtype: bool)
    }[name]
