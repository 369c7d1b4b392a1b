"""The triton backend's code generator: every path plan becomes Triton kernels.

Per path: a *prologue* kernel (one program per tensor: increments ``step``, evaluates the host
scalars in float64 and writes the ones the device code reads to ``hv``), then one kernel per stage:
*flat* passes over 1-D chunks of every tensor, *tiled* passes over 2-D tiles of every matrix (for
per-row / per-column values and reductions) and *vector* stages (one program per tensor, looping
over its matrices and vectors). All kernels take the same arguments, so the runtime launches them
uniformly; a device-side table holds each tensor's pointers and sizes.

Element math runs in fp32 whatever the storage dtype; stores round to nearest even.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass

import torch

from optgen.backends.launch_plan import CallPlan, PathLaunch, TritonPlan
from optgen.backends.naming import Names, SourceText, local_base
from optgen.backends.triton_plan import (
    CALLS,
    PathPlan,
    Stage,
    TritonUnsupported,
    dynamic_names,
    enumerate_paths,
    global_conditions,
    group_decided,
    host_definitions,
    plan_path,
    split_condition,
    static_conditions,
)
from optgen.ir.codecs import Codec, FloatCodec, codec_for, stored_names
from optgen.ir.nodes import Assign, Kind, Node, Program, walk_nodes, walk_stmts
from optgen.pysource import comment_text, docstring_text

#: Columns of the per-tensor table, before the per-path workspace offsets.
META_COLUMNS = ("numel", "B", "M", "N", "ndim", "gidx")

_F32_CONST = "tl.full((), {v!r}, tl.float32)"
_F64_CONST = "tl.full((), {v!r}, tl.float64)"

_BINARY = {"add": "({a} + {b})", "sub": "({a} - {b})", "mul": "({a} * {b})"}
_CMP = {"eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}


#: Where an emitted kernel's own name goes. Emitters write this hole, never a name, and
#: ``render_kernels`` joins the text's pieces with the final name once the kernel is deduplicated:
#: NUL is in no identifier, number or operator the emitters write, so no spec-derived text can
#: be mistaken for the name (as ``str.replace`` of a name would).
_NAME_HOLE = "\x00"


@dataclass
class KernelSource:
    name: str
    kind: str  # prologue | flat | tiled | vec
    text: str


@dataclass(frozen=True)
class _Draft:
    """An emitted kernel whose name is not chosen yet: its text split at the name's places."""

    kind: str
    parts: tuple[str, ...]

    @staticmethod
    def of(kind: str, text: str) -> _Draft:
        return _Draft(kind, tuple(text.split(_NAME_HOLE)))

    def named(self, name: str) -> KernelSource:
        return KernelSource(name, self.kind, name.join(self.parts))


def table_columns(program: Program, plan: PathPlan) -> list[str]:
    cols = ["param"] + [f"state:{d.name}" for d in program.state if d.kind != Kind.HOST]
    stride = ["stride"] if program.slice_stride else []  # k of per-slice values
    return cols + list(META_COLUMNS) + stride + [f"ws:{t.name}" for t in plan.temps] + codec_tables(plan)


def codec_tables(plan: PathPlan) -> list[str]:
    """Columns ``book:<codec>:<0|1 non-negative>:<key>`` of the code books the path's codecs
    gather from (feature state_precision): the runner fills them with :meth:`Codec.table`."""
    found: dict[str, None] = {}
    for st in plan.stages:
        for s in st.statements:
            for n in walk_nodes(s.value):
                if n.op in ("decode", "encode"):
                    non_neg = n.attr[2] if n.op == "decode" else n.attr[1]
                    for key in codec_for(n.attr[0]).triton_tables(non_neg):
                        found[f"book:{n.attr[0]}:{int(non_neg)}:{key}"] = None
    return list(found)


#: Names every kernel's fixed code uses (arguments, headers, loops, the builtin codecs' locals):
#: no local named after an IR value may take one.
_RESERVED = frozenset({
    "tab", "chunks", "gptr", "hv", "ws", "hyp", "steps", "inp", "red", "TBL_W", "NH", "BLOCK", "BM", "BN",
    "VB", "ALIGNED", "P_DT", "STEP_DT", "pid", "t", "b", "rows", "cols", "M", "N", "B", "rows2", "cols2",
    "offs", "mask", "start", "n", "sp", "sl_mask", "sl_offs", "j", "j0", "acc", "scale", "gidx", "step",
    "L", "tl", "triton", "range", "None", "True", "False", "inf", "nan",
    "q", "q_max", "q_scale", "q_s", "q_block", "q_live",
})

#: The order the named constants are declared in at the top of a kernel.
_CONSTANT_ORDER = ("COL", "HV", "HYP", "INP", "N", "RED")

#: Longest inline subexpression: a longer one gets a line (and a name) of its own.
_INLINE = 88

_ASSIGNED = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=[^=]")


class _Scope:
    """One kernel's names: its locals (:class:`Names`), the named constants of the table columns
    and slots it indexes (declared ``tl.constexpr`` at its top), and what it reads and writes
    (for its docstring)."""

    def __init__(self, reserved: list[str]):
        self.names = Names(_RESERVED | set(reserved))
        self.constants: dict[tuple[str, str], tuple[str, int]] = {}
        self.reads: list[str] = []
        self.writes: list[str] = []
        self.accumulates: list[str] = []
        self.pointer_names: dict[str, str] = {}

    def constant(self, family: str, key: str, value: int, stem: str | None = None) -> str:
        """The constant naming slot ``value`` of ``key`` in ``family`` (``COL_EXP_AVG`` for the
        table's column ``state:exp_avg``), named ``<family>_<stem>`` in capitals."""
        if (family, key) not in self.constants:
            stem = (key if stem is None else stem).replace(":", "_").upper()
            self.constants[(family, key)] = (self.names.new(f"{family}_{stem}"), value)
        return self.constants[(family, key)][0]

    def constant_lines(self) -> list[str]:
        order = sorted(self.constants.items(), key=lambda kv: (_CONSTANT_ORDER.index(kv[0][0]), kv[1][1]))
        return [f"    {name}: tl.constexpr = {value}" for _, (name, value) in order]

    def touch(self, what: list[str], name: str) -> None:
        if name not in what:
            what.append(name)

    def docstring(self, summary: str) -> list[str]:
        """The kernel's docstring lines: its stage (``summary``), then what it reads, writes and
        accumulates (IR names: identifiers, escaped all the same)."""
        io = [f"{verb} {', '.join(names)}" for verb, names in
              (("Reads", self.reads), ("writes", self.writes), ("accumulates", self.accumulates)) if names]
        paragraphs = [summary] + (["; ".join(io) + "."] if io else [])
        lines: list[str] = []
        for i, p in enumerate(paragraphs):
            lines += ([""] if i else []) + textwrap.wrap(p, 96, break_long_words=False, break_on_hyphens=False)
        text = docstring_text("\n".join(lines), multiline=True).split("\n")
        if len(text) == 1:
            return [f'    """{text[0]}"""']
        return [f'    """{text[0]}', *[f"    {x}" if x else "" for x in text[1:]], '    """']


class _Body:
    """Lines of one kernel body; its locals come from the kernel's :class:`_Scope`."""

    def __init__(self, scope: _Scope, indent: int = 1):
        self.lines: list[str] = []
        self.indent = indent
        self.scope = scope

    def emit(self, line: str) -> None:
        self.lines.append("    " * self.indent + line)

    def comment(self, text: str) -> None:
        """A comment line (``text`` escaped by the caller: optgen.pysource.comment_text)."""
        self.emit(f"# {text}")

    def fresh(self, hint: str = "x") -> str:
        return self.scope.names.new(hint)


#: ops the triton backend does not compute (yet), with the reason it gives
_TORCH_ONLY = {
    "atan": "atan() in triton kernels (not implemented yet: use backend='torch' or 'reference')",
    "viewnorm": "viewnorm() (a norm along one dim of the (shape[0], -1) matrix view) in triton kernels "
                "(not implemented yet: use backend='torch' or 'reference')",
    "viewmean": "viewmean() (a mean along one dim of the (shape[0], -1) matrix view) in triton kernels "
                "(not implemented yet: use backend='torch' or 'reference')",
    "sinkhorn": "sinkhorn() (SinkSGD's alternating row / column normalisation) in triton kernels "
                "(not implemented yet: use backend='torch' or 'reference')",
    "orthograd_iterative": "orthogonal_gradient='iterative' (rank-2 OrthoGrad; Muon's aux AdamW: "
                           "adam_orthogonal_gradient='iterative') in triton kernels "
                           "(not implemented yet: use 'flattened', or backend='torch' or 'reference')",
}


class KernelEmitter:
    """Emits the kernels of one path."""

    def __init__(self, program: Program, plan: PathPlan, hyper_slots: list, text: SourceText | None = None):
        self.program = program
        self.plan = plan
        #: (name, index) of every hyperparameter the prologues read, shared by a program's paths
        self.hyper_slots = hyper_slots
        self.cols = {c: i for i, c in enumerate(table_columns(program, plan))}
        self.states = {d.name: d for d in program.state}
        self.temps = {t.name: t for t in plan.temps}
        self.hv = {name: i for i, name in enumerate(plan.hv)}
        #: the codecs whose own triton code the kernels hold (their triton_source joins the module)
        self.codecs: set[str] = set()
        #: the statements' text (comments) and the host values' names, shared by a program's paths
        self.text = text if text is not None else SourceText(program)
        self.scope = self.new_scope()

    # -- common ------------------------------------------------------------------------------
    def new_scope(self) -> _Scope:
        """The names of the next kernel (the state dtype and host state arguments reserved)."""
        self.scope = _Scope([*self.state_dtypes, *(f"hs_{d.name}" for d in self.program.state)])
        return self.scope

    def col(self, name: str) -> str:
        # a state's column is named after it, a workspace's WS_<name>, a code book's BOOK_<codec>_...
        stem = re.sub(r"[^0-9A-Za-z]+", "_", name.removeprefix("state:")).strip("_") or "X"
        return f"tl.load(tab + t * TBL_W + {self.scope.constant('COL', name, self.cols[name], stem)})"

    def hv_slot(self, name: str) -> str:
        """The named constant of host value ``name``'s slot in ``hv``."""
        return self.scope.constant("HV", name, self.hv[name], self.text.host_name(name))

    def kernel_text(self, scope: _Scope, summary: str, lines: list[str], name: str = _NAME_HOLE) -> str:
        """A kernel: its signature, docstring, named constants, then ``lines``."""
        return self.signature(name) + "\n".join([*scope.docstring(summary), *scope.constant_lines(), *lines]) + "\n"

    @property
    def input_names(self) -> list[str]:
        return program_inputs(self.program)

    def signature(self, name: str = _NAME_HOLE) -> str:
        hs = "".join(f", hs_{d.name}" for d in self.program.state if d.kind == Kind.HOST)
        hs = (", inp" if self.input_names else "") + hs
        if self.program.reductions:  # the step's optimizer-wide reductions, one float32 each
            hs += ", red"
        dts = "".join(f", {n}: tl.constexpr" for n in self.state_dtypes)
        return (
            "@triton.jit\n"
            f"def {name}(\n"
            f"    tab, chunks, gptr, hv, ws, hyp, steps{hs},\n"
            f"    TBL_W: tl.constexpr, NH: tl.constexpr, BLOCK: tl.constexpr, BM: tl.constexpr,\n"
            f"    BN: tl.constexpr, VB: tl.constexpr, ALIGNED: tl.constexpr, P_DT: tl.constexpr,\n"
            f"    STEP_DT: tl.constexpr{dts},\n"
            "):\n"
        )

    @property
    def state_dtypes(self) -> list[str]:
        """The constexpr names of the state dtypes every kernel takes."""
        return [f"DT_{d.name}" for d in self.program.state]

    def dtype_of(self, name: str) -> str:
        if name in ("param", "grad"):
            return "P_DT"
        if name in self.states:
            return f"DT_{name}"
        return "tl.float32"

    # -- prologue: host scalars in float64 ---------------------------------------------------
    def prologue(self) -> _Draft:
        scope = self.new_scope()
        b = _Body(scope)
        b.emit("t = tl.program_id(0)")
        b.emit(f"gidx = {self.col('gidx')}")
        env: dict[str, str] = {}
        if self.program.step_store == "tensor":
            b.emit("step = tl.load(steps + gidx).to(tl.float64) + 1.0")
            b.emit("tl.store(steps + gidx, step.to(STEP_DT))")
        for d in self.program.state:
            if d.kind == Kind.HOST:
                env[d.name] = b.fresh(d.name)
                b.emit(f"{env[d.name]} = tl.load(hs_{d.name} + gidx).to(tl.float64)")
                scope.touch(scope.reads, d.name)
        for s in self.plan.host:
            code = self.host_expr(s.value, b, env)
            local = b.fresh(self.text.host_name(s.target))
            if s.target not in self.text.hoisted:
                b.comment(self.text.statement(s))
            elif local.split("_")[0] in ("k", "c"):  # a hoisted value without a descriptive name
                b.comment(comment_text(f"{local} = {self.text.expr(s.value)}"))
            if s.role == "host_state":
                b.emit(f"{local} = ({code}).to(DT_{s.target}).to(tl.float64)")
                b.emit(f"tl.store(hs_{s.target} + gidx, {local}.to(DT_{s.target}))")
                scope.touch(scope.writes, s.target)
            else:
                b.emit(f"{local} = {code}")
            env[s.target] = local
        if self.plan.hv:
            b.comment("the host values the passes read, rounded to float32")
        for n in self.plan.hv:
            b.emit(f"tl.store(hv + t * NH + {self.hv_slot(n)}, ({env[n]}).to(tl.float32))")
        what = "counts the step, computes" if self.program.step_store == "tensor" else "computes"
        summary = (f"Prologue: one program per tensor; {what} the host values in float64 and writes "
                   f"the {len(self.plan.hv)} the passes read to hv.")
        return _Draft.of("prologue", self.kernel_text(scope, summary, b.lines))

    def host_expr(self, n: Node, b: _Body, env: dict[str, str]) -> str:
        op = n.op
        if op == "const":
            if n.attr is None or isinstance(n.attr, str):
                raise TritonUnsupported(f"the constant {n.attr!r} in a host value computed on the device")
            return _F64_CONST.format(v=float(n.attr))
        if op == "var":
            if n.attr not in env:  # pragma: no cover - plan_path keeps every dependency
                raise TritonUnsupported(f"host value '{n.attr}' is not computed on this path")
            return env[n.attr]
        if op == "hyper":
            slot = self.scope.constant("HYP", repr(n.attr), self.hyper_slot(n.attr), self.text.hyper_name(n.attr))
            return f"tl.load(hyp + {slot})"
        if op == "input":  # per-parameter values the runtime uploads each step (Kourkoutas' beta2)
            names = self.input_names
            count = self.scope.constant("N", "inputs", len(names))
            return f"tl.load(inp + gidx * {count} + {self.scope.constant('INP', n.attr, names.index(n.attr))})"
        if op == "step":
            if self.program.step_store != "tensor":  # only a stochastic codec's seed reads it there
                raise TritonUnsupported("a stochastic state precision (bf16_sr, int8_sr) in triton kernels seeds "
                                        "its random stream with the step count, which this optimizer does not "
                                        "keep: use backend='torch' or a deterministic precision (bf16, fp16)")
            return "step"
        if op == "meta" and n.attr == "eps":  # eps_of(param)
            return "L.finfo_eps(P_DT)"
        if op == "meta":
            col = {"numel": "numel", "ndim": "ndim", "rows": "M", "cols": "N"}.get(n.attr)
            if col is None:
                raise TritonUnsupported(f"parameter fact '{n.attr}' in device code (only in conditions)")
            return f"{self.col(col)}.to(tl.float64)"
        args = [self.host_expr(a, b, env) for a in n.args]
        if op in _BINARY:
            return _BINARY[op].format(a=args[0], b=args[1])
        if op == "div":
            return f"({args[0]} / {args[1]})"
        if op == "pow":
            return f"L.pow64({args[0]}, {args[1]})"
        if op == "neg":
            return f"(-{args[0]})"
        if op in _CMP:
            return f"({args[0]} {_CMP[op]} {args[1]})"
        if op in ("and", "or"):
            # flags arrive as float64 hyperparameter slots: make every operand a truth value
            truth = [a if x.op in _CMP or x.op in ("and", "or", "not") else f"({a} != 0)" for a, x in zip(args, n.args)]
            return "(" + (" & " if op == "and" else " | ").join(truth) + ")"
        if op == "not":
            return f"({args[0]} == 0)"
        if op == "sqrt":
            return f"tl.sqrt({args[0]})"
        if op in ("exp", "log", "abs", "cos", "sin", "floor"):
            return f"tl.{op}({args[0]})"
        if op == "mod":
            return f"L.remainder({args[0]}, {args[1]})"
        if op == "float64":  # host values are float64 already
            return f"({args[0]})"
        if op == "float32":  # a host value rounded to float32
            return f"({args[0]}).to(tl.float32).to(tl.float64)"
        if op == "sign":
            return f"tl.where({args[0]} > 0, 1.0, tl.where({args[0]} < 0, -1.0, {args[0]}))"
        if op in ("max", "min"):
            return f"tl.{op}imum({args[0]}, {args[1]})"
        if op == "where":
            return f"tl.where({args[0]} != 0, {args[1]}, {args[2]})"
        raise TritonUnsupported(f"host operation '{op}'")

    def hyper_slot(self, attr: tuple) -> int:
        slots = self.hyper_slots
        if attr not in slots:
            slots.append(attr)
        return slots.index(attr)


    # -- device expressions ------------------------------------------------------------------
    def expr(self, n: Node, ctx: _DeviceCtx) -> str:
        op = n.op
        if op == "const":
            return _F32_CONST.format(v=float(n.attr))
        if op == "var":
            return ctx.read(n.attr, n.kind)
        if op == "meta":
            return f"{self.col('numel')}.to(tl.float32)"
        if op == "reduced":  # an optimizer-wide reduction of this step (its first phase)
            slot = [r.name for r in self.program.reductions].index(n.attr)
            return f"tl.load(red + {self.scope.constant('RED', n.attr, slot)})"
        if op in ("decode", "encode"):
            return self.coded(n, ctx)
        if n.is_host:
            raise TritonUnsupported(f"unhoisted host expression '{op}'")
        a = [self.expr(x, ctx) for x in n.args]
        if op in _BINARY:
            code = _BINARY[op].format(a=a[0], b=a[1])
        elif op == "div":
            code = f"L.div({a[0]}, {a[1]})"
        elif op == "rdiv":
            code = f"L.div({a[1]}, {a[0]})"
        elif op == "sdiv":  # a host scalar truly divided by a device value (as rdiv on this backend)
            code = f"L.div({a[1]}, {a[0]})"
        elif op == "mod":
            code = f"L.remainder({a[0]}, {a[1]})"
        elif op == "rmod":
            code = f"L.remainder({a[1]}, {a[0]})"
        elif op == "rsub":
            code = f"({a[1]} - {a[0]})"
        elif op == "neg":
            code = f"(-{a[0]})"
        elif op == "pow":
            e = n.args[1]
            if e.op == "const" and float(e.attr) == 2.0:
                x = ctx.named(a[0], "square")
                code = f"({x} * {x})"
            elif e.op == "const" and float(e.attr) == 0.5:
                code = f"L.sqrt({a[0]})"
            else:
                code = f"L.pow_({a[0]}, {a[1]})"
        elif op == "sqrt":
            code = f"L.sqrt({a[0]})"
        elif op == "rsqrt":
            code = f"L.div({_F32_CONST.format(v=1.0)}, L.sqrt({a[0]}))"
        elif op == "reciprocal":
            code = f"L.div({_F32_CONST.format(v=1.0)}, {a[0]})"
        elif op in ("abs", "exp", "log", "cos", "sin", "floor"):
            code = f"tl.{op}({a[0]})"
        elif op == "sign":
            code = f"L.sign({a[0]})"
        elif op in ("copy", "contiguous", "float32", "float64", "cast", "strided"):
            # device math is float32 already; a slice is its element lanes (see _DeviceCtx.index)
            code = a[0]
        elif op == "stochastic_round":
            off, _ = ctx.index(Kind.ELEMENT)
            # a different Philox stream per step and per tensor
            code = f"L.sr_bf16({a[0]}, ({a[1]}).to(tl.int32) * 65599 + {self.col('gidx')}, {off})"
        elif op in ("rand_like", "stream_rand"):  # seeded Philox per (seed, tensor): not torch's stream
            off, _ = ctx.index(Kind.ELEMENT)
            seed = f"({a[1]}).to(tl.int32)" if len(a) > 1 else "0"
            salt = " + 4099" if op == "stream_rand" else ""  # apart from rand_like's numbers
            code = f"tl.rand({seed} * 65599 + {self.col('gidx')}{salt}, {off})"
        elif op in _TORCH_ONLY:
            raise TritonUnsupported(_TORCH_ONLY[op])
        elif op == "maxabs_dim":
            raise TritonUnsupported("maxabs_dim() (the largest |x| along one dim of a parameter with 3 or more dims) "
                                    "in triton kernels (not implemented yet: use backend='torch' or 'reference')")
        elif op == "atan2":
            code = f"L.atan2({a[0]}, {a[1]})"
        elif op in ("maximum", "minimum"):
            code = f"L.{op}({a[0]}, {a[1]})"
        elif op == "clamp":
            code = f"L.minimum(L.maximum({a[0]}, {a[1]}), {a[2]})"
        elif op == "lerp":
            code = f"L.lerp({a[0]}, {a[1]}, {a[2]})"
        elif op == "where":
            cond = a[0] if not n.args[0].is_host else f"({a[0]} != 0)"
            code = f"tl.where({cond}, {a[1]}, {a[2]})"
        elif op == "addcmul":
            code = f"({a[0]} + {a[3]} * {a[1]} * {a[2]})"
        elif op == "addcdiv":
            code = f"({a[0]} + {a[3]} * L.div({a[1]}, {a[2]}))"
        elif op == "axpy":
            code = f"({a[0]} + {a[2]} * {a[1]})"
        elif op in _CMP:
            code = f"({a[0]} {_CMP[op]} {a[1]})"
        elif op == "and":
            code = "(" + " & ".join(a) + ")"
        elif op == "or":
            code = "(" + " | ".join(a) + ")"
        elif op == "not":
            code = f"({a[0]} == 0)"
        elif op == "outer":
            code = f"({a[0]} * {a[1]})"
        else:
            raise TritonUnsupported(f"operation '{op}' in an element expression")
        # a statement's own operation is its line (bound to its target); inner ones inline
        return code if n is ctx.top else ctx.value(code, op)

    def coded(self, n: Node, ctx: _DeviceCtx) -> str:
        """A coded state's read or write (feature state_precision) in registers: float codecs
        are the state's own load and its round-to-nearest store; bf16_sr rounds with Philox
        numbers (adv_optm's method, another stream), as stochastic parameter rounding does here."""
        codec = codec_for(n.attr[0])
        if not isinstance(codec, FloatCodec):
            return self.coded_blocks(codec, n, ctx)
        if n.op == "decode":
            return ctx.read(n.attr[1], Kind.ELEMENT)
        x = self.expr(n.args[0], ctx)
        if not codec.stochastic:
            return x  # the store rounds to the state's dtype
        off, _ = ctx.index(Kind.ELEMENT)
        step = self.expr(n.args[1], ctx) if len(n.args) > 1 else "0"
        # its own Philox stream: per step, tensor and state (salted apart from the parameter's)
        salt = 1 + sum(map(ord, str(n.attr))) % 9973
        return ctx.named(f"L.sr_bf16({x}, ({step}).to(tl.int32) * 65599 + {self.col('gidx')} + {salt} * 7919, {off})",
                         "rounded")

    def coded_blocks(self, codec: Codec, n: Node, ctx: _DeviceCtx) -> str:
        """A codec's own triton decode/encode (docs/state_precision.md) in a flat pass, whose tile
        holds whole scale blocks (BLOCK a multiple of the codec's block)."""
        unsupported = TritonUnsupported(f"{codec.label or f'state precision {codec.name!r}'} in triton kernels "
                                        "(not implemented yet: use backend='torch' or 'reference')")
        if ctx.mode != "flat":
            raise unsupported
        if n.op == "decode":
            _, state, non_neg = n.attr
        else:
            state, non_neg = ctx.encoding, n.attr[1]
        ptr = {k: ctx.pointer(v) for k, v in stored_names(state, codec, non_neg).items()}
        for key, dtype in codec.triton_tables(non_neg).items():
            ptr[key] = ctx.table_pointer(f"book:{codec.name}:{int(non_neg)}:{key}", dtype)
        if codec.triton_source:
            self.codecs.add(codec.name)
        live = ctx.body.fresh("live")  # a mask that exists in full chunks too
        ctx.body.emit(f"{live} = offs < {self.col('numel')}")
        try:
            if n.op == "decode":
                name = ctx.body.fresh(state)
                ctx.body.emit(f"{name} = {codec.triton_decode(ptr, 'offs', live, non_neg)}")
                ctx.locals[state] = name
                self.scope.touch(self.scope.reads, state)
                return name
            x = ctx.named(self.expr(n.args[0], ctx), state)  # the codec's lines may read it several times
            bits = None
            if codec.stochastic:
                step = self.expr(n.args[1], ctx)
                bits = ctx.body.fresh("bits")
                ctx.body.emit(f"{bits} = (tl.randint(({step}).to(tl.int32) * 65599 + {self.col('gidx')} + "
                              f"{1 + sum(map(ord, state)) % 9973} * 7919, offs) & 0xFFFF).to(tl.int32)")
            lines = codec.triton_encode(ptr, "offs", live, x, bits, non_neg)
        except NotImplementedError:
            raise unsupported from None
        if codec.block:
            ctx.body.emit(f"tl.static_assert(BLOCK % {codec.block} == 0)")
        for line in lines:
            # a codec's own locals must not overwrite a value of the kernel (builtin codecs' are
            # reserved, plugins' start with an underscore)
            m = _ASSIGNED.match(line)
            if m and m.group(1) in self.scope.names.taken and m.group(1) not in _RESERVED:
                raise AssertionError(f"codec '{codec.name}' assigns '{m.group(1)}', a local of the kernel")
            ctx.body.emit(line)
        ctx.codec_stored.add(state)
        self.scope.touch(self.scope.writes, state)
        return x

    # -- passes ------------------------------------------------------------------------------
    def pass_kernel(self, stage: Stage, index: int) -> _Draft:
        tiled = stage.layout == "tiled"
        scope = self.new_scope()
        body = _Body(scope, indent=1)
        ctx = _DeviceCtx(self, body, "tiled" if tiled else "flat")
        for s in stage.statements:
            body.comment(self.text.statement(s))
            ctx.target = s.target  # the stem of the names of its intermediate values
            if s.role == "reduce":
                self.reduce(s, ctx)
                scope.touch(scope.accumulates, s.target)
                continue
            ctx.encoding = s.target  # an encode's state (its codec stores it itself)
            ctx.top = s.value
            ctx.locals[s.target] = ctx.bind(self.expr(s.value, ctx), s.target)
            ctx.written.append(s.target)
        kinds = {s.target: s.value.kind for s in stage.statements}
        stores = [t for t in dict.fromkeys(ctx.written) if t not in ctx.codec_stored and
                  (t == "param" or t in self.states or t in self.plan.spills.get(index, []))]
        if stores:
            body.comment(f"store {', '.join(stores)}")
        for target in stores:
            kind = Kind.SLICE if kinds[target] == Kind.SLICE else Kind.ELEMENT
            ctx.store(target, ctx.locals[target], kind)
        header = ctx.header()
        if tiled:
            summary = ("Tiled pass: one program per BM x BN tile of every matrix (per-row and per-column "
                       "values, row and column reductions).")
            return _Draft.of("tiled", self.kernel_text(scope, summary, header + body.lines))
        # Flat passes: full chunks run unmasked (vectorised loads), the last chunk masked.
        block_name = f"{_NAME_HOLE}_block"
        # BLOCK in the block function only where a codec reshapes the tile into its scale blocks
        constexprs = ["TBL_W", "NH", "ALIGNED", "P_DT", *self.state_dtypes,
                      *(["BLOCK"] if _codec_block(stage.statements) else [])]
        runtime = ["t", "offs", "mask", "tab", "gptr", "hv", "ws", *(["red"] if self.program.reductions else [])]
        params = ", ".join([*runtime, *(f"{c}: tl.constexpr" for c in constexprs)])

        def call(mask: str) -> str:  # the block's arguments, written out (not edited from `params`)
            return ", ".join(["t", "offs", mask, *runtime[3:], *constexprs])

        inner = f"@triton.jit\ndef {block_name}({params}):\n" + "\n".join(
            ['    """One chunk of the element pass below (mask None: a full chunk, unmasked)."""',
             *scope.constant_lines(), *header, *body.lines]) + "\n"
        outer_scope = self.new_scope()
        outer_scope.reads, outer_scope.writes, outer_scope.accumulates = scope.reads, scope.writes, scope.accumulates
        lines = [
            "    pid = tl.program_id(0)",
            "    t = tl.load(chunks + 2 * pid)",
            "    start = tl.load(chunks + 2 * pid + 1)",
            f"    n = {self.col('numel')}",
            "    offs = start + tl.arange(0, BLOCK)",
            "    if ALIGNED:",
            "        offs = tl.max_contiguous(tl.multiple_of(offs, BLOCK), BLOCK)",
            "    if start + BLOCK <= n:",
            f"        {block_name}({call('None')})",
            "    else:",
            f"        {block_name}({call('offs < n')})",
        ]
        summary = "Element pass: one program per chunk of BLOCK elements of a tensor (1-D chunks of every tensor)."
        return _Draft.of("flat", inner + "\n\n" + self.kernel_text(outer_scope, summary, lines))

    def reduce(self, s: Assign, ctx: _DeviceCtx) -> None:
        n = s.value
        op = n.op
        x = self.expr(n.args[0], ctx)
        if op in ("matvec", "matvec_t", "vdot"):
            v = self.expr(n.args[1], ctx)
            x = f"({x} * {v})"
        elif op == "sumsq":
            x = ctx.named(x, s.target)
            x = f"({x} * {x})"
        elif op in ("maxabs", "rowmaxabs", "colmaxabs"):
            x = f"tl.abs({x})"
        body = ctx.body
        part = body.fresh(f"{s.target}_part")
        lanes = ctx.index(Kind.SLICE)[1] if n.args[0].kind == Kind.SLICE else "mask"
        body.emit(f"{part} = L.masked({x}, {lanes})")
        base = f"ws + {self.col('ws:' + s.target)}"
        if op == "maxabs":  # |x| >= 0: masked lanes (0) and the zeroed workspace are neutral
            inner = f"tl.max({part}, axis=0)" if ctx.mode == "flat" else f"tl.max(tl.max({part}, axis=1), axis=0)"
            body.emit(f"tl.atomic_max({base}, {inner})")
        elif op == "rowmaxabs":  # the same neutral zeros, per row / per column of the tile
            body.emit(f"tl.atomic_max({base} + b * M + rows, tl.max({part}, axis=1), mask=rows < M)")
        elif op == "colmaxabs":
            body.emit(f"tl.atomic_max({base} + b * N + cols, tl.max({part}, axis=0), mask=cols < N)")
        elif ctx.mode == "flat":
            body.emit(f"tl.atomic_add({base}, tl.sum({part}, axis=0))")
        elif op in ("matvec", "rowsum"):
            body.emit(f"tl.atomic_add({base} + b * M + rows, tl.sum({part}, axis=1), mask=rows < M)")
        elif op in ("matvec_t", "colsum"):
            body.emit(f"tl.atomic_add({base} + b * N + cols, tl.sum({part}, axis=0), mask=cols < N)")
        else:
            body.emit(f"tl.atomic_add({base}, tl.sum(tl.sum({part}, axis=1), axis=0))")

    # -- vector stages -----------------------------------------------------------------------
    def vec_kernel(self, stage: Stage) -> _Draft:
        scope = self.new_scope()
        body = _Body(scope, indent=1)
        body.emit("t = tl.program_id(0)")
        body.emit(f"B = {self.col('B')}")
        body.emit(f"M = {self.col('M')}")
        body.emit(f"N = {self.col('N')}")
        for s in stage.statements:
            body.comment(f"{self.text.statement(s)}  ({s.value.kind.label})")
            self.vec_statement(s, body)
            body.emit("tl.debug_barrier()")
        summary = ("Vector stage: one program per tensor, looping over its matrices and their rows / columns "
                   "in blocks of VB.")
        return _Draft.of("vec", self.kernel_text(scope, summary, body.lines))

    def vec_statement(self, s: Assign, body: _Body) -> None:
        kind = s.value.kind
        n = s.value
        if kind == Kind.TENSOR and n.op == "sum":  # the sum of a per-row / per-column value
            x = n.args[0]
            length = "M" if x.kind == Kind.ROW else "N"
            body.emit("acc = tl.zeros((), tl.float32)")
            body.emit("for b in range(0, B):")
            body.indent += 1
            self._vec_loop(body, length)
            ctx = _DeviceCtx(self, body, "vec", target=s.target, length=length)
            body.emit(f"acc += tl.sum(tl.where(j < {length}, {self.expr(x, ctx)}, 0.0), axis=0)")
            body.indent -= 2
            _DeviceCtx(self, body, "vec", target=s.target, length=None).store(s.target, "acc", kind)
            return
        if kind == Kind.TENSOR:
            ctx = _DeviceCtx(self, body, "vec", target=s.target, length=None)
            ctx.store(s.target, ctx.bind(self.expr(n, ctx), s.target), kind)
            return
        body.emit("for b in range(0, B):")
        body.indent += 1
        if kind == Kind.MATRIX and n.op not in ("dot", "matmean"):
            ctx = _DeviceCtx(self, body, "vec", target=s.target, length=None)
            ctx.store(s.target, ctx.bind(self.expr(n, ctx), s.target), kind)
        elif kind == Kind.MATRIX:  # dot of two rows or two columns
            length = "M" if n.args[0].kind == Kind.ROW else "N"
            body.emit("acc = tl.zeros((), tl.float32)")
            self._vec_loop(body, length)
            ctx = _DeviceCtx(self, body, "vec", target=s.target, length=length)
            if n.op == "matmean":  # the mean of a row / column: its sum over its length
                a = self.expr(n.args[0], ctx)
                body.emit(f"acc += tl.sum(tl.where(j < {length}, {a}, 0.0), axis=0)")
            else:
                a, c = self.expr(n.args[0], ctx), self.expr(n.args[1], ctx)
                body.emit(f"acc += tl.sum(tl.where(j < {length}, {a} * {c}, 0.0), axis=0)")
            body.indent -= 1
            ctx = _DeviceCtx(self, body, "vec", target=s.target, length=None)
            ctx.store(s.target, f"L.div(acc, {length}.to(tl.float32))" if n.op == "matmean" else "acc", kind)
        else:
            length = "M" if kind == Kind.ROW else "N"
            value = n
            if n.op == "normalize":
                value = n.args[0]
                body.emit("acc = tl.zeros((), tl.float32)")
                self._vec_loop(body, length)
                ctx = _DeviceCtx(self, body, "vec", target=s.target, length=length)
                x = ctx.named(self.expr(value, ctx), s.target)
                body.emit(f"acc += tl.sum(tl.where(j < {length}, {x} * {x}, 0.0), axis=0)")
                body.indent -= 1
                body.emit("scale = tl.maximum(tl.sqrt_rn(acc), 1e-12)")
            self._vec_loop(body, length)
            ctx = _DeviceCtx(self, body, "vec", target=s.target, length=length)
            x = self.expr(value, ctx)
            if n.op == "normalize":
                x = f"L.div({x}, scale)"
            ctx.store(s.target, ctx.bind(x, s.target), kind)
            body.indent -= 1
        body.indent -= 1

    @staticmethod
    def _vec_loop(body: _Body, length: str) -> None:
        """Open a loop over one row / column vector in blocks of VB (the caller closes it)."""
        body.emit(f"for j0 in range(0, {length}, VB):")
        body.indent += 1
        body.emit("j = j0 + tl.arange(0, VB)")


class _DeviceCtx:
    """Where values live while one device kernel body is emitted."""

    def __init__(self, em: KernelEmitter, body: _Body, mode: str, length: str | None = None,
                 target: str | None = None):
        self.em = em
        self.body = body
        self.mode = mode  # flat | tiled | vec
        self.length = length  # vec: "M" / "N" inside a vector loop
        self.target = target  # the statement being emitted: the stem of its values' names
        self.top: Node | None = None  # its value (the node bound to the target)
        self.locals: dict[str, str] = {}
        self.written: list[str] = []
        self.pointers: dict[str, str] = {}
        self.header_lines: list[str] = []
        self.hv_loaded: dict[str, str] = {}
        self.slice_lanes = False  # the per-slice lanes and offsets are set up in the header
        self.encoding: str | None = None  # the target of the statement being emitted
        self.codec_stored: set[str] = set()  # coded states whose codec's encode stored them

    def value(self, code: str, op: str) -> str:
        """An operation's result: inline in the expression of its statement, or on a line of its
        own (named ``<target>_<op>``) where the expression would grow too long to read."""
        if len(code) <= _INLINE:
            return code
        return self.named(code, f"{self.target}_{op}" if self.target else op)

    def named(self, code: str, hint: str) -> str:
        """``code`` as a local (for a value read more than once, or handed to a codec)."""
        if code.isidentifier():
            return code
        name = self.body.fresh(hint)
        self.body.emit(f"{name} = {code}")
        return name

    def bind(self, code: str, target: str) -> str:
        """A statement's value, named after its target (a value that is already a local is
        that local: an alias costs no line)."""
        return self.named(code, target)

    def header(self) -> list[str]:
        lines = []
        if self.mode == "tiled":
            lines += [
                "    pid = tl.program_id(0)",
                "    t = tl.load(chunks + 4 * pid)",
                "    b = tl.load(chunks + 4 * pid + 1)",
                "    rows = tl.load(chunks + 4 * pid + 2) + tl.arange(0, BM)",
                "    cols = tl.load(chunks + 4 * pid + 3) + tl.arange(0, BN)",
                f"    M = {self.em.col('M')}",
                f"    N = {self.em.col('N')}",
                "    if ALIGNED:",
                "        N = tl.multiple_of(N, 16)",
                "        cols = tl.max_contiguous(tl.multiple_of(cols, BN), BN)",
                "    rows2 = rows[:, None]",
                "    cols2 = cols[None, :]",
                "    offs = b * M * N + rows2 * N + cols2",
                "    mask = (rows2 < M) & (cols2 < N)",
            ]
        return lines + self.header_lines

    def pointer(self, name: str) -> str:
        """The local holding ``name``'s base pointer, loaded from the table on first use."""
        if name in self.pointers:
            return self.pointers[name]
        em = self.em
        # one name per buffer and kernel (a vector stage loads a pointer again where it uses it)
        local = em.scope.pointer_names.get(name) or em.scope.pointer_names.setdefault(name, self.body.fresh("p_" + local_base(name)))
        if name == "grad":
            src = "tl.load(gptr + t)"
        elif name == "param" or name in em.states:
            src = em.col("param" if name == "param" else f"state:{name}")
        else:  # a workspace buffer (fp32)
            src = None
        if src is None:
            line = f"{local} = ws + {em.col('ws:' + name)}"
        else:
            line = f"{local} = {src}.to(tl.pointer_type({em.dtype_of(name)}))"
        if self.mode == "vec":  # vector stages load pointers where they use them
            self.body.emit(line)
        else:  # passes load them once, in the header
            self.header_lines.append("    " + line)
            if src is not None:
                self.header_lines.append(f"    if ALIGNED:\n        {local} = tl.multiple_of({local}, 16)")
        self.pointers[name] = local
        return local

    def table_pointer(self, column: str, dtype: str) -> str:
        """The local holding a codec table's pointer (a ``book:`` column), loaded in the header."""
        if column not in self.pointers:
            local = self.body.fresh("p_" + column.rpartition(":")[2])  # p_qmap, p_lut: the book it points at
            self.header_lines.append(f"    {local} = {self.em.col(column)}.to(tl.pointer_type(tl.{dtype}))")
            self.pointers[column] = local
        return self.pointers[column]

    def index(self, kind: Kind) -> tuple[str, str | None]:
        """Offset and mask of a value of ``kind`` in this context."""
        if kind == Kind.TENSOR:
            return "0", None
        if kind == Kind.SLICE and self.mode in ("flat", "tiled"):
            # every k-th element: its lanes of the element pass, its own index in the slice
            if not self.slice_lanes:
                self.header_lines.append(f"    sp = {self.em.col('stride')}")
                self.header_lines.append("    sl_mask = L.slice_lanes(offs, sp, mask)")
                self.header_lines.append("    sl_offs = offs // sp")
                self.slice_lanes = True
            return "sl_offs", "sl_mask"
        if self.mode == "flat":
            if kind != Kind.ELEMENT:
                raise TritonUnsupported(f"{kind.label} value in a flat pass")
            return "offs", "mask"
        if self.mode == "tiled":
            return {
                Kind.ELEMENT: ("offs", "mask"),
                Kind.ROW: ("(b * M + rows2)", "(rows2 < M)"),
                Kind.COL: ("(b * N + cols2)", "(cols2 < N)"),
                Kind.MATRIX: ("b", None),
            }[kind]
        return {
            Kind.ROW: ("(b * M + j)", "(j < M)"),
            Kind.COL: ("(b * N + j)", "(j < N)"),
            Kind.MATRIX: ("b", None),
        }[kind]

    def is_bits(self, name: str) -> bool:
        decl = self.em.states.get(name)
        return decl is not None and decl.dtype == "bits"

    def _bits_offsets(self) -> str:
        if self.mode != "tiled":
            raise TritonUnsupported("a 1-bit state outside a tiled pass")
        return "(b * M + rows2) * ((N + 7) // 8)"

    def read_bits(self, name: str) -> str:
        """A 1-bit state: bit ``j % 8`` of byte ``j // 8`` of each row, as a boolean."""
        ptr = self.pointer(name)
        byte, local = self.body.fresh(f"{name}_byte"), self.body.fresh(name)
        self.em.scope.touch(self.em.scope.reads, name)
        self.body.emit(f"{byte} = tl.load({ptr} + {self._bits_offsets()} + cols2 // 8, mask=mask, other=0)")
        self.body.emit(f"{local} = ((({byte}).to(tl.int32) >> (cols2 % 8)) & 1) != 0")
        self.locals[name] = local
        return local

    def store_bits(self, name: str, value: str) -> None:
        """Pack the tile's booleans 8 per byte (BN is a multiple of 8; bits past N are 0)."""
        ptr = self.pointer(name)
        b = self.body
        bits, packed, bcols = b.fresh(f"{name}_bits"), b.fresh(f"{name}_packed"), b.fresh(f"{name}_bcols")
        self.em.scope.touch(self.em.scope.writes, name)
        b.emit(f"{bits} = tl.reshape(tl.where(mask, {value}, 0).to(tl.int32), (BM, BN // 8, 8))")
        b.emit(f"{packed} = tl.sum({bits} << tl.arange(0, 8)[None, None, :], axis=2)")
        b.emit(f"{bcols} = tl.load(chunks + 4 * pid + 3) // 8 + tl.arange(0, BN // 8)[None, :]")
        b.emit(f"tl.store({ptr} + {self._bits_offsets()} + {bcols}, {packed}.to(tl.uint8), "
               f"mask=(rows2 < M) & ({bcols} < (N + 7) // 8))")

    def read(self, name: str, kind: Kind) -> str:
        if kind == Kind.HOST:
            load = f"tl.load(hv + t * NH + {self.em.hv_slot(name)})"
            if self.mode == "vec":
                return load
            if name not in self.hv_loaded:
                self.hv_loaded[name] = self.body.fresh(self.em.text.host_name(name))
                self.header_lines.append(f"    {self.hv_loaded[name]} = {load}")
            return self.hv_loaded[name]
        if name in self.locals:
            return self.locals[name]
        if self.is_bits(name):
            return self.read_bits(name)
        ptr = self.pointer(name)
        off, mask = self.index(kind)
        local = self.body.fresh(name)
        self.em.scope.touch(self.em.scope.reads, name)
        m = ""
        if mask is not None:
            m = f", mask={mask}" if self.mode == "flat" and kind != Kind.SLICE else f", mask={mask}, other=0.0"
        decl = self.em.states.get(name)
        if decl is not None and decl.dtype == "bool":  # a mask state: an elementwise condition
            self.body.emit(f"{local} = tl.load({ptr} + {off}{m}) != 0")
        else:
            self.body.emit(f"{local} = tl.load({ptr} + {off}{m}).to(tl.float32)")
        if self.mode != "vec":
            self.locals[name] = local
        return local

    def store(self, name: str, value: str, kind: Kind = Kind.ELEMENT) -> None:
        if self.is_bits(name):
            self.store_bits(name, value)
            return
        ptr = self.pointer(name)
        off, mask = self.index(kind)
        self.em.scope.touch(self.em.scope.writes, name)
        m = f", mask={mask}" if mask is not None else ""
        self.body.emit(f"tl.store({ptr} + {off}, L.to_storage({value}, {self.em.dtype_of(name)}){m})")


def _codec_block(stmts: list) -> int:
    """The largest scale block of the codecs a path decodes or encodes (0: none)."""
    return max((codec_for(n.attr[0]).block or 0 for s in walk_stmts(stmts) if isinstance(s, Assign)
                for n in walk_nodes(s.value) if n.op in ("decode", "encode")), default=0)


def call_plan(s: Assign) -> CallPlan:
    """What the runtime needs to run a call stage: the op, its workspace input and output, and its
    host arguments (a host value's name, or a constant)."""
    x = s.value.args[0]
    return CallPlan(s.value.op, x.attr, s.target,
                    tuple(("var", a.attr) if a.op == "var" else ("const", a.attr) for a in s.value.args[1:]))


def program_inputs(program: Program) -> list[str]:
    """The runtime inputs (``input`` leaves) a program reads, in a fixed order."""
    return sorted({n.attr for s in walk_stmts(program.body) if isinstance(s, Assign)
                   for n in walk_nodes(s.value) if n.op == "input"})


def hyper_slots(program: Program) -> list[tuple]:
    """Every hyperparameter host code may read, in one fixed order shared by all branch paths."""
    found = {n.attr for s in walk_stmts(program.body) if isinstance(s, Assign) and s.value.is_host
             for n in walk_nodes(s.value) if n.op == "hyper"}
    return sorted(found, key=lambda a: (a[0], -1 if a[1] is None else a[1]))


def path_states(program: Program, stmts: list) -> list[str]:
    """The device (non-host) states a branch path's statements read or assign."""
    device = {d.name for d in program.state if d.kind != Kind.HOST}
    found = set()
    for s in walk_stmts(stmts):
        if isinstance(s, Assign):
            found |= {n.attr for n in walk_nodes(s.value) if n.op == "var" and n.attr in device}
            if s.target in device:
                found.add(s.target)
    return sorted(found)


def decisions(program: Program, dyn: set[str]) -> tuple[list[str], list[str]]:
    """What decides a group's tables, as opposed to the runtime values its kernels read.

    The prologue computes every host value from the hyperparameter slots on the device, so a
    hyperparameter that only feeds host values (``lr``, betas, ``weight_decay`` in ``1 - lr * wd``)
    is a runtime value: a scheduler moving it re-uploads the slots and rebuilds nothing. What the
    tables depend on is (a) the outcome of each static condition (a condition of hyperparameters
    alone is re-evaluated per group: ``group_conditions``) and (b) the values of the hyperparameters
    that reach a condition that also reads parameter facts or state, a call stage's host
    arguments, a matrix view rule or the slice stride (``static_hypers``, compared by value).
    """
    defs = host_definitions(program)
    globals_ = {g.name for g in program.globals}
    by_value: list = []  # nodes whose hyperparameters are compared by value
    conditions: list[str] = []
    for name, values, by_group in static_conditions(program, dyn, defs):
        if by_group:
            conditions.append(name)
        else:
            # a condition that also reads parameter facts: its hyperparameter-only parts are
            # decided by their outcomes (decision_atoms), the rest by the values it reads
            by_value += [leaf for v in values for leaf in split_condition(v)[1]]
    for s in walk_stmts(program.body):
        if isinstance(s, Assign):
            by_value += [a for n in walk_nodes(s.value) if n.op in CALLS for a in n.args[1:] if a.is_host]
    by_value += [cond for cond, _ in program.matrix_views]
    found: set[str] = {program.slice_stride} if program.slice_stride else set()
    seen: set[str] = set()
    stack = list(by_value)
    while stack:
        for n in walk_nodes(stack.pop()):
            if n.op == "hyper" and n.attr[0] not in globals_:
                found.add(n.attr[0])
            elif n.op == "var" and n.attr not in seen and n.attr not in dyn:
                seen.add(n.attr)
                stack += defs.get(n.attr, [])
    return sorted(found), sorted(set(conditions) - set(global_conditions(program)))


def default_decisions(program: Program) -> dict[str, bool]:
    """The static conditions decided by hyperparameters alone, at their defaults."""
    from optgen.numerics.host import HostContext, evaluate

    group = {name: (tuple(h.default) if isinstance(h.default, list) else h.default) for name, h in program.hypers}
    ctx = HostContext(group, torch.empty(0), {}, tensor_math=False)
    for g in program.globals:  # conditions on globals (Prodigy's k) read their initial values
        try:
            group[g.name] = evaluate(g.init, ctx)
        except (ArithmeticError, ValueError):
            pass  # the conditions reading it stay undecided (below)
    out: dict[str, bool] = {}
    for s in program.body:
        if isinstance(s, Assign) and s.value.is_host and s.value.boolean and s.target.startswith("_c") and \
                group_decided(s.value):
            try:
                out[s.target] = bool(evaluate(s.value, ctx))
            except (ArithmeticError, ValueError, KeyError):
                # host maths that fails at the defaults (an overflowing power of a global, or a
                # global whose init failed): the condition stays undecided, both branches are
                # rendered, and stepping reports the error (`optgen check`'s smoke step)
                continue
    return out


def render_kernels(program: Program, prefix: str, fixed: dict[str, bool] | None = None,
                   ) -> tuple[list[KernelSource], TritonPlan]:
    """The kernels of a hoisted program's branch paths plus the plan data the runtime needs.

    ``fixed`` decides conditions ahead: the generated module renders the paths reachable with
    every hyperparameter at its default (parameter facts such as the dtype or the shape still
    vary); the runtime renders any other path the first time a parameter group takes it.
    """
    if any(n.op == "sinkhorn" for s in walk_stmts(program.body) if isinstance(s, Assign) for n in walk_nodes(s.value)):
        # SinkSGD normalises every matrix with it: the backend refuses the optimizer at construction
        raise TritonUnsupported(_TORCH_ONLY["sinkhorn"])
    dyn = dynamic_names(program)
    kernels: list[KernelSource] = []
    by_text: dict[_Draft, str] = {}
    slots: list = hyper_slots(program)
    paths: dict[tuple, PathLaunch] = {}

    def add(draft: _Draft) -> str:
        if draft in by_text:  # the same kernel up to its name: launched under the first one's
            return by_text[draft]
        name = f"{prefix}_{draft.kind}{sum(k.kind == draft.kind for k in kernels)}"
        kernels.append(draft.named(name))
        by_text[draft] = name
        return name

    text = SourceText(program)  # comments and host value names, the same on every path
    unsupported: list[str] = []
    emitters: list[KernelEmitter] = []
    for key, stmts in enumerate_paths(program.body, dyn, fixed=default_decisions(program) if fixed is None else fixed):
        # A path the backend cannot run (a feature not written for it yet) is recorded with the
        # reason; the runtime raises it if a parameter group takes that path.
        try:
            plan = plan_path(program, key, stmts, dyn)
            em = KernelEmitter(program, plan, slots, text)
            sources: list = [(em.prologue(), "prologue")]
            calls = []
            for i, st in enumerate(plan.stages):
                if st.kind == "pass":
                    sources.append((em.pass_kernel(st, i), st.layout))
                elif st.kind == "call":
                    sources.append((f"call{len(calls)}", "call"))
                    calls.append(call_plan(st.statements[0]))
                else:
                    sources.append((em.vec_kernel(st), "vec"))
        except TritonUnsupported as exc:
            paths[key] = PathLaunch(unsupported=str(exc))
            unsupported.append(str(exc))
            continue
        emitters.append(em)
        launches = [(src if kind == "call" else add(src), kind) for src, kind in sources]
        paths[plan.key] = PathLaunch(
            launches=tuple(launches),
            calls=tuple(calls),
            columns=tuple(table_columns(program, plan)),
            temps=tuple((t.name, t.kind.name.lower(), t.accumulator) for t in plan.temps),
            hv=tuple(plan.hv),
            creates=tuple(plan.creates),
            # the tile a codec with scale blocks needs (feature state_precision)
            block=_codec_block(stmts),
            # the device states this path reads or writes: the runner refuses a missing one
            # (a flag switched on after its state would have been allocated) instead of a null pointer
            states=tuple(path_states(program, stmts)),
            accumulates=tuple(plan.accumulates),
        )
    if len(unsupported) == len(paths):
        raise TritonUnsupported(unsupported[0])
    static_hypers, group_conditions = decisions(program, dyn)
    launch_plan = TritonPlan(
        dynamic=tuple(sorted(dyn)),
        hyper_slots=tuple(tuple(s) for s in slots),
        inputs=tuple(program_inputs(program)),
        static_hypers=tuple(static_hypers),
        group_conditions=tuple(group_conditions),
        global_conditions=tuple(global_conditions(program)) if program.globals else None,
        paths=paths,
        # the codecs whose triton_source the module includes (render_triton_module)
        codecs=tuple(sorted(set().union(*(em.codecs for em in emitters)))),
    )
    return kernels, launch_plan
