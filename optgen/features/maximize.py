"""``maximize``: ascend instead of descend, by negating the gradient before anything else.

As torch.optim does it: a new tensor ``-grad`` (``p.grad`` itself is never touched), decided per
group by the keyword-only ``maximize`` flag.
"""

from __future__ import annotations

from optgen.features import Feature
from optgen.ir.nodes import Assign, If, Kind, Node, Program
from optgen.spec.model import HyperparameterSpec


def _apply(program: Program) -> Program:
    grad = Node("var", kind=Kind.ELEMENT, attr="grad")
    negate = Assign("grad", Node("neg", (grad,), kind=Kind.ELEMENT), role="grad")
    flag = Node("hyper", attr=("maximize", None), boolean=True)
    return program.copy(body=[If(flag, [negate], []), *program.body])


FEATURE = Feature(
    name="maximize",
    doc="Maximise the objective: the gradient is negated (a new tensor) before the update.",
    transform=_apply,
    hyperparameters={
        "maximize": HyperparameterSpec(default=False, type="bool", keyword_only=True,
                                       doc="maximise the objective instead of minimising it"),
    },
)
