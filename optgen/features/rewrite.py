"""Helpers for features: find the statements a feature rewrites and replace them.

Features work on conventions a base spec follows (documented in :mod:`optgen.features`): the
denominator is a temporary named ``denom``, the direction before the step size is ``update``, the
first moment is the EMA ``exp_avg = lerp(exp_avg, grad, w)``, decoupled weight decay is
``param = param + s * param``. A feature that cannot find what it needs raises
:class:`FeatureError`, which the lowering reports at the feature's entry in the spec.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from optgen.ir.nodes import Assign, If, Kind, Node, Stmt


class FeatureError(Exception):
    """The base program does not have the shape a feature rewrites."""


def flag(name: str) -> Node:
    """A boolean hyperparameter (a constructor flag) as an IR condition."""
    return Node("hyper", attr=(name, None), boolean=True)


def var(name: str, kind: Kind = Kind.ELEMENT) -> Node:
    return Node("var", kind=kind, attr=name)


def element(op: str, *args: Node, boolean: bool = False) -> Node:
    """A per-element operation node."""
    return Node(op, args, kind=Kind.ELEMENT, boolean=boolean)


def is_var(n: Node, name: str) -> bool:
    return n.op == "var" and n.attr == name


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


def first_moment_direction(s: Assign) -> bool:
    """Whether ``s`` is ``update = copy(exp_avg)``: the direction taken from the first moment."""
    return s.target == "update" and s.value.op == "copy" and is_var(s.value.args[0], "exp_avg")


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
    if v.op == "lerp" and is_var(v.args[0], target):
        w = v.args[2]
        one = w.op == "sub" and w.args[0].op == "const" and w.args[0].attr == 1
        beta1 = w.args[1] if one else Node("sub", (Node("const", attr=1), w))
        return Ema(v.args[1], w, beta1, None)
    if v.op == "axpy" and v.args[0].op == "mul" and is_var(v.args[0].args[0], target) and v.args[0].args[1].is_host:
        beta1, w = v.args[0].args[1], v.args[2]
        rest = Node("sub", (Node("const", attr=1), beta1))
        if w == rest:
            return Ema(v.args[1], rest, beta1, Node("const", attr=1))
        if w.op == "mul" and w.args[1] == rest:
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
