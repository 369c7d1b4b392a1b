"""Lowering of ``matches.state_dict`` (or a top-level ``state_dict``): the published class's state-dict layout (issue 13, item 3).

Values are host expressions of hyperparameters and facts about the parameter, lowered as the spec's
facts are, plus what only a layout needs: a quoted constant on its own (``'auto'``) and
``where(cond, a, b)`` with a host condition (only the chosen side is evaluated).
"""

from __future__ import annotations

from typing import Any

from optgen.errors import SpecError
from optgen.ir.nodes import Kind, Node, PublishedEntry, PublishedLayout, StateDecl
from optgen.spec import expr as E
from optgen.spec.expr import parse_expression
from optgen.spec.loader import Spec
from optgen.spec.model import PublishedEntrySpec

_DTYPES = ("uint8", "int8", "int32", "int64", "float32", "float64", "bool")


def lower_published(spec: Spec, lw: Any, state: list[StateDecl]) -> PublishedLayout | None:
    """The lowered layout of ``spec``'s ``matches.state_dict``, or None when it declares none."""
    m = spec.model.matches
    if m is not None and m.state_dict is not None and spec.model.state_dict is not None:
        raise SpecError(spec.source.text_at(("state_dict",)), "state_dict",
                        "the layout is given twice: under matches: and on its own")
    if m is not None and m.state_dict is not None:
        sd, base = m.state_dict, ("matches", "state_dict")
    elif spec.model.state_dict is not None:  # a class tested outside matches: (bitsandbytes')
        sd, base = spec.model.state_dict, ("state_dict",)
    else:
        return None
    prefix = ".".join(base)

    def value(text: str, path: tuple, field: str, per_param: bool) -> Node:
        e = parse_expression(text, spec.source.text_at((*base, *path)), field)
        node = _lower(lw, e, field)
        bad = ("step", "var", "input") + (() if per_param else ("meta", "has", "param_attr"))
        if not node.is_host or any(n.op in bad for n in _walk(node)):
            what = "hyperparameters, facts about the parameter and has(state)" if per_param else "hyperparameters"
            raise SpecError(e.pos, field, f"a state_dict value is a host expression of {what}")
        return node

    def cond(text: str | None, path: tuple, field: str) -> Node | None:
        if text is None:
            return None
        node = value(text, path, field, True)
        if not node.boolean:
            raise SpecError(spec.source.text_at((*base, *path)), field, "a condition must be true/false")
        return node

    names = {d.name for d in state}
    for i, n in enumerate(sd.keepdim):
        if n in names and next(d for d in state if d.name == n).kind not in (Kind.ROW, Kind.COL):
            raise SpecError(spec.source.text_at((*base, "keepdim", i)), f"{prefix}.keepdim[{i}]",
                            f"'{n}' is not a per-row or per-column state: only those keep a reduced dim")
    for section in ("flat", "none_if_absent", "keepdim"):
        for i, n in enumerate(getattr(sd, section)):
            if n not in names:
                raise SpecError(spec.source.text_at((*base, section, i)), f"{prefix}.{section}[{i}]",
                                f"'{n}' is not a state of {spec.model.class_}")
    bools = {d.name for d in state if d.dtype == "bool"}
    for n, m in sd.masked.items():
        if n not in names or m not in bools:
            raise SpecError(spec.source.text_at((*base, "masked", n)), f"{prefix}.masked.{n}",
                            f"'{n}: {m}' must map a state of {spec.model.class_} to a bool state (its mask)")
    for n in sd.rename:
        if n not in names:
            raise SpecError(spec.source.text_at((*base, "rename", n)), f"{prefix}.rename.{n}",
                            f"'{n}' is not a state of {spec.model.class_}")
    per_group = {n for n, h in lw.hypers.items() if h.per_group}  # the features' too (stochastic_rounding)
    for i, n in enumerate(sd.attributes):
        if n not in per_group:
            raise SpecError(spec.source.text_at((*base, "attributes", i)), f"{prefix}.attributes[{i}]",
                            f"'{n}' is not a per-group hyperparameter of {spec.model.class_}")
    entries = []
    for name, item in sd.state.items():
        item = item if isinstance(item, PublishedEntrySpec) else PublishedEntrySpec(value=item)
        field = f"{prefix}.state.{name}"
        if (item.value is None) == (item.codebook is None):
            raise SpecError(spec.source.text_at((*base, "state", name)), field,
                            "an entry takes either a value or a codebook (the code book of a coded state)")
        if item.codebook is not None:
            if item.codebook not in names:
                raise SpecError(spec.source.text_at((*base, "state", name, "codebook")), f"{field}.codebook",
                                f"'{item.codebook}' is not a state of {spec.model.class_}")
            entries.append(PublishedEntry(name, [], False, cond(item.if_, ("state", name, "if"), f"{field}.if"),
                                          None, item.codebook))
            continue
        is_list = isinstance(item.value, list)
        texts = item.value if is_list else [item.value]
        path = ("state", name) if isinstance(sd.state[name], str) else ("state", name, "value")
        vals = [value(str(t), (*path, i) if is_list else path, field, True) for i, t in enumerate(texts)]
        if item.dtype is not None and item.dtype not in _DTYPES:
            raise SpecError(spec.source.text_at((*base, "state", name, "dtype")), f"{field}.dtype",
                            f"dtype must be one of {', '.join(_DTYPES)}")
        entries.append(PublishedEntry(name, vals, is_list, cond(item.if_, ("state", name, "if"), f"{field}.if"),
                                      item.dtype))
    return PublishedLayout(
        step=sd.step,
        step_if=cond(sd.step_if, ("step_if",), f"{prefix}.step_if"),
        group=[(k, value(v, ("group", k), f"{prefix}.group.{k}", False)) for k, v in sd.group.items()],
        state=entries, flat=list(sd.flat), master=sd.master, none_if_absent=list(sd.none_if_absent),
        attributes=list(sd.attributes), masked=list(sd.masked.items()), keepdim=list(sd.keepdim),
        rename=list(sd.rename.items()), wrap=[(k, list(v)) for k, v in sd.wrap.items()],
    )


def _lower(lw: Any, e: E.Expr, field: str) -> Node:
    if isinstance(e, E.Const) and (isinstance(e.value, str) or e.value is None):
        return Node("const", attr=e.value)
    if isinstance(e, E.Name) and e.id in lw.scalars and lw.scalars[e.id][2] not in ("float", "int", "bool"):
        hname, idx, _ = lw.scalars[e.id]  # a mode string saved as it is
        return Node("hyper", attr=(hname, idx))
    if isinstance(e, E.Call) and e.func == "where" and len(e.args) == 3:
        c = _lower(lw, e.args[0], field)
        if c.is_host and c.boolean:
            a, b = _lower(lw, e.args[1], field), _lower(lw, e.args[2], field)
            return Node("where", (c, a, b), kind=Kind.HOST, boolean=a.boolean and b.boolean)
    return lw.expr(e, field)


def _walk(n: Node):
    yield n
    for a in n.args:
        yield from _walk(a)
