"""Features: each one is a transformation of the IR that any spec can switch on under ``features:``.

A feature declares the hyperparameters it adds, what it needs and what it conflicts with, and
rewrites the lowered :class:`~optgen.ir.nodes.Program`. :mod:`optgen.features.registry` maps names to
features (this package's ``__init__`` holds only :class:`Feature`, so the features import it without a cycle).

Features that adv_optm exposes as constructor flags (``use_atan2``, ``nesterov``, ...) wrap what
they rewrite in ``if <flag>:`` with the original statement as the other branch: the flag is a
per-group hyperparameter, and every backend specialises each combination used (the torch backend
buckets parameters by branch path, the triton backend renders one kernel set per path), so no
element ever branches on it. Features apply in the order the spec lists them; a feature's
``after``/``before`` say which orders it needs, and the resolver checks them.

A base spec names what features rewrite under ``roles:`` (see ``optgen.features.rewrite.ROLES``:
``first_moment``, ``direction``, ``denominator``, ``step_size``, ``decay``, ...), each bound to
exactly one statement; atan2, cautious, grams, cautious_wd and spectral_decay match those
statements by structure. A role a spec does not declare is inferred from today's dialect: the
denominator is
a temporary ``denom`` (``denom = ... + eps``), the direction is ``update`` (divided by ``denom``,
then ``update = update * step_size``), the first moment is ``exp_avg = lerp(exp_avg, grad, w)``
followed by ``update = copy(exp_avg)``, and decoupled decay is ``param = param + s * param``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from optgen.ir.nodes import Program
from optgen.spec.model import HyperparameterSpec


@dataclass(frozen=True)
class Feature:
    name: str
    doc: str
    transform: Callable[[Program], Program]
    hyperparameters: dict[str, HyperparameterSpec] = field(default_factory=dict)
    requires: tuple[str, ...] = ()
    conflicts: tuple[str, ...] = ()
    #: features this one must come after / before where both are listed (the resolver checks it)
    after: tuple[str, ...] = ()
    before: tuple[str, ...] = ()

    def apply(self, program: Program) -> Program:
        return self.transform(program)
