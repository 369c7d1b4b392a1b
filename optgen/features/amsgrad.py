"""``amsgrad``: AMSGrad, the denominator from the running maximum of the second moment.

Before the denominator is formed, ``max_exp_avg_sq = maximum(max_exp_avg_sq, exp_avg_sq)``, and
the denominator reads the maximum instead of ``exp_avg_sq`` (torch.optim.Adam/AdamW's
``amsgrad=True``: NaN-propagating maximum, then the same bias correction and eps). Adds the state
buffer ``max_exp_avg_sq`` (zeros, torch's state key: the spec must not declare it) where the
flag is on.

Roles: ``denominator`` (the one statement that reads the second moment) and ``second_moment``
(the state it reads); undeclared, the dialect's ``denom`` and ``exp_avg_sq``.
"""

from __future__ import annotations

from optgen.features import Feature
from optgen.features.rewrite import flag, own_state, rewrite_role, role_target, substitute, switch, var
from optgen.ir.nodes import Assign, Kind, Node, Program, StateDecl, walk_nodes
from optgen.ir.ops import Op
from optgen.spec.model import HyperparameterSpec

FLAG = "amsgrad"
MAX = "max_exp_avg_sq"


def _apply(program: Program) -> Program:
    own_state(program, "amsgrad", MAX)
    v = role_target(program, "second_moment", "exp_avg_sq")
    d = role_target(program, "denominator", "denom")

    def reads_v(n: Node) -> bool:
        return n.op == Op.VAR and n.attr == v

    def denom(s: Assign):
        if not any(reads_v(n) for n in walk_nodes(s.value)):
            return None
        track = Assign(MAX, Node("maximum", (var(MAX), var(v)), kind=Kind.ELEMENT), s.pos, "state")
        on = Assign(s.target, substitute(s.value, lambda n: var(MAX) if reads_v(n) else None), s.pos, s.role)
        return [switch(FLAG, [track, on], [s], s.pos)]

    body = rewrite_role(program, program.body, "amsgrad", "denominator", lambda s: s.target == d, denom,
                        f"a denominator '{d} = ...' reading the second moment '{v}'")
    decl = StateDecl(MAX, Kind.ELEMENT, "zeros", "param", flag(FLAG), f"maximum of {v} so far")
    return program.copy(body=body, state=[*program.state, decl])


FEATURE = Feature(
    name="amsgrad",
    doc="AMSGrad: the denominator uses the running maximum of exp_avg_sq (torch's amsgrad=True).",
    transform=_apply,
    hyperparameters={FLAG: HyperparameterSpec(default=False, type="bool", doc="use the maximum of past second moments")},
)
