"""``spectral_normalization``: adv_optm 2.5.16's spectral normalisation of the update
(``util/scaled_optm.py::scale_update``; math/adv-optm.md §2.11).

With the flag on, the step-size application (role ``step_size``: ``u = u * s`` or ``u = s * u``, s a
host value) becomes, for a parameter with 2 or more dims (the matrix ``U`` of its ``(shape[0], -1)``
view, cast to the parameter's dtype), one power-iteration step from the persistent
``spectral_u`` (per row) and ``spectral_v`` (per column)::

    v' = U^T u;  v = v' / max(||v'||, 1e-8) where ||v'|| >= 1e-6, else the old v
    u' = U v;    u = u' / max(||u'||, 1e-8) where ||u'|| >= 1e-6, else the old u
    sigma = <u, u'>
    U = U * (s * (sqrt(d_out / d_in) / max(sigma, 1 / (sqrt(d_out) + sqrt(d_in)))))

and for 0-D and 1-D parameters ``u = u * (s / max(||u||_inf, 1e-12))``. ``s`` is the statement's
own host factor: listed before ``atan2``, the feature leaves the 4/pi that atan2 multiplies into the
other path's step size out, as adv_optm leaves ``A`` out under spectral normalisation. The states are drawn at state
creation with ``randn`` from adv_optm's per-device stream (``spectral_v`` first) in the
parameter's dtype, each over ``(||x|| + 1e-12)``, for the parameters with 2 or more dims that take
the step-size statement's path (the static conditions around it: Muon's matrices); parameters of 3 or more dims are stepped as
their ``(shape[0], -1)`` view while the flag is on. The products are ``mv_t`` and ``mv`` (torch.mv's
rounding in the update's memory layout, which the einsums of ``matvec_t``/``matvec`` have not); the norms and
the dot product are the whole-vector ``norm`` and ``vdot``. The OFT and DoRA/LoRA cases of
``scale_update`` (PEFT parameter attributes) are not reproduced.

List it before ``stochastic_rounding``, ``factored`` and ``state_precision``. The states keep adv_optm's names: a spec must not declare them; the paths that take the
feature share them (Muon_adv's matrices and, by its block's features, its aux AdamW).
"""

from __future__ import annotations

from dataclasses import replace

from optgen.errors import Position
from optgen.features import Feature
from optgen.features.rewrite import fresh, is_static, is_var, own_state, renamed, rewrite_role, switch
from optgen.ir.nodes import Assign, If, Kind, Node, Program, StateDecl, Stmt
from optgen.ir.ops import Op
from optgen.spec.model import HyperparameterSpec

FLAG = "spectral_normalization"
STATES = ("spectral_v", "spectral_u")  # in adv_optm's drawing order (v first)
#: the state init: randn from adv_optm's stream in the parameter's dtype, over (norm + 1e-12)
INIT = "unit_randn"
HERE = Position("<feature spectral_normalization>", 1, 1)


def _host_factor(s: Assign) -> Node | None:
    """The host factor ``s`` of a step-size statement ``u = u * s`` / ``u = s * u``, or None."""
    v = s.value
    if v.op != Op.MUL or len(v.args) != 2:
        return None
    if is_var(v.args[0], s.target) and v.args[1].is_host:
        return v.args[1]
    if is_var(v.args[1], s.target) and v.args[0].is_host:
        return v.args[0]
    return None


def _block(program: Program, state: list[StateDecl], target: str, factor: Node) -> list[Stmt]:
    """The normalisation of ``target`` by the host ``factor``, lowered like spec statements."""
    from optgen.ir.lower import Lowerer
    from optgen.spec.expr import parse_assignment, parse_expression
    from optgen.spec.loader import SAssign, SIf

    taken: set[str] = set()
    final, placeholder = {}, {}
    for n in ("lr", "x", "vr", "vn", "ur", "un", "sigma"):
        final[n] = fresh(program, f"spectral_{n}", taken)
        # lowered under names a spec cannot clash with, then renamed (a spec cannot write '_' names)
        placeholder[n] = f"snz{n}placeholder"
        taken.add(final[n])
    upd = "snzupdateplaceholder"
    p = placeholder

    def stmt(text: str) -> SAssign:
        t, expr, pos, acc = parse_assignment(text, HERE, FLAG)
        return SAssign(t, expr, pos, FLAG, acc)

    matrix = [
        stmt(f"{p['x']} = cast({upd}, param)"),
        stmt(f"{p['vr']} = mv_t({p['x']}, spectral_u)"),
        stmt(f"{p['vn']} = norm({p['vr']})"),
        stmt(f"spectral_v = where({p['vn']} >= 1.0e-6, {p['vr']} / maximum({p['vn']}, 1.0e-8), spectral_v)"),
        stmt(f"{p['ur']} = mv({p['x']}, spectral_v)"),
        stmt(f"{p['un']} = norm({p['ur']})"),
        stmt(f"spectral_u = where({p['un']} >= 1.0e-6, {p['ur']} / maximum({p['un']}, 1.0e-8), spectral_u)"),
        stmt(f"{p['sigma']} = vdot(spectral_u, {p['ur']})"),
        stmt(f"{upd} = {p['x']} * ({p['lr']} * (sqrt(rows / cols) / maximum({p['sigma']}, "
             f"1 / (sqrt(rows) + sqrt(cols)))))"),
    ]
    vector = [stmt(f"{upd} = {upd} * ({p['lr']} / maximum(maxabs({upd}), 1.0e-12))")]
    head = [stmt(f"{p['lr']} = lr"), stmt(f"{upd} = copy(param)")]  # placeholders: their values are replaced
    body = [*head, SIf(parse_expression("ndim >= 2", HERE, FLAG), matrix, vector, None, FLAG)]
    lw = Lowerer(program.source, program.hypers, state, program.step_store,
                 tuple(g.name for g in program.globals), tuple(a.name for a in program.accumulators),
                 program.slice_stride)
    lowered = lw.statements(body)
    rename = {**{placeholder[n]: final[n] for n in final}, upd: target}
    lr_stmt = Assign(final["lr"], factor, None, "temp")
    return [lr_stmt, *renamed(lowered[2:], rename)]


def _path(program: Program, match) -> Node | None:
    """The static conditions around the step-size statement (Muon's matrix path: ``is_muon``), as
    one condition (None: none); conditions that change with the step (Adopt's ``step > 1``) are left out."""
    found: list[list[Node]] = []

    def walk(stmts: list[Stmt], conds: list[Node]) -> None:
        for st in stmts:
            if isinstance(st, If):
                keep = is_static(st.cond, program)
                walk(st.then, [*conds, st.cond] if keep else conds)
                walk(st.orelse, [*conds, Node("not", (st.cond,), boolean=True)] if keep else conds)
            elif match(st) and _host_factor(st) is not None:
                found.append(conds)

    walk(program.body, [])
    if len(found) != 1 or not found[0]:
        return None
    out = found[0][0]
    for c in found[0][1:]:
        out = Node("and", (out, c), boolean=True)
    return out


def _apply(program: Program) -> Program:
    # the states of an earlier application (a block's: Muon_adv's aux AdamW) are shared, adv_optm's
    # keys on every path that normalises; any other declaration of the names is the spec's
    shared = {d.name: d for d in program.state if d.name in STATES and d.init == INIT}
    if len(shared) != len(STATES):
        own_state(program, FLAG, *STATES)
    from optgen.features.rewrite import role_sites
    from optgen.ir.lower import Lowerer
    from optgen.spec.expr import parse_expression

    lw = Lowerer(program.source, program.hypers, program.state, program.step_store)
    cond = lw.expr(parse_expression(f"{FLAG} and ndim >= 2", HERE, FLAG), FLAG)
    legacy = lambda s: s.target == "update" and _host_factor(s) is not None  # noqa: E731
    path = _path(program, role_sites(program, "step_size", legacy))
    if path is not None:  # the states exist where the parameter takes the step's path
        cond = Node("and", (cond, path), boolean=True)
    decls = [StateDecl("spectral_v", Kind.COL, INIT, "param", cond,
                       "right singular vector estimate of the update (spectral normalisation)"),
             StateDecl("spectral_u", Kind.ROW, INIT, "param", cond,
                       "left singular vector estimate of the update (spectral normalisation)")]
    if len(shared) == len(STATES):  # one declaration: it exists where either path normalises
        merged = {d.name: replace(shared[d.name], cond=Node("or", (shared[d.name].cond, cond), boolean=True))
                  for d in decls}
        state = [merged.get(d.name, d) for d in program.state]
    else:
        state = [*program.state, *decls]

    def scale(s: Assign):
        factor = _host_factor(s)
        if factor is None:
            return None
        return [switch(FLAG, _block(program, state, s.target, factor), [s], s.pos)]

    body = rewrite_role(program, program.body, FLAG, "step_size", legacy, scale, "a step size 'update = update * step_size' (a host step size)")
    view = lw.expr(parse_expression(f"{FLAG} and ndim >= 3", HERE, FLAG), FLAG)
    return program.copy(body=body, state=state, matrix_views=[*program.matrix_views, (view, "rows")])


FEATURE = Feature(
    name=FLAG,
    doc="adv_optm's spectral normalisation: the step size applied as s * sqrt(d_out/d_in) / sigma from one "
        "power-iteration step on the update (s / max|u| for vectors).",
    transform=_apply,
    hyperparameters={
        FLAG: HyperparameterSpec(default=False, type="bool",
                                 doc="scale the update by its spectral norm (one power-iteration step) instead "
                                     "of the step size alone"),
    },
    # listed before atan2, atan2 scales the step size of the other path only (adv_optm's AdamW_adv
    # leaves its 4/pi out under spectral normalisation); after it, the normalised step keeps it
    # (the aux AdamW of Muon_adv)
    before=("stochastic_rounding", "factored", "state_precision"),
)
