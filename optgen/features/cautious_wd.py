"""``cautious_wd``: decoupled weight decay only where the update and the parameter agree in sign.

adv_optm's ``cautious_wd`` (math/adv-optm.md §2.2, §2.10): ``mask = float(update * param >= 0)``
(zeros included, not renormalised) and the decay ``param + s * param`` becomes
``addcmul(param, param, mask, value=s)``; torch's spelling ``param * (1 - s)`` becomes
``param * (1 - s * mask)``. Role ``decay`` (one statement per path; undeclared: every such
decay of the parameter itself; declared, also ``param + s * T`` toward a target ``T``); the direction in the mask is the target of role ``step_size`` (else
``direction``, else the dialect's ``update``).
"""

from __future__ import annotations

from optgen.features import Feature
from optgen.features.rewrite import indicator, is_var, rewrite_role, role_target, switch, var
from optgen.ir.nodes import Assign, Kind, Node, Program
from optgen.ir.ops import Op
from optgen.spec.model import HyperparameterSpec

FLAG = "cautious_wd"


def _apply(program: Program) -> Program:
    upd = role_target(program, "step_size", role_target(program, "direction", "update"))
    declared = "decay" in program.roles
    # update and parameter agree in sign (zeros included)
    mask = indicator(Node("ge", (Node("mul", (var(upd), var("param")), kind=Kind.ELEMENT),
                                 Node("const", attr=0)), kind=Kind.ELEMENT, boolean=True))

    def decay(s: Assign):
        v = s.value
        if s.target != "param" or not v.args:
            return None
        one = Node("const", attr=1)
        # param * (1 - s) or (1 - s) * param, s a host value (torch's spelling)
        if v.op == Op.MUL and any(is_var(a, "param") for a in v.args):
            k = v.args[1] if is_var(v.args[0], "param") else v.args[0]
            if k.op == Op.SUB and k.args[0].op == Op.CONST and k.args[0].attr == 1 and k.args[1].is_host:
                masked = Node("sub", (one, Node("mul", (k.args[1], mask), kind=Kind.ELEMENT)), kind=Kind.ELEMENT)
                on = Node("mul", (var("param"), masked), kind=v.kind)
                return [switch(FLAG, [Assign("param", on, s.pos, s.role)], [s], s.pos)]
            return None
        if not is_var(v.args[0], "param"):
            return None
        # param + s * T, T the parameter itself or, where the spec declares the decay, a decay
        # target (SignSGD's geometric decay toward sign(param) * ||param|| / sqrt(numel))
        if v.op == Op.AXPY and v.args[2].is_host and (is_var(v.args[1], "param") or declared):
            on = Node("addcmul", (v.args[0], v.args[1], mask, v.args[2]), kind=v.kind)
        # param + s * param * X (Fisher decay: X the per-element decay scale): the mask joins X
        elif v.op == Op.ADDCMUL and is_var(v.args[1], "param"):
            scaled = Node("mul", (mask, v.args[2]), kind=Kind.ELEMENT)
            on = Node("addcmul", (v.args[0], v.args[1], scaled, v.args[3]), kind=v.kind)
        else:
            return None
        return [switch(FLAG, [Assign("param", on, s.pos, s.role)], [s], s.pos)]

    body = rewrite_role(program, program.body, "cautious_wd", "decay", lambda s: s.target == "param", decay,
                        "a decoupled decay 'param = param + s * param' or 'param = param * (1 - s)'", many=True)
    return program.copy(body=body)


FEATURE = Feature(
    name="cautious_wd",
    doc="Cautious weight decay: decay only where sign(update) agrees with sign(param) (adv_optm).",
    transform=_apply,
    hyperparameters={FLAG: HyperparameterSpec(default=False, type="bool",
                                              doc="decay only where the update and the param agree in sign")},
)
