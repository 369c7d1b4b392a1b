"""``spectral_decay``: Adams' spectral weight decay (adams-torch 0.0.1; math/torch-adams-adamw-family.md §1.3).

Matrices (the last two dims; leading dims are batch dims) decay along their top singular direction,
estimated by one power-iteration step per update from a persistent ``u`` (a per-row state,
initialised to ones, so an all-zero matrix never recovers it)::

    v = normalize(W^T u); wv = W v; u = normalize(wv); s = dot(u, wv); sigma = s
    param = param - sqrt(M) * lr * weight_decay * outer(s * u, v)

Parameters without spectral state (0-D, 1-D, ``(M, 1)``, ``(1, N)``, and those with
``param.use_spectral_decay = False``, read when the state is made) decay as
``param * (1 - lr * scalar_vector_weight_decay)``. ``weight_decay != 0`` gates both decays, as in
Adams. The block runs on the pre-update parameter: in place of the base's decoupled decay (role
``decay``, one statement per path) where the base has one, else at the start of the statements
that write the parameter (before the moments, as Adams does). Its temporaries take names the spec
does not use; a spec must not declare states ``u`` or ``sigma`` itself.
"""

from __future__ import annotations

from optgen.errors import Position
from optgen.features import Feature
from optgen.features.rewrite import (
    FeatureError,
    at_start_of_param_block,
    edit_nested,
    fresh,
    is_var,
    renamed,
    rewrite_role,
    role_sites,
)
from optgen.ir.nodes import Assign, Kind, Program, StateDecl, Stmt, walk_stmts
from optgen.ir.ops import Op
from optgen.spec.model import HyperparameterSpec

SPECTRAL = "ndim >= 2 and rows != 1 and cols != 1 and param_attr('use_spectral_decay', true)"


def _is_decay(s: Assign) -> bool:
    """``s`` decays the parameter by a host factor: ``param + s * param`` or ``param * (1 - s)``."""
    v = s.value
    if s.target != "param" or not v.args:
        return False
    if v.op == Op.AXPY:
        return is_var(v.args[0], "param") and is_var(v.args[1], "param") and v.args[2].is_host
    if v.op == Op.MUL and len(v.args) == 2:
        k = v.args[1] if is_var(v.args[0], "param") else v.args[0] if is_var(v.args[1], "param") else None
        return k is not None and k.is_host
    return False


def _block(program: Program, state: list[StateDecl]) -> list[Stmt]:
    """The decay block, lowered like spec statements (so it is the IR Adams' spec wrote)."""
    from optgen.ir.lower import Lowerer
    from optgen.spec.expr import parse_assignment, parse_expression
    from optgen.spec.loader import SAssign, SIf

    here = Position("<feature spectral_decay>", 1, 1)
    taken: set[str] = set()
    final, placeholder = {}, {}
    for n in ("v", "wv", "s"):
        final[n] = fresh(program, n, taken)  # Adams' names where the spec does not use them
        placeholder[n] = fresh(program, f"spectral_{n}", taken | set(final.values())).lstrip("_") + "x"
        taken |= {final[n], placeholder[n]}
    v, wv, s = placeholder["v"], placeholder["wv"], placeholder["s"]

    def stmt(text: str) -> SAssign:
        target, expr, pos, acc = parse_assignment(text, here, "spectral_decay")
        return SAssign(target, expr, pos, "spectral_decay", acc)

    spectral = [
        stmt(f"{v} = normalize(matvec_t(param, u))"),
        stmt(f"{wv} = matvec(param, {v})"),
        stmt(f"u = normalize({wv})"),
        stmt(f"{s} = dot(u, {wv})"),
        stmt(f"sigma = {s}"),
        stmt(f"param = param - rows ** 0.5 * lr * weight_decay * outer({s} * u, {v})"),
    ]
    vector = [stmt("param = param * (1 - lr * scalar_vector_weight_decay)")]
    inner = SIf(parse_expression("has(u)", here, "spectral_decay"), spectral, vector, None, "spectral_decay")
    outer = SIf(parse_expression("weight_decay != 0", here, "spectral_decay"), [inner], [], None, "spectral_decay")
    lw = Lowerer(program.source, program.hypers, state, program.step_store,
                 tuple(g.name for g in program.globals), tuple(a.name for a in program.accumulators),
                 program.slice_stride)
    # lowered under placeholder names (a spec cannot write '_' names), then renamed
    rename = {placeholder[n]: final[n] for n in final}
    return renamed(lw.statements([outer]), rename)


def _apply(program: Program) -> Program:
    for name in ("u", "sigma"):
        if any(d.name == name for d in program.state):
            raise FeatureError(f"feature 'spectral_decay' keeps state '{name}': the spec declares one too")
    if "lr" not in dict(program.hypers):
        raise FeatureError("feature 'spectral_decay' decays by lr * weight_decay: the spec needs a hyperparameter 'lr'")
    from optgen.ir.lower import Lowerer
    from optgen.spec.expr import parse_expression

    lw = Lowerer(program.source, program.hypers, program.state, program.step_store)
    cond = lw.expr(parse_expression(SPECTRAL, Position("<feature spectral_decay>", 1, 1), "spectral_decay"),
                   "spectral_decay")
    state = [*program.state,
             StateDecl("u", Kind.ROW, "ones", "param", cond, "left singular vector estimate of each matrix"),
             StateDecl("sigma", Kind.MATRIX, "zeros", "param", cond, "top singular value estimate (for inspection)")]
    block = _block(program, state)
    match = role_sites(program, "decay", _is_decay)
    has_decay = any(isinstance(s, Assign) and match(s) for s in walk_stmts(program.body))
    if has_decay:  # in place of the base's decoupled decay, on each path
        body = rewrite_role(program, program.body, "spectral_decay", "decay", _is_decay,
                            lambda s: block if _is_decay(s) else None,
                            "a decoupled decay 'param = param + s * param' or 'param = param * (1 - s)'", many=True)
    else:
        body, ok = edit_nested(program.body, at_start_of_param_block(block))
        if not ok:
            raise FeatureError("feature 'spectral_decay' needs a statement that writes the parameter")
    return program.copy(body=body, state=state)


FEATURE = Feature(
    name="spectral_decay",
    doc="Spectral weight decay (Adams): sqrt(M) * lr * wd * sigma u v^T from one power-iteration step, "
        "decoupled L2 for non-matrices.",
    transform=_apply,
    hyperparameters={
        "weight_decay": HyperparameterSpec(default=0.1, min=0, doc="spectral decay of matrices; 0 switches every "
                                           "decay off", message="Invalid weight_decay value: {value}"),
        "scalar_vector_weight_decay": HyperparameterSpec(
            default=0.1, min=0, doc="decoupled L2 decay of params without spectral state",
            message="Invalid scalar_vector_weight_decay value: {value}"),
    },
    # it replaces the base's decay first: cautious_wd then masks the vector decay, fisher_wd finds
    # no axpy decay left (an error, not a silent double decay)
    before=("cautious_wd", "fisher_wd"),
)
