"""The op table (optgen.ir.ops): every op the compiler emits has facts, and the facts agree with
what lowering produces and what the host pass computes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from optgen.ir.library import FUNCTIONS
from optgen.ir.nodes import Assign, Kind, Node, walk_nodes, walk_stmts
from optgen.ir.ops import CALLS, FULL_PASS_REDUCTIONS, NAMES, OPS, OWN_SHAPE, REDUCTIONS, Op
from optgen.ir.serial import program_from_data
from optgen.numerics.host import HostContext, evaluate

GENERATED = Path(__file__).resolve().parent.parent / "generated"


def _programs():
    for path in sorted(GENERATED.glob("*_ir.py")):
        ns: dict = {}
        exec(compile(path.read_text(), str(path), "exec"), ns)  # a data literal written by optgen build
        yield path.stem, program_from_data(ns["PROGRAM_DATA"])


def _nodes(program):
    for body in (program.body, program.finalize):
        for s in walk_stmts(body):
            yield from walk_nodes(s.value if isinstance(s, Assign) else s.cond)


def test_every_generated_op_has_facts_and_its_arity() -> None:
    seen: set[str] = set()
    for name, program in _programs():
        for n in _nodes(program):
            assert n.op in OPS, f"{name}: op '{n.op}' is not in optgen.ir.ops.OPS"
            lo, hi = OPS[n.op].arity
            assert lo <= len(n.args) and (hi is None or len(n.args) <= hi), \
                f"{name}: {n.op} with {len(n.args)} arguments, the table says {OPS[n.op].arity}"
            seen.add(n.op)
    assert len(seen) > 50  # the specs exercise most of the table


def test_reductions_produce_the_kind_the_table_names() -> None:
    checked = 0
    for _, program in _programs():
        for n in _nodes(program):
            to = OPS[n.op].reduces_to
            if to is not None and not n.is_host:
                assert n.kind == to, f"{n.op} lowered to {n.kind}, the table says {to}"
                checked += 1
    assert checked


def test_every_library_function_is_an_op() -> None:
    # eps_of(param) lowers to the parameter fact meta('eps')
    missing = sorted(set(FUNCTIONS) - set(OPS) - {"eps_of"})
    assert not missing, f"library functions without an op: {missing}"


def test_names_are_the_op_strings() -> None:
    assert Op.LERP == "lerp" and Op.LOW_RANK_CANS == "low_rank_cans"
    assert len(set(NAMES)) == len(NAMES) == len(OPS)
    with pytest.raises(AttributeError):
        Op.LERPP  # noqa: B018  (a misspelt op is an error, not a comparison that never holds)


def test_derived_sets() -> None:
    assert CALLS == {"newton_schulz", "cans", "low_rank_newton_schulz", "low_rank_cans"}
    assert FULL_PASS_REDUCTIONS < REDUCTIONS
    assert REDUCTIONS - FULL_PASS_REDUCTIONS == {"normalize", "dot", "matmean"}
    assert CALLS | REDUCTIONS | {"cast", "outer", "square_outer", "strided", "maxabs_dim", "viewnorm", "viewmean", "sinkhorn",
                                 "orthograd_iterative"} == OWN_SHAPE


def _ctx() -> HostContext:
    ctx = HostContext({"lr": 0.5, "betas": (0.9, 0.99)}, torch.zeros(3, 4), {"step": torch.tensor(2.0)}, False)
    ctx.env["x"] = 1.5
    ctx.inputs["beta2"] = 0.25
    return ctx


_LEAF_ATTRS = {Op.CONST: 2.0, Op.VAR: "x", Op.HYPER: ("betas", 1), Op.META: "numel", Op.HAS: "step",
               Op.INPUT: "beta2", Op.PARAM_ATTR: ("use_x", True), Op.STEP: None}


@pytest.mark.parametrize("op", NAMES)
def test_host_fact_is_what_the_host_pass_computes(op: str) -> None:
    """An op marked ``host`` evaluates on host scalars; every other op is refused by the host pass."""
    info = OPS[op]
    lo = info.arity[0]
    args = tuple(Node(Op.CONST, attr=0.5 + i) for i in range(lo))
    if op == Op.WHERE:
        args = (Node(Op.CONST, attr=True), *args[1:])
    node = Node(op, args, attr=_LEAF_ATTRS.get(op))
    if not info.host:
        with pytest.raises((NotImplementedError, KeyError, TypeError, AttributeError)):
            evaluate(node, _ctx())
        return
    value = evaluate(node, _ctx())
    assert isinstance(value, (bool, int, float)) and not (isinstance(value, float) and math.isnan(value))


def test_host_values() -> None:
    """A few host ops against Python's own maths (the table's dispatch reaches the right function)."""
    c = lambda v: Node(Op.CONST, attr=v)  # noqa: E731
    ctx = _ctx()
    assert evaluate(Node(Op.POW, (c(2.0), c(10.0))), ctx) == 1024.0
    assert evaluate(Node(Op.DIV, (c(1.0), c(0.0))), ctx) == math.inf
    assert evaluate(Node(Op.MOD, (c(-1.0), c(3.0))), ctx) == 2.0
    assert evaluate(Node(Op.ATAN2, (c(1.0), c(1.0))), ctx) == math.atan2(1.0, 1.0)
    assert evaluate(Node(Op.LT, (c(1.0), c(2.0))), ctx) is True
    assert evaluate(Node(Op.HYPER, attr=("betas", 0)), ctx) == 0.9
    assert evaluate(Node(Op.STEP), ctx) == 2.0
    assert evaluate(Node(Op.META, attr="rows"), ctx) == 3
    # where evaluates only the side it takes
    assert evaluate(Node(Op.WHERE, (c(False), Node(Op.VAR, attr="missing"), c(7.0))), ctx) == 7.0
    assert evaluate(Node(Op.SQRT, (c(4.0),)), ctx) == 2.0 and evaluate(Node(Op.NEG, (c(4.0),)), ctx) == -4.0
    assert evaluate(Node(Op.AND, (c(True), c(1.0), c(0.0))), ctx) is False


def test_host_facts_agree_with_the_library() -> None:
    # maximum/minimum accept a host second argument, but lowering requires a device first one, so
    # neither reaches the host pass
    differ = sorted(n for n, f in FUNCTIONS.items() if n in OPS and f.host != OPS[n].host)
    assert differ == ["maximum", "minimum"]


def test_an_unknown_op_is_an_error() -> None:
    with pytest.raises(KeyError):
        OPS["lerpp"]
    assert OPS[Op.ROWSUM].reduces_to is Kind.ROW
