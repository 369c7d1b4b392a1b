"""``grams``: Gradient descent with Adaptive Momentum Scaling (adv_optm 2.2.3 ``grams_moment``).

The update direction takes the momentum's magnitude and the gradient's sign,
``update = sign(grad) * |exp_avg|``; the stored moment is unchanged (math/adv-optm.md §6.2).
With ``cautious`` also listed after it, Grams wins where both flags are on, as in adv_optm.
"""

from __future__ import annotations

from optgen.features import Feature
from optgen.features.rewrite import first_moment_direction, replace_assigns, require, switch, var
from optgen.ir.nodes import Assign, Kind, Node, Program
from optgen.spec.model import HyperparameterSpec

FLAG = "grams_moment"


def _apply(program: Program) -> Program:
    def grams(s: Assign):
        if first_moment_direction(s):
            value = Node("mul", (Node("sign", (var("grad"),), kind=Kind.ELEMENT),
                                 Node("abs", (s.value.args[0],), kind=Kind.ELEMENT)), kind=Kind.ELEMENT)
            return [switch(FLAG, [Assign("update", value, s.pos, s.role)], [s], s.pos)]
        return None

    body, n = replace_assigns(program.body, grams)
    require(n, "grams", "an 'update = copy(exp_avg)' statement")
    return program.copy(body=body)


FEATURE = Feature(
    name="grams",
    doc="Grams: update = sign(grad) * |exp_avg| (adv_optm 2.2.3 grams_moment).",
    transform=_apply,
    hyperparameters={FLAG: HyperparameterSpec(default=False, type="bool",
                                              doc="Grams: the momentum's magnitude with the gradient's sign")},
)
