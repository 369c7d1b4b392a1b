"""``factored``: SMMF-style factored states with a 1-bit sign (adv_optm ``state_precision='factored'``).

Every per-element state that declares a ``factored:`` form is stored, for parameters that are
factored, as two non-negative rank-1 factors of its magnitude over the closest-to-square matrix
``(d1, d2)`` of the flat parameter (``d1 >= d2``), plus, for a signed state, its sign packed
8 per ``uint8`` (math/adv-optm.md §2.5). Each step, as adv_optm does:

1. reconstruct the full float32 state before its first use: ``outer(row, col)``, negated where
   the sign bit is clear;
2. run the base update on it at full size (the update uses the full-size new state);
3. re-factor after each write: ``sign = state > 0``, ``row = rowsum(|state|)``,
   ``col = colsum(|state|) / max(sum(colsum(|state|)), 1e-12)`` (the column factor is the one
   normalised, as ``d1 >= d2``).

The gradient is taken in float32. A spec with adv_optm's ``state_precision`` hyperparameter
(``'factored'`` or ``nnmf_factor``) keeps the dense states of the parameters it does not factor
(1-D ones) in float32 too and upcasts their gradient, as adv_optm does there; with only
``nnmf_factor`` (Lion) those keep the parameter's dtype. The program's
``matrix_views`` rule tells the runtime to hand the factored branch its parameter, gradient and
per-element states as ``(d1, d2)`` views, so per-row/per-column values are the factors and no
backend needs to know about the reshape. A parameter is factored when factored states are requested and it is not 1-D (unless ``vector_reshape``); 0-d parameters
are factored as ``(1, 1)``, as in adv_optm. List it last under ``features:``: it rewrites the
statements the other features produced.

A spec that declares adv_optm's ``factored_2nd`` hyperparameter gets a third path: with
``factored_2nd`` on (and the parameter not factored as a whole, not a vector) only the unsigned
factored states (the second moments) are factored; the first moment stays dense in the parameter's
dtype and the gradient is not upcast (adv_optm's ``factored_2nd``, math §2.5). The factored state's
update reads its per-element operands in float32 (adv_optm's ``grad.float()``); every other read of the
denominator takes it in the gradient's dtype (adv_optm's ``denom.to(update.dtype)``); where the
state is read before its update in the step (ADOPT's ``v_{t-1}``), the reconstructed state is taken
in the gradient's dtype first (adv_optm's ``.to(grad.dtype)``) and upcast again for the update. All
of these are no-ops for float32 parameters.

Parameters the spec steps as another matrix view (AdaMuon's ``(shape[0], -1)`` matrix) keep that
view on the ``factored_2nd`` path: a state whose form says ``any_view`` is factored on the square
view all the same (adv_optm's AdaMuon), its factors declared on that view (``StateDecl.view``) and
read and written through ``square_outer`` / ``square_rowsum`` / ``square_colsum``, which carry the
same flat memory between the two views; the other states of such parameters stay dense.
"""

from __future__ import annotations

from optgen.features import Feature
from optgen.features.fisher_wd import is_scale
from optgen.features.orthograd import is_orthograd_block
from optgen.features.rewrite import (
    FeatureError,
    at_start_of_param_block,
    edit_nested,
    element,
    flag,
    names_in,
    placed,
    role_target,
    var,
)
from optgen.ir.nodes import Assign, If, Kind, Node, Program, StateDecl, Stmt, walk_nodes
from optgen.ir.ops import Op
from optgen.spec.model import HyperparameterSpec

#: The column factor's normaliser floor (adv_optm's ``EPSILON``).
FLOOR = 1e-12


def _factored_precision() -> Node:
    return Node("eq", (Node("hyper", attr=("state_precision", None)), Node("const", attr="factored")), boolean=True)


def _requested(precision_api: bool) -> Node:
    if not precision_api:
        return flag("nnmf_factor")
    return Node("or", (_factored_precision(), flag("nnmf_factor")), boolean=True)


def aliased(program: Program) -> bool:
    """Whether ``nnmf_factor`` stands for ``state_precision='factored'`` (adv_optm's classes), not
    only for factoring the matrices (a spec's ``nnmf_alias`` off: Muon's aux AdamW)."""
    h = dict(program.hypers).get("nnmf_alias")
    return h is None or bool(h.default)


def _shaped() -> Node:
    """Not a vector (or vectors reshaped too)."""
    not_vector = Node("ne", (Node("meta", attr="ndim"), Node("const", attr=1)), boolean=True)
    return Node("or", (not_vector, flag("vector_reshape")), boolean=True)


def _and(a: Node | None, b: Node) -> Node:
    return b if a is None else Node("and", (a, b), boolean=True)


class _Factoring:
    """The rewrite of one program's body for its factored states; ``second``: adv_optm's
    ``factored_2nd`` dense path (see the module's docstring; ``denom`` the denominator's name)."""

    def __init__(self, decls: list[StateDecl], taken: set[str], second: bool = False, denom: str = "denom",
                 square: bool = False):
        self.decls = {d.name: d for d in decls}
        self.second = second
        self.denom = denom
        #: the factors live on the closest-to-square view of a parameter stepped as another view:
        #: the square_* ops carry values between the two (the same flat memory)
        self.square = square
        self.full = {}
        for d in decls:
            # the temporaries of each state (derived from its name, so the generated code reads):
            # a spec name among them is an error, never captured
            for name in (f"{d.name}_full", f"{d.name}_magnitude", f"{d.name}_abs", f"{d.name}_colsum"):
                if name in taken:
                    raise FeatureError(f"feature 'factored' names a temporary of '{d.name}' '{name}', which is taken")
            self.full[d.name] = f"{d.name}_full"

    def _rename(self, n: Node) -> Node:
        if n.op == Op.VAR and n.attr in self.full:
            return Node("var", kind=Kind.ELEMENT, attr=self.full[n.attr])
        if not n.args:
            return n
        return Node(n.op, tuple(self._rename(a) for a in n.args), n.kind, n.attr, n.boolean)

    def _second(self, s: Assign, value: Node) -> Node:
        """adv_optm's casts on the factored_2nd path: the factored state's update in float32, the
        denominator elsewhere in the gradient's dtype (not in Fisher decay's scale, which reads the
        float32 one)."""
        reads = {n.attr for n in walk_nodes(value) if n.op == Op.VAR}
        if s.target in self.full and s.target in reads:  # its update (ADOPT's init squares the raw gradient)
            def up(n: Node) -> Node:
                if n.op == Op.VAR and n.kind == Kind.ELEMENT:
                    return element("float32", n)
                return Node(n.op, tuple(up(a) for a in n.args), n.kind, n.attr, n.boolean) if n.args else n
            return up(value)
        if s.target in self.full or s.target == self.denom or is_scale(s, self.denom):
            return value

        def cast(n: Node) -> Node:
            if n.op == Op.VAR and n.attr == self.denom:
                return element("cast", n, var("grad"))
            return Node(n.op, tuple(cast(a) for a in n.args), n.kind, n.attr, n.boolean) if n.args else n
        return cast(value)

    def reconstruct(self, name: str) -> list[Stmt]:
        row, col, sign = self.decls[name].factored
        if self.square:
            magnitude = element("square_outer", var(row, Kind.ROW), var(col, Kind.COL), var("grad"))
        else:
            magnitude = element("outer", var(row, Kind.ROW), var(col, Kind.COL))
        if sign is None:
            return [Assign(self.full[name], magnitude, None, "temp")]
        mag = f"{name}_magnitude"
        return [
            Assign(mag, magnitude, None, "temp"),
            Assign(self.full[name], element("where", Node("var", kind=Kind.ELEMENT, attr=sign, boolean=True),
                                            var(mag), element("neg", var(mag))), None, "temp"),
        ]

    def refactor(self, name: str) -> list[Stmt]:
        row, col, sign = self.decls[name].factored
        full, absolute, sums = var(self.full[name]), f"{name}_abs", f"{name}_colsum"
        # factors of the float32 value (a no-op after the upcast; ADOPT's init squares the raw
        # gradient and stores it as float32, as adv_optm does)
        full32 = element("float32", full)
        out: list[Stmt] = []
        if sign is not None:
            out.append(Assign(sign, element("gt", full32, Node("const", attr=0.0), boolean=True), None, "state"))
        total = Node("sum", (var(sums, Kind.COL),), kind=Kind.TENSOR)
        floor = Node("maximum", (total, Node("const", attr=FLOOR)), kind=Kind.TENSOR)
        rowsum, colsum = ("square_rowsum", "square_colsum") if self.square else ("rowsum", "colsum")
        out += [
            Assign(absolute, element("abs", full32), None, "temp"),
            Assign(row, Node(rowsum, (var(absolute),), kind=Kind.ROW), None, "state"),
            Assign(sums, Node(colsum, (var(absolute),), kind=Kind.COL), None, "temp"),
            # d1 >= d2 in the view, so adv_optm's nnmf normalises the column factor
            Assign(col, Node("div", (var(sums, Kind.COL), floor), kind=Kind.COL), None, "state"),
        ]
        return out

    def block(self, stmts: list[Stmt], ready: set[str]) -> tuple[list[Stmt], set[str]]:
        """``stmts`` on full-size temporaries; ``ready``: states whose full-size value is current on
        this path. After a conditional only the states current on both branches are: a later read
        reconstructs from the stored factors, as adv_optm reads its state (ADOPT's first step)."""
        out: list[Stmt] = []
        for s in stmts:
            if isinstance(s, If):
                then, r1 = self.block(s.then, set(ready))
                orelse, r2 = self.block(s.orelse, set(ready))
                out.append(If(s.cond, then, orelse, s.pos))
                ready = r1 & r2
                continue
            reads = {n.attr for n in walk_nodes(s.value) if n.op == Op.VAR} & set(self.full)
            for name in sorted(reads - ready):
                out += self.reconstruct(name)
                if self.second and s.target != name:  # read before its update (ADOPT's v_{t-1})
                    out.append(Assign(self.full[name], element("cast", var(self.full[name]), var("grad")), None,
                                      "temp"))
                ready.add(name)
            target = self.full.get(s.target, s.target)
            role = "temp" if s.target in self.full else s.role
            value = self._second(s, s.value) if self.second else s.value
            out.append(Assign(target, self._rename(value), s.pos, role))
            if s.target in self.full:
                out += self.refactor(s.target)
                ready.add(s.target)
        return out, ready


def _before_orthograd(stmts: list[Stmt]) -> int:
    """Where the upcast goes in the block that writes the parameter: just before its OrthoGrad
    (after Kourkoutas' raw pooling), or at its start."""
    return next((i for i, s in enumerate(stmts) if is_orthograd_block(s)), 0)


def _conjuncts(n: Node | None) -> list[Node]:
    if n is None:
        return []
    return [c for a in n.args for c in _conjuncts(a)] if n.op == Op.AND else [n]


def _common_view(program: Program, decls: list[StateDecl]) -> Node | None:
    """The one matrix-view condition that every state of ``decls`` is conditioned on (a conjunct of
    each one's condition: AdaMuon's v exists only for the parameters it steps as (rows, -1)), if any."""
    common = None
    for d in decls:
        conds = [c for c, _ in program.matrix_views if c in _conjuncts(d.cond)]
        if len(conds) != 1 or common is not None and conds[0] != common:
            return None
        common = conds[0]
    return common


def _all_viewed(program: Program, second: list[StateDecl], crossing: list[StateDecl]) -> bool:
    """Whether every factored_2nd state crosses views and exists only under a matrix view: the
    square view's path would then factor nothing, and is not built."""
    return len(crossing) == len(second) and _common_view(program, crossing) is not None


def _assume(stmts: list[Stmt], cond: Node) -> list[Stmt]:
    """``stmts`` for parameters where ``cond`` holds: a conditional on it keeps its taken branch."""
    out: list[Stmt] = []
    for s in stmts:
        if isinstance(s, If):
            if s.cond == cond:
                out += _assume(s.then, cond)
                continue
            s = If(s.cond, _assume(s.then, cond), _assume(s.orelse, cond), s.pos)
        out.append(s)
    return out


def _under_view(program: Program, crossing: list[StateDecl]) -> tuple[Node, list[Stmt]]:
    """The condition of the parameters stepped as another matrix view whose any_view states are
    factored on the square view, and the body they run (simplified for the view's own condition
    where all those states share one)."""
    common = _common_view(program, crossing)
    if common is not None:
        return Node("and", (_shaped(), common), boolean=True), _assume(program.body, common)
    conds = tuple(c for c, _ in program.matrix_views)
    viewed = conds[0] if len(conds) == 1 else Node("or", conds, boolean=True)
    return Node("and", (_shaped(), viewed), boolean=True), program.body


def _second_on(requested: Node, where: Node) -> Node:
    """factored_2nd's own path: on, the whole factoring not requested, and ``where``."""
    return Node("and", (Node("not", (requested,), boolean=True),
                        Node("and", (flag("factored_2nd"), where), boolean=True)), boolean=True)


def _apply(program: Program) -> Program:
    decls = [d for d in program.state if d.factored is not None]
    if not decls:
        raise FeatureError("feature 'factored' needs a per-element state with a 'factored: {row, col}' form")
    taken = {d.name for d in program.state}
    for d in decls:
        for name in d.factored:
            if name is not None and name in taken:
                raise FeatureError(f"state '{d.name}': factored state name '{name}' is already a state")
            taken.add(name)
    taken |= names_in(program)
    # adv_optm's state_precision API (AdamW, Adopt, SignSGD) keeps every state in float32 and
    # upcasts the gradient once factored states are requested; with only nnmf_factor (Lion), the
    # parameters it does not factor keep their dtype.
    precision_api = "state_precision" in dict(program.hypers)
    requested = _requested(precision_api)
    # what keeps the dense states in float32 and upcasts their gradient: the request, or (a spec
    # whose nnmf_alias is off: Muon's aux AdamW) state_precision='factored' alone, nnmf_factor
    # then factoring the matrices only
    dense_request = requested if aliased(program) else _factored_precision()
    view = Node("and", (requested, _shaped()), boolean=True)
    fact = _Factoring(decls, taken)
    factored, _ = fact.block(program.body, set())
    # the upcast goes where adv_optm upcasts: right before OrthoGrad, after Kourkoutas' raw-gradient
    # pooling, or at the start (before Muon's MARS); ADOPT's init-only step squares the raw
    # gradient first. A spec that upcasts earlier (Lion_Prodigy before its clip) says so itself.
    # only for parameters that keep one of the factored states (not Muon's aux-Adam parameters)
    cast: list[Stmt] = [Assign("grad", element("float32", var("grad")), None, "grad")]
    conds = [d.cond for d in decls]
    if all(c is not None for c in conds):
        either = conds[0] if len(conds) == 1 else Node("or", tuple(conds), boolean=True)
        cast = [If(either, cast, [])]
    upcast = placed(at_start_of_param_block(cast, True), _before_orthograd)
    dense_body = program.body
    factored, ok = edit_nested(factored, upcast)
    if precision_api:
        dense_cast = cast if dense_request is requested else [If(dense_request, cast, [])]
        dense_body, ok = edit_nested(dense_body, placed(at_start_of_param_block(dense_cast, True), _before_orthograd))
    if not ok:
        raise FeatureError("feature 'factored' needs a 'param = ...' statement")
    otherwise: list[Stmt] = program.body
    second = [d for d in decls if d.factored[2] is None]
    view2 = view2x = None
    crossing: list[StateDecl] = []
    # Parameters the spec steps as another view (AdaMuon orthogonalises the (rows, -1) matrix)
    # keep their view: their states declared any_view are factored on the square view through the
    # square_* ops (adv_optm factors AdaMuon's v so), the others stay dense. A spec whose
    # published class accepts only False builds no path.
    spec2 = dict(program.hypers).get("factored_2nd")
    if spec2 is not None and spec2.choices != [False] and second:
        # adv_optm's factored_2nd: only the second moments factored, the rest dense, no upcast
        denom = role_target(program, "denominator", "denom")
        rest: list[Stmt] = program.body
        crossing = [d for d in second if d.factored_any_view] if program.matrix_views else []
        if crossing:
            under, body_x = _under_view(program, crossing)
            fact2x = _Factoring(crossing, taken, second=True, denom=denom, square=True)
            factored2x, _ = fact2x.block(body_x, set())
            rest = [If(under, factored2x, program.body)]
            view2x = _second_on(requested, under)
        if not _all_viewed(program, second, crossing):
            fact2 = _Factoring(second, taken, second=True, denom=denom)
            factored2, _ = fact2.block(program.body, set())
            shaped2 = _shaped()
            for cond, _ in program.matrix_views:
                shaped2 = Node("and", (shaped2, Node("not", (cond,), boolean=True)), boolean=True)
            rest = [If(shaped2, factored2, rest)]
            view2 = _second_on(requested, shaped2)
            for d in second:
                view2 = _and(d.cond, view2)
        otherwise = [If(flag("factored_2nd"), rest, program.body)]
    body = [If(requested, [If(_shaped(), factored, dense_body)], otherwise)]
    state: list[StateDecl] = []
    for d in program.state:
        if d.factored is None:
            state.append(d)
            continue
        row, col, sign = d.factored
        own_view = view
        if view2 is not None and sign is None:
            own_view = Node("or", (own_view, view2), boolean=True)
        crosses = view2x is not None and d.name in {c.name for c in crossing}
        if crosses:
            own_view = Node("or", (own_view, view2x), boolean=True)
        on = _and(d.cond, own_view)
        dense = Node("not", (own_view,), boolean=True)
        # adv_optm keeps the dense states of parameters it does not factor in float32 too
        state.append(StateDecl(d.name, d.kind, d.init, d.dtype, _and(d.cond, dense), d.doc,
                               dtype_when=(dense_request, "float32") if precision_api else None))
        # factors on the square view whatever view the parameter is stepped as (the same shape
        # where it is stepped as the square one)
        square = "square" if crosses else None
        state.append(StateDecl(row, Kind.ROW, "zeros", "float32", on, f"per-row factor of |{d.name}|", view=square))
        state.append(StateDecl(col, Kind.COL, "zeros", "float32", on, f"per-column factor of |{d.name}|",
                               view=square))
        if sign is not None:
            state.append(StateDecl(sign, Kind.ELEMENT, "zeros", "bits", on, f"sign of {d.name}, 1 bit per element"))
    views = [(view, "square")] + ([(view2, "square")] if view2 is not None else [])
    return program.copy(body=body, state=state, matrix_views=[*views, *program.matrix_views])


FEATURE = Feature(
    name="factored",
    doc="SMMF-style rank-1 factored states with a 1-bit packed sign over the closest-to-square reshape (adv_optm).",
    transform=_apply,
    # a spec with adv_optm's state_precision API declares it (choices: auto, factored)
    hyperparameters={
        "nnmf_factor": HyperparameterSpec(default=False, type="bool", doc="legacy alias of state_precision='factored'"),
        "vector_reshape": HyperparameterSpec(default=False, type="bool",
                                             doc="factor 1-D parameters too (as a closest-to-square matrix)"),
    },
)
