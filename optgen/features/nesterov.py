"""``nesterov``: Nesterov momentum in the Adam family's form.

The update direction becomes ``lerp(m_new, grad, w)`` with the EMA's own weight ``w = 1 - beta1``
or, when ``nesterov_coef`` is given, ``w = 1 - nesterov_coef``
(adv_optm: ``copy(m).lerp_(g, 1 - beta1)``); the stored moment is not Nesterov'd. ``grad`` is the
gradient as it is at that point, even where the moment averages something else (ADOPT's
normalised gradient: adv_optm mixes the two scales, math/adv-optm.md §9.7).
"""

from __future__ import annotations

from optgen.features import Feature
from optgen.features.rewrite import ema_form, is_var, replace_assigns, require, switch, var
from optgen.ir.nodes import Assign, If, Node, Program, walk_stmts
from optgen.spec.model import HyperparameterSpec

FLAG = "nesterov"
COEF = "nesterov_coef"


def _apply(program: Program) -> Program:
    emas = [e for e in map(ema_form, walk_stmts(program.body)) if e is not None]
    require(len(emas), "nesterov", "an 'exp_avg = lerp(exp_avg, grad, w)' or 'exp_avg = exp_avg * beta1 + (c * (1 - "
            "beta1)) * grad' statement")

    coef = Node("hyper", attr=(COEF, None))
    own = Node("sub", (Node("const", attr=1), coef))

    def direction(s: Assign):
        v = s.value
        if s.target == "update" and v.op == "copy" and is_var(v.args[0], "exp_avg"):
            def mix(w: Node) -> Assign:
                return Assign("update", Node("lerp", (v.args[0], var("grad"), w), kind=v.kind), s.pos, s.role)

            default = Node("eq", (coef, Node("const", attr=None)), boolean=True)
            on = If(default, [mix(emas[0].weight)], [mix(own)], s.pos)
            return [switch(FLAG, [on], [s], s.pos)]
        return None

    body, n = replace_assigns(program.body, direction)
    require(n, "nesterov", "an 'update = copy(exp_avg)' statement")
    return program.copy(body=body)


FEATURE = Feature(
    name="nesterov",
    doc="Nesterov momentum: update = lerp(m, grad, 1 - beta1) from the new moment m.",
    transform=_apply,
    hyperparameters={
        FLAG: HyperparameterSpec(default=False, type="bool", doc="Nesterov momentum"),
        COEF: HyperparameterSpec(default=None, type="any", doc="Nesterov's mixing coefficient (None: beta1)"),
    },
)
