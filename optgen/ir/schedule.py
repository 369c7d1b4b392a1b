"""The scheduler: split a straight-line step into phases (kernel passes).

A phase is a run of device statements that one pass over the parameter can compute. A value
produced by a reduction that reads per-element data (``matvec``, ``sum``, ``norm``, ...) is only
complete at the end of the pass that computes it, so a statement that consumes it starts a new
phase. Small per-row/per-matrix work (``normalize``, ``dot``) that follows a reduction runs at the
start of the consuming phase.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from optgen.ir.library import FULL_PASS_REDUCTIONS
from optgen.ir.nodes import Assign, If, Node, Stmt, walk_nodes


@dataclass
class Phase:
    index: int
    statements: list[Assign] = field(default_factory=list)
    #: values this phase reduces and later phases consume
    produces: list[str] = field(default_factory=list)
    #: values from earlier phases this phase reads
    consumes: list[str] = field(default_factory=list)


def specialize(stmts: list[Stmt], decide: Callable[[Node], bool]) -> list[Assign]:
    """The straight-line program for one set of condition outcomes."""
    out: list[Assign] = []
    for s in stmts:
        if isinstance(s, If):
            out.extend(specialize(s.then if decide(s.cond) else s.orelse, decide))
        else:
            out.append(s)
    return out


def schedule(stmts: list[Assign]) -> list[Phase]:
    """Split straight-line device statements into phases; host statements are left out."""
    phases = [Phase(0)]
    # value name -> index of the phase whose pass completes it
    ready_after: dict[str, int] = {}
    for s in stmts:
        if s.value.is_host:
            continue
        reads = {n.attr for n in walk_nodes(s.value) if n.op == "var" and not n.is_host}
        pending = [r for r in reads if ready_after.get(r, -1) >= len(phases) - 1]
        if pending:
            phases.append(Phase(len(phases)))
        cur = phases[-1]
        for r in reads:
            if r in ready_after and ready_after[r] < cur.index and r not in cur.consumes:
                cur.consumes.append(r)
        cur.statements.append(s)
        reduces = any(n.op in FULL_PASS_REDUCTIONS for n in walk_nodes(s.value))
        depends = [ready_after[r] for r in reads if r in ready_after]
        if reduces:
            ready_after[s.target] = cur.index
            cur.produces.append(s.target)
        elif depends and max(depends) >= cur.index:
            ready_after[s.target] = max(depends)
        else:
            ready_after.pop(s.target, None)
    return phases
