"""``ademamix``: AdEMAMix's slow momentum (adv_optm 2.2.3 ``use_AdEMAMix``, ``beta3_ema``, ``alpha``).

A second, slow EMA of whatever the first moment averages (the gradient in Adam, the normalised
gradient in ADOPT, Prodigy's d-scaled gradient) is added to the direction:
``exp_avg_slow = lerp(exp_avg_slow, x, 1 - beta3_ema)`` (Prodigy: ``exp_avg_slow * beta3_ema +
(d * (1 - beta3_ema)) * x``, the first moment's own form),
``update = update + alpha * exp_avg_slow``, once the direction is formed from the first moment
(after Grams/Cautious), just before its first use (the division by the denominator or the
scaling), so the slow EMA is divided by the same
bias correction as m (adv_optm's code, not the paper; no alpha/beta3 warm-up schedulers;
math/adv-optm.md §6.1).

Roles: ``first_moment`` (exactly one EMA statement, whose input and form the slow EMA copies)
and ``direction`` (its target is the direction extended); undeclared, the dialect's ``exp_avg``
and ``update``. The slow EMA is the state ``exp_avg_slow`` (adv_optm's key; the spec must not
declare it).
"""

from __future__ import annotations

from optgen.features import Feature
from optgen.features.rewrite import (
    FeatureError,
    direction_target,
    edit_nested,
    first_moment,
    flag,
    is_var,
    own_state,
    switch,
    var,
)
from optgen.ir.nodes import Assign, Kind, Node, Program, StateDecl, walk_nodes
from optgen.spec.model import HyperparameterSpec

FLAG = "use_AdEMAMix"
SLOW = "exp_avg_slow"


def _before_first_use(extra: list, d: str):
    """Returns an edit: ``extra`` just before the first use of the direction ``d`` in a statement
    list, ``d = f(d, ...)`` (the division by the denominator or the scaling)."""
    def uses(s) -> bool:
        return isinstance(s, Assign) and s.target == d and any(is_var(n, d) for n in walk_nodes(s.value))

    def edit(stmts: list) -> list | None:
        i = next((i for i, s in enumerate(stmts) if uses(s)), None)
        return None if i is None else [*stmts[:i], *extra, *stmts[i:]]

    return edit


def _apply(program: Program) -> Program:
    own_state(program, "ademamix", SLOW)
    _, ema = first_moment(program, program.body, "ademamix")
    d = direction_target(program)
    x, scale = ema.x, ema.scale
    one = Node("const", attr=1)
    beta3 = Node("hyper", attr=("beta3_ema", None))
    w = Node("sub", (one, beta3), kind=Kind.HOST)
    if scale is None:
        slow_ema = Node("lerp", (var(SLOW), x, w), kind=Kind.ELEMENT)
    else:  # the first moment's own form: slow * beta3 + (c * (1 - beta3)) * x
        slow_ema = Node("axpy", (Node("mul", (var(SLOW), beta3), kind=Kind.ELEMENT), x, Node("mul", (scale, w))),
                        kind=Kind.ELEMENT)
    slow = [
        Assign(SLOW, slow_ema, None, "state"),
        Assign(d, Node("axpy", (var(d), var(SLOW), Node("hyper", attr=("alpha", None))),
                       kind=Kind.ELEMENT), None, "temp"),
    ]
    body, found = edit_nested(program.body, _before_first_use([switch(FLAG, slow, [])], d))
    if not found:
        raise FeatureError(f"feature 'ademamix' needs a use 'd = f(d, ...)' of the direction '{d}' after it is formed")
    state = [*program.state, StateDecl(SLOW, Kind.ELEMENT, "zeros", "param", flag(FLAG), "AdEMAMix's slow EMA",
                                           # its factored form under feature 'factored' (adv_optm 2.2.3's keys)
                                           factored=("mu_m_slow_nmf", "mv_m_slow_nmf", "sign_slow"))]
    return program.copy(body=body, state=state)


FEATURE = Feature(
    name="ademamix",
    doc="AdEMAMix: add alpha times a slow EMA (beta3_ema) to the direction (adv_optm 2.2.3).",
    transform=_apply,
    hyperparameters={
        FLAG: HyperparameterSpec(default=False, type="bool", doc="add AdEMAMix's slow EMA to the update"),
        "beta3_ema": HyperparameterSpec(default=0.9999, min=0, max_exclusive=1, doc="decay of the slow EMA"),
        "alpha": HyperparameterSpec(default=5.0, min=0, doc="weight of the slow EMA"),
    },
)
