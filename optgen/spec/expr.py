"""The expression language of specs, parsed with :mod:`ast` into a small whitelisted tree.

Spec text never reaches ``eval``/``exec``: it is parsed, every node is checked against a
whitelist, and only the resulting tree travels on.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field

from optgen.errors import Position, SpecError


@dataclass(frozen=True)
class Expr:
    pos: Position | None = field(default=None, compare=False, repr=False, kw_only=True)


@dataclass(frozen=True)
class Const(Expr):
    value: float | int | bool | str


@dataclass(frozen=True)
class Name(Expr):
    id: str


@dataclass(frozen=True)
class Unary(Expr):
    op: str  # "neg" | "not"
    operand: Expr


@dataclass(frozen=True)
class Binary(Expr):
    op: str  # + - * / ** %
    left: Expr
    right: Expr


@dataclass(frozen=True)
class Compare(Expr):
    op: str  # == != < <= > >=
    left: Expr
    right: Expr


@dataclass(frozen=True)
class BoolOp(Expr):
    op: str  # and | or
    values: tuple[Expr, ...]


@dataclass(frozen=True)
class Call(Expr):
    func: str
    args: tuple[Expr, ...]


_BINOPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.Pow: "**", ast.Mod: "%"}
_CMPOPS = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">="}
_CONSTANT_NAMES = {"true": True, "false": False, "True": True, "False": False, "None": None, "null": None}
_DESCRIBE = {
    ast.Attribute: "attribute access",
    ast.Subscript: "subscripts",
    ast.Lambda: "lambda",
    ast.IfExp: "conditional expressions (use where(cond, a, b) or an if: block)",
    ast.List: "lists",
    ast.Tuple: "tuples",
    ast.Dict: "dicts",
    ast.Set: "sets",
    ast.ListComp: "comprehensions",
    ast.GeneratorExp: "comprehensions",
    ast.NamedExpr: "':='",
    ast.Await: "await",
    ast.JoinedStr: "f-strings",
    ast.Starred: "starred arguments",
}


def parse_expression(text: str, pos: Position, field_name: str) -> Expr:
    """Parse ``text`` (found at ``pos``) into an :class:`Expr`."""
    tree = _parse(text, "eval", pos, field_name)
    return _convert(tree.body, pos, field_name)


def parse_assignment(text: str, pos: Position, field_name: str) -> tuple[str, Expr, Position, bool]:
    """Parse ``target = expression`` (or ``target += expression``, an accumulation); returns the
    target name, the expression, its position and whether it accumulates."""
    tree = _parse(text, "exec", pos, field_name)
    node = tree.body[0] if len(tree.body) == 1 else None
    if isinstance(node, ast.AugAssign):
        if not isinstance(node.op, ast.Add):
            raise SpecError(_at(pos, node), field_name, "only '+=' (an accumulation) may update a name in place")
        if not isinstance(node.target, ast.Name):
            raise SpecError(_at(pos, node), field_name, "the left-hand side must be a single name")
        _own_name(node.target.id, _at(pos, node.target), field_name)
        return node.target.id, _convert(node.value, pos, field_name), _at(pos, node.target), True
    if not isinstance(node, ast.Assign):
        raise SpecError(pos, field_name, f"expected an assignment 'name = expression', got {text!r}")
    if len(node.targets) != 1 or not isinstance(node.targets[0], ast.Name):
        raise SpecError(_at(pos, node), field_name, "the left-hand side must be a single name")
    target = node.targets[0]
    _own_name(target.id, _at(pos, target), field_name)
    return target.id, _convert(node.value, pos, field_name), _at(pos, target), False


#: Bounds on one expression: its text, the nesting of its tree, and the size of a number in it.
MAX_EXPRESSION_CHARS = 2000
MAX_EXPRESSION_DEPTH = 64
MAX_CONSTANT = 1.0e300


def _own_name(name: str, pos: Position, field_name: str) -> None:
    """Names starting with '_' belong to optgen (hoisted host values ``_k0``, ``_c0``, ...)."""
    if name.startswith("_"):
        raise SpecError(pos, field_name, f"'{name}': names starting with '_' are reserved for optgen")


def _parse(text: str, mode: str, pos: Position, field_name: str) -> ast.AST:
    if not isinstance(text, str):
        raise SpecError(pos, field_name, f"expected an expression string, got {type(text).__name__}")
    if "\n" in text.strip() or "\r" in text:
        raise SpecError(pos, field_name, "an expression must fit on one line")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise SpecError(pos, field_name, f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    if "\0" in text:
        raise SpecError(pos.shifted(text.index("\0")), field_name, "NUL character in an expression")
    try:
        return ast.parse(text.strip(), mode=mode)
    except (ValueError, RecursionError, MemoryError) as exc:  # a number too long to convert, ...
        raise SpecError(pos, field_name, f"cannot parse: {str(exc).splitlines()[0]}") from None
    except SyntaxError as exc:
        col = (exc.offset or 1) - 1
        raise SpecError(pos.shifted(col), field_name, f"syntax error: {exc.msg}") from None


def _at(base: Position, node: ast.AST) -> Position:
    return base.shifted(getattr(node, "col_offset", 0))


def _convert(node: ast.AST, base: Position, field_name: str, depth: int = 0) -> Expr:
    here = _at(base, node)
    if depth > MAX_EXPRESSION_DEPTH:
        raise SpecError(here, field_name, f"expression nested deeper than {MAX_EXPRESSION_DEPTH} levels")

    def sub(n: ast.AST) -> Expr:
        return _convert(n, base, field_name, depth + 1)

    if isinstance(node, ast.Constant):
        if isinstance(node.value, (int, float)) and not isinstance(node.value, bool) and abs(node.value) > MAX_CONSTANT:
            raise SpecError(here, field_name, f"number out of range (at most {MAX_CONSTANT:g} in magnitude)")
        if node.value is None or isinstance(node.value, (bool, int, float, str)):
            return Const(node.value, pos=here)
        raise SpecError(here, field_name, f"constant {node.value!r} is not allowed")
    if isinstance(node, ast.Name):
        if node.id in _CONSTANT_NAMES:
            return Const(_CONSTANT_NAMES[node.id], pos=here)
        _own_name(node.id, here, field_name)
        return Name(node.id, pos=here)
    if isinstance(node, ast.UnaryOp):
        if isinstance(node.op, ast.USub):
            return Unary("neg", sub(node.operand), pos=here)
        if isinstance(node.op, ast.UAdd):
            return sub(node.operand)
        if isinstance(node.op, ast.Not):
            return Unary("not", sub(node.operand), pos=here)
        raise SpecError(here, field_name, "operator '~' is not allowed")
    if isinstance(node, ast.BinOp):
        op = _BINOPS.get(type(node.op))
        if op is None:
            raise SpecError(here, field_name, f"operator {type(node.op).__name__} is not allowed")
        out = Binary(op, sub(node.left), sub(node.right), pos=here)
        _bounded_constant(out, field_name)
        return out
    if isinstance(node, ast.BoolOp):
        op = "and" if isinstance(node.op, ast.And) else "or"
        return BoolOp(op, tuple(sub(v) for v in node.values), pos=here)
    if isinstance(node, ast.Compare):
        if len(node.ops) != 1:
            raise SpecError(here, field_name, "chained comparisons are not allowed; use 'and'")
        op = _CMPOPS.get(type(node.ops[0]))
        if op is None:
            raise SpecError(here, field_name, f"comparison {type(node.ops[0]).__name__} is not allowed")
        return Compare(op, sub(node.left), sub(node.comparators[0]), pos=here)
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name):
            raise SpecError(here, field_name, "only calls of library functions by name are allowed")
        if node.keywords:
            raise SpecError(here, field_name, f"{node.func.id}(): keyword arguments are not allowed")
        return Call(node.func.id, tuple(sub(a) for a in node.args), pos=here)
    what = _DESCRIBE.get(type(node), type(node).__name__)
    raise SpecError(here, field_name, f"{what} not allowed in an expression")


def _constant_value(e: Expr) -> float | None:
    """The value of an arithmetic expression of numeric constants, in float64, or None."""
    if isinstance(e, Const):
        return float(e.value) if isinstance(e.value, (int, float)) and not isinstance(e.value, bool) else None
    if isinstance(e, Unary) and e.op == "neg":
        v = _constant_value(e.operand)
        return None if v is None else -v
    if isinstance(e, Binary):
        a, b = _constant_value(e.left), _constant_value(e.right)
        if a is None or b is None:
            return None
        try:
            if e.op == "**":
                r = a**b
                return None if isinstance(r, complex) else r
            if e.op == "%":
                return a % b if b != 0 else None
            return {"+": a + b, "-": a - b, "*": a * b}.get(e.op, a / b if e.op == "/" and b != 0 else None)
        except OverflowError:
            return float("inf")
        except ZeroDivisionError:
            return None
    return None


def _bounded_constant(e: Binary, field_name: str) -> None:
    """A constant subexpression must stay a finite float64 (``10**10**10`` would hang the host
    evaluator in integer arithmetic): checked here, once, at build time."""
    v = _constant_value(e)
    if v is not None and (v != v or abs(v) > MAX_CONSTANT):
        raise SpecError(e.pos, field_name, f"constant expression {unparse(e)} is out of range "
                        f"(at most {MAX_CONSTANT:g} in magnitude)")


def names_in(expr: Expr) -> set[str]:
    """Every :class:`Name` used in ``expr``."""
    out: set[str] = set()

    def walk(e: Expr) -> None:
        if isinstance(e, Name):
            out.add(e.id)
        for child in children(e):
            walk(child)

    walk(expr)
    return out


def children(e: Expr) -> tuple[Expr, ...]:
    if isinstance(e, Unary):
        return (e.operand,)
    if isinstance(e, (Binary, Compare)):
        return (e.left, e.right)
    if isinstance(e, BoolOp):
        return e.values
    if isinstance(e, Call):
        return e.args
    return ()


_PREC = {"or": 1, "and": 2, "not": 3, "cmp": 4, "+": 5, "-": 5, "*": 6, "/": 6, "%": 6, "neg": 7, "**": 8}


def unparse(e: Expr, parent: int = 0) -> str:
    """Render an expression back to (canonical) source text."""
    if isinstance(e, Const):
        return repr(e.value)
    if isinstance(e, Name):
        return e.id
    if isinstance(e, Call):
        return f"{e.func}({', '.join(unparse(a) for a in e.args)})"
    if isinstance(e, Unary):
        p = _PREC[e.op]
        s = ("-" if e.op == "neg" else "not ") + unparse(e.operand, p)
    elif isinstance(e, Binary):
        p = _PREC[e.op]
        if e.op == "**":
            s = f"{unparse(e.left, p + 1)} ** {unparse(e.right, p)}"
        else:
            s = f"{unparse(e.left, p)} {e.op} {unparse(e.right, p + 1)}"
    elif isinstance(e, Compare):
        p = _PREC["cmp"]
        s = f"{unparse(e.left, p + 1)} {e.op} {unparse(e.right, p + 1)}"
    elif isinstance(e, BoolOp):
        p = _PREC[e.op]
        s = f" {e.op} ".join(unparse(v, p + 1) for v in e.values)
    else:  # pragma: no cover
        raise TypeError(e)
    return f"({s})" if p < parent else s
