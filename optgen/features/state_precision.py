"""``state_precision``: per-element states stored at a lower precision (docs/state_precision.md).

A storage transform, as ``factored`` is: the spec's maths is unchanged. For each precision that a
codec stores (:mod:`optgen.ir.codecs`), the statements of the parameter block are rewritten so
that a coded state ``X`` is decoded into a float32 working value ``X_work`` before its first
read, every write of ``X`` writes ``X_work`` and is followed by ``X = encode(X_work)``, and later
reads take ``X_work`` (the update uses the unrounded new state, as adv_optm's ``get_state`` /
``set_state`` do). Each precision is a branch on the per-group ``state_precision`` (and on the
codec's small-tensor rule), so backends specialise it; nothing is decoded or encoded outside the
step's own passes.

Two dialects:

- adv_optm's (the spec declares ``state_precision`` with ``auto`` among its choices, 2.5.16):
  ``fp32`` and ``fp16`` are storage dtypes (the maths runs in them, as adv_optm's does),
  ``bf16_sr`` and ``int8_sr`` are codecs; with ``fp32``, ``bf16_sr`` and ``int8_sr`` the gradient
  is upcast to float32 (``upcast_grad_for_precision``), where adv_optm upcasts it. The states coded
  are the dense forms of the factorable states (those adv_optm's ``state_util`` stores);
  ``exp_avg_sq`` and ``second_momentum_buffer`` are the non-negative ones (adv_optm's
  ``non_neg=True``).
- any other spec: the feature adds ``state_precision`` (default ``'auto'``: the spec's own
  storage) with ``fp32`` (a float32 dtype) and the codecs ``bf16``, ``bf16_sr``, ``fp16``,
  ``int8_sr``; a spec that declares the hyperparameter itself lists the precisions it takes
  (any registered codec). Every per-element state of the parameter's dtype is coded; a state is
  non-negative where every write of it provably is.

List it last under ``features:``.
"""

from __future__ import annotations

import dataclasses

from optgen.features import Feature
from optgen.features.factored import _before_orthograd, aliased
from optgen.features.rewrite import (
    FeatureError,
    at_start_of_param_block,
    edit_nested,
    element,
    names_in,
    placed,
    var,
)
from optgen.ir.codecs import PACKED_UINT4, Codec, codec_for
from optgen.ir.nodes import Assign, If, Kind, Node, Program, StateDecl, Stmt, walk_nodes
from optgen.ir.ops import Op
from optgen.spec.model import HyperparameterSpec

HYPER = "state_precision"
#: adv_optm 2.5.16's dtype-only precisions and the codecs among its values
ADV_DTYPES = {"fp32": "float32", "fp16": "float16"}
ADV_CODECS = ("bf16_sr", "int8_sr")
ADV_UPCAST = ("fp32", "bf16_sr", "int8_sr")
#: the states adv_optm stores with non_neg=True
ADV_NON_NEG = ("exp_avg_sq", "second_momentum_buffer")
GENERIC = ["auto", "fp32", "bf16", "bf16_sr", "fp16", "int8_sr"]


def _is(name: str) -> Node:
    return Node("eq", (Node("hyper", attr=(HYPER, None)), Node("const", attr=name)), boolean=True)


def _and(a: Node | None, b: Node | None) -> Node | None:
    if a is None:
        return b
    if b is None:
        return a
    return Node("and", (a, b), boolean=True)


def _not(a: Node) -> Node:
    return Node("not", (a,), boolean=True)


def work_name(state: str) -> str:
    return f"{state}_work"


class _Coding:
    """The rewrite of one statement list for one codec (``coded``: state -> non-negative)."""

    def __init__(self, codec: Codec, coded: dict[str, bool]):
        self.codec = codec
        self.coded = coded

    def _rename(self, n: Node) -> Node:
        if n.op == Op.VAR and n.attr in self.coded:
            return Node("var", kind=Kind.ELEMENT, attr=work_name(n.attr))
        if not n.args:
            return n
        return Node(n.op, tuple(self._rename(a) for a in n.args), n.kind, n.attr, n.boolean)

    def block(self, stmts: list[Stmt], ready: set[str]) -> tuple[list[Stmt], set[str]]:
        out: list[Stmt] = []
        for s in stmts:
            if isinstance(s, If):
                then, r1 = self.block(s.then, set(ready))
                orelse, r2 = self.block(s.orelse, set(ready))
                out.append(If(s.cond, then, orelse, s.pos))
                ready = r1 & r2  # after a conditional only what both branches decoded or wrote
                continue
            reads = {n.attr for n in walk_nodes(s.value) if n.op == Op.VAR} & set(self.coded)
            for name in sorted(reads - ready):
                decode = Node("decode", (), Kind.ELEMENT, (self.codec.name, name, self.coded[name]))
                out.append(Assign(work_name(name), decode, None, "temp"))
                ready.add(name)
            if s.target in self.coded:
                out.append(Assign(work_name(s.target), self._rename(s.value), s.pos, "temp"))
                # a stochastic codec's encode also takes the step (the triton backend's Philox seed)
                args = (var(work_name(s.target)), *((Node("step"),) if self.codec.stochastic else ()))
                encode = Node("encode", args, Kind.ELEMENT, (self.codec.name, self.coded[s.target]))
                out.append(Assign(s.target, encode, s.pos, "state"))
                ready.add(s.target)
            else:
                out.append(Assign(s.target, self._rename(s.value), s.pos, s.role))
        return out, ready


def _touches(s: Stmt, names: set[str]) -> bool:
    if isinstance(s, If):
        return any(_touches(x, names) for x in s.then + s.orelse)
    return s.target in names or any(n.op == Op.VAR and n.attr in names for n in walk_nodes(s.value))


def _factored_request(cond: Node) -> bool:
    """``cond`` is feature factored's request (its branch runs with state_precision='factored')."""
    return any(n.op == Op.CONST and n.attr == "factored" for n in walk_nodes(cond))


def _wrap(stmts: list[Stmt], names: set[str], make) -> list[Stmt]:
    """``make`` applied to the smallest statement list that holds every access of ``names`` and
    the parameter's write (a lone conditional is entered; factored's requested branch is left as
    it is)."""
    hits = [i for i, s in enumerate(stmts) if _touches(s, names)]
    if not hits:
        return stmts
    # the parameter's block: written outside the conditional that holds the accesses
    direct = any(_touches(s, {"param"}) for i, s in enumerate(stmts) if i not in hits)
    if len(hits) == 1 and isinstance(stmts[hits[0]], If) and not direct:
        i = hits[0]
        s = stmts[i]
        then = s.then if _factored_request(s.cond) else _wrap(s.then, names, make)
        return [*stmts[:i], If(s.cond, then, _wrap(s.orelse, names, make), s.pos), *stmts[i + 1:]]
    return make(stmts)


# -- non-negativity of a state's writes (generic dialect) --------------------------------------
def _host_nonneg(n: Node, hypers: dict) -> bool:
    if n.op == Op.CONST:
        return isinstance(n.attr, (int, float)) and not isinstance(n.attr, bool) and n.attr >= 0
    if n.op == Op.HYPER:
        h = hypers.get(n.attr[0])
        return h is not None and h.min is not None and h.min >= 0
    if n.op == Op.SUB and n.args[0].op == Op.CONST and n.args[0].attr == 1 and n.args[1].op == Op.HYPER:
        h = hypers.get(n.args[1].attr[0])
        return h is not None and ((h.max is not None and h.max <= 1) or (h.max_exclusive is not None
                                                                            and h.max_exclusive <= 1))
    if n.op in (Op.MUL, Op.DIV, Op.ADD, Op.SQRT, Op.MAX, Op.POW) and n.args:
        return all(_host_nonneg(a, hypers) for a in n.args)
    return False


def _nonneg(n: Node, name: str, temps: dict[str, Node], hypers: dict, depth: int = 0) -> bool:
    if depth > 40:
        return False
    if n.is_host:
        return _host_nonneg(n, hypers)
    rec = lambda a: _nonneg(a, name, temps, hypers, depth + 1)  # noqa: E731
    if n.op == Op.VAR:
        if n.attr == name:
            return True  # by induction: the state starts at zero
        return n.attr in temps and rec(temps[n.attr])
    if n.op in (Op.ABS, Op.SQRT, Op.EXP):
        return True
    if n.op == Op.MUL:
        return n.args[0] == n.args[1] or all(rec(a) for a in n.args)
    if n.op == Op.ADDCMUL:
        a, b, c, s = n.args
        return rec(a) and (b == c or (rec(b) and rec(c))) and rec(s)
    if n.op in (Op.ADD, Op.DIV, Op.LERP, Op.FLOAT32, Op.COPY, Op.CONTIGUOUS):
        return all(rec(a) for a in n.args[:2])
    if n.op == Op.MAXIMUM:
        return any(rec(a) for a in n.args)
    if n.op == Op.WHERE:
        return rec(n.args[1]) and rec(n.args[2])
    return False


def _writes(stmts: list[Stmt], name: str, temps: dict[str, Node], out: list[Node]) -> None:
    for s in stmts:
        if isinstance(s, If):
            _writes(s.then, name, dict(temps), out)
            _writes(s.orelse, name, dict(temps), out)
        elif s.target == name:
            out.append(s.value)
        elif s.role in ("temp", "grad"):
            temps[s.target] = s.value


def non_negative(program: Program, name: str) -> bool:
    """Every write of state ``name`` is provably non-negative (a square, an EMA of squares...)."""
    values: list[Node] = []
    _writes(program.body, name, {}, values)
    hypers = dict(program.hypers)
    temps: dict[str, Node] = {}
    _collect_temps(program.body, temps)
    return bool(values) and all(_nonneg(v, name, temps, hypers) for v in values)


def _collect_temps(stmts: list[Stmt], temps: dict[str, Node]) -> None:
    for s in stmts:
        if isinstance(s, If):
            _collect_temps(s.then, temps)
            _collect_temps(s.orelse, temps)
        elif s.role in ("temp", "grad"):
            temps.setdefault(s.target, s.value)  # a name written twice: its first form (conservative
            if temps[s.target] is not s.value:  # only where both agree)
                temps[s.target] = Node("unknown")


# -- the transform -----------------------------------------------------------------------------
def _upcast(stmts: list[Stmt], conds: list[Node | None], when: Node | None = None) -> list[Stmt]:
    """adv_optm's gradient upcast where it upcasts (before OrthoGrad, in the parameter's block),
    for the parameters that keep one of the coded states (and where ``when`` holds)."""
    cast: list[Stmt] = [Assign("grad", element("float32", var("grad")), None, "grad")]
    if all(c is not None for c in conds):
        either = conds[0] if len(conds) == 1 else Node("or", tuple(conds), boolean=True)
        when = _and(when, either)
    if when is not None:
        cast = [If(when, cast, [])]
    out, ok = edit_nested(stmts, placed(at_start_of_param_block(cast, True), _before_orthograd))
    if not ok:
        raise FeatureError("feature 'state_precision' needs a 'param = ...' statement")
    return out


def _apply(program: Program) -> Program:
    hypers = dict(program.hypers)
    h = hypers.get(HYPER)
    if h is None:
        raise FeatureError("feature 'state_precision' needs its hyperparameter")  # pragma: no cover
    choices = [c for c in (h.choices or []) if isinstance(c, str)]
    adv = "factored" in choices  # adv_optm's API: its values include feature factored's
    if adv:
        decls = [d for d in program.state if d.kind == Kind.ELEMENT and d.dtype != "bits" and d.dtype_when is not None
                 and any(n.op == Op.HYPER and n.attr[0] == HYPER for n in walk_nodes(d.dtype_when[0]))]
        codecs = [c for c in choices if c in ADV_CODECS]
        dtypes = {c: t for c, t in ADV_DTYPES.items() if c in choices}
        non_neg = {d.name: d.name in ADV_NON_NEG for d in decls}
    else:
        decls = [d for d in program.state if d.kind == Kind.ELEMENT and d.dtype == "param"]
        codecs = [c for c in choices if c not in ("auto", "fp32")]
        dtypes = {"fp32": "float32"} if "fp32" in choices else {}
        non_neg = {d.name: non_negative(program, d.name) for d in decls}
    if not decls:
        raise FeatureError("feature 'state_precision' found no per-element state to store")
    names = {d.name for d in decls}
    taken = {d.name for d in program.state}
    for d in decls:  # the working value's name derives from the state's: a spec name is an error
        if work_name(d.name) in names_in(program):
            raise FeatureError(f"feature 'state_precision' names the working value of '{d.name}' "
                               f"'{work_name(d.name)}', which is taken")
    try:
        by_name = {c: codec_for(c) for c in codecs}
    except KeyError as exc:
        raise FeatureError(f"state_precision: no codec named {exc.args[0]!r}") from None
    conds = [d.cond for d in decls]

    # adv_optm turns a request for nnmf_factor into state_precision='factored'
    legacy = adv and "nnmf_factor" in hypers and aliased(program)

    def is_(c: str) -> Node:
        return _and(_is(c), _not(Node("hyper", attr=("nnmf_factor", None), boolean=True))) if legacy else _is(c)

    def when(c: str) -> Node:
        return _and(is_(c), by_name[c].applies())

    def make(stmts: list[Stmt]) -> list[Stmt]:
        plain = stmts
        if adv and "fp32" in dtypes:
            plain = _upcast(stmts, conds, is_("fp32"))  # the body itself: fp32 is a dtype
        for c in reversed(codecs):
            coded, _ = _Coding(by_name[c], non_neg).block(stmts, set())
            if adv and c in ADV_UPCAST:
                coded = _upcast(coded, conds)
            plain = [If(when(c), coded, plain)]
        return plain

    body = _wrap(program.body, names, make)
    state: list[StateDecl] = []
    extra: dict[str, StateDecl] = {}
    for d in program.state:
        if d.name not in names:
            state.append(d)
            continue
        rules: list[tuple[Node, str]] = []
        for c in codecs:
            codec = by_name[c]
            stored = codec.stored(non_neg[d.name])
            own = next(s for s in stored if s.suffix == "")
            if own.shape == "packed" and (codec.per_byte, own.dtype) != (2, "uint8"):
                raise FeatureError(f"state_precision: codec '{c}' packs {codec.per_byte} codes per {own.dtype}: "
                                   "only two 4-bit codes per uint8 are stored packed")
            rules.append((when(c), PACKED_UINT4 if own.shape == "packed" else own.dtype))
            if codec.applies() is not None:
                rules.append((is_(c), "float32"))  # the small tensors it leaves alone
            for s in stored:
                if s.suffix == "":
                    continue
                key = d.name + s.suffix
                if key in taken:
                    raise FeatureError(f"state_precision: codec '{c}' stores '{key}', which is a state")
                kind = Kind.BLOCK if s.shape == "blocks" else Kind.ELEMENT
                cond = _and(d.cond, when(c))
                prev = extra.get(key)
                if prev is not None:
                    if prev.block != codec.block or prev.dtype != s.dtype:
                        raise FeatureError(f"state_precision: codecs store '{key}' in two layouts")
                    prev.cond = Node("or", (prev.cond, cond), boolean=True)
                    continue
                # a state created by its first write has its codec's tensors created with it
                init = "absent" if d.init == "absent" else s.init
                extra[key] = StateDecl(key, kind, init, s.dtype, cond, f"{c} {s.suffix[1:]} of {d.name}",
                                       block=codec.block)
        rules += [(is_(c), t) for c, t in dtypes.items()]
        state.append(dataclasses.replace(d, dtype_rules=rules))
    state += extra.values()
    return program.copy(body=body, state=state)


FEATURE = Feature(
    name="state_precision",
    doc="per-element states stored at a lower precision (bf16, bf16_sr, fp16, int8_sr, registered codecs), "
        "decoded and encoded inside the step",
    transform=_apply,
    hyperparameters={
        HYPER: HyperparameterSpec(default="auto", type="any", choices=GENERIC, keyword_only=True,
                                  doc="how per-element states are stored: 'auto' (the spec's own dtype), 'fp32', "
                                      "'bf16', 'bf16_sr' (stochastic rounding), 'fp16', 'int8_sr' (adv_optm's "
                                      "blockwise int8)"),
    },
    after=("orthograd", "maximize", "amsgrad", "normed_momentum", "nesterov", "grams", "cautious", "ademamix",
           "simplified_ademamix", "atan2", "fisher_wd", "cautious_wd", "kourkoutas_beta", "stochastic_rounding",
           "factored", "spectral_decay", "clip_grad", "coupled"),
)
