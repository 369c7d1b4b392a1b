"""``amsgrad``: AMSGrad, the denominator from the running maximum of the second moment.

Before the denominator is formed, ``max_exp_avg_sq = maximum(max_exp_avg_sq, exp_avg_sq)``, and
the denominator reads the maximum instead of ``exp_avg_sq`` (torch.optim.Adam/AdamW's
``amsgrad=True``: NaN-propagating maximum, then the same bias correction and eps). Adds the state
buffer ``max_exp_avg_sq`` (zeros) where the flag is on.
"""

from __future__ import annotations

from optgen.features import Feature
from optgen.features.rewrite import flag, is_var, replace_assigns, require, substitute, switch, var
from optgen.ir.nodes import Assign, Kind, Node, Program, StateDecl, walk_nodes
from optgen.spec.model import HyperparameterSpec

FLAG = "amsgrad"
MAX = "max_exp_avg_sq"


def _apply(program: Program) -> Program:
    def denom(s: Assign):
        if s.target == "denom" and any(is_var(n, "exp_avg_sq") for n in walk_nodes(s.value)):
            track = Assign(MAX, Node("maximum", (var(MAX), var("exp_avg_sq")), kind=Kind.ELEMENT), s.pos, "state")
            return [switch(FLAG, [track, Assign(s.target, substitute(s.value, lambda n: var(MAX) if is_var(n, "exp_avg_sq") else None), s.pos,
                                              s.role)], [s], s.pos)]
        return None

    body, n = replace_assigns(program.body, denom)
    require(n, "amsgrad", "a 'denom = ...' statement reading exp_avg_sq")
    decl = StateDecl(MAX, Kind.ELEMENT, "zeros", "param", flag(FLAG), "maximum of exp_avg_sq so far")
    state = [s for s in program.state if s.name != MAX] + [decl]
    return program.copy(body=body, state=state)


FEATURE = Feature(
    name="amsgrad",
    doc="AMSGrad: the denominator uses the running maximum of exp_avg_sq (torch's amsgrad=True).",
    transform=_apply,
    hyperparameters={FLAG: HyperparameterSpec(default=False, type="bool", doc="use the maximum of past second moments")},
)
