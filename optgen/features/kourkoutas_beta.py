"""``kourkoutas_beta``: Kourkoutas-beta, a per-layer dynamic beta2 (adv_optm ``kourkoutas_beta``).

The second-moment EMA's beta2 becomes the runtime input ``kourkoutas_beta2``, computed once per
step for each bucket of parameters from the previous step's pooled gradient norm
(:mod:`optgen.runtime.kourkoutas`); bias correction keeps the static ``betas[1]``, as adv_optm
does. Each parameter leaves ``sum(grad^2)`` (after OrthoGrad) in its state ``kourkoutas_sq`` for
the next step's pooling (ADOPT's init-only first step ``exp_avg_sq = grad * grad`` pools its raw
gradient too, as adv_optm does; a later write in the same step replaces it). ``kourkoutas_warmup`` says which release's warm-up the spec follows:
``blend`` (2.5.16, a linear blend over ``k_warmup_steps``) or ``switch`` (2.2.3: beta2_max until
then). A spec that declares ``kourkoutas_pool: raw`` pools the gradient as the step receives it,
before OrthoGrad and the upcast (adv_optm 2.2.3's Simplified_AdEMAMix); ``updates`` pools only the
gradients of steps that update (2.2.3's ADOPT skips its init-only step). Needs ``betas[1] >
beta2_min`` (a ValueError otherwise).

Role: ``second_moment`` (exactly one EMA statement ``v = v * beta2 + c * x * x``; undeclared, the
dialect's ``exp_avg_sq``); an init-only write ``v = grad * grad`` of the same state pools too. The
state ``kourkoutas_sq`` and the input ``kourkoutas_beta2`` are the runtime's names: the spec must
not use them.
"""

from __future__ import annotations

from optgen.features import Feature
from optgen.features.rewrite import (
    FeatureError,
    at_start_of_param_block,
    edit_nested,
    find_role,
    flag,
    is_var,
    names_in,
    own_state,
    replace_assigns,
    role_target,
    substitute,
    switch,
    var,
)
from optgen.ir.nodes import Assign, Kind, Node, Program, StateDecl, Stmt, walk_nodes
from optgen.ir.ops import Op
from optgen.spec.model import HyperparameterSpec

FLAG = "kourkoutas_beta"
#: the runtime input (per-parameter beta2) and the per-tensor state (sum of squares) this feature
#: adds; optgen.runtime.kourkoutas computes and reads them by these names
BETA2 = "kourkoutas_beta2"
SQ = "kourkoutas_sq"


def _beta2(s: Assign) -> Node | None:
    """The old value's factor of a second-moment EMA ``v = v * beta2 + c * x * x`` (addcmul), or None."""
    v = s.value
    if v.op == Op.ADDCMUL and v.args[0].op == Op.MUL and is_var(v.args[0].args[0], s.target):
        return v.args[0].args[1]
    return None


def _initialises(s: Stmt, v: str) -> bool:
    """ADOPT's init-only first step, ``v = grad * grad``: adv_optm pools that gradient too."""
    return isinstance(s, Assign) and s.target == v and s.value.op == Op.MUL and all(
        is_var(a, "grad") for a in s.value.args)


def _sq(s: Stmt | None) -> Assign:
    g = var("grad")
    return Assign(SQ, Node("sum", (Node("mul", (g, g), kind=Kind.ELEMENT),), kind=Kind.TENSOR),
                  s.pos if s is not None else None, "state")


def _apply(program: Program) -> Program:
    own_state(program, "kourkoutas_beta", SQ)
    if BETA2 in names_in(program):
        raise FeatureError(f"feature 'kourkoutas_beta' reads the runtime input '{BETA2}': the spec uses the name")
    v = role_target(program, "second_moment", "exp_avg_sq")
    (ema, beta2), = find_role(program, program.body, "kourkoutas_beta", "second_moment",
                              lambda s: s.target == v, _beta2,
                              f"a second-moment EMA '{v} = {v} * beta2 + (1 - beta2) * grad * grad'")
    if any(n.op == Op.VAR for n in walk_nodes(beta2)):
        raise FeatureError("feature 'kourkoutas_beta' needs beta2 to be a hyperparameter", ema.pos)
    pool = dict(program.hypers).get("kourkoutas_pool")
    raw = pool is not None and pool.default == "raw"
    at_init = pool is None or pool.default != "updates"

    def rewrite(s: Assign) -> list[Stmt] | None:
        if s.target == v and s.pos == ema.pos and _beta2(s) == beta2:
            value = substitute(s.value, lambda n: Node("input", attr=BETA2) if n == beta2 else None)
            pooled = [] if raw else [_sq(s)]
            return [switch(FLAG, [*pooled, Assign(s.target, value, s.pos, s.role)], [s], s.pos)]
        if _initialises(s, v) and not raw and at_init:
            return [s, switch(FLAG, [_sq(s)], [], s.pos)]
        return None

    body, _ = replace_assigns(program.body, rewrite)
    if raw:  # the gradient as the step receives it, before OrthoGrad (adv_optm's Simplified_AdEMAMix)
        body, _ = edit_nested(body, at_start_of_param_block([switch(FLAG, [_sq(None)], [])], True))
    ok = Node("or", (Node("not", (flag(FLAG),), boolean=True),
                     Node("gt", (beta2, Node("hyper", attr=("beta2_min", None))), boolean=True)), boolean=True)
    checks = [*program.checks, (ok, "For Kourkoutas-β, betas[1] (as beta2_max) must be > beta2_min")]
    decl = StateDecl(SQ, Kind.TENSOR, "zeros", "float32", flag(FLAG), "sum(grad^2) of the last step, for the pooling")
    return program.copy(body=body, checks=checks, state=[*program.state, decl])


FEATURE = Feature(
    name="kourkoutas_beta",
    doc="Kourkoutas-beta: beta2 per layer from the pooled gradient norm's 'sunspike' ratio (adv_optm).",
    transform=_apply,
    hyperparameters={
        FLAG: HyperparameterSpec(default=False, type="bool", doc="dynamic beta2 per layer (Kourkoutas-beta)"),
        "beta2_min": HyperparameterSpec(default=0.9, min=0, max_exclusive=1, doc="the smallest dynamic beta2"),
        "ema_alpha": HyperparameterSpec(default=0.95, min=0, max_exclusive=1, doc="decay of the norm's EMA"),
        "tiny_spike": HyperparameterSpec(default=1e-9, min=0, doc="added to the EMA in the sunspike ratio"),
        "k_warmup_steps": HyperparameterSpec(default=0, min=0, doc="warm-up steps of the dynamic beta2"),
        "k_logging": HyperparameterSpec(default=0, doc="accepted; unused (as in adv_optm)"),
        "layer_key_fn": HyperparameterSpec(default=None, type="any", per_group=False,
                                           doc="parameter -> bucket key (default: its shape)"),
        "kourkoutas_warmup": HyperparameterSpec(default="blend", type="any", constructor=False,
                                                doc="blend (adv_optm 2.5.16) or switch (2.2.3)"),
    },
)
