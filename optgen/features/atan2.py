"""``atan2``: the bounded update of adv_optm (``use_atan2``), an epsilon-free Adam.

Every division by the denominator becomes ``atan2(x, denom)``, the denominator loses its ``+ eps``
and the step size is multiplied by 4/pi, so ``|update| <= 2 * step_size`` (adv_optm 2.5.16, §2.8 of
math/adv-optm.md: the angle is scaled, bias correction 1 stays outside).
"""

from __future__ import annotations

import math

from optgen.features import Feature
from optgen.features.rewrite import is_var, replace_assigns, require, switch
from optgen.ir.nodes import Assign, Kind, Node, Program
from optgen.spec.model import HyperparameterSpec

FLAG = "use_atan2"
SCALE = 4 / math.pi


def _apply(program: Program) -> Program:
    def denom(s: Assign):
        if s.target == "denom" and s.value.op == "add" and s.value.args[1].is_host:
            return [switch(FLAG, [Assign("denom", s.value.args[0], s.pos, s.role)], [s], s.pos)]
        return None

    def divide(s: Assign):
        v = s.value
        if v.op == "div" and is_var(v.args[1], "denom"):
            return [switch(FLAG, [Assign(s.target, Node("atan2", v.args, kind=v.kind), s.pos, s.role)], [s], s.pos)]
        return None

    def scale(s: Assign):
        v = s.value
        if s.target == "update" and v.op == "mul" and is_var(v.args[0], "update") and v.args[1].is_host:
            factor = Node("mul", (v.args[1], Node("const", attr=SCALE)), kind=Kind.HOST)
            on = Assign(s.target, Node("mul", (v.args[0], factor), kind=v.kind), s.pos, s.role)
            return [switch(FLAG, [on], [s], s.pos)]
        return None

    body, n = replace_assigns(program.body, denom)
    require(n, "atan2", "a 'denom = ... + eps' statement")
    body, n = replace_assigns(body, divide)
    require(n, "atan2", "a division by 'denom'")
    body, n = replace_assigns(body, scale)
    require(n, "atan2", "an 'update = update * step_size' statement")
    return program.copy(body=body)


FEATURE = Feature(
    name="atan2",
    doc="Bounded update: x / denom becomes (4/pi) atan2(x, denom) without eps (adv_optm's use_atan2).",
    transform=_apply,
    hyperparameters={
        FLAG: HyperparameterSpec(default=False, type="bool", doc="update = 4/pi * atan2(m, denom), no eps"),
    },
)
