"""``atan2``: the bounded update of adv_optm (``use_atan2``), an epsilon-free Adam.

Every division by the denominator becomes ``atan2(x, denom)``, the denominator loses its ``+ eps``
and the step size is multiplied by 4/pi, so ``|update| <= 2 * step_size`` (adv_optm 2.5.16, §2.8 of
math/adv-optm.md: the angle is scaled, bias correction 1 stays outside).

Roles: ``denominator`` (``d = x + eps`` or ``d = eps + x``), ``step_size`` (``u = u * s`` or
``u = s * u``), each exactly one statement; every division by the denominator's name is rewritten.
Undeclared, they are the dialect's ``denom = ... + eps`` and ``update = update * s``.
"""

from __future__ import annotations

import math

from optgen.features import Feature
from optgen.features.rewrite import is_var, rewrite_role, role_target, switch
from optgen.ir.nodes import Assign, Kind, Node, Program
from optgen.ir.ops import Op
from optgen.spec.model import HyperparameterSpec

FLAG = "use_atan2"
SCALE = 4 / math.pi


def atan2_of_division(s: Assign, denominator: str) -> Assign | None:
    """``t = x / d`` as ``t = atan2(x, d)`` where ``d`` is the denominator's name (else None)."""
    v = s.value
    if v.op == Op.DIV and is_var(v.args[1], denominator):
        return Assign(s.target, Node("atan2", v.args, kind=v.kind), s.pos, s.role)
    return None


def _apply(program: Program) -> Program:
    d = role_target(program, "denominator", "denom")

    def denom(s: Assign):
        v = s.value
        if v.op != Op.ADD:
            return None
        if v.args[1].is_host and not v.args[0].is_host:
            x = v.args[0]
        elif v.args[0].is_host and not v.args[1].is_host:
            x = v.args[1]
        else:
            return None
        return [switch(FLAG, [Assign(s.target, x, s.pos, s.role)], [s], s.pos)]

    def divide(s: Assign):
        on = atan2_of_division(s, d)
        return None if on is None else [switch(FLAG, [on], [s], s.pos)]

    def scale(s: Assign):
        v = s.value
        if v.op != Op.MUL:
            return None
        if is_var(v.args[0], s.target) and v.args[1].is_host:
            x, step = v.args
        elif is_var(v.args[1], s.target) and v.args[0].is_host:
            step, x = v.args
        else:
            return None
        factor = Node("mul", (step, Node("const", attr=SCALE)), kind=Kind.HOST)
        on = Assign(s.target, Node("mul", (x, factor), kind=v.kind), s.pos, s.role)
        return [switch(FLAG, [on], [s], s.pos)]

    body = rewrite_role(program, program.body, "atan2", "denominator", lambda s: s.target == "denom", denom,
                        "a denominator 'd = x + eps'")
    body = rewrite_role(program, body, "atan2", "division", lambda s: True, divide,
                        f"a division by the denominator '{d}'", many=True)
    body = rewrite_role(program, body, "atan2", "step_size",
                        lambda s: s.target == "update" and is_var(s.value.args[0] if s.value.args else s.value,
                                                                  "update"),
                        scale, "a step size 'update = update * step_size'")
    return program.copy(body=body)


FEATURE = Feature(
    name="atan2",
    doc="Bounded update: x / denom becomes (4/pi) atan2(x, denom) without eps (adv_optm's use_atan2).",
    transform=_apply,
    conflicts=("atan2_adams",),
    hyperparameters={
        FLAG: HyperparameterSpec(default=False, type="bool", doc="update = 4/pi * atan2(m, denom), no eps"),
    },
)
