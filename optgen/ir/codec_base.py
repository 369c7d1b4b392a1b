"""The interface of a state codec (docs/state_precision.md): what it stores and how it encodes and
decodes, in torch and in Triton. :mod:`optgen.ir.codecs` lists the codecs; this module is apart so
that codecs defined elsewhere (:mod:`optgen.quant.registry`) subclass it without a cycle."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Stored:
    """One tensor a codec stores for a state."""

    suffix: str  # "" : the state's own key (the codes); else the key's suffix ("_scale")
    dtype: str  # a storage dtype name (optgen.numerics.dtypes.storage_dtype)
    shape: str  # "element" (the parameter's shape) | "blocks" ((ceil(numel / block),))
    #             | "packed" ((ceil(numel / per_byte),) uint8: codes packed per byte, flat)
    #             | "padded" (the codes of whole blocks, the last one padded: the codec's
    #               :meth:`Codec.padded_shape`)
    init: float = 0.0


class Codec:
    """The interface (see docs/state_precision.md). Subclasses set the class attributes."""

    name: str = ""
    #: elements per scale block (None: an elementwise codec)
    block: int | None = None
    #: codes per stored byte of a "packed" code tensor (torchao's 4-bit: 2)
    per_byte: int = 1
    #: encode consumes random bits (drawn by the caller, see :meth:`draws`)
    stochastic: bool = False
    #: the triton helpers the kernels include (jit functions), "" where the codec needs none
    triton_source: str = ""
    #: the end of the state's name that the keys of its other stored tensors replace ("": they
    #: extend it; adv_optm's anchor ``anchor_data`` keeps ``anchor_scale``, ``anchor_min``)
    stem: str = ""
    #: what a backend that cannot run the codec names in its refusal ("": the state precision)
    label: str = ""

    def codes_shaped(self) -> bool:
        """Whether the codes have the parameter's shape (else a decode takes the parameter's)."""
        own = next(s for s in self.stored(False) if s.suffix == "")
        return self.per_byte == 1 and own.shape == "element"

    def padded_shape(self, numel: int) -> tuple[int, ...]:
        """The shape of "padded" codes for a tensor of ``numel`` elements."""
        raise NotImplementedError(f"codec '{self.name}' stores no padded codes")

    def stored(self, non_neg: bool) -> list[Stored]:
        raise NotImplementedError

    def applies(self) -> Any:
        """An IR host condition under which the codec stores a state (None: always); where it
        does not hold the state stays float32 (the published small-tensor rules)."""
        return None

    def hyperparameters(self) -> dict[str, Any]:
        """Hyperparameters :meth:`applies` reads (name -> HyperparameterSpec)."""
        return {}

    def draws(self, numel: int) -> tuple[int, ...] | None:
        """The shape of the int32 draw in [0, 2**16) one encode of ``numel`` elements takes."""
        return None

    def decode(self, stored: dict[str, torch.Tensor], shape: tuple[int, ...], non_neg: bool) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, x: torch.Tensor, non_neg: bool, bits: torch.Tensor | None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def triton_tables(self, non_neg: bool) -> dict[str, str]:
        """The read-only tables (code books) the triton decode/encode gather from, as
        ``key -> element dtype`` ("float32", "uint8"): the kernel gets ``ptr[key]``, a pointer to
        :meth:`table` on the parameter's device, handed over with the state's tensors."""
        return {}

    def table(self, key: str, non_neg: bool, device: torch.device) -> torch.Tensor:
        """The contiguous table ``key`` of :meth:`triton_tables` on ``device`` (built once)."""
        raise KeyError(f"codec '{self.name}' has no table {key!r}")

    def triton_decode(self, ptr: dict[str, str], offs: str, mask: str, non_neg: bool) -> str:
        raise NotImplementedError(f"codec '{self.name}' has no triton decode")

    def triton_encode(self, ptr: dict[str, str], offs: str, mask: str, x: str, bits: str | None,
                      non_neg: bool) -> list[str]:
        raise NotImplementedError(f"codec '{self.name}' has no triton encode")
