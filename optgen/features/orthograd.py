"""``orthograd``: OrthoGrad, the gradient projected orthogonal to the parameter (adv_optm
``orthogonal_gradient``, the "grokking at the edge" formula, flattened form; 2.5.16's rank-2
``'iterative'`` form).

With ``w`` the parameter and ``g`` the gradient, flattened::

    proj = dot(w, g) / (dot(w, w) + 1e-30)
    g_orth = g - w * proj
    g = g_orth * (||g|| / (||g_orth|| + 1e-30))

in float32 (``w``, ``g`` the float32 parameter and gradient), cast back to the gradient's dtype,
as adv_optm computes it (``torch.dot``, ``sub`` of ``w * proj``, the norm ratio as one scalar;
math/adv-optm.md §2.6). It runs before anything else reads the gradient, at the start of the
block that writes the parameter (so ADOPT's init-only first step squares the raw gradient, as
published). The flag is the spec's ``orthogonal_gradient``: a bool (adv_optm 2.2.3) or a mode
string (2.5.16: ``'disabled'``, ``'flattened'`` or ``'iterative'``).

``'iterative'`` (math §2.6, rank-2 OrthoGrad) is ``grad = orthograd_iterative(grad, param)``
(:func:`optgen.numerics.sinkhorn.orthograd_iterative`: 3 alternating passes along the longer dim
of the ``(shape[0], -1)`` view, then the other, each ``g -= 1.01 * proj * p`` and the norms along
that dim restored to the original gradient's), in the gradient's own dtype as the spec has it at
that point (upcast or not, as published). Vectors (fewer than 2 dims, or a parameter tagged
``_is_dora_scale`` / ``is_vector``) take the flattened form, as published. The published code runs
the passes in place on a view of ``p.grad`` where the gradient was not upcast, so that the user's
``.grad`` holds the projected gradient after ``step()``; optgen leaves ``.grad`` as the user set
it (the step's values are the same; only code that reads ``.grad`` after the step, or
accumulates into it without zeroing, sees the difference). The triton backend refuses the
iterative path (the runtime names it when a parameter group takes it).

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
    # in float32, the result cast back to the gradient's dtype (a no-op for float32 gradients)
    w, g, tiny = element("float32", var("param")), element("float32", var("grad")), Node("const", attr=TINY)
    proj = _t("div", _t("vdot", w, g), _t("add", _t("vdot", w, w), tiny))
    scaled = element("mul", var(g_orth), var(scale, Kind.TENSOR))
    return [
        Assign(g_orth, element("sub", g, element("mul", w, proj)), None, "temp"),
        Assign(scale, _t("div", _t("norm", g), _t("add", _t("norm", var(g_orth)), tiny)), None, "temp"),
        Assign("grad", Node(Op.CAST, (scaled, var("grad")), kind=Kind.ELEMENT), None, "grad"),
    ]


def _mode(name: str) -> Node:
    return Node("eq", (Node("hyper", attr=(FLAG, None)), Node("const", attr=name)), boolean=True)


def _or(*xs: Node) -> Node:
    return Node("or", xs, boolean=True)


def _block(program: Program) -> If:
    declared = dict(program.hypers).get(FLAG)
    if declared is None or declared.inferred_type() == "bool":
        return If(flag(FLAG), _statements(program), [])
    # 2.5.16's modes: 'iterative' takes the flattened form for vectors (1-D and 0-D, or tagged
    # DoRA scales / is_vector), the rank-2 passes otherwise
    vector = _or(Node("lt", (Node("meta", attr="ndim"), Node("const", attr=2)), boolean=True),
                 Node("param_attr", attr=("_is_dora_scale", False), boolean=True),
                 Node("param_attr", attr=("is_vector", False), boolean=True))
    iterative = _mode("iterative")
    flat = _or(_mode("flattened"), Node("and", (iterative, vector), boolean=True))
    rank2 = Assign("grad", Node(Op.ORTHOGRAD_ITERATIVE, (var("grad"), var("param")), kind=Kind.ELEMENT), None, "grad")
    return If(flat, _statements(program), [If(iterative, [rank2], [])])


def _apply(program: Program) -> Program:
    body, ok = edit_nested(program.body, placed(at_start_of_param_block([_block(program)]),
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
    if not isinstance(s, If) or len(s.then) != 3 or FLAG not in _flags(s.cond):
        return False
    if s.orelse and not (len(s.orelse) == 1 and isinstance(s.orelse[0], If) and not s.orelse[0].orelse
                         and [x.target for x in s.orelse[0].then if isinstance(x, Assign)] == ["grad"]):
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
