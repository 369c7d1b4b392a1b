"""``orthograd``: OrthoGrad, the gradient projected orthogonal to the parameter (adv_optm
``orthogonal_gradient``, the "grokking at the edge" formula, flattened form).

With ``w`` the parameter and ``g`` the gradient, flattened::

    proj = dot(w, g) / (dot(w, w) + 1e-30)
    g_orth = g - w * proj
    g = g_orth * (||g|| / (||g_orth|| + 1e-30))

as adv_optm computes it (``torch.dot``, ``sub`` of ``w * proj``, the norm ratio as one scalar;
math/adv-optm.md §2.6). It runs before anything else reads the gradient, at the start of the
block that writes the parameter (so ADOPT's init-only first step squares the raw gradient, as
published). The flag is the spec's ``orthogonal_gradient``: a bool (adv_optm 2.2.3) or a mode
string (2.5.16: ``'flattened'`` turns it on; ``'iterative'`` is not implemented).

No role: it reads ``param`` and ``grad`` and goes before the first parameter write; its two
temporaries take names the spec does not use.
"""

from __future__ import annotations

from optgen.features import Feature
from optgen.features.rewrite import (
    FeatureError,
    at_start_of_param_block,
    edit_nested,
    element,
    flag,
    fresh,
    placed,
    var,
)
from optgen.ir.nodes import Assign, If, Kind, Node, Program, Stmt, walk_nodes
from optgen.ir.ops import Op
from optgen.spec.model import HyperparameterSpec

FLAG = "orthogonal_gradient"
TINY = 1e-30


def _t(op: str, *args: Node) -> Node:
    return Node(op, args, kind=Kind.TENSOR)


def _statements(program: Program) -> list[Stmt]:
    g_orth = fresh(program, "ortho_g")
    scale = fresh(program, "ortho_scale", {g_orth})
    w, g, tiny = var("param"), var("grad"), Node("const", attr=TINY)
    proj = _t("div", _t("vdot", w, g), _t("add", _t("vdot", w, w), tiny))
    return [
        Assign(g_orth, element("sub", g, element("mul", w, proj)), None, "temp"),
        Assign(scale, _t("div", _t("norm", g), _t("add", _t("norm", var(g_orth)), tiny)), None, "temp"),
        Assign("grad", element("mul", var(g_orth), var(scale, Kind.TENSOR)), None, "grad"),
    ]


def _apply(program: Program) -> Program:
    declared = dict(program.hypers).get(FLAG)
    if declared is not None and declared.inferred_type() != "bool":
        cond = Node("eq", (Node("hyper", attr=(FLAG, None)), Node("const", attr="flattened")), boolean=True)
    else:
        cond = flag(FLAG)
    body, ok = edit_nested(program.body, placed(at_start_of_param_block([If(cond, _statements(program), [])]),
                                                after_gradient_preprocessing))
    if not ok:
        raise FeatureError("feature 'orthograd' needs a 'param = ...' statement")
    return program.copy(body=body)


def after_gradient_preprocessing(stmts: list[Stmt]) -> int:
    """Where OrthoGrad goes in the block that writes the parameter: after the spec's own leading
    gradient preprocessing (Lion_Prodigy's clip: adv_optm clips, then orthogonalises; Muon's approx
    MARS), i.e. after the last write of ``grad`` before the first parameter write (0 if none)."""
    def pre(s: Stmt) -> bool:
        if isinstance(s, If):
            return all(pre(x) for x in (*s.then, *s.orelse))
        return s.role != "param"

    def writes_grad(s: Stmt) -> bool:
        if isinstance(s, If):
            return any(writes_grad(x) for x in (*s.then, *s.orelse))
        return s.target == "grad"

    n = 0
    for i, s in enumerate(stmts):
        if not pre(s):
            break
        if writes_grad(s):
            n = i + 1
    return n


def is_orthograd_block(s: Stmt) -> bool:
    """Whether ``s`` is the conditional this feature inserts: on its flag, three statements ending
    in the gradient's write (found by structure, not by its temporaries' names)."""
    if not isinstance(s, If) or s.orelse or len(s.then) != 3 or FLAG not in _flags(s.cond):
        return False
    last = s.then[-1]
    return isinstance(last, Assign) and last.target == "grad" and last.pos is None and \
        all(isinstance(x, Assign) and x.pos is None for x in s.then)


def _flags(cond: Node) -> set[str]:
    return {n.attr[0] for n in walk_nodes(cond) if n.op == Op.HYPER}


FEATURE = Feature(
    name="orthograd",
    doc="OrthoGrad: project the gradient orthogonal to the parameter, keeping its norm (adv_optm).",
    transform=_apply,
    hyperparameters={FLAG: HyperparameterSpec(default=False, type="bool",
                                              doc="project the gradient orthogonal to the parameter")},
)
