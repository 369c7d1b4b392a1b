"""``atan2_adams``: Adams' bounded update (adams-torch 0.0.1), always on.

Every division by the denominator becomes ``atan2(x, denom)``, with no flag, no ``4/pi`` scale and
no epsilon to drop: the base's denominator has none (``|update| <= pi/2 * step_size``). This is the
form Adams is published in; adv_optm's switchable, rescaled form is the feature ``atan2``.

Role: ``denominator`` (the one statement assigning the value divided by; undeclared, the
dialect's ``denom``); every division by its name, also inside an expression, is rewritten: at
least one.
"""

from __future__ import annotations

from optgen.features import Feature
from optgen.features.rewrite import is_var, rewrite_role, role_target, substitute
from optgen.ir.nodes import Assign, Node, Program
from optgen.ir.ops import Op


def _apply(program: Program) -> Program:
    d = role_target(program, "denominator", "denom")

    def atan2_of(n: Node) -> Node | None:
        if n.op == Op.DIV and is_var(n.args[1], d):
            return Node("atan2", tuple(substitute(a, atan2_of) for a in n.args), kind=n.kind)
        return None

    def divide(s: Assign):
        value = substitute(s.value, atan2_of)
        return None if value == s.value else [Assign(s.target, value, s.pos, s.role)]

    body = rewrite_role(program, program.body, "atan2_adams", "division", lambda s: True, divide,
                        f"a division by the denominator '{d}'", many=True)
    return program.copy(body=body)


FEATURE = Feature(
    name="atan2_adams",
    doc="Adams' bounded update: every x / denom becomes atan2(x, denom), always (no flag, no 4/pi, no eps).",
    transform=_apply,
    conflicts=("atan2",),
)
