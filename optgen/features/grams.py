"""``grams``: Gradient descent with Adaptive Momentum Scaling (adv_optm 2.2.3 ``grams_moment``).

The update direction takes the momentum's magnitude and the gradient's sign,
``update = sign(grad) * |exp_avg|``; the stored moment is unchanged (math/adv-optm.md §6.2).
With ``cautious`` also listed after it, Grams wins where both flags are on, as in adv_optm.
Role: ``direction`` (``d = copy(m)`` or ``d = m``, exactly one statement).
"""

from __future__ import annotations

from optgen.features import Feature
from optgen.features.rewrite import DIRECTION, direction_sites, direction_source, rewrite_role, switch, var
from optgen.ir.nodes import Assign, Kind, Node, Program
from optgen.spec.model import HyperparameterSpec

FLAG = "grams_moment"


def _apply(program: Program) -> Program:
    source = direction_source(program)

    def grams(s: Assign):
        m = source(s)
        if m is None:
            return None
        value = Node("mul", (Node("sign", (var("grad"),), kind=Kind.ELEMENT),
                             Node("abs", (m,), kind=Kind.ELEMENT)), kind=Kind.ELEMENT)
        return [switch(FLAG, [Assign(s.target, value, s.pos, s.role)], [s], s.pos)]

    body = rewrite_role(program, program.body, "grams", "direction", direction_sites(program), grams,
                        DIRECTION)
    return program.copy(body=body)


FEATURE = Feature(
    name="grams",
    doc="Grams: update = sign(grad) * |exp_avg| (adv_optm 2.2.3 grams_moment).",
    transform=_apply,
    before=("cautious",),
    hyperparameters={FLAG: HyperparameterSpec(default=False, type="bool",
                                              doc="Grams: the momentum's magnitude with the gradient's sign")},
)
