"""``simplified_ademamix``: Simplified AdEMAMix's accumulator (adv_optm 2.2.3 ``Simplified_AdEMAMix``).

The first moment becomes an accumulator, ``exp_avg = exp_avg * beta1 + x`` (x: what the EMA
averaged), the direction adds the current input, ``update = exp_avg + alpha_grad * x``, and the
learning rate (in the update and in the decay) becomes adv_optm's
``lr_eff = lr * (1 / ((1 - beta1^step) / (1 - beta1) + alpha_grad))`` (math/adv-optm.md §6.3/6.4).
It excludes Grams, the Cautious mask and atan2, as adv_optm does.
"""

from __future__ import annotations

from optgen.features import Feature
from optgen.features.rewrite import (
    first_moment_direction,
    is_var,
    replace_assigns,
    require,
    substitute,
    switch,
)
from optgen.ir.nodes import Assign, Kind, Node, Program, Stmt, walk_nodes, walk_stmts
from optgen.spec.model import HyperparameterSpec

FLAG = "Simplified_AdEMAMix"
LR = "lr_sim"


def _host(op: str, *args: Node) -> Node:
    return Node(op, args, kind=Kind.HOST)


def _uses_lr(n: Node) -> Node | None:
    """The hyperparameter ``lr`` read as the scaled ``lr_sim``."""
    return Node("var", kind=Kind.HOST, attr=LR) if n.op == "hyper" and n.attr == ("lr", None) else None


def _relr(s: Assign) -> list[Stmt]:
    return [Assign(s.target, substitute(s.value, _uses_lr), s.pos, s.role)]


def _beta1(weight: Node) -> Node:
    """beta1 from the EMA's weight ``1 - beta1`` (taken as written, so no rounding is added)."""
    if weight.op == "sub" and weight.args[0].op == "const" and weight.args[0].attr == 1:
        return weight.args[1]
    return _host("sub", Node("const", attr=1), weight)


def _apply(program: Program) -> Program:
    found: dict[str, Node] = {}

    def accumulate(s: Assign):
        v = s.value
        if s.target == "exp_avg" and v.op == "lerp" and is_var(v.args[0], "exp_avg"):
            found["x"] = v.args[1]
            beta1 = _beta1(v.args[2])
            acc = Node("add", (Node("mul", (v.args[0], beta1), kind=v.kind), v.args[1]), kind=v.kind)
            return [switch(FLAG, [Assign(s.target, acc, s.pos, s.role)], [s], s.pos)]
        return None

    body, n = replace_assigns(program.body, accumulate)
    require(n, "simplified_ademamix", "an 'exp_avg = lerp(exp_avg, x, 1 - beta1)' statement")
    x = found["x"]
    alpha_grad = Node("hyper", attr=("alpha_grad", None))

    def direction(s: Assign):
        if first_moment_direction(s):
            value = Node("axpy", (s.value.args[0], x, alpha_grad), kind=Kind.ELEMENT)
            return [switch(FLAG, [Assign("update", value, s.pos, s.role)], [s], s.pos)]
        return None

    body, n = replace_assigns(body, direction)
    require(n, "simplified_ademamix", "an 'update = copy(exp_avg)' statement")

    beta1 = _beta1(next(s.value.args[2] for s in walk_stmts(program.body)
                        if isinstance(s, Assign) and s.target == "exp_avg" and s.value.op == "lerp"))
    one = Node("const", attr=1)
    scale = _host("add", _host("div", _host("sub", one, _host("pow", beta1, Node("step"))), _host("sub", one, beta1)),
                  alpha_grad)
    lr_sim = _host("mul", Node("hyper", attr=("lr", None)), _host("div", one, scale))
    scaled = switch(FLAG, [Assign(LR, lr_sim)], [Assign(LR, Node("hyper", attr=("lr", None)))])
    # computed just before the first statement that reads lr, where beta1 (maybe warmed up) is known
    first = next((i for i, s in enumerate(body) if _reads_lr(s)), len(body))
    return program.copy(body=[*body[:first], scaled, *replace_assigns(body[first:], _relr)[0]])


def _reads_lr(s: Stmt) -> bool:
    return any(n.op == "hyper" and n.attr == ("lr", None)
               for a in walk_stmts([s]) if isinstance(a, Assign) for n in walk_nodes(a.value))


FEATURE = Feature(
    name="simplified_ademamix",
    doc="Simplified AdEMAMix: accumulator momentum, update = m + alpha_grad * g, lr / (sum beta1^i + alpha_grad).",
    transform=_apply,
    hyperparameters={
        FLAG: HyperparameterSpec(default=False, type="bool", doc="Simplified AdEMAMix (accumulator momentum)"),
        "alpha_grad": HyperparameterSpec(default=100.0, min=0, doc="weight of the current gradient in the update"),
    },
    conflicts=("grams", "cautious", "atan2", "ademamix"),
)
