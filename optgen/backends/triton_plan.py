"""Planning for the triton backend: branch paths, if-conversion, reduction splitting and stages.

A *path* is one combination of the step's static conditions (those that depend only on
hyperparameters and facts about the parameter, decided once per parameter set); conditions that
depend on the step count or on host state are *dynamic* and are if-converted into selects, so one
kernel serves every step. Each path's device statements are split into *stages*: element passes
(one fused kernel each, reductions accumulated inside the pass) and vector stages (per-row /
per-column / per-matrix work on the reduced values) between them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace

from optgen.ir.codecs import codec_for, stored_names
from optgen.ir.nodes import Assign, If, Kind, Node, Program, Stmt, walk_nodes, walk_stmts
from optgen.ir.ops import CALLS, FULL_PASS_REDUCTIONS, NOT_IN_TRITON, REDUCTIONS, Op


class TritonUnsupported(Exception):
    """The program uses something the triton backend cannot express (yet)."""


@dataclass
class Stage:
    kind: str  # "pass" | "vec" | "call" (an op the runtime runs with torch between kernels)
    statements: list[Assign] = field(default_factory=list)
    layout: str = "flat"  # passes: "flat" (1-D chunks) or "tiled" (2-D tiles of each matrix)


@dataclass
class Temp:
    name: str
    kind: Kind
    accumulator: bool


@dataclass
class PathPlan:
    key: tuple[tuple[str, bool], ...]
    host: list[Assign]  # host statements the prologue evaluates, in order
    stages: list[Stage]
    hv: list[str]  # host values the device code reads, in hv order
    temps: list[Temp]  # workspace buffers (accumulators first)
    spills: dict[int, list[str]]  # stage index -> element temps stored for later stages
    creates: list[str]  # absent-initialised states this path writes
    #: (accumulator, workspace temp): per-tensor values the runtime sums into an accumulator
    accumulates: list[tuple[str, str]] = field(default_factory=list)


def group_decided(value: Node) -> bool:
    """A value of hyperparameters (and globals) and constants alone: the same for every parameter
    of a group."""
    return all(n.op in (Op.HYPER, Op.CONST) or n.args for n in walk_nodes(value))


def split_condition(value: Node) -> tuple[list[Node], list[Node]]:
    """A condition's maximal boolean parts of hyperparameters alone (``betas[0] > 0``), and the
    parts that read parameter facts or state (``ndim != 1``), through ``and`` / ``or`` / ``not``."""
    if value.boolean and group_decided(value):
        return [value], []
    if value.op in (Op.AND, Op.OR, Op.NOT):
        atoms: list[Node] = []
        rest: list[Node] = []
        for a in value.args:
            at, re_ = split_condition(a)
            atoms += at
            rest += re_
        return atoms, rest
    return [], [value]


def host_definitions(program: Program) -> dict[str, list[Node]]:
    """Every host value assigned to each name in the step (a name may be assigned on several paths)."""
    defs: dict[str, list[Node]] = {}
    for s in walk_stmts(program.body):
        if isinstance(s, Assign) and s.value.is_host:
            defs.setdefault(s.target, []).append(s.value)
    return defs


def static_conditions(program: Program, dyn: set[str],
                      defs: dict[str, list[Node]]) -> Iterator[tuple[str, list[Node], bool]]:
    """Each static ``if`` of the step: its condition's name, the values assigned to it, and whether
    they are of hyperparameters alone (decided once per group)."""
    for s in walk_stmts(program.body):
        if isinstance(s, If) and s.cond.op == Op.VAR and s.cond.attr not in dyn:
            values = defs.get(s.cond.attr, [])
            yield s.cond.attr, values, bool(s.cond.attr.startswith("_c") and values and
                                            all(group_decided(v) for v in values))


def decision_atoms(program: Program, dyn: set[str]) -> list[Node]:
    """The hyperparameter-only parts of the static conditions that also read parameter facts.

    With the parameter facts fixed, such a condition changes only when one of these parts does, so
    a group's snapshot holds their outcomes rather than the values they read: a scheduler moving
    ``beta1`` in ``beta1 > 0 and ndim != 1`` rebuilds nothing while it stays positive."""
    atoms: list[Node] = []
    for _, values, by_group in static_conditions(program, dyn, host_definitions(program)):
        if not by_group:
            atoms += [a for v in values for a in split_condition(v)[0] if a not in atoms]
    return atoms


def global_conditions(program: Program) -> list[str]:
    """Hoisted conditions on globals and hyperparameters alone (Prodigy's ``k < prodigy_steps``):
    static, so they choose the branch path, but re-evaluated per group at every step."""
    names = {g.name for g in program.globals}
    out = []
    for s in program.body:
        if isinstance(s, Assign) and s.value.is_host and s.value.boolean and s.target.startswith("_c") and any(
                n.op == Op.HYPER and n.attr[0] in names for n in walk_nodes(s.value)) and group_decided(s.value):
            out.append(s.target)
    return out


#: ops a branch computed as a select may not hold: they end a pass or call out (reductions,
#: Newton-Schulz), draw random numbers (both branches would draw), or read and write coded states
_NOT_SELECTABLE = REDUCTIONS | CALLS | {Op.SUMSQ, Op.RAND_LIKE, Op.STREAM_RAND, Op.STOCHASTIC_ROUND, Op.DECODE,
                                        Op.ENCODE, Op.PARAM_ATTR}  # param_attr: a condition's operand only


def _numeric_hypers(program: Program, value: Node) -> bool:
    """Every hyperparameter ``value`` reads has a number (or bool) as its default, and it compares
    with no ``None`` or string: the prologue's float slots hold it."""
    hypers = dict(program.hypers)
    for n in walk_nodes(value):
        if n.op == Op.CONST and (n.attr is None or isinstance(n.attr, str)):
            return False
        if n.op == Op.HYPER:
            h = hypers.get(n.attr[0])
            d = None if h is None else h.default
            if isinstance(d, (list, tuple)) and n.attr[1] is not None:
                d = d[n.attr[1]] if n.attr[1] < len(d) else None
            if isinstance(d, str) or not isinstance(d, (bool, int, float)) or (h.type not in (None, "float", "int", "bool")):
                return False
    return True


def _selectable_branch(stmts: list[Stmt], present: set[str], device_states: set[str],
                       conds: set[str]) -> dict[str, Kind] | None:
    """The targets of a branch and their kinds if it can run as a select: element-wise device
    statements and host values (no reduction, call, draw or coded state), conditionals only on
    ``conds`` (step-dependent or themselves selects), and only states every path has (one that
    exists under a flag would be read where it is absent); None otherwise."""
    kinds: dict[str, Kind] = {}
    for s in stmts:
        if isinstance(s, If):
            if s.cond.op != Op.VAR or s.cond.attr not in conds:
                return None
            for b in (s.then, s.orelse):
                inner = _selectable_branch(b, present, device_states, conds)
                if inner is None:
                    return None
                kinds.update(inner)
            continue
        if s.role in ("host_state", "accumulate", "call") or s.value.kind not in (Kind.ELEMENT, Kind.HOST):
            return None
        if s.target in device_states and s.target not in present:
            return None
        for n in walk_nodes(s.value):
            if n.op in _NOT_SELECTABLE or (n.op == Op.VAR and n.attr in device_states and n.attr not in present):
                return None
        kinds[s.target] = s.value.kind
    return kinds


def selected_conditions(program: Program, dyn: set[str]) -> set[str]:
    """Static conditions the kernels compute as selects instead of branch paths of their own.

    A condition of numeric hyperparameters alone (``weight_decay != 0``, ``cautious``) whose every
    ``if`` guards element-wise statements and host values only does not change a kernel's
    structure: both branches run in the same pass and a ``where`` keeps the taken one (bit for bit
    the taken branch's value; the other costs arithmetic, not memory traffic, in a memory-bound
    pass). The prologue computes the condition from the hyperparameter slots at every step, so
    switching such a flag renders nothing and rebuilds no table. Conditions that add a reduction,
    a whole-matrix call, a random draw, a coded or conditional state, or a host-state update stay
    branch paths."""
    defs = host_definitions(program)
    device_states = {d.name for d in program.state if d.kind != Kind.HOST}
    present = {d.name for d in program.state if d.kind != Kind.HOST and d.cond is None and d.init != "absent"}
    globals_ = set(global_conditions(program))
    ifs = [s for s in walk_stmts(program.body) if isinstance(s, If) and s.cond.op == Op.VAR and s.cond.attr not in dyn]
    chosen = {s.cond.attr for s in ifs}
    chosen = {n for n in chosen if n.startswith("_c") and n not in globals_ and defs.get(n)
              and all(group_decided(v) and _numeric_hypers(program, v) for v in defs[n])}
    while True:  # the largest set whose every if is selectable given the others
        keep = set(chosen)
        for s in ifs:
            if s.cond.attr not in keep:
                continue
            branches = [_selectable_branch(b, present, device_states, dyn | chosen) for b in (s.then, s.orelse)]
            if branches[0] is None or branches[1] is None or any(
                    branches[1][t] != k for t, k in branches[0].items() if t in branches[1]):
                keep.discard(s.cond.attr)
        if keep == chosen:
            return chosen
        chosen = keep


def dynamic_names(program: Program) -> set[str]:
    """Host names whose values the kernels read at every step: those that change from step to step
    (they depend on ``step``, host state or an optimizer-wide global such as Prodigy's ``d``), and
    the static conditions computed as selects (:func:`selected_conditions`)."""
    steps = step_dependent_names(program)
    return steps | selected_conditions(program, steps)


def step_dependent_names(program: Program) -> set[str]:
    """Host names whose values change from step to step."""
    dyn = {d.name for d in program.state if d.kind == Kind.HOST}
    names = {g.name for g in program.globals}
    conds = set(global_conditions(program))
    for s in walk_stmts(program.body):
        if isinstance(s, Assign) and s.value.is_host and s.target not in conds:
            if s.role == "host_state" or any(
                n.op in (Op.STEP, Op.INPUT) or (n.op == Op.VAR and n.attr in dyn) or (n.op == Op.HYPER and n.attr[0] in names)
                for n in walk_nodes(s.value)
            ):
                dyn.add(s.target)
    return dyn


def restrictions(program: Program) -> list[tuple[object, str]]:
    """What the triton backend refuses in a hoisted program, found from its structure at build
    time (``optgen check`` reports each at its spec line): ``(position, message)`` pairs, the
    messages those the runner would raise when a parameter group takes the path."""
    dyn = dynamic_names(program)
    found: list[tuple[object, str]] = []

    def walk(stmts: list[Stmt], inside: If | None) -> None:
        for s in stmts:
            if isinstance(s, If):
                dynamic = inside if inside is not None else (s if s.cond.attr in dyn else None)
                walk(s.then, dynamic)
                walk(s.orelse, dynamic)
            elif inside is not None and s.role in ("host_state", "accumulate"):
                what = ("host state updated inside a step-dependent condition" if s.role == "host_state"
                        else "an accumulation inside a step-dependent condition")
                found.append((s.pos or inside.pos, f"{what} ('{s.target}'; the condition at line "
                              f"{inside.pos.line if inside.pos else '?'}): compute it with where() instead"))

    walk(program.body, None)
    return found


def enumerate_paths(stmts: list[Stmt], dyn: set[str], decided: tuple = (),
                    fixed: dict[str, bool] | None = None) -> list[tuple[tuple, list[Stmt]]]:
    """Every feasible combination of static conditions, with the straight-line statements it runs.

    A condition decided earlier on a path (the same flag switching several rewrites) takes the same
    branch again, so contradictory combinations are never produced. Static conditions nested in a
    step-dependent one are decided per path too; the step-dependent one stays a conditional.
    ``fixed`` conditions take only the given branch (still recorded in the key where met).
    """
    fixed = fixed or {}
    result: list[tuple[tuple, list[Stmt]]] = [(decided, [])]
    for s in stmts:
        new = []
        for key, body in result:
            if isinstance(s, If) and s.cond.attr not in dyn:
                known = dict(key)
                if s.cond.attr in known:
                    options = [known[s.cond.attr]]
                else:
                    options = [fixed[s.cond.attr]] if s.cond.attr in fixed else [True, False]
                for taken in options:
                    k1 = key if s.cond.attr in known else key + ((s.cond.attr, taken),)
                    for k2, b2 in enumerate_paths(s.then if taken else s.orelse, dyn, k1, fixed):
                        new.append((k2, body + b2))
            elif isinstance(s, If):
                for kt, bt in enumerate_paths(s.then, dyn, key, fixed):
                    for ke, be in enumerate_paths(s.orelse, dyn, kt, fixed):
                        new.append((ke, body + [If(s.cond, bt, be, s.pos)]))
            else:
                new.append((key, body + [s]))
        result = new
    return result


def if_convert(stmts: list[Stmt], kinds: dict[str, Kind], counter: list[int]) -> list[Assign]:
    """Replace step-dependent conditionals by both branches and a select of every target."""
    out: list[Assign] = []
    for s in stmts:
        if not isinstance(s, If):
            out.append(s)
            kinds[s.target] = s.value.kind
            continue
        branches = []
        before = dict(kinds)
        for branch in (s.then, s.orelse):
            flat = if_convert(branch, kinds, counter)
            renamed: dict[str, Node] = {}
            body: list[Assign] = []
            for a in flat:
                if a.role == "host_state":
                    raise TritonUnsupported("host state updated inside a step-dependent condition")
                if a.role == "accumulate":
                    raise TritonUnsupported("an accumulation inside a step-dependent condition")
                counter[0] += 1
                name = f"{a.target}__b{counter[0]}"
                body.append(Assign(name, _substitute(a.value, renamed), a.pos, "temp"))
                renamed[a.target] = Node("var", kind=a.value.kind, attr=name, boolean=a.value.boolean)
            branches.append((body, renamed, {a.target: a for a in flat}))
        for body, _, _ in branches:
            out.extend(body)
        targets: list[str] = []
        for _, _, orig in branches:
            targets += [t for t in orig if t not in targets]
        for t in targets:
            orig = branches[0][2].get(t) or branches[1][2].get(t)
            one_sided = t not in branches[0][2] or t not in branches[1][2]
            if one_sided and orig.role == "temp" and t not in before:
                kinds.pop(t, None)  # a temporary local to one branch: never read after the conditional
                continue
            kind = orig.value.kind
            pick = [br[1].get(t, Node("var", kind=before.get(t, kind), attr=t)) for br in branches]
            out.append(Assign(t, Node("where", (s.cond, pick[0], pick[1]), kind=kind), orig.pos, orig.role))
            kinds[t] = kind
    return out


def _var_kinds(stmts: list[Assign]) -> list[Assign]:
    """Reads of a temporary take the kind its assignment on this path has: a feature may give a
    temporary another kind on one flag path (Coupled Adam's per-column denominator), while the
    statements after the conditional keep the node kind of the other path."""
    kinds: dict[str, Kind] = {}

    def fix(n: Node) -> Node:
        if n.op == Op.VAR and n.attr in kinds and kinds[n.attr] != n.kind:
            return replace(n, kind=kinds[n.attr])
        return replace(n, args=tuple(fix(a) for a in n.args)) if n.args else n

    out = []
    for s in stmts:
        v = fix(s.value)
        out.append(s if v == s.value else Assign(s.target, v, s.pos, s.role))
        if s.role == "temp":
            kinds[s.target] = v.kind
        else:
            kinds.pop(s.target, None)
    return out


def _substitute(n: Node, names: dict[str, Node]) -> Node:
    if n.op == Op.VAR and n.attr in names:
        return names[n.attr]
    if not n.args:
        return n
    return replace(n, args=tuple(_substitute(a, names) for a in n.args))


#: reductions of per-row / per-column values (normalize, dot, matmean): vector-stage work, no pass
_SMALL_REDUCTIONS = REDUCTIONS - FULL_PASS_REDUCTIONS


def split_reductions(stmts: list[Assign]) -> list[Assign]:
    """Give every full-pass reduction (and every nested normalize/dot) its own statement.

    ``mean`` becomes a ``sum`` divided by ``numel`` and ``norm`` the square root of a ``sumsq``,
    so that passes only ever accumulate sums.
    """
    out: list[Assign] = []
    counter = {"r": 0, "s": 0, "n": 0}

    def extract(n: Node, top: bool) -> Node:
        n = replace(n, args=tuple(extract(a, False) for a in n.args)) if n.args else n
        if n.op in CALLS:
            # a whole-matrix op (Newton-Schulz): its own stage, run by the runtime with torch on the
            # workspace copy of its input, between the passes that produce and consume it
            x, name = n.args[0], f"_x{counter['n']}"
            out.append(Assign(name, x, role="temp"))  # a workspace copy the runtime reads
            x = Node("var", kind=x.kind, attr=name)
            for a in n.args[1:]:
                if a.op not in (Op.VAR, Op.CONST) or not a.is_host:
                    raise TritonUnsupported(f"{n.op}()'s host arguments must be simple values")
            name = f"_n{counter['n']}"
            counter["n"] += 1
            out.append(Assign(name, replace(n, args=(x, *n.args[1:])), role="call"))
            return Node("var", kind=n.kind, attr=name)
        if n.op == Op.SUM and n.args[0].kind not in (Kind.ELEMENT, Kind.SLICE):
            # the sum of a per-row / per-column vector: vector-stage work, not a pass
            name = f"_s{counter['s']}"
            counter["s"] += 1
            out.append(Assign(name, n, role="temp"))
            return Node("var", kind=n.kind, attr=name)
        if n.op in (Op.ROWNORM, Op.COLNORM):  # the square root of a per-row / per-column sum of squares
            x = n.args[0]
            sq = Node("rowsum" if n.op == Op.ROWNORM else "colsum", (Node("mul", (x, x), kind=x.kind),), kind=n.kind)
            name = f"_r{counter['r']}"
            counter["r"] += 1
            out.append(Assign(name, sq, role="reduce"))
            return Node("sqrt", (Node("var", kind=n.kind, attr=name),), kind=n.kind)
        if n.op in FULL_PASS_REDUCTIONS:
            name = f"_r{counter['r']}"
            counter["r"] += 1
            op = {"mean": "sum", "norm": "sumsq"}.get(n.op, n.op)
            out.append(Assign(name, replace(n, op=op), role="reduce"))
            ref = Node("var", kind=n.kind, attr=name)
            if n.op == Op.MEAN:
                return Node("div", (ref, Node("meta", attr="numel")), kind=n.kind)
            if n.op == Op.NORM:
                return Node("sqrt", (ref,), kind=n.kind)
            return ref
        if n.op in _SMALL_REDUCTIONS and not top:
            name = f"_s{counter['s']}"
            counter["s"] += 1
            out.append(Assign(name, n, role="temp"))
            return Node("var", kind=n.kind, attr=name)
        return n

    for s in stmts:
        if s.value.is_host:
            out.append(s)
            continue
        value = extract(s.value, True)
        out.append(Assign(s.target, value, s.pos, s.role))
    return out


def _reads(n: Node) -> set[str]:
    return {x.attr for x in walk_nodes(n) if x.op == Op.VAR and not x.is_host}


def is_small(s: Assign) -> bool:
    """Per-row/column/matrix/tensor work that needs no pass over the elements."""
    if s.role in ("reduce", "call"):
        return False
    # per-slice values live on the lanes of an element pass
    big = (Kind.ELEMENT, Kind.SLICE)
    return s.value.kind not in big and all(x.kind not in big for x in walk_nodes(s.value))


def make_stages(device: list[Assign], bits: frozenset[str] = frozenset()) -> list[Stage]:
    """Alternate element passes and vector stages, keeping program order where it matters.

    ``bits``: 1-bit states, stored packed along the rows of each matrix (tiled passes only)."""
    segs: list[Stage] = [Stage("pass"), Stage("vec")]
    produced: dict[str, int] = {}
    reduced: dict[str, int] = {}
    cur = 0
    for s in device:
        reads = _reads(s.value)
        if s.role == "call":
            segs.append(Stage("call", [s]))
            produced[s.target] = len(segs) - 1
            segs += [Stage("pass"), Stage("vec")]
            cur = len(segs) - 2
            continue
        if is_small(s):
            segs[cur + 1].statements.append(s)
            produced[s.target] = cur + 1
            continue
        vec = segs[cur + 1].statements
        vec_names = {x.target for x in vec} | set().union(*(_reads(x.value) for x in vec)) if vec else set()
        conflict = any(reduced.get(r) == cur or produced.get(r) == cur + 1 for r in reads)
        conflict |= s.target in vec_names
        if conflict:
            cur += 2
            segs += [Stage("pass"), Stage("vec")]
        segs[cur].statements.append(s)
        produced[s.target] = cur
        if s.role == "reduce":
            reduced[s.target] = cur
    stages = [st for st in segs if st.statements]
    for st in stages:
        if st.kind == "pass":
            tiled = any(
                n.kind in (Kind.ROW, Kind.COL, Kind.MATRIX) or (n.op == Op.VAR and n.attr in bits)
                for a in st.statements for n in walk_nodes(a.value)
            ) or any(a.target in bits for a in st.statements)
            st.layout = "tiled" if tiled else "flat"
    return stages


def inline_reduced(device: list[Assign]) -> list[Assign]:
    """Temporaries computed from the step's optimizer-wide reductions, host values and constants
    alone (a clipping coefficient): the same for every tensor, so each pass computes them from the
    reductions it loads instead of a vector stage storing them (one launch fewer)."""
    known: dict[str, Node] = {}
    out: list[Assign] = []
    for s in device:
        value = _substitute(s.value, known) if known else s.value
        if s.role == "temp" and all(n.op in (Op.REDUCED, Op.CONST) or n.is_host or n.args for n in walk_nodes(value)) \
                and any(n.op == Op.REDUCED for n in walk_nodes(value)):
            known[s.target] = value
            continue
        out.append(s if value is s.value else Assign(s.target, value, s.pos, s.role))
    return out


def plan_path(program: Program, key: tuple, stmts: list[Stmt], dyn: set[str]) -> PathPlan:
    for s in walk_stmts(stmts):
        for n in walk_nodes(s.value if isinstance(s, Assign) else s.cond):
            if n.op in NOT_IN_TRITON:
                raise TritonUnsupported(f"{NOT_IN_TRITON[n.op]} in triton kernels (not implemented yet: use "
                                        "backend='torch' or 'reference')")
    kinds: dict[str, Kind] = {}
    straight = _var_kinds(if_convert(stmts, kinds, [0]))
    straight = split_reductions(straight)
    host = [s for s in straight if s.value.is_host]
    device = [s for s in straight if not s.value.is_host]
    # each accumulation leaves one value per tensor in the workspace; the runtime sums them
    accumulates: list[tuple[str, str]] = []
    for i, s in enumerate(device):
        if s.role == "accumulate":
            name = f"_acc{len(accumulates)}_{s.target}"
            accumulates.append((s.target, name))
            device[i] = Assign(name, s.value, s.pos, "temp")
    if program.reductions:
        device = inline_reduced(device)
    stages = make_stages(device, frozenset(d.name for d in program.state if d.dtype == "bits"))

    # Host values the device code reads, and the host statements they need.
    hv: list[str] = []
    for s in device:
        for n in walk_nodes(s.value):
            if n.op == Op.VAR and n.is_host and n.attr not in hv:
                hv.append(n.attr)
    needed = set(hv)
    keep: list[Assign] = []
    for s in reversed(host):
        if s.target in needed or s.role == "host_state":
            keep.append(s)
            needed |= {n.attr for n in walk_nodes(s.value) if n.op == Op.VAR}
    keep.reverse()
    for s in keep:
        for n in walk_nodes(s.value):
            if n.op in (Op.HAS, Op.PARAM_ATTR):
                raise TritonUnsupported(f"'{n.op}' used as a value (only in conditions) in '{s.target}'")

    # Workspace: reduction accumulators, vector-stage temporaries, element temps crossing stages.
    state_names = {d.name for d in program.state}
    temps: list[Temp] = [Temp(s.target, s.value.kind, True) for s in device if s.role == "reduce"]
    temps += [Temp(s.target, s.value.kind, False) for s in device if s.role == "call"]
    for st in stages:
        if st.kind == "vec":
            for s in st.statements:
                if s.target not in state_names and all(t.name != s.target for t in temps):
                    temps.append(Temp(s.target, s.value.kind, False))
    spills: dict[int, list[str]] = {}
    for i, st in enumerate(stages):
        if st.kind != "pass":
            continue
        for s in st.statements:
            if s.role in ("param", "state", "reduce", "call"):
                continue
            later = [x for later_st in stages[i + 1:] for x in later_st.statements]
            if any(s.target in _reads(x.value) for x in later) and s.target not in spills.get(i, []):
                spills.setdefault(i, []).append(s.target)
                if all(t.name != s.target for t in temps):
                    temps.append(Temp(s.target, s.value.kind, False))
    written = set()
    for s in device:
        written.add(s.target)
        if s.value.op == Op.ENCODE:  # a coded state's write writes every tensor its codec stores
            written.update(stored_names(s.target, codec_for(s.value.attr[0]), s.value.attr[1]).values())
    creates = [d.name for d in program.state if d.init == "absent" and d.name in written]
    return PathPlan(key, keep, stages, hv, temps, spills, creates, accumulates)


def plan_program(program: Program) -> tuple[set[str], list[PathPlan]]:
    """All path plans of a hoisted program."""
    dyn = dynamic_names(program)
    return dyn, [plan_path(program, key, stmts, dyn) for key, stmts in enumerate_paths(program.body, dyn)]
