"""``normed_momentum``: normalise the gradient by the denominator, then take the momentum.

adv_optm's ``normed_momentum`` (math/adv-optm.md §2.9): right after ``denom`` is computed the
gradient is divided by it (in place: later uses see the normalised gradient), and the final
division of ``update`` by ``denom`` is dropped. Apply it before ``atan2``, which then turns the
moved division into an angle too.
"""

from __future__ import annotations

from optgen.features import Feature
from optgen.features.rewrite import is_var, replace_assigns, require, switch, var
from optgen.ir.nodes import Assign, Node, Program
from optgen.spec.model import HyperparameterSpec

FLAG = "normed_momentum"


def _apply(program: Program) -> Program:
    def after_denom(s: Assign):
        if s.target == "denom":
            normalise = Assign("grad", Node("div", (var("grad"), var("denom")), kind=s.value.kind), s.pos, "grad")
            return [s, switch(FLAG, [normalise], [], s.pos)]
        return None

    def drop_division(s: Assign):
        v = s.value
        if s.target == "update" and v.op == "div" and is_var(v.args[0], "update") and is_var(v.args[1], "denom"):
            return [switch(FLAG, [], [s], s.pos)]
        return None

    body, n = replace_assigns(program.body, after_denom)
    require(n, "normed_momentum", "a 'denom' statement")
    body, n = replace_assigns(body, drop_division)
    require(n, "normed_momentum", "an 'update = update / denom' statement")
    return program.copy(body=body)


FEATURE = Feature(
    name="normed_momentum",
    doc="Normalise the gradient by the denominator before the momentum (adv_optm's normed_momentum).",
    transform=_apply,
    hyperparameters={
        FLAG: HyperparameterSpec(default=False, type="bool", doc="normalise the gradient before the momentum"),
    },
)
