"""``nesterov``: Nesterov momentum in the Adam family's form.

The update direction becomes ``lerp(m_new, grad, w)`` with the EMA's own weight ``w = 1 - beta1``
or, when ``nesterov_coef`` is given, ``w = 1 - nesterov_coef``
(adv_optm: ``copy(m).lerp_(g, 1 - beta1)``); the stored moment is not Nesterov'd. ``grad`` is the
gradient as it is at that point, even where the moment averages something else (ADOPT's
normalised gradient: adv_optm mixes the two scales, math/adv-optm.md §9.7).

Roles: ``first_moment`` (its EMA gives the weight) and ``direction`` (``d = copy(m)`` or ``d = m``),
each exactly one statement; undeclared, the dialect's ``exp_avg`` and ``update = copy(exp_avg)``.
"""

from __future__ import annotations

from optgen.features import Feature
from optgen.features.rewrite import (
    DIRECTION,
    direction_sites,
    direction_source,
    first_moment,
    rewrite_role,
    switch,
    var,
)
from optgen.ir.nodes import Assign, If, Node, Program
from optgen.spec.model import HyperparameterSpec

FLAG = "nesterov"
COEF = "nesterov_coef"


def _apply(program: Program) -> Program:
    _, ema = first_moment(program, program.body, "nesterov")
    source = direction_source(program)
    coef = Node("hyper", attr=(COEF, None))
    own = Node("sub", (Node("const", attr=1), coef))

    def direction(s: Assign):
        m = source(s)
        if m is None:
            return None

        def mix(w: Node) -> Assign:
            return Assign(s.target, Node("lerp", (m, var("grad"), w), kind=s.value.kind), s.pos, s.role)

        default = Node("eq", (coef, Node("const", attr=None)), boolean=True)
        on = If(default, [mix(ema.weight)], [mix(own)], s.pos)
        return [switch(FLAG, [on], [s], s.pos)]

    body = rewrite_role(program, program.body, "nesterov", "direction", direction_sites(program), direction, DIRECTION)
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
