"""Lowering of ``reductions:``: optimizer-wide values the same step consumes.

A reduction is computed as the first phase of every ``step()``, over every selected parameter of
every param group that has a gradient, before any parameter is stepped; the update of each
parameter then reads it by name as a per-tensor device value (IR node ``reduced``), on every
backend and without a host sync (optgen.runtime.reductions computes it).

```yaml
reductions:
  total_norm: {of: grad, over: norm, order: 2.0}                  # torch.nn.utils.get_total_norm
  threshold: {of: "abs(param)", over: kthvalue, k: "floor(sparsity * count)", select: "ndim == 2"}
```

``of`` is a per-element (or per-tensor) expression of one parameter (param, grad, its states,
its group's hyperparameters, facts and earlier reductions); ``select`` a per-parameter host
condition; ``if`` a host condition of group 0's hyperparameters and globals (the reduction is
skipped, and must not be read, when it is false); ``order``/``k``/``q`` host expressions of group
0's hyperparameters and globals (``k`` also of ``count``, the number of elements reduced).
"""

from __future__ import annotations

from typing import Protocol

from optgen.errors import SpecError
from optgen.ir.nodes import Kind, Node, ReductionDecl, walk_nodes
from optgen.ir.ops import Op
from optgen.spec import expr as E
from optgen.spec.loader import Spec

#: per-parameter leaves a whole-optimizer host expression (order, k, q, if) may not read
_PER_PARAM = ("step", "meta", "has", "param_attr", "input")


class ExprLowerer(Protocol):
    """What lowering a reduction needs of :class:`optgen.ir.lower.Lowerer` (which calls it)."""

    scalars: dict[str, tuple[str, int | None, str]]
    globals: set[str]
    accumulators: set[str]
    reductions: set[str]

    def known_names(self) -> list[str]: ...

    def expr(self, e: E.Expr, field: str) -> Node: ...


def lower_reductions(spec: Spec, lw: ExprLowerer) -> list[ReductionDecl]:
    """The spec's ``reductions:`` in declaration order; each becomes a name ``lw`` resolves."""
    out: list[ReductionDecl] = []
    windowed: set[str] = set()  # window statistics: not the history of another
    m = spec.model
    for name, red in m.reductions.items():
        field = f"reductions.{name}"
        exprs = spec.reduction_exprs[name]
        if name in lw.known_names() or name in lw.accumulators or name in lw.globals:
            raise SpecError(spec.source.at(("reductions", name)), field,
                            f"'{name}' is declared twice (hyperparameter, state, global, accumulator or reduction)")
        of = lw.expr(exprs["of"], f"{field}.of")
        if "window" in exprs:
            out.append(_window(name, red.over, of, exprs, field, lw, red.doc, windowed))
            lw.reductions.add(name)
            windowed.add(name)
            continue
        if red.over in WINDOWED_ONLY:
            raise SpecError(exprs["of"].pos, f"{field}.over", f"over: {red.over} is a window statistic: it needs "
                            "window: (the number of earlier steps) and of: naming an earlier reduction")
        if of.is_host or of.boolean or of.kind not in (Kind.ELEMENT, Kind.TENSOR):
            raise SpecError(exprs["of"].pos, f"{field}.of", "a reduction reduces a per-element or per-tensor "
                            f"number of each parameter, but this is {'a mask' if of.boolean else of.kind.label}")
        decl = ReductionDecl(name, of, red.over, doc=red.doc)
        for key in ("order", "k", "q"):
            e = exprs.get(key)
            if e is None:
                continue
            if key == "k":
                lw.scalars["count"] = ("count", None, "float")  # the number of elements reduced
            try:
                node = lw.expr(e, f"{field}.{key}")
            finally:
                lw.scalars.pop("count", None)
            if key == "k":  # count resolves as a host value of the reduction itself
                node = _rename_count(node)
            _whole(node, e, f"{field}.{key}", "a number")
            setattr(decl, key, node)
        if red.over == "kthvalue" and decl.k is None:
            raise SpecError(spec.source.at(("reductions", name)), field, "over: kthvalue needs k:")
        if red.over == "quantile" and decl.q is None:
            raise SpecError(spec.source.at(("reductions", name)), field, "over: quantile needs q:")
        if "select" in exprs:
            e = exprs["select"]
            node = lw.expr(e, f"{field}.select")
            if not node.is_host or not node.boolean or any(n.op in (Op.STEP, Op.INPUT) for n in walk_nodes(node)):
                raise SpecError(e.pos, f"{field}.select", "select: is a true/false host condition of the "
                                "parameter's hyperparameters and facts (ndim, numel, param_attr(...), has(...))")
            decl.select = node
        if "if" in exprs:
            e = exprs["if"]
            node = lw.expr(e, f"{field}.if")
            _whole(node, e, f"{field}.if", "a true/false value")
            if not node.boolean:
                raise SpecError(e.pos, f"{field}.if", "if: must be true or false (use a comparison)")
            decl.cond = node
        out.append(decl)
        lw.reductions.add(name)
    return out


#: statistics only a window has (a reduction over parameters has sum, max, min, norm, ...)
WINDOWED_ONLY = ("mean", "std", "count")
#: the statistics of a window
WINDOW_STATISTICS = ("mean", "std", "count", "sum", "max", "min")


def _window(name: str, over: str, of: Node, exprs: dict, field: str, lw: ExprLowerer, doc: str,
            windowed: set[str]) -> ReductionDecl:
    """A window statistic: ``over`` of the finite values the reduction ``of`` names took at the last
    ``window`` earlier steps (optgen.runtime.reductions keeps them on the device)."""
    if of.op != Op.REDUCED or of.attr in windowed:
        raise SpecError(exprs["of"].pos, f"{field}.of", "a window statistic reads the history of an earlier "
                        "reduction over the parameters: of: is that reduction's name")
    if over not in WINDOW_STATISTICS:
        raise SpecError(exprs["of"].pos, f"{field}.over", f"a window has no '{over}': over: is one of "
                        f"{', '.join(WINDOW_STATISTICS)}")
    for key in ("k", "q", "select"):
        if key in exprs:
            raise SpecError(exprs[key].pos, f"{field}.{key}", f"{key}: belongs to reductions over the parameters, "
                            "not to a window statistic")
    e = exprs["window"]
    size = lw.expr(e, f"{field}.window")
    _whole(size, e, f"{field}.window", "a number of steps")
    decl = ReductionDecl(name, of, over, window=size, doc=doc)
    if "if" in exprs:
        cond = lw.expr(exprs["if"], f"{field}.if")
        _whole(cond, exprs["if"], f"{field}.if", "a true/false value")
        decl.cond = cond
    return decl


def _rename_count(n: Node) -> Node:
    if n.op == Op.HYPER and n.attr == ("count", None):
        return Node("var", attr="count")
    if not n.args:
        return n
    return Node(n.op, tuple(_rename_count(a) for a in n.args), n.kind, n.attr, n.boolean)


def _whole(node: Node, e, field: str, what: str) -> None:
    if not node.is_host or any(n.op in _PER_PARAM or (n.op == Op.VAR and n.attr != "count") for n in walk_nodes(node)):
        raise SpecError(e.pos, field, f"{field.rsplit('.', 1)[1]}: is {what} computed once per step: a host "
                        "expression of hyperparameters and globals (group 0's)")
