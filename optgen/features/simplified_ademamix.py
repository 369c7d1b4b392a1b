"""``simplified_ademamix``: Simplified AdEMAMix's accumulator (adv_optm 2.2.3 ``Simplified_AdEMAMix``).

The first moment becomes an accumulator, ``exp_avg = exp_avg * beta1 + x`` (x: what the EMA
averaged; Prodigy's ``+ d * x``), the direction adds the current input, ``update = exp_avg +
alpha_grad * x`` (Prodigy: ``alpha_grad * d``), and the learning rate (in the update and in the
decay) becomes adv_optm's ``lr_eff = lr * (1 / ((1 - beta1^step) / (1 - beta1) + alpha_grad))``; where
the spec forms a step size from lr in one host statement (Prodigy's ``dlr = d * lr``), that step
size is scaled instead, as adv_optm scales dlr (math/adv-optm.md §6.3/6.4).

It lists beside Grams, the Cautious mask, AdEMAMix and atan2 (one published class, one generated
class): the features come first, so their flags wrap the EMA direction this feature rewrites in
their own ``else`` branches. adv_optm 2.2.3 turns ``use_AdEMAMix``, ``grams_moment``,
``cautious_mask`` and ``use_atan2`` off under ``Simplified_AdEMAMix`` (Adopt_adv turns atan2 off
without a word, the others with a print); this feature instead adds a construction-time check for
each of those flags the spec has, a ValueError naming both flags, so no flag is silently ignored.

Roles: ``first_moment`` (exactly one EMA statement, the lerp or a scaled axpy form) and
``direction`` (``d = copy(m)`` or ``d = m``); undeclared, the dialect's ``exp_avg`` and
``update = copy(exp_avg)``. The scaled learning rate is a temporary with a fresh name.
"""

from __future__ import annotations

from optgen.features import Feature
from optgen.features.rewrite import (
    DIRECTION,
    direction_sites,
    direction_source,
    ema_form,
    first_moment,
    flag,
    fresh,
    replace_assigns,
    rewrite_role,
    substitute,
    switch,
)
from optgen.ir.nodes import Assign, Kind, Node, Program, Stmt, walk_nodes, walk_stmts
from optgen.ir.ops import Op
from optgen.spec.model import HyperparameterSpec

FLAG = "Simplified_AdEMAMix"
LR = "lr_sim"
#: the features adv_optm 2.2.3 turns off under the flag, by their flags (checked at construction)
EXCLUDES = {"ademamix": "use_AdEMAMix", "grams": "grams_moment", "cautious": "cautious_mask", "atan2": "use_atan2"}


def _host(op: str, *args: Node) -> Node:
    return Node(op, args, kind=Kind.HOST)


def _relr(name: str):
    """A rewrite of a statement: the hyperparameter ``lr`` read as the scaled temporary ``name``."""
    def uses_lr(n: Node) -> Node | None:
        return Node("var", kind=Kind.HOST, attr=name) if n.op == Op.HYPER and n.attr == ("lr", None) else None

    return lambda s: [Assign(s.target, substitute(s.value, uses_lr), s.pos, s.role)]


def _exclusion_checks(program: Program) -> list[tuple[Node, str]]:
    """``not (Simplified_AdEMAMix and <flag>)`` for each excluded feature the spec lists."""
    out = []
    for feature, other in EXCLUDES.items():
        if feature in program.features:
            both = Node("and", (flag(FLAG), flag(other)), boolean=True)
            out.append((Node("not", (both,), boolean=True),
                        f"{FLAG}=True and {other}=True cannot be combined: adv_optm 2.2.3 turns {other} off under "
                        f"{FLAG}; pass {other}=False"))
    return out


def _apply(program: Program) -> Program:
    program = program.copy(checks=[*program.checks, *_exclusion_checks(program)])
    lr_name = fresh(program, LR)
    # the lerp form, or an axpy form scaled by something (Prodigy's d): not the unscaled axpy form
    ema_stmt, ema = first_moment(program, program.body, "simplified_ademamix",
                                 lambda s, e: None if e.scale is not None and e.scale.op == Op.CONST else e)
    x, beta1 = ema.x, ema.beta1

    def accumulate(s: Assign):
        if (s.target, s.pos) != (ema_stmt.target, ema_stmt.pos) or ema_form(s, s.target) != ema:
            return None  # not the first moment (or a feature's rewritten copy of it)
        m = s.value.args[0]
        if ema.scale is None:  # m = m * beta1 + x
            acc = Node("add", (Node("mul", (m, ema.beta1), kind=s.value.kind), ema.x), kind=s.value.kind)
        else:  # Prodigy: m = m * beta1 + c * x, the accumulator of the scaled input
            acc = Node("axpy", (m, ema.x, ema.scale), kind=s.value.kind)
        return [switch(FLAG, [Assign(s.target, acc, s.pos, s.role)], [s], s.pos)]

    body, _ = replace_assigns(program.body, accumulate)
    alpha_grad = Node("hyper", attr=("alpha_grad", None))
    # the input's weight in the direction: alpha_grad, times the input's scale (Prodigy's d)
    weight = alpha_grad if ema.scale is None else _host("mul", alpha_grad, ema.scale)
    source = direction_source(program)

    def direction(s: Assign):
        m = source(s)
        if m is None:
            return None
        value = Node("axpy", (m, x, weight), kind=Kind.ELEMENT)
        return [switch(FLAG, [Assign(s.target, value, s.pos, s.role)], [s], s.pos)]

    body = rewrite_role(program, body, "simplified_ademamix", "direction", direction_sites(program), direction,
                        DIRECTION)
    one = Node("const", attr=1)
    scale = _host("add", _host("div", _host("sub", one, _host("pow", beta1, Node("step"))), _host("sub", one, beta1)),
                  alpha_grad)
    factor = _host("div", one, scale)
    readers = [s for s in walk_stmts(body) if isinstance(s, Assign) and _reads_lr(s)]
    if len(readers) == 1 and readers[0].value.is_host and readers[0].role == "temp":
        # the spec forms its step size from lr in one statement (Prodigy's dlr = d * lr): that
        # step size is scaled, as adv_optm scales dlr (the statistics and the decay read it too)
        step_size = readers[0]

        def rescale(s: Assign):
            if s is step_size:
                scaled = Assign(s.target, _host("mul", s.value, factor), s.pos, s.role)
                return [switch(FLAG, [scaled], [s], s.pos)]
            return None

        return program.copy(body=replace_assigns(body, rescale)[0])
    lr_sim = _host("mul", Node("hyper", attr=("lr", None)), factor)
    scaled = switch(FLAG, [Assign(lr_name, lr_sim)], [Assign(lr_name, Node("hyper", attr=("lr", None)))])
    # computed just before the first statement that reads lr, where beta1 (maybe warmed up) is known
    first = next((i for i, s in enumerate(body) if _reads_lr(s)), len(body))
    return program.copy(body=[*body[:first], scaled, *replace_assigns(body[first:], _relr(lr_name))[0]])


def _reads_lr(s: Stmt) -> bool:
    return any(n.op == Op.HYPER and n.attr == ("lr", None)
               for a in walk_stmts([s]) if isinstance(a, Assign) for n in walk_nodes(a.value))


FEATURE = Feature(
    name="simplified_ademamix",
    doc="Simplified AdEMAMix: accumulator momentum, update = m + alpha_grad * g, lr / (sum beta1^i + alpha_grad).",
    transform=_apply,
    hyperparameters={
        FLAG: HyperparameterSpec(default=False, type="bool", doc="Simplified AdEMAMix (accumulator momentum)"),
        "alpha_grad": HyperparameterSpec(default=100.0, min=0, doc="weight of the current gradient in the update"),
    },
    after=tuple(EXCLUDES),
)
