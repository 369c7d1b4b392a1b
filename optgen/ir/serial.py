"""A plain-data form of a :class:`Program`, embedded in generated modules for the reference
backend (deterministic, JSON-compatible, and readable)."""

from __future__ import annotations

from typing import Any

from optgen.ir.nodes import (
    AccumulatorDecl,
    Assign,
    GlobalDecl,
    If,
    Kind,
    Node,
    Program,
    PublishedEntry,
    PublishedLayout,
    ReductionDecl,
    StateDecl,
    Stmt,
)
from optgen.spec.model import HyperparameterSpec, MatchSpec


def node_to_data(n: Node) -> list:
    attr = list(n.attr) if isinstance(n.attr, tuple) else n.attr
    out: list = [n.op, n.kind.name.lower(), attr, n.boolean]
    if n.args:
        out.append([node_to_data(a) for a in n.args])
    return out


def node_from_data(d: list) -> Node:
    op, kind, attr, boolean = d[:4]
    args = tuple(node_from_data(a) for a in d[4]) if len(d) > 4 else ()
    if isinstance(attr, list):
        attr = tuple(attr)
    return Node(op, args, Kind[kind.upper()], attr, boolean)


def _stmts_to_data(stmts: list[Stmt]) -> list:
    out = []
    for s in stmts:
        if isinstance(s, If):
            out.append({"if": node_to_data(s.cond), "then": _stmts_to_data(s.then), "else": _stmts_to_data(s.orelse)})
        else:
            out.append({"set": s.target, "role": s.role, "value": node_to_data(s.value)})
    return out


def _stmts_from_data(items: list) -> list[Stmt]:
    out: list[Stmt] = []
    for d in items:
        if "if" in d:
            out.append(If(node_from_data(d["if"]), _stmts_from_data(d["then"]), _stmts_from_data(d["else"])))
        else:
            out.append(Assign(d["set"], node_from_data(d["value"]), role=d["role"]))
    return out


def program_to_data(p: Program) -> dict[str, Any]:
    return {
        "name": p.name,
        "class_name": p.class_name,
        "doc": p.doc,
        "source": p.source,
        "sha256": p.sha256,
        "step_store": p.step_store,
        "step_math": p.step_math,
        "state_init": p.state_init,
        "hypers": [[n, h.model_dump(by_alias=True, exclude_defaults=True)] for n, h in p.hypers],
        "checks": [[node_to_data(c), m] for c, m in p.checks],
        "state": [
            {
                "name": s.name,
                "kind": s.kind.name.lower(),
                "init": list(s.init) if isinstance(s.init, tuple) else s.init,
                "dtype": s.dtype,
                "cond": node_to_data(s.cond) if s.cond is not None else None,
                **({"dtype_when": [node_to_data(s.dtype_when[0]), s.dtype_when[1]]} if s.dtype_when else {}),
                **({"scalar_if_zero": True} if s.scalar_if_zero else {}),
                **({"dtype_rules": [[node_to_data(c), t] for c, t in s.dtype_rules]} if s.dtype_rules else {}),
                **({"block": s.block} if s.block else {}),
                **({"view": s.view} if s.view else {}),
                **({"codec_rules": [[node_to_data(c), t] for c, t in s.codec_rules]} if s.codec_rules else {}),
            }
            for s in p.state
        ],
        "body": _stmts_to_data(p.body),
        "matches": _matches_to_data(p.matches),
        "features": list(p.features),
        **({"matrix_views": [[node_to_data(c), shape] for c, shape in p.matrix_views]} if p.matrix_views else {}),
        **({"slice_stride": p.slice_stride} if p.slice_stride else {}),
        **({"globals": [[g.name, node_to_data(g.init)] for g in p.globals]} if p.globals else {}),
        **({"accumulators": [[a.name, node_to_data(a.init)] for a in p.accumulators]} if p.accumulators else {}),
        **({"finalize": _stmts_to_data(p.finalize)} if p.finalize else {}),
        **({"reductions": [_reduction_to_data(r) for r in p.reductions]} if p.reductions else {}),
        **({"post": _stmts_to_data(p.post)} if p.post else {}),
        **({"published": _layout_to_data(p.published)} if p.published is not None else {}),
    }


_REDUCTION_NODES = ("of", "order", "k", "q", "select", "cond", "window")


def _reduction_to_data(r: ReductionDecl) -> dict[str, Any]:
    out: dict[str, Any] = {"name": r.name, "over": r.over, **({"phase": r.phase} if r.phase != "first" else {})}
    for key in _REDUCTION_NODES:
        node = getattr(r, key)
        if node is not None:
            out[key] = node_to_data(node)
    return out


def _reduction_from_data(d: dict[str, Any]) -> ReductionDecl:
    nodes = {k: node_from_data(d[k]) for k in _REDUCTION_NODES if k in d}
    return ReductionDecl(d["name"], over=d["over"], phase=d.get("phase", "first"), **nodes)


def _matches_to_data(m: Any) -> dict[str, Any] | None:
    if m is None:
        return None
    d = m.model_dump(by_alias=True)
    if d.get("state_dict") is None:
        d.pop("state_dict", None)  # the modules of specs without one stay as they were
    elif not d["state_dict"].get("attributes"):
        d["state_dict"].pop("attributes", None)  # as those of layouts without attributes
    if d.get("state_dict") is not None and not d["state_dict"].get("masked"):
        d["state_dict"].pop("masked", None)  # as those of layouts without masked states
    if d.get("state_dict") is not None and not d["state_dict"].get("keepdim"):
        d["state_dict"].pop("keepdim", None)  # as those of layouts without kept dims
    for key in ("rename", "wrap"):  # as those of layouts without renamed or nested entries
        if d.get("state_dict") is not None and not d["state_dict"].get(key):
            d["state_dict"].pop(key, None)
    for entry in (d.get("state_dict") or {}).get("state", {}).values():
        if isinstance(entry, dict) and entry.get("codebook") is None:
            entry.pop("codebook", None)  # as those of entries with a value
    if d.get("parameters") == "all":
        d.pop("parameters")  # the modules of specs that train every parameter stay as they were
    return d


def _opt(n: Node | None) -> list | None:
    return node_to_data(n) if n is not None else None


def _layout_to_data(lay: PublishedLayout) -> dict[str, Any]:
    return {
        "step": lay.step,
        "step_if": _opt(lay.step_if),
        "group": [[k, node_to_data(v)] for k, v in lay.group],
        "state": [{"name": e.name, "values": [node_to_data(v) for v in e.values], "is_list": e.is_list,
                   "cond": _opt(e.cond), "dtype": e.dtype, **({"codebook": e.codebook} if e.codebook else {})}
                  for e in lay.state],
        "flat": list(lay.flat),
        "master": lay.master,
        "none_if_absent": list(lay.none_if_absent),
        **({"attributes": list(lay.attributes)} if lay.attributes else {}),  # older modules stay as they were
        **({"masked": [list(m) for m in lay.masked]} if lay.masked else {}),
        **({"keepdim": list(lay.keepdim)} if lay.keepdim else {}),
        **({"rename": [list(r) for r in lay.rename]} if lay.rename else {}),
        **({"wrap": [[k, list(v)] for k, v in lay.wrap]} if lay.wrap else {}),
    }


def _layout_from_data(d: dict[str, Any] | None) -> PublishedLayout | None:
    if d is None:
        return None
    def opt(x: list | None) -> Node | None:
        return node_from_data(x) if x is not None else None

    return PublishedLayout(
        step=d["step"], step_if=opt(d["step_if"]),
        group=[(k, node_from_data(v)) for k, v in d["group"]],
        state=[PublishedEntry(e["name"], [node_from_data(v) for v in e["values"]], e["is_list"], opt(e["cond"]),
                              e["dtype"], e.get("codebook")) for e in d["state"]],
        flat=list(d["flat"]), master=d["master"], none_if_absent=list(d["none_if_absent"]),
        attributes=list(d.get("attributes", [])),
        masked=[(s, m) for s, m in d.get("masked", [])], keepdim=list(d.get("keepdim", [])),
        rename=[(a, b) for a, b in d.get("rename", [])], wrap=[(k, list(v)) for k, v in d.get("wrap", [])],
    )


def program_from_data(d: dict[str, Any]) -> Program:
    return Program(
        name=d["name"],
        class_name=d["class_name"],
        doc=d["doc"],
        source=d["source"],
        sha256=d["sha256"],
        step_store=d["step_store"],
        step_math=d["step_math"],
        state_init=d["state_init"],
        hypers=[(n, HyperparameterSpec.model_validate(h)) for n, h in d["hypers"]],
        checks=[(node_from_data(c), m) for c, m in d["checks"]],
        state=[
            StateDecl(
                s["name"],
                Kind[s["kind"].upper()],
                tuple(s["init"]) if isinstance(s["init"], list) else s["init"],
                s["dtype"],
                node_from_data(s["cond"]) if s["cond"] is not None else None,
                dtype_when=(node_from_data(s["dtype_when"][0]), s["dtype_when"][1]) if "dtype_when" in s else None,
                scalar_if_zero=s.get("scalar_if_zero", False),
                dtype_rules=[(node_from_data(c), t) for c, t in s.get("dtype_rules", [])],
                block=s.get("block"),
                view=s.get("view"),
                codec_rules=[(node_from_data(c), t) for c, t in s.get("codec_rules", [])],
            )
            for s in d["state"]
        ],
        body=_stmts_from_data(d["body"]),
        matches=MatchSpec.model_validate(d["matches"]) if d["matches"] is not None else None,
        features=list(d["features"]),
        matrix_views=[(node_from_data(c), shape) for c, shape in d.get("matrix_views", [])],
        slice_stride=d.get("slice_stride"),
        globals=[GlobalDecl(n, node_from_data(i)) for n, i in d.get("globals", [])],
        accumulators=[AccumulatorDecl(n, node_from_data(i)) for n, i in d.get("accumulators", [])],
        finalize=_stmts_from_data(d.get("finalize", [])),
        reductions=[_reduction_from_data(r) for r in d.get("reductions", [])],
        post=_stmts_from_data(d.get("post", [])),
        published=_layout_from_data(d.get("published")),
    )
