"""Block features: features a block declares, applied to the statements of each use of the block
only, their hyperparameters read under the block's names (docs/block_features.md).

A block's ``features:`` entry ``{feature: atan2, names: {use_atan2: adam_use_atan2}}`` runs feature
``atan2`` on a view of the program: its body is the block's statements (where the spec uses the
block), its roles the block's ``roles:`` (bound among those statements), and its hyperparameters
the program's with each block name presented under the feature's name (the program's own
hyperparameter of that name, if any, hidden). What the feature writes is renamed back: its flag
reads ``adam_use_atan2``. The states, checks and matrix views it adds are the program's, a state
or a view existing only where the parameter takes the block's path (the static conditions around
the use: Muon's ``not is_muon``). A feature that changes anything else of the program cannot run
on a block's statements, and says so.

The block features run before the spec's own (which then see the rewritten statements, as the
spec's ``stochastic_rounding`` sees the aux AdamW's parameter writes).
"""

from __future__ import annotations

from dataclasses import replace

from optgen.errors import SpecError
from optgen.features.registry import FEATURES, check_order
from optgen.features.rewrite import FeatureError, is_static, names_in
from optgen.ir.nodes import Assign, If, Node, Program, StateDecl, Stmt
from optgen.ir.ops import Op
from optgen.spec.blocks import BlockFeature


def apply_block_features(program: Program) -> Program:
    """``program`` with the features of each use of a block that declares them applied to that
    use's statements (the last use first, so the earlier ones' places stay valid)."""
    for site in reversed(program.scopes):
        scope = site.scope
        entries = scope.features
        check_order([f.name for f in entries], lambda i, e=entries: (e[i].pos, e[i].field), f"block '{scope.block}': ")
        body = _at(program.body, site.path)
        region = body[site.start:site.end]
        around = _conditions(program, program.body, site.path)
        outside = _accessed(_spliced(program.body, site.path, site.start, site.end, []))
        for entry in scope.features:
            try:
                program, region = _apply_one(program, region, site.roles, entry, around, outside)
            except FeatureError as exc:
                raise SpecError(exc.pos if exc.pos is not None else entry.pos, entry.field, str(exc)) from None
        program = program.copy(body=_spliced(program.body, site.path, site.start, site.end, region))
    return program.copy(scopes=[])


def _apply_one(program: Program, region: list[Stmt], roles: dict, entry: BlockFeature,
               around: Node | None, outside: set[str]) -> tuple[Program, list[Stmt]]:
    """One block feature on ``region`` (the block's statements; ``outside``: the names the rest of
    the body accesses): the program (with what the feature adds) and the rewritten statements."""
    feature = FEATURES[entry.name]
    hypers = dict(program.hypers)
    missing = [n for n in feature.hyperparameters if n not in entry.names]
    if missing:
        raise FeatureError(f"feature '{entry.name}' in a block: names: must give the block's name for its "
                           f"hyperparameter(s) {', '.join(missing)}")
    for ours, theirs in entry.names.items():
        if theirs not in hypers:
            raise FeatureError(f"feature '{entry.name}': names: maps '{ours}' to '{theirs}', which is not a "
                               "hyperparameter of the block or the spec")
    inward = {theirs: ours for ours, theirs in entry.names.items()}
    hidden = set(entry.names) - set(inward)  # the program's own hyperparameters of the feature's names
    used = _hyper_names(region)
    clash = sorted(hidden & used)
    if clash:
        raise FeatureError(f"feature '{entry.name}': the block's statements read '{clash[0]}', the name under "
                           f"which the feature reads '{entry.names[clash[0]]}'")
    # the view's states: those the block's statements access; a feature may rewrite the ones only
    # they access (factored, state_precision: the aux AdamW's moments), not those shared
    inside = _accessed(region)
    seen = [d for d in program.state if d.name in inside]
    # each under the feature's names (a state's dtype rule reads the block's adam_state_precision)
    shown = [_state_out(d, inward, None) for d in seen]
    origin = {id(v): d for v, d in zip(shown, seen)}
    view = program.copy(
        body=_renamed(region, inward), state=shown,
        hypers=[(inward.get(n, n), h) for n, h in program.hypers if n not in hidden],
        roles=roles, reserved=frozenset(names_in(program)), scopes=[])
    out = feature.apply(view)
    for name in ("globals", "accumulators", "reductions", "finalize", "post", "published"):
        if getattr(out, name) is not getattr(view, name):
            raise FeatureError(f"feature '{entry.name}' changes the program's {name}: it cannot run on a "
                               "block's statements")
    outward = dict(entry.names)
    kept = {id(origin[id(d)]) for d in out.state if id(d) in origin}
    changed = [d for d in seen if id(d) not in kept]
    shared = [d.name for d in changed if d.name in outside]
    if shared:
        raise FeatureError(f"feature '{entry.name}' changes state '{shared[0]}', which statements outside the "
                           "block's access: it cannot run on a block's statements")
    ours = {d.name for d in seen}
    fresh = [_state_out(d, outward, None if d.name in ours else around) for d in out.state if id(d) not in origin]
    if not changed:  # only added states: after the program's
        state = [*program.state, *fresh]
    else:  # rewritten ones (and what the feature adds) where the first of them was
        first = changed[0]
        gone = {id(d) for d in changed}
        state = []
        for d in program.state:
            if d is first:
                state += fresh
            if id(d) not in gone:
                state.append(d)
    checks = [*program.checks, *((_node_out(c, outward), m) for c, m in out.checks[len(program.checks):])]
    # the views the feature adds (factored puts its own first: they exclude the program's here)
    before = {id(v) for v in program.matrix_views}
    views = [*program.matrix_views, *((_and(_node_out(c, outward), around), shape)
                                      for c, shape in (v for v in out.matrix_views if id(v) not in before))]
    new = program.copy(state=state, checks=checks, matrix_views=views)
    return new, _renamed(out.body, outward)


def _state_out(d: StateDecl, names: dict[str, str], around: Node | None) -> StateDecl:
    """``d`` (added or rewritten by a block feature) with the block's names, its condition also
    ``around`` where given (a state the feature added)."""
    cond = _node_out(d.cond, names) if d.cond is not None else None
    if around is not None:
        cond = _and(cond, around) if cond is not None else around
    when = (_node_out(d.dtype_when[0], names), d.dtype_when[1]) if d.dtype_when is not None else None
    return replace(d, cond=cond, dtype_when=when,
                   dtype_rules=[(_node_out(c, names), t) for c, t in d.dtype_rules],
                   codec_rules=[(_node_out(c, names), t) for c, t in d.codec_rules])


def _and(a: Node, b: Node | None) -> Node:
    return a if b is None else Node("and", (a, b), boolean=True)


def _conditions(program: Program, body: list[Stmt], path: tuple) -> Node | None:
    """The static conditions of the Ifs on ``path`` (an else branch's negated), as one condition;
    conditions that change with the step are left out (a state exists or not per parameter)."""
    out: Node | None = None
    stmts = body
    for index, branch in path:
        s = stmts[index]
        if is_static(s.cond, program):
            c = s.cond if branch == "then" else Node("not", (s.cond,), boolean=True)
            out = c if out is None else Node("and", (out, c), boolean=True)
        stmts = getattr(s, branch)
    return out


def _at(body: list[Stmt], path: tuple) -> list[Stmt]:
    for index, branch in path:
        body = getattr(body[index], branch)
    return body


def _spliced(body: list[Stmt], path: tuple, start: int, end: int, region: list[Stmt]) -> list[Stmt]:
    if not path:
        return [*body[:start], *region, *body[end:]]
    (index, branch), rest = path[0], path[1:]
    s = body[index]
    inner = _spliced(getattr(s, branch), rest, start, end, region)
    new = If(s.cond, inner, s.orelse, s.pos) if branch == "then" else If(s.cond, s.then, inner, s.pos)
    return [*body[:index], new, *body[index + 1:]]


def _node_out(n: Node, names: dict[str, str]) -> Node:
    return _node(n, names)


def _node(n: Node, names: dict[str, str]) -> Node:
    """``n`` with the hyperparameters in ``names`` renamed."""
    if n.op == Op.HYPER and n.attr[0] in names:
        return replace(n, attr=(names[n.attr[0]], *n.attr[1:]))
    return replace(n, args=tuple(_node(a, names) for a in n.args)) if n.args else n


def _renamed(stmts: list[Stmt], names: dict[str, str]) -> list[Stmt]:
    out: list[Stmt] = []
    for s in stmts:
        if isinstance(s, If):
            out.append(If(_node(s.cond, names), _renamed(s.then, names), _renamed(s.orelse, names), s.pos))
        else:
            out.append(Assign(s.target, _node(s.value, names), s.pos, s.role))
    return out


def _accessed(stmts: list[Stmt]) -> set[str]:
    """The names ``stmts`` read or write."""
    from optgen.ir.nodes import walk_nodes, walk_stmts

    found: set[str] = set()
    for s in walk_stmts(stmts):
        if isinstance(s, Assign):
            found.add(s.target)
        for n in walk_nodes(s.value if isinstance(s, Assign) else s.cond):
            if n.op == Op.VAR:
                found.add(n.attr)
    return found


def _hyper_names(stmts: list[Stmt]) -> set[str]:
    from optgen.ir.nodes import walk_nodes, walk_stmts

    found: set[str] = set()
    for s in walk_stmts(stmts):
        for n in walk_nodes(s.value if isinstance(s, Assign) else s.cond):
            if n.op == Op.HYPER:
                found.add(n.attr[0])
    return found
