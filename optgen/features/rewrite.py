"""Helpers for features: find the statements a feature rewrites, by role, and replace them.

A feature asks for a role (:data:`optgen.ir.roles.ROLES`) and a form (a test of the statement's
IR structure); :func:`rewrite_role` and :func:`find_role` bind it with exact cardinality: the
statements the spec declares under ``roles:``, else those of today's dialect (documented in
:mod:`optgen.features`: the denominator ``denom``, the direction ``update``, the first moment
``exp_avg``, ...), and none or several is an error at the spec's lines. A feature's temporaries
take names from :func:`fresh`, which never captures a spec's name. A feature that cannot find
what it needs raises :class:`FeatureError`, which the lowering reports at the statement concerned
or at the feature's entry in the spec.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from optgen.ir.nodes import Assign, If, Kind, Node, Program, Stmt
from optgen.ir.ops import Op
from optgen.ir.roles import MULTI_ROLES, ROLES  # noqa: F401  (MULTI_ROLES: the vocabulary, re-exported)


class FeatureError(Exception):
    """The base program does not have the shape a feature rewrites; ``pos``: the spec statement
    concerned, where there is one (the error is reported there instead of at the feature's entry)."""

    def __init__(self, message: str, pos=None):
        super().__init__(message)
        self.pos = pos




#: the structural matches (not roles a spec declares) and the role each is found from
FOUND_FROM = {"division": "denominator"}


def where(pos) -> str:
    return f"line {pos.line}" if pos is not None else "a feature's statement"


def role_sites(program: Program, role: str, legacy: Callable[[Assign], bool]) -> Callable[[Assign], bool]:
    """A test of an assignment for ``role``: the statements the spec binds under ``roles:``, else
    ``legacy`` (the dialect: names of today's specs)."""
    bound = program.roles.get(role)
    if bound is None:
        return legacy
    keys = set(bound)
    return lambda s: (s.target, s.pos) in keys


def role_target(program: Program, role: str, default: str) -> str:
    """The name the statement bound to ``role`` assigns (``default``, the dialect's, if undeclared)."""
    bound = program.roles.get(role)
    return bound[0][0] if bound else default


def rewrite_role(program: Program, body: list[Stmt], feature: str, role: str, legacy: Callable[[Assign], bool],
                 fn: Callable[[Assign], list[Stmt] | None], what: str, many: bool = False) -> list[Stmt]:
    """``body`` with ``fn`` applied to the statements of ``role`` (see :func:`role_sites`), with exact
    cardinality: one spec statement (copies of it on a feature's flag paths count once), or with
    ``many`` at least one. A declared statement ``fn`` refuses (None) is an error at its line; a
    dialect statement ``fn`` refuses is not the role."""
    match = role_sites(program, role, legacy)
    declared = role in program.roles
    hits: dict = {}
    refused: dict = {}

    def each(s: Assign):
        if not match(s):
            return None
        new = fn(s)
        if new is None:
            refused.setdefault(s.pos, s)
            return None
        hits.setdefault(s.pos, s)
        return new

    out, _ = replace_assigns(body, each)
    # a declared statement none of whose copies has the form (an earlier feature's flag path may
    # hold a rewritten copy of it, which this feature leaves alone)
    for p, s in refused.items():
        if declared and p not in hits:
            raise FeatureError(f"feature '{feature}': the statement of role '{role}' ({where(p)}, "
                               f"'{s.target} = ...') is not {what}", p)
    # a role a spec cannot declare (the divisions by the denominator) is found by structure from
    # one it can: the hint names that one
    hint = role if role in ROLES else FOUND_FROM.get(role)
    if not hits:
        raise FeatureError(f"feature '{feature}' needs {what}"
                           + (f" (role '{hint}': declare it under roles:)" if hint else ""))
    if len(hits) > 1 and not many:
        lines = ", ".join(where(p) for p in hits)
        said = f"role '{role}' ({what})" if role in ROLES else what
        raise FeatureError(f"feature '{feature}': {said} matches several statements ({lines})"
                           + (f"; declare the one it means under roles: {{{role}: name}}" if role in ROLES else ""),
                           next(iter(hits)))
    return out


def find_role(program: Program, body: list[Stmt], feature: str, role: str, legacy: Callable[[Assign], bool],
              form: Callable[[Assign], Any], what: str, many: bool = False) -> list[tuple[Assign, Any]]:
    """The statements of ``role`` whose ``form`` (a test of their structure) is not None, each with
    its form, bound with the cardinality of :func:`rewrite_role` (the same errors); the first copy
    of each spec statement."""
    found: dict = {}

    def probe(s: Assign) -> list[Stmt] | None:
        shape = form(s)
        if shape is None:
            return None
        found.setdefault(s.pos, (s, shape))
        return [s]

    rewrite_role(program, body, feature, role, legacy, probe, what, many)
    return list(found.values())


FIRST_MOMENT = "a first-moment EMA 'm = lerp(m, x, w)' or 'm = m * beta1 + (c * (1 - beta1)) * x'"


def first_moment(program: Program, body: list[Stmt], feature: str, form: Callable[[Assign], Any] | None = None,
                 ) -> tuple[Assign, Ema]:
    """The one statement of role ``first_moment`` (undeclared: the EMA of the dialect's
    ``exp_avg``) and its EMA form; ``form`` narrows the forms the feature takes."""
    def shape(s: Assign) -> Any:
        ema = ema_form(s, s.target)
        return ema if ema is None or form is None else form(s, ema)

    (s, ema), = find_role(program, body, feature, "first_moment", lambda s: s.target == "exp_avg", shape,
                          FIRST_MOMENT)
    return s, ema


DIRECTION = "a direction taken from the first moment 'd = copy(m)' or 'd = m'"


def direction_sites(program: Program) -> Callable[[Assign], bool]:
    """The dialect's direction: ``update = copy(m)`` (``m``: see :func:`direction_source`)."""
    source = direction_source(program)
    return lambda s: s.target == "update" and source(s) is not None


def direction_target(program: Program) -> str:
    """The name the direction statement assigns (the dialect's ``update`` if undeclared)."""
    return role_target(program, "direction", "update")


def own_state(program: Program, feature: str, *names: str) -> None:
    """A feature's states keep their published names (state-dict keys): the spec must not declare them."""
    for name in names:
        if any(d.name == name for d in program.state):
            raise FeatureError(f"feature '{feature}' keeps state '{name}': the spec declares one too")


def names_in(program: Program) -> set[str]:
    """Every name the program uses: targets, variables, states, hyperparameters and globals."""
    from optgen.ir.nodes import walk_nodes, walk_stmts

    names = {"param", "grad", *program.reserved} | {s.name for s in program.state} | {g.name for g in program.globals}
    names |= {a.name for a in program.accumulators}
    for n, h in program.hypers:
        names.add(n)
        names.update(h.as_ or ())
    for s in walk_stmts([*program.body, *program.finalize]):
        if isinstance(s, Assign):
            names.add(s.target)
            nodes = walk_nodes(s.value)
        else:
            nodes = walk_nodes(s.cond)
        names.update(n.attr for n in nodes if n.op == Op.VAR)
    return names


def fresh(program: Program, name: str, taken: set[str] = frozenset()) -> str:
    """A temporary's name that captures none of the program's: ``name`` where the program does not
    use it (today's generated code keeps its names), else ``_name``, ``_name2``, ... (names with a
    leading underscore are optgen's: a spec cannot write them)."""
    used = names_in(program) | set(taken)
    if name not in used:
        return name
    candidate, k = f"_{name}", 2
    while candidate in used:
        candidate, k = f"_{name}{k}", k + 1
    return candidate


def is_static(n: Node, program: Program) -> bool:
    """``n`` is decided per parameter once (hyperparameters, constants and parameter facts): it
    can say at state creation whether a parameter takes a path."""
    from optgen.ir.nodes import walk_nodes

    dynamic = {g.name for g in program.globals}
    return n.is_host and all(
        m.op in (Op.CONST, Op.META, Op.PARAM_ATTR) or (m.op == Op.HYPER and m.attr[0] not in dynamic)
        or (m.op not in (Op.STEP, Op.VAR, Op.HAS, Op.INPUT, Op.REDUCED, Op.UNKNOWN) and m.args)
        for m in walk_nodes(n))


def flag(name: str) -> Node:
    """A boolean hyperparameter (a constructor flag) as an IR condition."""
    return Node("hyper", attr=(name, None), boolean=True)


def var(name: str, kind: Kind = Kind.ELEMENT) -> Node:
    return Node("var", kind=kind, attr=name)


def element(op: str, *args: Node, boolean: bool = False) -> Node:
    """A per-element operation node."""
    return Node(op, args, kind=Kind.ELEMENT, boolean=boolean)


def is_var(n: Node, name: str) -> bool:
    return n.op == Op.VAR and n.attr == name


def replace_assigns(stmts: list[Stmt], fn: Callable[[Assign], list[Stmt] | None]) -> tuple[list[Stmt], int]:
    """Apply ``fn`` to every assignment (inside conditionals too); it returns replacements or None.

    Returns the new statements and how many assignments were replaced.
    """
    count = 0
    out: list[Stmt] = []
    for s in stmts:
        if isinstance(s, If):
            branch, n = _in_branches(s, lambda b: replace_assigns(b, fn))
            count += n
            out.append(branch)
            continue
        new = fn(s)
        if new is None:
            out.append(s)
        else:
            out.extend(new)
            count += 1
    return out, count


def switch(name: str, on: list[Stmt], off: list[Stmt], pos=None) -> If:
    """``if <flag>: on else: off``: a constructor flag decided per group, specialised per path."""
    return If(flag(name), on, off, pos)


def require(count: int, feature: str, what: str) -> None:
    if count == 0:
        raise FeatureError(f"feature '{feature}' needs {what}")


def substitute(n: Node, fn: Callable[[Node], Node | None]) -> Node:
    """``n`` with every subexpression for which ``fn`` returns a node replaced by it (outermost first)."""
    new = fn(n)
    if new is not None:
        return new
    return replace(n, args=tuple(substitute(a, fn) for a in n.args)) if n.args else n


def indicator(cond: Node) -> Node:
    """``where(cond, 1.0, 0.0)``: an elementwise 0/1 mask."""
    return Node("where", (cond, Node("const", attr=1.0), Node("const", attr=0.0)), kind=Kind.ELEMENT)


def edit_nested(stmts: list[Stmt], edit: Callable[[list[Stmt]], list[Stmt] | None]) -> tuple[list[Stmt], bool]:
    """Apply ``edit`` to the first statement list it accepts: ``stmts`` itself, else the branches of
    its conditionals in order (depth first). Returns the new statements and whether it applied."""
    new = edit(stmts)
    if new is not None:
        return new, True
    for i, s in enumerate(stmts):
        if isinstance(s, If):
            then, ok = edit_nested(s.then, edit)
            orelse = s.orelse
            if not ok:
                orelse, ok = edit_nested(s.orelse, edit)
            if ok:
                return [*stmts[:i], If(s.cond, then, orelse, s.pos), *stmts[i + 1:]], True
    return stmts, False


def edit_every(stmts: list[Stmt], edit: Callable[[list[Stmt]], list[Stmt] | None]) -> tuple[list[Stmt], int]:
    """Apply ``edit`` to every statement list it accepts (an accepted list is not entered again):
    Muon's matrix and Adam branches both write the parameter. Returns the statements and the count."""
    new = edit(stmts)
    if new is not None:
        return new, 1
    out: list[Stmt] = []
    count = 0
    for s in stmts:
        if isinstance(s, If):
            branch, n = _in_branches(s, lambda b: edit_every(b, edit))
            count += n
            out.append(branch)
        else:
            out.append(s)
    return out, count


def _in_branches(s: If, fn: Callable[[list[Stmt]], tuple[list[Stmt], int]]) -> tuple[If, int]:
    """``s`` with ``fn`` applied to both branches, and the sum of the counts it returned."""
    then, a = fn(s.then)
    orelse, b = fn(s.orelse)
    return If(s.cond, then, orelse, s.pos), a + b


def at_start_of_param_block(block: list[Stmt], through_branches: bool = False,
                            ) -> Callable[[list[Stmt]], list[Stmt] | None]:
    """An edit for :func:`edit_nested`: ``block`` at the start of the statement list that writes the
    parameter (where adv_optm upcasts and orthogonalises the gradient, after ADOPT's init-only step).
    ``through_branches``: a conditional whose branches both write it counts as a write (stochastic
    rounding splits the write in two; Muon's matrix and Adam paths both write)."""
    def writes(s: Stmt) -> bool:
        if isinstance(s, Assign):
            return s.target == "param"
        return through_branches and any(writes(x) for x in s.then) and any(writes(x) for x in s.orelse)

    def edit(stmts: list[Stmt]) -> list[Stmt] | None:
        return [*block, *stmts] if any(writes(s) for s in stmts) else None

    return edit


@dataclass(frozen=True)
class Ema:
    """A first-moment EMA as a spec writes it: ``lerp(exp_avg, x, w)`` (``scale`` None), or Prodigy's
    ``exp_avg * beta1 + (scale * (1 - beta1)) * x``."""

    x: Node  # what it averages
    weight: Node  # the new value's weight (w, or 1 - beta1)
    beta1: Node  # the old value's factor, as written where the spec writes it
    scale: Node | None  # Prodigy's d (a constant 1 for an unscaled axpy form); None for lerp


def ema_form(s: Stmt, target: str = "exp_avg") -> Ema | None:
    """``s`` as an EMA of state ``target``, or None."""
    if not isinstance(s, Assign) or s.target != target:
        return None
    v = s.value
    if v.op == Op.LERP and is_var(v.args[0], target):
        w = v.args[2]
        one = w.op == Op.SUB and w.args[0].op == Op.CONST and w.args[0].attr == 1
        beta1 = w.args[1] if one else Node("sub", (Node("const", attr=1), w))
        return Ema(v.args[1], w, beta1, None)
    if v.op == Op.AXPY and v.args[0].op == Op.MUL and is_var(v.args[0].args[0], target) and v.args[0].args[1].is_host:
        beta1, w = v.args[0].args[1], v.args[2]
        rest = Node("sub", (Node("const", attr=1), beta1))
        if w == rest:
            return Ema(v.args[1], rest, beta1, Node("const", attr=1))
        if w.op == Op.MUL and w.args[1] == rest:
            return Ema(v.args[1], rest, beta1, w.args[0])
    return None


def placed(edit: Callable[[list[Stmt]], list[Stmt] | None], where: Callable[[list[Stmt]], int],
           ) -> Callable[[list[Stmt]], list[Stmt] | None]:
    """``edit`` (one that puts a block at the start of a statement list) with the block moved to
    index ``where(stmts)`` of the list instead."""
    def moved(stmts: list[Stmt]) -> list[Stmt] | None:
        done = edit(stmts)
        if done is None:
            return None
        at = where(stmts)
        return [*stmts[:at], *done[: len(done) - len(stmts)], *stmts[at:]]

    return moved


def direction_source(program: Program) -> Callable[[Assign], Node | None]:
    """For role ``direction``: the first-moment variable that a statement ``d = copy(m)`` (or
    ``d = m``) takes the direction from, or None. ``m`` is the ``first_moment`` role's state where
    declared, any state where only ``direction`` is, else the dialect's ``exp_avg``."""
    states = {s.name for s in program.state}
    if "first_moment" in program.roles:
        ok = {role_target(program, "first_moment", "exp_avg")}
    elif "direction" in program.roles:
        ok = states
    else:
        ok = {"exp_avg"}

    def source(s: Assign) -> Node | None:
        v = s.value
        if v.op == Op.COPY and v.args[0].op == Op.VAR and v.args[0].attr in ok:
            return v.args[0]
        if v.op == Op.VAR and v.attr in ok:
            return v
        return None

    return source


def renamed(stmts: list[Stmt], names: dict[str, str]) -> list[Stmt]:
    """``stmts`` with the variables and targets in ``names`` renamed (a feature's block, lowered under
    placeholder names a spec cannot clash with, then given its fresh names)."""
    def node(n: Node) -> Node:
        if n.op == Op.VAR and n.attr in names:
            return replace(n, attr=names[n.attr])
        return replace(n, args=tuple(node(a) for a in n.args)) if n.args else n

    out: list[Stmt] = []
    for st in stmts:
        if isinstance(st, If):
            out.append(If(node(st.cond), renamed(st.then, names), renamed(st.orelse, names), st.pos))
        else:
            out.append(Assign(names.get(st.target, st.target), node(st.value), st.pos, st.role))
    return out
