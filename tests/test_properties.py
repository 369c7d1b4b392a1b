"""Property tests: the expression parser and the host maths."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from optgen.errors import Position, SpecError
from optgen.ir.nodes import Node
from optgen.numerics.host import HostContext, evaluate
from optgen.spec.expr import Expr, parse_expression, unparse

POS = Position("p.yaml", 1, 1)
names = st.sampled_from(["a", "b", "lr", "beta1", "grad", "m"])
numbers = st.one_of(st.integers(0, 100), st.floats(0.001, 100, allow_nan=False))


def exprs() -> st.SearchStrategy[str]:
    leaf = st.one_of(names, numbers.map(repr))
    return st.recursive(
        leaf,
        lambda inner: st.one_of(
            st.tuples(inner, st.sampled_from(["+", "-", "*", "/", "**"]), inner).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
            st.tuples(st.sampled_from(["sqrt", "abs", "lerp"]), st.lists(inner, min_size=1, max_size=3)).map(
                lambda t: f"{t[0]}({', '.join(t[1])})"
            ),
            inner.map(lambda x: f"-{x}"),
        ),
        max_leaves=12,
    )


@given(exprs())
@settings(max_examples=300, deadline=None)
def test_unparse_round_trips(text: str) -> None:
    tree = parse_expression(text, POS, "f")
    assert parse_expression(unparse(tree), POS, "f") == tree


@given(st.text(max_size=40))
@settings(max_examples=500, deadline=None)
def test_arbitrary_text_is_parsed_or_rejected_cleanly(text: str) -> None:
    try:
        out = parse_expression(text, POS, "f")
    except SpecError as exc:
        assert str(exc).startswith("p.yaml:")
    else:
        assert isinstance(out, Expr)


def _host(op: str, *args: float) -> Node:
    return Node(op, tuple(Node("const", attr=a) for a in args))


@given(st.floats(-1e6, 1e6), st.floats(-1e6, 1e6))
def test_host_arithmetic_is_python_double(a: float, b: float) -> None:
    ctx = HostContext({}, None, {}, tensor_math=False)  # type: ignore[arg-type]
    assert evaluate(_host("add", a, b), ctx) == a + b
    assert evaluate(_host("mul", a, b), ctx) == a * b
    got = evaluate(_host("div", a, b), ctx)
    if b != 0:
        assert got == a / b
    else:
        assert math.isnan(got) if a == 0 else math.isinf(got)
