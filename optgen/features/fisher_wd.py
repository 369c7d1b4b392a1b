"""``fisher_wd``: adv_optm's Fisher weight decay (FAdam-style), a per-element decay scale.

The decoupled decay ``param + s * param`` (``s = -(wd * lr)``) becomes
``addcmul(param, param, (wd * lr) * fisher, value=-1)`` with the scale from this step's
denominator (math/adv-optm.md §2.10): ``fisher = 1 / denom`` divided by ``max(rms(param * fisher), 1)``,
or, where the spec has ``use_atan2`` and it is on, ``fisher = 4/pi * atan2(wd_scaler, denom)``
(``wd_scaler`` is adv_optm's stored 1.0). List it before ``cautious_wd``, which then masks the
scale.

Roles: ``decay`` (one statement per path, ``param + (-(rate)) * param``; undeclared: every such
decay of the parameter) and ``denominator`` (its target is the scale's divisor; undeclared, the
dialect's ``denom``). The scale is a temporary with a fresh name; ``wd_scaler`` is adv_optm's
state key (the spec must not declare it).
"""

from __future__ import annotations

import math

from optgen.features import Feature
from optgen.features.rewrite import flag, fresh, is_var, own_state, rewrite_role, role_target, switch, var
from optgen.ir.nodes import Assign, If, Kind, Node, Program, StateDecl, Stmt
from optgen.ir.ops import Op
from optgen.spec.model import HyperparameterSpec

FLAG = "fisher_wd"
SCALER = "wd_scaler"


def _e(op: str, *args: Node, **kw) -> Node:
    return Node(op, args, kind=Kind.ELEMENT, **kw)


def _t(op: str, *args: Node) -> Node:
    return Node(op, args, kind=Kind.TENSOR)


def _scale(f_name: str, denom: str, with_atan2: bool, param: str = "param") -> list:
    f, one = var(f_name), Node("const", attr=1.0)
    rms = _t("sqrt", _t("mean", _e("pow", _e("mul", var(param), f), Node("const", attr=2))))
    clipped = [
        Assign(f_name, _e("rdiv", var(denom), Node("const", attr=1)), None, "temp"),
        Assign(f_name, _e("div", f, _t("maximum", _t("div", rms, one), one)), None, "temp"),
    ]
    if not with_atan2:
        return clipped
    angle = _e("mul", _e("atan2", var(SCALER, Kind.TENSOR), var(denom)), Node("const", attr=4 / math.pi))
    return [If(flag("use_atan2"), [Assign(f_name, angle, None, "temp")], clipped)]


def fisher_scale(program: Program, name: str) -> list:
    """The statements that compute the (unscaled) Fisher decay scale of ``program`` into ``name``
    (feature centered_wd's, which scales its decay by it too)."""
    return _scale(name, role_target(program, "denominator", "denom"), "use_atan2" in dict(program.hypers))


def is_scale(s: Assign, denom: str) -> bool:
    """Whether ``s`` is this feature's scale read from the denominator ``denom`` (``1 / denom`` or
    ``4/pi * atan2(wd_scaler, denom)``; feature ``factored`` keeps it in float32, as adv_optm does)."""
    v = s.value
    if s.role != "temp" or s.pos is not None:
        return False
    if v.op == Op.RDIV:
        return is_var(v.args[0], denom) and v.args[1] == Node("const", attr=1)
    return v.op == Op.MUL and v.args[0].op == Op.ATAN2 and is_var(v.args[0].args[0], SCALER) \
        and is_var(v.args[0].args[1], denom)


def _apply(program: Program) -> Program:
    own_state(program, "fisher_wd", SCALER)
    with_atan2 = "use_atan2" in dict(program.hypers)
    denom = role_target(program, "denominator", "denom")
    f_name = fresh(program, "fisher")
    # the parameter as stored, for the scale's RMS: adv_optm reads p itself (a bf16 product and mean
    # on bf16 parameters), where feature stochastic_rounding later renames the writes' reads to fp32
    p_name = fresh(program, "fisher_param", {f_name})
    made: list[If] = []

    def decay(s: Assign):
        v = s.value
        if v.op == Op.AXPY and is_var(v.args[0], "param") and is_var(v.args[1], "param") and v.args[2].op == Op.NEG:
            rate = v.args[2].args[0]  # wd * lr, as adv_optm multiplies it into the scale
            on = [
                *_scale(f_name, denom, with_atan2, p_name),
                Assign(f_name, _e("mul", var(f_name), rate, attr="scalar_first"), s.pos, "temp"),
                Assign("param", Node("addcmul", (v.args[0], v.args[1], var(f_name), Node("const", attr=-1.0)),
                                     kind=v.kind), s.pos, s.role),
            ]
            made.append(switch(FLAG, on, [s], s.pos))
            return [made[-1]]
        return None

    body = rewrite_role(program, program.body, "fisher_wd", "decay", lambda s: s.target == "param", decay,
                        "a decoupled decay 'param = param + (-(wd * lr)) * param'", many=True)
    body = _alias_before(body, {id(x) for x in made}, If(flag(FLAG), [Assign(p_name, var("param"), None, "temp")], []))
    decl = StateDecl(SCALER, Kind.TENSOR, "ones", "float32", flag(FLAG), "Fisher decay's stored scaler (1.0)")
    return program.copy(body=body, state=[*program.state, decl])


def _alias_before(stmts: list[Stmt], made: set[int], alias: If) -> list[Stmt]:
    """``alias`` before the first statement holding one of the ``made`` switches, in each list that
    writes the parameter directly (the list feature stochastic_rounding takes to float32 from its
    first parameter write on), so the alias still reads the parameter as stored."""
    def holds(s: Stmt) -> bool:
        return id(s) in made or (isinstance(s, If) and any(holds(x) for x in s.then + s.orelse))

    if any(isinstance(s, Assign) and s.target == "param" for s in stmts):
        i = next((i for i, s in enumerate(stmts) if holds(s)), None)
        return stmts if i is None else [*stmts[:i], alias, *stmts[i:]]
    return [If(s.cond, _alias_before(s.then, made, alias), _alias_before(s.orelse, made, alias), s.pos)
            if isinstance(s, If) and holds(s) else s for s in stmts]


FEATURE = Feature(
    name="fisher_wd",
    doc="Fisher weight decay: the decay scaled per element by 1/denom, RMS-clipped (adv_optm's fisher_wd).",
    transform=_apply,
    before=("cautious_wd",),
    hyperparameters={FLAG: HyperparameterSpec(
        default=False, type="bool", doc="FAdam-style decay scaled by 1/denom (RMS-clipped) or 4/pi atan2(1, denom)")},
)
