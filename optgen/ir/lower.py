"""Lowering: a parsed :class:`~optgen.spec.loader.Spec` becomes a typed IR :class:`Program`.

Every name is resolved, every value gets a shape kind, and the arithmetic is canonicalised into
the ops whose rounding the published code has (``a + s*b*c`` is torch's ``addcmul``,
``a + s*b/c`` its ``addcdiv``, ``a + s*b`` its ``add(alpha=s)``, ``s / t`` its reciprocal-multiply).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from optgen.errors import SpecError, did_you_mean
from optgen.ir.library import COMPARISONS, FUNCTIONS, nearest_functions
from optgen.ir.nodes import (
    AccumulatorDecl,
    Assign,
    GlobalDecl,
    If,
    Kind,
    Node,
    Program,
    StateDecl,
    Stmt,
    join,
    walk_nodes,
)
from optgen.ir.ops import CALLS, Op
from optgen.ir.reductions import lower_reductions
from optgen.spec import expr as E
from optgen.spec.loader import SAssign, SIf, Spec, SScope
from optgen.spec.model import HyperparameterSpec

META = ("numel", "ndim", "rows", "cols", "bf16", "dim0", "dim1", "big_dims", "square_rows", "square_cols")
_KINDS = {
    "element": Kind.ELEMENT,
    "row": Kind.ROW,
    "col": Kind.COL,
    "matrix": Kind.MATRIX,
    "tensor": Kind.TENSOR,
    "host": Kind.HOST,
    "slice": Kind.SLICE,
}


@dataclass
class ScopeSite:
    """A use of a block that declares features, as lowered: its statements are ``[start, end)`` of
    the statement list at ``path`` (from the body, each step an If's index and branch), ``roles``
    the block's ``roles:`` bound among them; the features pass applies the block's features there."""

    path: tuple[tuple[int, str], ...]
    start: int
    end: int
    scope: SScope
    roles: dict[str, list[tuple[str, Any]]]
    inside: bool = False  # being lowered (scopes do not nest)


class Lowerer:
    """Resolves names and types expressions against one spec's declarations."""

    def __init__(self, spec_path: str, hypers: list[tuple[str, HyperparameterSpec]], state: list[StateDecl],
                 step_store: str, globals_: tuple[str, ...] = (), accumulators: tuple[str, ...] = (),
                 slice_stride: str | None = None):
        self.path = spec_path
        self.hypers = dict(hypers)
        self.scalars: dict[str, tuple[str, int | None, str]] = {}
        for name, h in hypers:
            t = h.inferred_type()
            if h.as_:
                for i, alias in enumerate(h.as_):
                    self.scalars[alias] = (name, i, t)
            else:
                self.scalars[name] = (name, None, t)
        self.state = {s.name: s for s in state}
        self.step_store = step_store
        #: optimizer-wide values kept in the param groups: read like hyperparameters
        self.globals = set(globals_)
        for g in globals_:
            self.scalars[g] = (g, None, "float")
        self.accumulators = set(accumulators)
        #: optimizer-wide values of the step's first phase (``reductions:``), read as per-tensor values
        self.reductions: set[str] = set()
        self.slice_stride = slice_stride
        self.temps: dict[str, tuple[Kind, bool]] = {}
        self.partial: set[str] = set()
        #: the spec's named facts (host expressions of hyperparameters and parameter facts)
        self.facts: dict[str, Node] = {}
        #: the uses of blocks that declare features (where their statements were lowered)
        self.scopes: list[ScopeSite] = []

    # -- names -----------------------------------------------------------------------------
    def known_names(self) -> list[str]:
        names = ["param", "grad", *META, *self.scalars, *self.state, *self.temps, *self.facts]
        if self.step_store != "none":
            names.append("step")
        return names

    def name(self, e: E.Name, field: str) -> Node:
        n = e.id
        if n in ("param", "grad"):
            return Node("var", kind=Kind.ELEMENT, attr=n)
        if n == "step":
            if self.step_store == "none":
                raise SpecError(e.pos, field, "this spec keeps no step counter (step: {store: none})")
            return Node("step")
        if n in META:
            return Node("meta", attr=n)
        if n in self.facts:
            return self.facts[n]
        if n in self.temps:
            kind, boolean = self.temps[n]
            return Node("var", kind=kind, attr=n, boolean=boolean)
        if n in self.partial:
            raise SpecError(e.pos, field, f"'{n}' is assigned in only one branch of a conditional above")
        if n in self.state:  # a bool state (a mask) reads as an elementwise condition
            return Node("var", kind=self.state[n].kind, attr=n, boolean=self.state[n].dtype == "bool")
        if n in self.reductions:
            return Node("reduced", kind=Kind.TENSOR, attr=n)
        if n in self.accumulators:
            raise SpecError(e.pos, field, f"accumulator '{n}' is only added to here ('{n} += value'); "
                                          "finalize: reads its sum")
        if n in self.scalars:
            hname, idx, t = self.scalars[n]
            if t in ("any", "dtype"):
                raise SpecError(e.pos, field, f"hyperparameter '{n}' is not a number and cannot be used in maths")
            return Node("hyper", attr=(hname, idx), boolean=(t == "bool"))
        raise SpecError(e.pos, field, f"unknown name '{n}'{did_you_mean(n, self.known_names())}")

    # -- expressions -----------------------------------------------------------------------
    def expr(self, e: E.Expr, field: str) -> Node:
        if isinstance(e, E.Const):
            if isinstance(e.value, str) or e.value is None:
                raise SpecError(e.pos, field, f"{e.value!r} is only allowed compared (== / !=) with a "
                                              "non-numeric hyperparameter, or as param_attr's first argument")
            return Node("const", attr=e.value, boolean=isinstance(e.value, bool))
        if isinstance(e, E.Name):
            return self.name(e, field)
        if isinstance(e, E.Unary):
            a = self.expr(e.operand, field)
            if e.op == Op.NOT:
                self._need_host_bool(a, e.operand, field, "'not'")
                return Node("not", (a,), boolean=True)
            self._need_number(a, e.operand, field)
            return Node("neg", (a,), kind=a.kind)
        if isinstance(e, E.BoolOp):
            args = tuple(self.expr(v, field) for v in e.values)
            for a, v in zip(args, e.values):
                self._need_host_bool(a, v, field, f"'{e.op}'")
            return Node(e.op, args, boolean=True)
        if isinstance(e, E.Compare):
            choice = self._choice_compare(e, field)
            if choice is not None:
                return choice
            a, b = self.expr(e.left, field), self.expr(e.right, field)
            kind = self._join(a, b, e, field)
            return Node(COMPARISONS[e.op], (a, b), kind=kind, boolean=True)
        if isinstance(e, E.Binary):
            a, b = self.expr(e.left, field), self.expr(e.right, field)
            self._need_number(a, e.left, field)
            self._need_number(b, e.right, field)
            return self.binary(e.op, a, b, e, field)
        if isinstance(e, E.Call):
            return self.call(e, field)
        raise SpecError(e.pos, field, f"unsupported expression {type(e).__name__}")  # pragma: no cover

    def _choice_compare(self, e: E.Compare, field: str) -> Node | None:
        """``hyper == 'value'`` / ``hyper != None``: a condition on a non-numeric hyperparameter
        (a mode string, an optional argument), decided on the host like any static condition."""
        sides = (e.left, e.right)
        const = [s for s in sides if isinstance(s, E.Const) and (s.value is None or isinstance(s.value, str))]
        if not const:  # True / False compared with a non-numeric hyperparameter (an optional flag)
            const = [s for s in sides if isinstance(s, E.Const) and isinstance(s.value, bool)]
            others = [s for s in sides if isinstance(s, E.Name) and s.id in self.scalars]
            if not const or not others or self.scalars[others[0].id][2] != "any":
                return None
        other = e.right if const[0] is e.left else e.left
        if e.op not in ("==", "!="):
            raise SpecError(e.pos, field, f"{const[0].value!r} can only be compared with == or !=")
        if not (isinstance(other, E.Name) and other.id in self.scalars):
            raise SpecError(other.pos, field, f"{const[0].value!r} can only be compared with a hyperparameter")
        hname, idx, _ = self.scalars[other.id]
        hyper = Node("hyper", attr=(hname, idx))
        return Node(COMPARISONS[e.op], (hyper, Node("const", attr=const[0].value)), boolean=True)

    def _join(self, a: Node, b: Node, e: E.Expr, field: str) -> Kind:
        k = join(a.kind, b.kind)
        if k is None:
            raise SpecError(e.pos, field, f"cannot combine a {a.kind.label} and a {b.kind.label} value "
                                          "elementwise (use outer(row, col))")
        return k

    def _need_number(self, n: Node, e: E.Expr, field: str) -> None:
        if n.boolean and not n.is_host:
            raise SpecError(e.pos, field, "a boolean mask is not a number (use where(mask, a, b))")

    def _need_host_bool(self, n: Node, e: E.Expr, field: str, what: str) -> None:
        if not n.is_host:
            raise SpecError(e.pos, field, f"{what} needs values decided per parameter, but this is "
                                          f"{n.kind.label} (use where() for elementwise choices)")

    def binary(self, op: str, a: Node, b: Node, e: E.Binary, field: str) -> Node:
        name = {"+": "add", "-": "sub", "*": "mul", "/": "div", "**": "pow", "%": "mod"}[op]
        if a.is_host and b.is_host:
            return Node(name, (a, b))
        kind = self._join(a, b, e, field)
        if op == "**":
            if not b.is_host:
                raise SpecError(e.right.pos, field, "the exponent of a device value must be a host scalar")
            return Node("pow", (a, b), kind=kind)
        if op in ("+", "-"):
            if b.is_host:
                return Node(name, (a, b), kind=kind)
            if a.is_host:
                return Node("add", (b, a), kind=kind) if op == "+" else Node("rsub", (b, a), kind=kind)
            fused = self._fuse(a, b, negate=(op == "-"), kind=kind)
            return fused or Node(name, (a, b), kind=kind)
        if op == "*":
            if a.is_host:
                return Node("mul", (b, a), kind=kind, attr="scalar_first")
            return Node("mul", (a, b), kind=kind)
        if op == "%":  # Python's % / torch.remainder: the result takes the divisor's sign
            return Node("rmod", (b, a), kind=kind) if a.is_host else Node("mod", (a, b), kind=kind)
        # division
        if a.is_host:
            return Node("rdiv", (b, a), kind=kind)
        return Node("div", (a, b), kind=kind)

    def _fuse(self, a: Node, b: Node, negate: bool, kind: Kind) -> Node | None:
        """``a +/- (s*x*y | x*y | s*x/y | x/y | s*x)`` as one torch op, when ``a`` keeps its shape."""
        if a.kind != kind or a.is_host:
            return None

        def scale(s: Node | None) -> Node:
            if s is None:
                return Node("const", attr=-1 if negate else 1)
            return Node("neg", (s,)) if negate else s

        # Only ``s * x`` written scalar-first fuses: that is how torch code spells value=/alpha=,
        # while ``x * s`` is a separate multiply in the published code.
        def split_scaled(n: Node) -> tuple[Node, Node | None]:
            if n.op == Op.MUL and n.args[1].is_host and n.attr == "scalar_first":
                return n.args[0], n.args[1]
            return n, None

        if b.op == Op.MUL and not b.args[1].is_host and not b.args[0].is_host:
            x, s = split_scaled(b.args[0])
            return Node("addcmul", (a, x, b.args[1], scale(s)), kind=kind)
        if b.op == Op.DIV and not b.args[1].is_host and not b.args[0].is_host:
            x, s = split_scaled(b.args[0])
            return Node("addcdiv", (a, x, b.args[1], scale(s)), kind=kind)
        if b.op == Op.MUL and b.args[1].is_host and b.attr == "scalar_first":
            return Node("axpy", (a, b.args[0], scale(b.args[1])), kind=kind)
        return None

    def call(self, e: E.Call, field: str) -> Node:
        f = FUNCTIONS.get(e.func)
        if f is None:
            raise SpecError(e.pos, field, f"unknown function '{e.func}'{nearest_functions(e.func)}")
        lo, hi = f.arity
        if not lo <= len(e.args) <= hi:
            want = str(lo) if lo == hi else f"{lo} to {hi}"
            raise SpecError(e.pos, field, f"{e.func}() takes {want} arguments, got {len(e.args)}")
        if e.func == "has":
            arg = e.args[0]
            if not isinstance(arg, E.Name) or arg.id not in self.state:
                raise SpecError(arg.pos, field, "has() takes the name of a state buffer")
            return Node("has", attr=arg.id, boolean=True)
        if e.func == "eps_of":
            arg = e.args[0]
            if not (isinstance(arg, E.Name) and arg.id == "param"):
                raise SpecError(arg.pos, field, "eps_of() takes 'param': eps_of(param) is the parameter "
                                "dtype's torch.finfo(dtype).eps")
            return Node("meta", attr="eps")
        if e.func == "param_attr":
            attr, default = e.args
            if not (isinstance(attr, E.Const) and isinstance(attr.value, str)):
                raise SpecError(attr.pos, field, "param_attr() takes an attribute name in quotes first")
            if not (isinstance(default, E.Const) and not isinstance(default.value, str)):
                raise SpecError(default.pos, field, "param_attr()'s default must be a constant")
            return Node("param_attr", attr=(attr.value, default.value), boolean=isinstance(default.value, bool))
        args = [self.expr(a, field) for a in e.args]
        all_host = all(a.is_host for a in args)
        if e.func == "is_float32":
            if not all_host:
                raise SpecError(e.pos, field, "is_float32() works on host scalars only")
            self._need_number(args[0], e.args[0], field)
            return Node(e.func, tuple(args), boolean=True)
        if all_host:
            if not f.host:
                raise SpecError(e.pos, field, f"{e.func}() works on device values, but all its arguments are host scalars")
            return Node(e.func, tuple(args))
        if not f.tensor:
            raise SpecError(e.pos, field, f"{e.func}() works on host scalars only")
        return self._tensor_call(e, args, field)

    def _tensor_call(self, e: E.Call, args: list[Node], field: str) -> Node:
        fn = e.func

        def need(i: int, *kinds: Kind) -> None:
            if args[i].kind not in kinds:
                want = " or ".join(k.label for k in kinds)
                raise SpecError(e.args[i].pos, field, f"{fn}() argument {i + 1} must be {want}, got {args[i].kind.label}")

        def joined(*idx: int) -> Kind:
            k = args[idx[0]].kind
            for i in idx[1:]:
                k2 = join(k, args[i].kind)
                if k2 is None:
                    raise SpecError(e.pos, field, f"{fn}(): cannot combine {k.label} and {args[i].kind.label} values")
                k = k2
            return k

        if fn == "stochastic_round":
            need(0, Kind.ELEMENT)
            if not args[1].is_host:
                raise SpecError(e.args[1].pos, field, "stochastic_round()'s seed must be a host scalar")
            return Node(fn, tuple(args), kind=Kind.ELEMENT)
        if fn in CALLS:
            need(0, Kind.ELEMENT)
            for i in range(1, len(args)):
                if not args[i].is_host:
                    raise SpecError(e.args[i].pos, field, f"{fn}()'s steps and coefficients must be host scalars")
            return Node(fn, tuple(args), kind=Kind.ELEMENT)
        if fn in ("rand_like", "stream_rand"):
            need(0, Kind.ELEMENT)
            if len(args) > 1 and not args[1].is_host:
                raise SpecError(e.args[1].pos, field, f"{fn}()'s seed must be a host scalar")
            return Node(fn, tuple(args), kind=Kind.ELEMENT)
        if fn == "maxabs_dim":
            need(0, Kind.ELEMENT)
            d = e.args[1]
            if not (isinstance(d, E.Const) and type(d.value) is int and d.value >= 0):
                raise SpecError(d.pos, field, "maxabs_dim()'s dim must be a constant non-negative integer")
            return Node(fn, tuple(args), kind=Kind.ELEMENT)
        if fn in ("viewnorm", "viewmean"):
            need(0, Kind.ELEMENT)
            d = e.args[1]
            if not (isinstance(d, E.Const) and type(d.value) is int and d.value in (0, 1)):
                raise SpecError(d.pos, field, f"{fn}()'s dim must be 0 or 1 (a dim of the (shape[0], -1) matrix)")
            return Node(fn, tuple(args), kind=Kind.ELEMENT)
        if fn in ("sinkhorn", "orthograd_iterative"):
            need(0, Kind.ELEMENT)
            need(1, Kind.ELEMENT)
            for i in range(2, len(args)):
                if not args[i].is_host:
                    raise SpecError(e.args[i].pos, field, f"{fn}()'s iterations and flag must be host scalars")
            return Node(fn, tuple(args), kind=Kind.ELEMENT)
        if fn == "cast":
            return Node(fn, tuple(args), kind=args[0].kind, boolean=False)
        if fn == "strided":
            need(0, Kind.ELEMENT)
            if self.slice_stride is None:
                raise SpecError(e.pos, field, "strided() needs 'slice_stride:' (the hyperparameter k) in the spec")
            # the stride travels as a host argument, so every backend reads it like any host value
            return Node(fn, (args[0], Node("hyper", attr=(self.slice_stride, None))), kind=Kind.SLICE)
        if fn == "div":
            for a, x in zip(args, e.args):
                self._need_number(a, x, field)
            if args[0].is_host:  # a host scalar over a device value: a true division, not reciprocal * s
                return Node("sdiv", (args[1], args[0]), kind=args[1].kind)
            return Node("div", tuple(args), kind=joined(0, 1))
        if fn == "axpy":
            if args[0].is_host or args[0].kind != joined(0, 1, 2):
                raise SpecError(e.args[0].pos, field, "axpy()'s first argument must be a device value of the result's kind")
            if args[2].kind not in (Kind.HOST, Kind.TENSOR):
                raise SpecError(e.args[2].pos, field, f"axpy()'s scale must be a host or per-tensor value, got "
                                f"{args[2].kind.label}")
            return Node(fn, tuple(args), kind=args[0].kind)
        if fn in ("sqrt", "rsqrt", "abs", "sign", "exp", "log", "reciprocal", "copy", "contiguous", "float32", "float64",
                  "cos", "sin", "floor", "atan"):
            return Node(fn, tuple(args), kind=args[0].kind)
        if fn in ("atan2", "maximum", "minimum"):
            if args[0].is_host:
                raise SpecError(e.args[0].pos, field, f"{fn}()'s first argument must be a device value")
            if fn == "atan2" and args[1].is_host:
                raise SpecError(e.args[1].pos, field, "atan2()'s second argument must be a device value")
            return Node(fn, tuple(args), kind=joined(0, 1))
        if fn == "clamp":
            for i in (1, 2):
                if not args[i].is_host:
                    raise SpecError(e.args[i].pos, field, "clamp()'s bounds must be host scalars")
            return Node(fn, tuple(args), kind=args[0].kind)
        if fn == "lerp":
            kind = joined(0, 1, 2)
            if args[0].kind != kind or args[0].is_host:
                raise SpecError(e.args[0].pos, field, f"lerp()'s first argument must already be {kind.label}")
            return Node(fn, tuple(args), kind=kind)
        if fn == "where":
            if not args[0].boolean or args[0].is_host:
                raise SpecError(e.args[0].pos, field, "where()'s first argument must be an elementwise comparison")
            return Node(fn, tuple(args), kind=joined(0, 1, 2))
        if fn in ("matvec", "mv"):
            need(0, Kind.ELEMENT)
            need(1, Kind.COL)
            return Node(fn, tuple(args), kind=Kind.ROW)
        if fn in ("matvec_t", "mv_t"):
            need(0, Kind.ELEMENT)
            need(1, Kind.ROW)
            return Node(fn, tuple(args), kind=Kind.COL)
        if fn == "normalize":
            need(0, Kind.ROW, Kind.COL)
            return Node(fn, tuple(args), kind=args[0].kind)
        if fn == "dot":
            need(0, Kind.ROW, Kind.COL)
            need(1, args[0].kind)
            return Node(fn, tuple(args), kind=Kind.MATRIX)
        if fn == "outer":
            need(0, Kind.ROW)
            need(1, Kind.COL)
            return Node(fn, tuple(args), kind=Kind.ELEMENT)
        if fn in ("rowsum", "colsum"):
            need(0, Kind.ELEMENT)
            return Node(fn, tuple(args), kind=Kind.ROW if fn == "rowsum" else Kind.COL)
        if fn in ("rownorm", "colnorm", "rowmaxabs", "colmaxabs"):
            need(0, Kind.ELEMENT)
            return Node(fn, tuple(args), kind=Kind.ROW if fn.startswith("row") else Kind.COL)
        if fn == "matmean":
            need(0, Kind.ROW, Kind.COL)
            return Node(fn, tuple(args), kind=Kind.MATRIX)
        if fn in ("sum", "mean", "norm", "maxabs"):
            return Node(fn, tuple(args), kind=Kind.TENSOR)
        if fn == "vdot":
            need(0, Kind.ELEMENT, Kind.SLICE, Kind.ROW, Kind.COL)
            need(1, args[0].kind)
            return Node(fn, tuple(args), kind=Kind.TENSOR)
        raise SpecError(e.pos, field, f"{fn}() cannot be applied to device values")  # pragma: no cover

    # -- statements ------------------------------------------------------------------------
    def statements(self, stmts: list[SAssign | SIf | SScope], at: tuple[tuple[int, str], ...] = ()) -> list[Stmt]:
        """The statements lowered; ``at``: where their list sits in the body (recorded for the
        uses of blocks with features, :class:`ScopeSite`)."""
        out: list[Stmt] = []
        for s in stmts:
            if isinstance(s, SAssign):
                out.append(self.assign(s))
                continue
            if isinstance(s, SScope):
                if any(site.inside for site in self.scopes):
                    raise SpecError(s.pos, s.field, f"block '{s.block}' declares features and is used inside "
                                    "another such block: scopes of block features do not nest")
                site = ScopeSite(at, len(out), len(out), s, _bind_roles(s.roles, s.body, s.smap), True)
                self.scopes.append(site)
                out.extend(self.statements(s.body))
                site.end, site.inside = len(out), False
                continue
            cond = self.expr(s.cond, s.field + ".if")
            if not cond.is_host:
                raise SpecError(s.cond.pos, s.field + ".if", f"a condition must be decided per parameter, but this "
                                f"one is {cond.kind.label} (use where() for elementwise choices)")
            if not cond.boolean:
                raise SpecError(s.cond.pos, s.field + ".if", "a condition must be true or false (use a comparison)")
            before = dict(self.temps)
            then = self.statements(s.then, (*at, (len(out), "then")))
            after_then = self.temps
            self.temps = dict(before)
            orelse = self.statements(s.orelse, (*at, (len(out), "orelse")))
            after_else = self.temps
            self.temps = {k: v for k, v in after_then.items() if after_else.get(k) == v}
            self.partial |= (set(after_then) | set(after_else)) - set(self.temps)
            out.append(If(cond, then, orelse, s.pos))
        return out

    def assign(self, s: SAssign) -> Assign:
        t, field = s.target, s.field
        value = self.expr(s.expr, field)
        if s.accumulate:
            if t not in self.accumulators:
                raise SpecError(s.pos, field, f"'{t}' is not an accumulator: '+=' adds to one declared under "
                                f"accumulators:{did_you_mean(t, self.accumulators)}")
            if value.kind != Kind.TENSOR or value.boolean:
                raise SpecError(s.pos, field, f"an accumulator adds one per-tensor device value per parameter, "
                                f"but the value is {value.kind.label} (reduce it with sum() or vdot())")
            return Assign(t, value, s.pos, role="accumulate")
        if t in self.accumulators:
            raise SpecError(s.pos, field, f"accumulator '{t}' can only be added to: '{t} += value'")
        if t in self.globals:
            raise SpecError(s.pos, field, f"global '{t}' is written only by finalize:")
        if t in self.scalars:
            raise SpecError(s.pos, field, f"cannot assign to hyperparameter '{t}'")
        if t in META or t == "step":
            raise SpecError(s.pos, field, f"cannot assign to '{t}'")
        if t in ("param", "grad"):
            if value.kind != Kind.ELEMENT:
                raise SpecError(s.pos, field, f"'{t}' is per-element, but the value is {value.kind.label}")
            return Assign(t, value, s.pos, role=t)
        if t in self.state:
            decl = self.state[t]
            if decl.kind == Kind.HOST:
                if not value.is_host:
                    raise SpecError(s.pos, field, f"state '{t}' is a host scalar, but the value is {value.kind.label}")
                return Assign(t, value, s.pos, role="host_state")
            if value.kind != decl.kind:
                raise SpecError(s.pos, field, f"state '{t}' is {decl.kind.label}, but the value is {value.kind.label}")
            return Assign(t, value, s.pos, role="state")
        if t in self.temps and self.temps[t][0] != value.kind:
            raise SpecError(s.pos, field, f"'{t}' was {self.temps[t][0].label} and cannot become {value.kind.label}")
        self.temps[t] = (value.kind, value.boolean)
        self.partial.discard(t)
        return Assign(t, value, s.pos, role="temp")


class FinalizeLowerer(Lowerer):
    """``finalize:``: host statements over group 0's hyperparameters and globals, the accumulators'
    sums and their own temporaries; an assignment to a global updates it in every group."""

    def name(self, e: E.Name, field: str) -> Node:
        n = e.id
        if n in self.accumulators:
            return Node("var", attr=n)  # the accumulator's sum over the step, on the host
        if n in ("param", "grad", "step", *META) or n in self.state or n in self.facts:
            raise SpecError(e.pos, field, f"'{n}' is per parameter; finalize: sees hyperparameters, globals, "
                                          "accumulators and its own temporaries")
        return super().name(e, field)

    def assign(self, s: SAssign) -> Assign:
        t, field = s.target, s.field
        if s.accumulate:
            raise SpecError(s.pos, field, "finalize: reads accumulators; '+=' belongs in update:")
        value = self.expr(s.expr, field)
        if t in self.globals:
            return Assign(t, value, s.pos, role="global")
        if t in self.hypers and self.hypers[t].written and self.scalars.get(t, (None,))[0] == t:
            if not value.is_host:
                raise SpecError(s.pos, field, f"'{t}' is a hyperparameter: its value is a host expression")
            return Assign(t, value, s.pos, role="group")  # run per param group (host.run_host_block)
        if t in self.scalars or t in self.accumulators:
            raise SpecError(s.pos, field, f"finalize: assigns globals, temporaries and hyperparameters marked "
                            f"written: true, not '{t}'")
        self.temps[t] = (Kind.HOST, value.boolean)
        self.partial.discard(t)
        return Assign(t, value, s.pos, role="temp")


def _host_init(lw: Lowerer, e: E.Expr, field: str) -> Node:
    node = lw.expr(e, field)
    if not node.is_host or any(n.op in (Op.STEP, Op.VAR, Op.META, Op.HAS, Op.PARAM_ATTR, Op.INPUT) for n in walk_nodes(node)):
        raise SpecError(e.pos, field, "an init is a host expression of hyperparameters (and globals)")
    return node


def _ordered_hypers(spec: Spec, extra: list[tuple[str, HyperparameterSpec]]) -> list[tuple[str, HyperparameterSpec]]:
    hypers = list(spec.model.hyperparameters.items()) + extra
    order = spec.model.constructor_order
    if order is None:
        return hypers
    by_name = dict(hypers)
    pos = spec.position("constructor_order")
    for i, n in enumerate(order):
        if n not in by_name:
            raise SpecError(spec.source.at(("constructor_order", i)), f"constructor_order[{i}]",
                            f"unknown hyperparameter '{n}'{did_you_mean(n, by_name)}")
        if n in order[:i]:
            raise SpecError(spec.source.at(("constructor_order", i)), f"constructor_order[{i}]",
                            f"'{n}' is listed twice")
    missing = [n for n, _ in hypers if n not in order]
    if missing:
        raise SpecError(pos, "constructor_order", f"missing hyperparameters: {', '.join(missing)}")
    return [(n, by_name[n]) for n in order]


def lower_base(spec: Spec, extra_hypers: list[tuple[str, HyperparameterSpec]]) -> tuple[Program, dict[str, Node]]:
    """Lower a loaded spec into an IR :class:`Program`, before its features are applied
    (``extra_hypers``: the features' hyperparameters, which the spec's statements may read), and
    the spec's ``facts:`` as nodes. :func:`optgen.pipeline.lower` runs this, then the features."""
    hypers = _ordered_hypers(spec, extra_hypers)

    state: list[StateDecl] = []
    for name, st in spec.model.state.items():
        init = st.init
        pos = spec.source.at(("state", name, "init"))
        if st.kind == "slice" and spec.model.slice_stride is None:
            raise SpecError(spec.source.at(("state", name, "kind")), f"state.{name}.kind",
                            "a per-slice state needs 'slice_stride:' (the hyperparameter k) in the spec")
        if st.scalar_if_zero and init != "param":
            raise SpecError(spec.source.at(("state", name, "scalar_if_zero")), f"state.{name}.scalar_if_zero",
                            "scalar_if_zero applies to init: param only")
        subset = re.fullmatch(r"random_subset\(\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)", init) if isinstance(init, str) else None
        if subset is not None:
            if subset.group(1) not in dict(hypers) or st.kind != "element" or st.dtype != "bool":
                raise SpecError(pos, f"state.{name}.init", "random_subset(HYPER) initialises a per-element bool "
                                "state (dtype: bool) from a hyperparameter's fraction")
            init = ("random_subset", subset.group(1))
        elif isinstance(init, str) and init not in ("zeros", "ones", "absent", "param"):
            if init not in dict(hypers):
                raise SpecError(pos, f"state.{name}.init", f"init must be zeros, ones, absent, param, a number or a "
                                f"hyperparameter name, got '{init}'{did_you_mean(init, ['zeros', 'ones', 'absent', *dict(hypers)])}")
            init = ("hyper", init)
        fac = (st.factored.row, st.factored.col, st.factored.sign) if st.factored is not None else None
        if fac is not None and st.kind != "element":
            raise SpecError(spec.source.at(("state", name, "factored")), f"state.{name}.factored",
                            "only per-element states can be factored")
        if fac is not None and "factored" not in spec.model.features:
            raise SpecError(spec.source.at(("state", name, "factored")), f"state.{name}.factored",
                            "a factored form needs feature 'factored' under features:")
        state.append(StateDecl(name, _KINDS[st.kind], init, st.dtype, None, st.doc, fac,
                               scalar_if_zero=st.scalar_if_zero,
                               factored_any_view=st.factored is not None and st.factored.any_view))
        if st.kind == "host" and st.dtype == "param":
            state[-1].dtype = "default"

    m = spec.model
    if m.slice_stride is not None and m.slice_stride not in dict(hypers):
        raise SpecError(spec.source.text_at(("slice_stride",)), "slice_stride",
                        f"unknown hyperparameter '{m.slice_stride}'{did_you_mean(m.slice_stride, dict(hypers))}")
    for section in ("globals", "accumulators"):
        for name in getattr(m, section):
            if name in dict(hypers) or name in m.state or (section == "accumulators" and name in m.globals):
                raise SpecError(spec.source.at((section, name)), f"{section}.{name}",
                                f"'{name}' is declared twice (hyperparameter, state, global or accumulator)")
    globals_ = tuple(m.globals)
    accs = tuple(m.accumulators)
    lw = Lowerer(spec.path, hypers, state, m.step.store, globals_, accs, m.slice_stride)
    init_lw = Lowerer(spec.path, hypers, [], "none", globals_)
    global_decls = [GlobalDecl(n, _host_init(init_lw, spec.global_inits[n], f"globals.{n}.init"), g.doc)
                    for n, g in m.globals.items()]
    acc_decls = [AccumulatorDecl(n, _host_init(init_lw, spec.accumulator_inits[n], f"accumulators.{n}.init"), a.doc)
                 for n, a in m.accumulators.items()]
    for name, e in spec.facts.items():
        field = f"facts.{name}"
        if name in lw.known_names():
            raise SpecError(e.pos, field, f"fact '{name}' shadows another name")
        node = lw.expr(e, field)
        if not node.is_host or any(n.op in (Op.STEP, Op.VAR, Op.INPUT, Op.HAS) for n in walk_nodes(node)):
            raise SpecError(e.pos, field, "a fact is a host expression of hyperparameters and facts about the "
                            "parameter (not of the step, state or runtime inputs)")
        lw.facts[name] = node
    for decl in state:
        if decl.name in spec.state_conditions:
            e = spec.state_conditions[decl.name]
            field = f"state.{decl.name}.if"
            node = lw.expr(e, field)
            if not node.is_host or not node.boolean:
                raise SpecError(e.pos, field, "a state condition must be a true/false host expression")
            decl.cond = node
    checks = []
    for expr_, message in spec.checks:
        node = lw.expr(expr_, "checks")
        if not node.is_host or not node.boolean:
            raise SpecError(expr_.pos, "checks", "a check must be a true/false expression of hyperparameters")
        checks.append((node, message))

    views: list[tuple[Node, str]] = []
    if spec.view_condition is not None:
        node = lw.expr(spec.view_condition, "matrix_view.if")
        if not node.is_host or not node.boolean:
            raise SpecError(spec.view_condition.pos, "matrix_view.if", "a view condition must be a true/false host "
                            "expression of hyperparameters and facts about the parameter")
        views.append((node, spec.model.matrix_view.shape))

    reductions = lower_reductions(spec, lw)  # before update: its statements read them
    body = lw.statements(spec.update)
    finalize = FinalizeLowerer(spec.path, hypers, state, m.step.store, globals_, accs).statements(spec.finalize)
    # a global that no finalize: statement assigns is a construction-time constant (its init,
    # evaluated when its group is added); an accumulator nothing reads is a mistake
    if accs and not finalize:
        raise SpecError(spec.position(), "finalize", "accumulators need finalize: statements that read them")
    program = Program(
        name=m.name, class_name=m.class_, doc=m.doc, source=spec.path, sha256=spec.sha256,
        step_store=m.step.store, step_math=m.step.math, state_init=m.state_init, hypers=hypers,
        checks=checks, state=state, body=body, reductions=reductions, matches=m.matches, features=list(m.features), matrix_views=views,
        slice_stride=m.slice_stride, globals=global_decls, accumulators=acc_decls, finalize=finalize,
        roles=_bind_roles(spec.model.roles, spec.update, spec.source), scopes=lw.scopes,
    )
    return program, lw.facts


def attach_published(spec: Spec, program: Program, facts: dict[str, Node]) -> Program:
    """The ``published:`` state-dict layout lowered against the featured program (the features'
    hyperparameters and states, such as ``nnmf_factor`` and the factors, are names here)."""
    m = spec.model
    if (m.matches is None or m.matches.state_dict is None) and m.state_dict is None:
        return program
    from optgen.ir.published import lower_published

    plw = Lowerer(spec.path, program.hypers, program.state, m.step.store, tuple(m.globals),
                  tuple(m.accumulators), m.slice_stride)
    plw.facts = facts
    return program.copy(published=lower_published(spec, plw, program.state))


def _bind_roles(roles: dict, update: list, source) -> dict[str, list[tuple[str, Any]]]:
    """``roles:`` (a spec's, or a block's among its own statements), each reference bound to exactly
    one assignment of ``update``: ``name`` (the one statement assigning it), ``name#k`` (its k-th
    assignment in source order); ``source``: the source map ``roles:`` was read from."""
    import re

    from optgen.ir.roles import MULTI_ROLES, ROLES

    assigns: list[SAssign] = []

    def collect(stmts: list[SAssign | SIf | SScope]) -> None:
        for s in stmts:
            if isinstance(s, SAssign):
                assigns.append(s)
            elif isinstance(s, SScope):
                collect(s.body)
            else:
                collect(s.then)
                collect(s.orelse)

    collect(update)
    out: dict[str, list[tuple[str, Any]]] = {}
    for role, refs in roles.items():
        field = f"roles.{role}"
        if role not in ROLES:
            raise SpecError(source.at(("roles", role, "<key>")), field,
                            f"unknown role '{role}'{did_you_mean(role, ROLES)}; roles: {', '.join(ROLES)}")
        many = isinstance(refs, list)
        if many and role not in MULTI_ROLES:
            raise SpecError(source.at(("roles", role)), field, f"role '{role}' binds one statement, not a list")
        bound = []
        for j, ref in enumerate(refs if many else [refs]):
            path = ("roles", role, j) if many else ("roles", role)
            pos = source.text_at(path)
            where = f"{field}[{j}]" if many else field
            found = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(?:#([0-9]+))?", ref.strip()) if isinstance(ref, str) else None
            if found is None:
                raise SpecError(pos, where, f"a role names a statement as 'name' or 'name#k' (its k-th assignment), "
                                f"got {ref!r}")
            name, k = found.group(1), found.group(2)
            hits = [a for a in assigns if a.target == name]
            if not hits:
                raise SpecError(pos, where, f"no statement of update: assigns '{name}'"
                                f"{did_you_mean(name, [a.target for a in assigns])}")
            if k is None and len(hits) > 1:
                lines = ", ".join(str(a.pos.line) for a in hits)
                raise SpecError(pos, where, f"'{name}' is assigned on lines {lines}: a role binds one statement "
                                f"(write '{name}#1' ... '{name}#{len(hits)}')")
            if k is not None and not 1 <= int(k) <= len(hits):
                raise SpecError(pos, where, f"'{name}' is assigned {len(hits)} time(s), there is no '{ref}'")
            hit = hits[0] if k is None else hits[int(k) - 1]
            if (hit.target, hit.pos) in bound:
                raise SpecError(pos, where, f"'{ref}' is listed twice")
            bound.append((hit.target, hit.pos))
        out[role] = bound
    return out
