"""``cautious``: the Cautious update mask (adv_optm 2.2.3 ``cautious_mask``, C-Optim).

Where the momentum and the gradient disagree in sign the direction is zeroed, and the mask is
renormalised by its mean as adv_optm does (``mask / max(mean(mask), 1e-3)``, not C-Optim's
``numel / (sum + 1)``): ``update = exp_avg * mask`` with ``mask = float(exp_avg * grad > 0)``
(strict). The stored moment is unchanged (math/adv-optm.md §6.2). It comes after ``grams`` (the
resolver checks it): where both flags are on, Grams wins (adv_optm disables the mask then).
Role: ``direction`` (``d = copy(m)`` or ``d = m``); its temporary takes a name the spec does not use.
"""

from __future__ import annotations

from optgen.features import Feature
from optgen.features.rewrite import (
    DIRECTION,
    direction_sites,
    direction_source,
    fresh,
    indicator,
    rewrite_role,
    switch,
    var,
)
from optgen.ir.nodes import Assign, Kind, Node, Program
from optgen.spec.model import HyperparameterSpec

FLAG = "cautious_mask"
FLOOR = 1e-3


def _apply(program: Program) -> Program:
    source = direction_source(program)
    name = fresh(program, "mask")  # capture-free: a base's own 'mask' is left alone

    def cautious(s: Assign):
        m = source(s)
        if m is None:
            return None
        agree = Node("gt", (Node("mul", (m, var("grad")), kind=Kind.ELEMENT), Node("const", attr=0)),
                     kind=Kind.ELEMENT, boolean=True)
        # the mask in the gradient's dtype, as adv_optm's (m * g > 0).to(g.dtype)
        mask = Node("cast", (indicator(agree), var("grad")), kind=Kind.ELEMENT)
        scale = Node("maximum", (Node("mean", (var(name),), kind=Kind.TENSOR),
                                 Node("const", attr=FLOOR)), kind=Kind.TENSOR)
        on = [
            Assign(name, mask, s.pos, "temp"),
            Assign(name, Node("div", (var(name), scale), kind=Kind.ELEMENT), s.pos, "temp"),
            Assign(s.target, Node("mul", (m, var(name)), kind=Kind.ELEMENT), s.pos, s.role),
        ]
        return [switch(FLAG, on, [s], s.pos)]

    body = rewrite_role(program, program.body, "cautious", "direction", direction_sites(program), cautious,
                        DIRECTION)
    return program.copy(body=body)


FEATURE = Feature(
    name="cautious",
    doc="Cautious mask: zero the direction where momentum and gradient disagree, renormalised by the mean.",
    transform=_apply,
    after=("grams",),
    hyperparameters={FLAG: HyperparameterSpec(default=False, type="bool",
                                              doc="mask the update where momentum and gradient disagree")},
)
