"""The torch backend's code generator: the IR step as multi-tensor Python code.

The generated function ``_device_step(h, param, grad, S)`` runs one bucket of parameters that take
the same branches: ``param``/``grad`` are lists of tensors, ``S`` maps state names to lists, and
``h`` holds the host values of the bucket (one number, or one per tensor). Every op is a call into
:mod:`optgen.runtime.foreach`; values are updated in place where that is safe (the op's first
operand is the target itself or a temporary that nothing else sees).
"""

from __future__ import annotations

from dataclasses import replace

from optgen.backends.naming import Names, SourceText, reads_of
from optgen.ir.codecs import codec_for, stored_names
from optgen.ir.nodes import Assign, If, Kind, Node, Program, Stmt, walk_nodes, walk_stmts
from optgen.ir.ops import OWN_SHAPE, Op

INPLACE = {
    "add", "sub", "mul", "div", "rdiv", "rsub", "neg", "pow", "sqrt", "rsqrt", "abs", "sign", "exp", "log",
    "reciprocal", "maximum", "minimum", "lerp", "addcmul", "addcdiv", "axpy", "cos", "sin", "floor", "atan",
}
#: ops that may return their argument itself (no copy when the dtype already matches)
_MAY_ALIAS = {"float32", "float64", "cast", "contiguous", "strided"}
_KIND_NAME = {Kind.MATRIX: "matrix", Kind.ROW: "row", Kind.COL: "col", Kind.ELEMENT: "element", Kind.SLICE: "slice"}
#: reductions told their operand's kind (under sharded parameters it says which dims span ranks)
_OPERAND_KIND = {"normalize": None, "dot": None, "matmean": None, "sum": Kind.ELEMENT, "mean": Kind.ELEMENT, "norm": Kind.ELEMENT, "maxabs": Kind.ELEMENT,
                 "vdot": Kind.ELEMENT}


#: The names ``_device_step`` itself uses: no value may take one.
_RESERVED = ("h", "param", "grad", "S", "A", "F")


class TorchEmitter:
    def __init__(self, program: Program):
        self.program = program
        self.lines: list[str] = []
        self.depth = 1
        self.counter = 0
        #: each IR name's local (its own name, a suffix on a clash), and the statements' text
        self.names = Names(_RESERVED)
        self.locals: dict[str, str] = {}
        self.text = SourceText(program)
        #: the fresh temporaries of the statement being emitted, named when it is done
        self.pending: list[str] = []
        self.device_state = [d.name for d in program.state if d.kind != Kind.HOST]
        self.absent_ok = {d.name for d in program.state if d.init == "absent"}
        #: temporaries whose tensors no other name references (safe to update in place)
        self.owned: set[str] = set()
        order = list(walk_stmts(program.body))
        self.position = {id(s): i for i, s in enumerate(order)}
        self.writes_after: dict[int, set[str]] = {}
        seen: set[str] = set()
        for s in reversed(order):
            self.writes_after[id(s)] = set(seen)
            if isinstance(s, Assign):
                seen.add(s.target)

    # -- naming --------------------------------------------------------------------------------
    def local(self, name: str) -> str:
        if name in ("param", "grad"):
            return name
        if name not in self.locals:
            self.locals[name] = self.names.new(name)
        return self.locals[name]

    def fresh(self) -> str:
        """A placeholder for a temporary of the current statement (NUL-delimited: in no name or
        number), named after the statement's target by :meth:`name_temporaries`."""
        self.counter += 1
        token = f"\x00{self.counter}\x00"
        self.pending.append(token)
        return token

    def name_temporaries(self, start: int, target: str, final: str | None = None) -> None:
        """Name the statement's temporaries (its lines from ``start`` on) after ``target``; the
        one in ``final`` becomes the target's own local (no ``x = x_1`` line)."""
        for token in self.pending:
            name = self.local(target) if token == final else self.names.new(target)
            self.lines[start:] = [line.replace(token, name) for line in self.lines[start:]]
        self.pending = []

    def emit(self, line: str) -> None:
        self.lines.append("    " * self.depth + line)

    # -- expressions ---------------------------------------------------------------------------
    def host(self, n: Node) -> str:
        if n.op == Op.CONST:
            return repr(n.attr)
        if n.op == Op.VAR:
            return f'h["{n.attr}"]'
        raise AssertionError(f"unhoisted host expression {n.op}")  # pragma: no cover

    def arg(self, a: Node, parent: Node) -> tuple[str, bool]:
        if a.is_host:
            return self.host(a), False
        code, fresh = self.expr(a)
        if parent.op not in OWN_SHAPE and a.kind != parent.kind and a.kind != Kind.TENSOR:
            return f'F.align({code}, "{_KIND_NAME[a.kind]}", "{_KIND_NAME[parent.kind]}")', False
        return code, fresh

    def stored(self, state: str, codec: str, non_neg: bool) -> str:
        """A coded state's stored tensors (feature state_precision) by suffix."""
        names = stored_names(state, codec_for(codec), non_neg)
        return "{" + ", ".join(f'"{k}": {self.local(v)}' for k, v in names.items()) + "}"

    def expr(self, n: Node) -> tuple[str, bool]:
        """Code for a device value and whether it is a fresh temporary."""
        if n.op == Op.VAR:
            return self.local(n.attr), False
        if n.op == Op.DECODE:
            codec, state, non_neg = n.attr
            name = self.fresh()
            # packed or padded codes do not have the parameter's shape: the decode takes the parameters'
            like = "" if codec_for(codec).codes_shaped() else ", param"
            self.emit(f'{name} = F.decode("{codec}", {non_neg}, {self.stored(state, codec, non_neg)}{like})')
            return name, True
        if n.op == Op.REDUCED:  # an optimizer-wide reduction: the runtime puts one per tensor in S
            return f'S["{n.attr}"]', False
        args = [self.arg(a, n) for a in n.args]
        first, first_fresh = args[0]
        rest = ", ".join(code for code, _ in args[1:])
        if first_fresh and n.op in INPLACE and n.args[0].kind == n.kind:
            self.emit(f"F.{n.op}_({first}{', ' + rest if rest else ''})")
            return first, True
        codes = [code for code, _ in args]
        narrow = n.op == Op.WHERE and all(a.is_host for a in n.args[1:])
        if narrow:
            codes.append("like=param")  # two numbers: the result takes the parameters' dtype
        if n.op in _OPERAND_KIND and n.args[0].kind != _OPERAND_KIND[n.op]:
            codes.append(f'kind="{_KIND_NAME[n.args[0].kind]}"')
        name = self.fresh()
        self.emit(f"{name} = F.{n.op}({', '.join(codes)})")
        # Not a temporary to update in place: an alias, or a value in the parameters' dtype whatever
        # its operands (an in-place op with a float32 operand would round to bf16 where out of place
        # promotes: a 0/1 mask times a float32 decay scale).
        return name, n.op not in _MAY_ALIAS and not narrow

    # -- statements ----------------------------------------------------------------------------
    def block(self, stmts: list[Stmt]) -> None:
        emitted = False
        for s in stmts:
            if isinstance(s, If):
                before = set(self.owned)
                self.emit(f"# {self.text.condition(s.cond)}")
                self.emit(f'if h["{s.cond.attr}"]:')
                self.depth += 1
                n = len(self.lines)
                self.block(s.then)
                if len(self.lines) == n:
                    self.emit("pass")
                self.depth -= 1
                owned_then, self.owned = self.owned, before
                if _has_device_work(s.orelse):
                    self.emit("else:")
                    self.depth += 1
                    self.block(s.orelse)
                    self.depth -= 1
                self.owned &= owned_then  # owned after the conditional only if owned on both sides
                emitted = True
            elif not s.value.is_host:
                self.emit(f"# {self.text.statement(s)}")
                start = len(self.lines)
                final = self.assign(s)
                self.name_temporaries(start, s.target, final)
                emitted = True
        return emitted

    def assign(self, s: Assign) -> str | None:
        """Emit statement ``s``; returns the temporary that is to be named as the target itself
        (None: the target keeps its binding line)."""
        target = self.local(s.target)
        v = _peephole(s.value)
        if s.role == "accumulate":  # one value per tensor, summed by the runtime in parameter order
            code, _ = self.expr(v)
            self.emit(f'A.append(("{s.target}", {code}))')
            return
        if s.role in ("temp", "grad"):
            # A temporary that holds tensors only it references is updated in place (the same
            # rounding as out of place, without new allocations).
            spine = self._spine(v, s.target) if s.target in self.owned else None
            if spine is not None:
                for node in reversed(spine):
                    rest = [self.arg(a, node)[0] for a in node.args[1:]]
                    self.emit(f"F.{node.op}_({target}{''.join(', ' + r for r in rest)})")
                return
            start = len(self.lines)
            code, fresh = self.expr(v)
            if v.op == Op.VAR and v.attr in (*self.device_state, "param") and v.attr in self.writes_after[id(s)]:
                code, fresh = f"F.copy({code})", True  # the source is written later: keep this value
            # The statement's own temporary may take the target's name when nothing after its
            # first line reads the target's old value.
            final = None
            if code in self.pending and (s.target not in reads_of(v) or len(self.lines) == start + 1):
                final = code
            else:
                self.emit(f"{target} = {code}")
            if v.op == Op.VAR:
                self.owned.discard(v.attr)  # now an alias
            if fresh:
                self.owned.add(s.target)
            else:
                self.owned.discard(s.target)
            return final
        if v.op == Op.ENCODE:
            code, _ = self.expr(v.args[0])
            codec, non_neg = v.attr
            self.emit(f'F.encode_("{codec}", {non_neg}, {self.stored(s.target, codec, non_neg)}, {code})')
            return
        spine = self._spine(v, s.target)
        if spine is not None:
            for node in reversed(spine):
                rest = [self.arg(a, node)[0] for a in node.args[1:]]
                self.emit(f"F.{node.op}_({target}{''.join(', ' + r for r in rest)})")
            return
        code, _ = self.expr(v)
        if v.op == Op.VAR:
            self.owned.discard(v.attr)  # stored by reference below, or copied: no longer private
        if s.target in self.absent_ok:
            self.emit(f'{target} = F.store(S, "{s.target}", {code})')
        else:
            self.emit(f"F.assign_({target}, {code})")

    def _spine(self, v: Node, target: str) -> list[Node] | None:
        """The chain of in-place ops that updates ``target`` from its own value, outermost first."""
        spine = []
        node = v
        while node.op in INPLACE and node.args and node.args[0].kind == node.kind:
            spine.append(node)
            node = node.args[0]
        if not spine or not (node.op == Op.VAR and node.attr == target):
            return None
        for n in spine:
            for a in n.args[1:]:
                if any(x.op == Op.VAR and x.attr == target for x in walk_nodes(a)):
                    return None
        return spine


def _peephole(n: Node) -> Node:
    """``a + (-b)`` as ``a - b``: the same IEEE result (subtraction is addition of the negation),
    without materialising ``-b``."""
    if n.args:
        n = replace(n, args=tuple(_peephole(a) for a in n.args))
    if n.op == Op.ADD and len(n.args) == 2 and n.args[1].op == Op.NEG and not n.args[1].is_host \
            and n.args[1].kind == n.kind:
        return replace(n, op="sub", args=(n.args[0], n.args[1].args[0]))
    return n


def _has_device_work(stmts: list[Stmt]) -> bool:
    return any(isinstance(s, Assign) and not s.value.is_host for s in walk_stmts(stmts))


def render_device_step(program: Program) -> str:
    """The source of ``_device_step`` for a hoisted program."""
    em = TorchEmitter(program)
    if em.device_state:
        em.emit("# the states, one list of tensors each")
    for name in em.device_state:
        em.emit(f'{em.local(name)} = S["{name}"]')
    em.block(program.body)
    if not em.lines:
        em.emit("pass")
    header = f"def _device_step(h, param, grad, S{', A' if program.accumulators else ''}):\n"
    doc = '    """One bucket of parameters (see optgen.backends.torch_codegen)."""\n'
    return header + doc + "\n".join(em.lines) + "\n"
