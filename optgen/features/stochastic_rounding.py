"""``stochastic_rounding``: bf16 parameters written once, stochastically rounded (adv_optm).

For bfloat16 parameters (and the flag on), the parameter writes at the end of the step (decay and
update) run on float32 copies of the parameter and of the update, and the result is rounded to
bfloat16 once, by adding 16 random low bits and truncating (math/adv-optm.md §2.2 steps 3-7, §2.3).
The torch and reference backends draw adv_optm's exact random stream (a generator per device,
seeded 42 at construction), so they match it bit for bit; the triton backend uses Philox numbers
in the kernel (the same distribution, another stream). Other dtypes are untouched.

No role of its own: the parameter writes are found by structure (the statement lists that write
``param``, one per path), and the direction taken in float32 is the target of ``step_size`` (else
``direction``, else the dialect's ``update``) where the writes read it. Its float32 copies are
temporaries with fresh names.
"""

from __future__ import annotations

from optgen.features import Feature
from optgen.features.rewrite import (
    FeatureError,
    edit_every,
    flag,
    fresh,
    replace_assigns,
    role_target,
    substitute,
    var,
)
from optgen.ir.nodes import Assign, If, Kind, Node, Program, Stmt, walk_nodes, walk_stmts
from optgen.ir.ops import Op
from optgen.spec.model import HyperparameterSpec

FLAG = "stochastic_rounding"
P32, U32 = "param_fp32", "update_fp32"  # the copies' names where the spec does not use them


def _writes_param(s: Stmt) -> bool:
    if isinstance(s, Assign):
        return s.target == "param"
    return any(_writes_param(x) for x in s.then + s.orelse)


def _reads(stmts: list[Stmt], name: str) -> bool:
    return any(isinstance(s, Assign) and any(n.op == Op.VAR and n.attr == name for n in walk_nodes(s.value))
               for s in walk_stmts(stmts))


def _in_fp32(upd: str, p32: str, u32: str):
    """An edit: in the statement list holding the last parameter write, the writes from the first
    one on in fp32, then one stochastic rounding (None where no parameter write is direct)."""
    def to_fp32(n: Node) -> Node | None:
        if n.op == Op.VAR and n.attr in ("param", upd):
            return var(p32 if n.attr == "param" else u32)
        return None

    def retarget(s: Assign) -> list[Stmt]:
        target, role = (p32, "temp") if s.target == "param" else (s.target, s.role)
        return [Assign(target, substitute(s.value, to_fp32), s.pos, role)]

    def edit(stmts: list[Stmt]) -> list[Stmt] | None:
        writes = [i for i, s in enumerate(stmts) if _writes_param(s)]
        direct = [i for i in writes if isinstance(stmts[i], Assign)]
        if not direct:
            return None
        first, last = writes[0], direct[-1]
        segment = stmts[first:last + 1]
        copies = [Assign(p32, Node("float32", (var("param"),), kind=Kind.ELEMENT), None, "temp")]
        if _reads(segment, upd):
            copies.append(Assign(u32, Node("float32", (var(upd),), kind=Kind.ELEMENT), None, "temp"))
        on = [
            *copies,
            *replace_assigns(segment, retarget)[0],
            Assign("param", Node("stochastic_round", (var(p32), Node("step")), kind=Kind.ELEMENT), None, "param"),
        ]
        cond = Node("and", (flag(FLAG), Node("ne", (Node("meta", attr="bf16"), Node("const", attr=0)), boolean=True)),
                    boolean=True)
        return [*stmts[:first], If(cond, on, segment), *stmts[last + 1:]]

    return edit


def _apply(program: Program) -> Program:
    upd = role_target(program, "step_size", role_target(program, "direction", "update"))
    p32 = fresh(program, P32)
    u32 = fresh(program, U32, {p32})
    body, ok = edit_every(program.body, _in_fp32(upd, p32, u32))
    if not ok:
        raise FeatureError("feature 'stochastic_rounding' needs a 'param = ...' statement")
    return program.copy(body=body)


FEATURE = Feature(
    name="stochastic_rounding",
    doc="bf16 params: decay and update in float32, then one stochastic rounding to bf16 (adv_optm).",
    transform=_apply,
    hyperparameters={FLAG: HyperparameterSpec(default=True, type="bool",
                                              doc="round bf16 params stochastically (float32 math for the write)")},
)
