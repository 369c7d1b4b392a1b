"""Human-readable text of IR expressions and statements (for ``optgen show`` and docstrings)."""

from __future__ import annotations

from optgen.ir.nodes import Assign, If, Node, Stmt
from optgen.ir.ops import Op

_INFIX = {"add": ("+", 5), "sub": ("-", 5), "mul": ("*", 6), "div": ("/", 6), "pow": ("**", 8), "mod": ("%", 6)}
_CMP = {"eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}


#: (hyperparameter, index) -> the name its ``as:`` list gives it, e.g. ("betas", 0) -> "beta1"
ALIASES: dict[tuple[str, int], str] = {}


def set_aliases(hypers) -> None:
    """Print tuple hyperparameters by their ``as:`` names (``beta1`` rather than ``betas[0]``)."""
    ALIASES.clear()
    for name, h in hypers:
        for i, alias in enumerate(h.as_ or ()):
            ALIASES[(name, i)] = alias


def _scaled(base: str, scale: Node, rest: str) -> str:
    if scale.op == Op.NEG:
        return f"{base} - {expr_text(scale.args[0], 6)} * {rest}"
    if scale.op == Op.CONST and scale.attr == -1:
        return f"{base} - {rest}"
    if scale.op == Op.CONST and scale.attr == 1:
        return f"{base} + {rest}"
    return f"{base} + {expr_text(scale, 6)} * {rest}"


def expr_text(n: Node, parent: int = 0) -> str:
    op = n.op
    if op == Op.CONST:
        return repr(n.attr)
    if op == Op.VAR:
        return n.attr
    if op == Op.HYPER:
        name, idx = n.attr
        if idx is None:
            return name
        return ALIASES.get((name, idx), f"{name}[{idx}]")
    if op == Op.STEP:
        return "step"
    if op == Op.META:
        return n.attr
    if op == Op.HAS:
        return f"has({n.attr})"
    if op == Op.PARAM_ATTR:
        return f"param_attr({n.attr[0]!r}, {n.attr[1]!r})"
    a = n.args
    if op in _INFIX:
        sym, p = _INFIX[op]
        s = f"{expr_text(a[0], p)} {sym} {expr_text(a[1], p + 1)}"
    elif op in _CMP:
        p = 4
        s = f"{expr_text(a[0], p + 1)} {_CMP[op]} {expr_text(a[1], p + 1)}"
    elif op in (Op.AND, Op.OR):
        p = 2 if op == Op.AND else 1
        s = f" {op} ".join(expr_text(x, p + 1) for x in a)
    elif op == Op.NOT:
        p = 3
        s = f"not {expr_text(a[0], p)}"
    elif op == Op.NEG:
        p = 7
        s = f"-{expr_text(a[0], p)}"
    elif op == Op.RDIV:
        p = 6
        s = f"{expr_text(a[1], p)} / {expr_text(a[0], p + 1)}"
    elif op == Op.RMOD:
        p = 6
        s = f"{expr_text(a[1], p)} % {expr_text(a[0], p + 1)}"
    elif op == Op.SDIV:  # a host scalar truly divided by a device value
        return f"div({expr_text(a[1])}, {expr_text(a[0])})"
    elif op == Op.RSUB:
        p = 5
        s = f"{expr_text(a[1], p)} - {expr_text(a[0], p + 1)}"
    elif op == Op.AXPY:
        p = 5
        s = _scaled(expr_text(a[0], p), a[2], expr_text(a[1], 7))
    elif op in (Op.ADDCMUL, Op.ADDCDIV):
        p = 5
        sym = "*" if op == Op.ADDCMUL else "/"
        s = _scaled(expr_text(a[0], p), a[3], f"{expr_text(a[1], 7)} {sym} {expr_text(a[2], 7)}")
    else:
        return f"{op}({', '.join(expr_text(x) for x in a)})"
    return f"({s})" if p < parent else s


def stmts_text(stmts: list[Stmt], indent: str = "", hide_slots: bool = True) -> list[str]:
    out: list[str] = []
    for s in stmts:
        if isinstance(s, If):
            out.append(f"{indent}if {expr_text(s.cond)}:")
            out.extend(stmts_text(s.then, indent + "    ", hide_slots) or [indent + "    pass"])
            if s.orelse:
                out.append(f"{indent}else:")
                out.extend(stmts_text(s.orelse, indent + "    ", hide_slots))
        elif isinstance(s, Assign):
            tag = "" if not s.value.is_host else "  # host"
            op = "+=" if s.role == "accumulate" else "="
            out.append(f"{indent}{s.target} {op} {expr_text(s.value)}{tag}")
    return out
