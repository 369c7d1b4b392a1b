"""``clip_grad``: gradient clipping over every parameter of the optimizer, as the step's first phase.

Bit-identical to ``torch.nn.utils.clip_grad_value_`` and/or ``torch.nn.utils.clip_grad_norm_``
called on all the optimizer's parameters (every group, in group order) right before the same
optimizer's step without clipping. The feature adds four optimizer-wide, keyword-only
hyperparameters, all off by default:

- ``max_grad_norm`` (None: no norm clipping): the total norm is torch's (``torch._foreach_norm``
  per device and dtype, then the norm of the stacked norms), ``clip_coef = max_norm / (total +
  1e-6)`` clamped to 1.0, and every gradient multiplied by it unconditionally (``_foreach_mul``
  with the coefficient as a device tensor: no host sync);
- ``grad_norm_type`` (2.0; ``float("inf")`` for the max norm; any order torch accepts);
- ``error_if_nonfinite`` (False): torch's RuntimeError, same message, raised before anything is
  stepped (reading the flag costs one host sync, as in torch);
- ``clip_grad_value`` (None): gradients clamped to ``[-v, v]`` (``clip_grad_value_``), applied
  before the norm clipping when both are set.

The user's ``.grad`` is not modified: the step runs on scaled copies (optgen.runtime.clipping),
the total norm of the last step is ``optimizer.last_grad_norm``. The program itself is unchanged:
the runtime reads the feature's name in ``Program.features``.
"""

from __future__ import annotations

from optgen.features import Feature
from optgen.ir.nodes import Program
from optgen.spec.model import HyperparameterSpec


def _apply(program: Program) -> Program:
    return program  # a runtime phase (optgen.runtime.clipping): the per-parameter step is unchanged


FEATURE = Feature(
    name="clip_grad",
    doc="Clip the gradients of all parameters (norm and/or value, as torch.nn.utils) before the step.",
    transform=_apply,
    hyperparameters={
        "max_grad_norm": HyperparameterSpec(default=None, type="float", nullable=True, keyword_only=True,
                                            per_group=False,
                                            doc="clip the total gradient norm to this (None: off), as clip_grad_norm_"),
        "grad_norm_type": HyperparameterSpec(default=2.0, type="float", keyword_only=True, per_group=False,
                                             doc="order of the total norm (inf: max norm)"),
        "error_if_nonfinite": HyperparameterSpec(default=False, type="bool", keyword_only=True, per_group=False,
                                                 doc="raise when the total norm is nan or inf, as clip_grad_norm_"),
        "clip_grad_value": HyperparameterSpec(default=None, type="float", nullable=True, keyword_only=True,
                                              per_group=False,
                                              doc="clamp every gradient to [-v, v] (None: off), as clip_grad_value_"),
    },
)
