"""``coupled``: Coupled Adam's shared second moment (Stollenwerk & Stollenwerk, arXiv 2502.08441;
math/torch-adams-adamw-family.md §4).

Where a group's ``coupled`` flag is on, the denominator reads, instead of the per-element second
moment ``v``, its mean over the first dim (the vocabulary of an embedding ``[V, H]``), one value
per hidden coordinate, scaled by ``avg_scale`` and broadcast back::

    v_c = avg_scale * mean(v, dim=0)        # [H] for [V, H]; the whole-tensor mean for 1-D
    denom = sqrt(v_c) / bias_correction2_sqrt + eps

as ``nanoGPT/coupled_adam.py`` of ``flxst/coupled-adam`` (ba54c74) computes it on its foreach
path. The stored state keeps the ordinary per-element ``v`` (only the denominator is coupled), so
the state dict is the base's. ``mean(v, dim=0)`` of a 2-D tensor is ``colsum(v) / rows`` bit for
bit on CPU (torch's mean sums, then divides by the count); a parameter of more dims is stepped as
its ``(shape[0], -1)`` view, whose columns are exactly the entries ``mean(dim=0)`` averages.

Published behaviour kept: the amsgrad path is not coupled (the paper's code modifies only the
non-amsgrad branch), so with feature ``amsgrad`` listed before it the ``amsgrad=True`` path keeps
its ``max_exp_avg_sq`` denominator.

Roles: ``denominator`` (the statement ``d = ... + eps`` that reads the second moment) and
``second_moment`` (the state it reads); undeclared, the dialect's ``denom`` and ``exp_avg_sq``.
"""

from __future__ import annotations

from dataclasses import replace

from optgen.errors import Position
from optgen.features import Feature
from optgen.features.rewrite import FeatureError, is_var, rewrite_role, role_target, substitute, switch
from optgen.ir.nodes import Assign, If, Kind, Node, Program, join, walk_nodes
from optgen.ir.ops import REDUCTIONS
from optgen.spec.model import HyperparameterSpec

FLAG = "coupled"
SCALE = "avg_scale"
HERE = Position("<feature coupled>", 1, 1)


def _lower(program: Program, text: str) -> Node:
    from optgen.ir.lower import Lowerer
    from optgen.spec.expr import parse_expression

    lw = Lowerer(program.source, program.hypers, program.state, program.step_store,
                 tuple(g.name for g in program.globals), tuple(a.name for a in program.accumulators),
                 program.slice_stride)
    return lw.expr(parse_expression(text, HERE, "coupled"), "coupled")


def _rekind(n: Node) -> Node:
    """``n`` with the kinds of its element-wise operations recomputed from their arguments (the
    coupled second moment is per-column or per-tensor, so the denominator built on it is too and
    broadcasts in the parameter's update, as the published broadcast view does)."""
    if not n.args or n.op in REDUCTIONS:
        return n
    args = tuple(_rekind(a) for a in n.args)
    kind = Kind.HOST
    for a in args:
        kind = join(kind, a.kind)
    return replace(n, args=args, kind=kind if n.kind != Kind.HOST else n.kind)


def _apply(program: Program) -> Program:
    v = role_target(program, "second_moment", "exp_avg_sq")
    if not any(s.name == v and s.kind == Kind.ELEMENT for s in program.state):
        raise FeatureError(f"feature 'coupled' averages the per-element second moment '{v}': the spec has no such "
                           "state (role 'second_moment': declare it under roles:)")
    matrix = _lower(program, f"{SCALE} * (colsum({v}) / rows)")  # mean over dim 0, per column
    whole = _lower(program, f"{SCALE} * mean({v})")  # 0-D and 1-D: dim 0 is the whole tensor
    is_matrix = _lower(program, "ndim >= 2")

    def denom(s: Assign):
        if not any(is_var(n, v) for n in walk_nodes(s.value)):
            return None  # amsgrad's path (max_exp_avg_sq): uncoupled, as published
        paths = [Assign(s.target, _rekind(substitute(s.value, lambda n, m=m: m if is_var(n, v) else None)), s.pos,
                        s.role) for m in (matrix, whole)]
        return [switch(FLAG, [If(is_matrix, [paths[0]], [paths[1]], s.pos)], [s], s.pos)]

    d = role_target(program, "denominator", "denom")
    body = rewrite_role(program, program.body, "coupled", "denominator", lambda s: s.target == d, denom,
                        f"a denominator '{d} = ... + eps' reading the second moment '{v}'")
    # parameters of 3 or more dims: mean(dim=0) averages the columns of their (shape[0], -1) view
    view = _lower(program, f"{FLAG} and ndim >= 3")
    return program.copy(body=body, matrix_views=[(view, "rows"), *program.matrix_views])


FEATURE = Feature(
    name="coupled",
    doc="Coupled Adam: the denominator reads avg_scale * mean(v, dim=0) (one second moment per hidden "
        "coordinate of an embedding), where a group's 'coupled' flag is on.",
    transform=_apply,
    hyperparameters={
        FLAG: HyperparameterSpec(default=False, type="bool",
                                 doc="couple the second moment over dim 0 (the vocabulary of an embedding)"),
        SCALE: HyperparameterSpec(default=1.0, min=0,
                                  doc="factor of the coupled second moment (Coupled Adam's avg_scale)"),
    },
    after=("amsgrad",),
)
