"""``normed_momentum``: normalise the gradient by the denominator, then take the momentum.

adv_optm's ``normed_momentum`` (math/adv-optm.md §2.9): right after the denominator is computed
the gradient is divided by it (in place: later uses see the normalised gradient), and the final
division of the direction by the denominator is dropped. Apply it before ``atan2``, which then
turns the moved division into an angle too (the resolver checks the order).

Roles: ``denominator`` (exactly one statement, any form) and the one division ``d = d / denom``
of a direction by it; undeclared, the dialect's ``denom``.
"""

from __future__ import annotations

from optgen.features import Feature
from optgen.features.rewrite import is_var, rewrite_role, role_target, switch, var
from optgen.ir.nodes import Assign, Node, Program
from optgen.ir.ops import Op
from optgen.spec.model import HyperparameterSpec

FLAG = "normed_momentum"


def _apply(program: Program) -> Program:
    d = role_target(program, "denominator", "denom")

    def after_denom(s: Assign):
        normalise = Assign("grad", Node("div", (var("grad"), var(s.target)), kind=s.value.kind), s.pos, "grad")
        return [s, switch(FLAG, [normalise], [], s.pos)]

    def drop_division(s: Assign):
        v = s.value
        if v.op == Op.DIV and is_var(v.args[0], s.target) and is_var(v.args[1], d):
            return [switch(FLAG, [], [s], s.pos)]
        return None

    # the direction's division by the denominator (found by structure), before the gradient's
    # division is added
    body = rewrite_role(program, program.body, "normed_momentum", "division", lambda s: True, drop_division,
                        f"a division of the direction by the denominator 'update = update / {d}'")
    body = rewrite_role(program, body, "normed_momentum", "denominator", lambda s: s.target == d,
                        after_denom, f"a denominator '{d} = ...'")
    return program.copy(body=body)


FEATURE = Feature(
    name="normed_momentum",
    doc="Normalise the gradient by the denominator before the momentum (adv_optm's normed_momentum).",
    transform=_apply,
    before=("atan2",),
    hyperparameters={
        FLAG: HyperparameterSpec(default=False, type="bool", doc="normalise the gradient before the momentum"),
    },
)
