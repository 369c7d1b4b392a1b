"""``nesterov``: Nesterov momentum in the Adam family's form.

The update direction becomes ``lerp(m_new, grad, w)`` with the EMA's own weight ``w = 1 - beta1``
(adv_optm: ``copy(m).lerp_(g, 1 - beta1)``); the stored moment is not Nesterov'd.
"""

from __future__ import annotations

from optgen.features import Feature
from optgen.features.rewrite import is_var, replace_assigns, require, switch
from optgen.ir.nodes import Assign, Node, Program, walk_stmts
from optgen.spec.model import HyperparameterSpec

FLAG = "nesterov"


def _apply(program: Program) -> Program:
    emas = [s for s in walk_stmts(program.body) if isinstance(s, Assign) and s.target == "exp_avg"
            and s.value.op == "lerp" and is_var(s.value.args[0], "exp_avg")]
    require(len(emas), "nesterov", "an 'exp_avg = lerp(exp_avg, grad, w)' statement")
    ema = emas[0].value

    def direction(s: Assign):
        v = s.value
        if s.target == "update" and v.op == "copy" and is_var(v.args[0], "exp_avg"):
            on = Assign("update", Node("lerp", (v.args[0], ema.args[1], ema.args[2]), kind=v.kind), s.pos, s.role)
            return [switch(FLAG, [on], [s], s.pos)]
        return None

    body, n = replace_assigns(program.body, direction)
    require(n, "nesterov", "an 'update = copy(exp_avg)' statement")
    return program.copy(body=body)


FEATURE = Feature(
    name="nesterov",
    doc="Nesterov momentum: update = lerp(m, grad, 1 - beta1) from the new moment m.",
    transform=_apply,
    hyperparameters={FLAG: HyperparameterSpec(default=False, type="bool", doc="Nesterov momentum")},
)
