"""``cautious_wd``: decoupled weight decay only where the update and the parameter agree in sign.

adv_optm's ``cautious_wd`` (math/adv-optm.md §2.2, §2.10): ``mask = float(update * param >= 0)``
(zeros included, not renormalised) and the decay ``param + s * param`` becomes
``addcmul(param, param, mask, value=s)``.
"""

from __future__ import annotations

from optgen.features import Feature
from optgen.features.rewrite import indicator, is_var, replace_assigns, require, switch, var
from optgen.ir.nodes import Assign, Kind, Node, Program
from optgen.spec.model import HyperparameterSpec

FLAG = "cautious_wd"


def _apply(program: Program) -> Program:
    # update and parameter agree in sign (zeros included)
    mask = indicator(Node("ge", (Node("mul", (var("update"), var("param")), kind=Kind.ELEMENT),
                                 Node("const", attr=0)), kind=Kind.ELEMENT, boolean=True))

    def decay(s: Assign):
        v = s.value
        if s.target != "param" or not v.args or not is_var(v.args[0], "param"):
            return None
        # param + s * T, T the parameter itself or a decay target (SignSGD's geometric decay)
        if v.op == "axpy" and (is_var(v.args[1], "param") or is_var(v.args[1], "wd_target")):
            on = Node("addcmul", (v.args[0], v.args[1], mask, v.args[2]), kind=v.kind)
        # param + s * param * X (Fisher decay: X the per-element decay scale): the mask joins X
        elif v.op == "addcmul" and is_var(v.args[1], "param"):
            scaled = Node("mul", (mask, v.args[2]), kind=Kind.ELEMENT)
            on = Node("addcmul", (v.args[0], v.args[1], scaled, v.args[3]), kind=v.kind)
        else:
            return None
        return [switch(FLAG, [Assign("param", on, s.pos, s.role)], [s], s.pos)]

    body, n = replace_assigns(program.body, decay)
    require(n, "cautious_wd", "a decoupled decay 'param = param + s * param'")
    return program.copy(body=body)


FEATURE = Feature(
    name="cautious_wd",
    doc="Cautious weight decay: decay only where sign(update) agrees with sign(param) (adv_optm).",
    transform=_apply,
    hyperparameters={FLAG: HyperparameterSpec(default=False, type="bool",
                                              doc="decay only where the update and the param agree in sign")},
)
