"""``centered_wd``: adv_optm 2.5.16's centered weight decay, a pull toward the initial parameter.

math/adv-optm.md §2.2 step 5 and §2.10: the anchor is the parameter at state initialisation,
stored as ``anchor_data`` (``centered_wd_mode='full'``: a copy in the parameter's dtype;
``'float8'``, the published default: ``p.to(float8_e4m3fn)``, unscaled, so it saturates at +-448
and flushes magnitudes below about 2^-10; ``'int8'`` / ``'int4'``: adv_optm's asymmetric blocks of
128 / 32, a read-only coded state, ``StateDecl.codec_rules`` naming the codecs ``anchor_int8`` /
``anchor_int4`` (optgen.ir.codecs.MinMaxBlocks), which encode the parameter at allocation into
``anchor_data`` (int8 codes), ``anchor_scale`` and ``anchor_min`` (per block, the parameter's
dtype) and decode it where the step reads it). After the standard decoupled decay (role
``decay``, whose rate ``-(weight_decay * s)`` gives the scale ``s``), before the parameter write:
``target = param - anchor`` (the anchor taken in the dtype of the parameter being written, the
float32 copy under stochastic rounding) and ``param = param + (-(centered_wd * s)) * target``,
with cautious decay (where the spec has ``cautious_wd``) masking where ``update * target >= 0``:
``addcmul(param, target, mask, -(centered_wd * s))``. ``centered_wd = 0`` (the default) keeps no
anchor and runs the base step unchanged.

With ``fisher_wd`` (the spec has it): adv_optm scales both decays by the Fisher scale, so the
feature computes that scale (feature fisher_wd's statements) from the parameter before the
decays and writes ``addcmul(param, target, (centered_wd * s) * scale, -1)`` (cautious: the mask
times it). With a decay toward a computed target (a role-bound decay ``param + r * T``, ``T`` not
the parameter: SignSGD's geometric decay), adv_optm centres the same computation on
``param - anchor``: the branch that computes ``T`` is copied after it, under its condition, with
``param`` read as ``param - anchor`` (the parameter's own dtype) and its temporaries renamed,
and that centred target replaces ``param - anchor`` where the condition holds.

Not implemented (refused at construction): a structured decay ``param - param * X`` (SinkSGD's
geometric decay, which adv_optm also multiplies into the centered decay) with ``geometric_wd``.
It comes after ``cautious_wd`` and ``fisher_wd`` and before ``stochastic_rounding`` (the resolver
checks it).

Roles: ``decay`` (one statement per path; undeclared: every such decay of the parameter) and the
direction in the cautious mask, the target of ``step_size`` (else ``direction``, else the
dialect's ``update``); ``denominator`` through feature fisher_wd. The temporaries have fresh
names; ``anchor_data``, ``anchor_scale``, ``anchor_min`` are adv_optm's state keys (the spec must
not declare them).
"""

from __future__ import annotations

from optgen.features import Feature
from optgen.features.fisher_wd import fisher_scale
from optgen.features.rewrite import (
    FeatureError,
    flag,
    fresh,
    indicator,
    is_var,
    names_in,
    own_state,
    renamed,
    role_sites,
    role_target,
    switch,
    var,
    where,
)
from optgen.ir.nodes import Assign, If, Kind, Node, Program, StateDecl, Stmt, walk_stmts
from optgen.ir.ops import Op
from optgen.spec.model import HyperparameterSpec

COEF, MODE, ANCHOR = "centered_wd", "centered_wd_mode", "anchor_data"
TARGET = "cwd_target"  # the temporary's name where the spec does not use it
FISHER = "cwd_fisher"  # the unscaled Fisher scale's name where the spec does not use it
#: (mode, codec): the blockwise anchors, read-only coded states (optgen.ir.codecs.MinMaxBlocks)
CODED = (("int8", "anchor_int8"), ("int4", "anchor_int4"))


def _h(name: str) -> Node:
    return Node("hyper", attr=(name, None))


def _rate(s: Assign) -> Node | None:
    """The scale ``s`` of a standard decay ``param + (-(weight_decay * s)) * param`` (or of its
    cautious / Fisher forms), or None."""
    v = s.value
    if s.target != "param" or v.op not in (Op.AXPY, Op.ADDCMUL) or not is_var(v.args[0], "param"):
        return None
    r = v.args[-1]
    if r.op == Op.NEG and r.args[0].op == Op.MUL and r.args[0].args[0].op == Op.HYPER:
        return r.args[0].args[1]
    return None


def _scaled_decay(s: Assign) -> bool:
    """``param = param - param * X``: a decay whose per-element rate ``X`` the spec computed
    (SinkSGD's structured geometric decay; centered decay is refused with ``geometric_wd``)."""
    v = s.value
    return s.target == "param" and v.op == Op.ADDCMUL and is_var(v.args[0], "param") and \
        is_var(v.args[1], "param") and v.args[3].op == Op.CONST and v.args[3].attr == -1


def _contains(s: Stmt, match) -> Node | None:
    if isinstance(s, Assign):
        return _rate(s) if match(s) else None
    for x in [*s.then, *s.orelse]:
        found = _contains(x, match)
        if found is not None:
            return found
    return None


def _mode(name: str) -> Node:
    return Node("eq", (_h(MODE), Node("const", attr=name)), boolean=True)


def _target(t: str) -> list[Stmt]:
    """``t = param - anchor``, the anchor read in the parameter's working dtype: a cast of the
    stored tensor ('full', 'float8') or its blockwise codec's decode ('int8', 'int4'), one path
    per mode."""
    def diff(anchor: Node) -> Assign:
        cast = Node("cast", (anchor, var("param")), kind=Kind.ELEMENT)
        return Assign(t, Node("sub", (var("param"), cast), kind=Kind.ELEMENT), None, "temp")

    out: list[Stmt] = [diff(var(ANCHOR))]
    for mode, codec in reversed(CODED):
        decoded = Node("decode", (), Kind.ELEMENT, (codec, ANCHOR, False))
        out = [If(_mode(mode), [diff(decoded)], out)]
    return out


def _centered(rate: Node, upd: str, cautious: bool, t: str, fisher: tuple[str, str] | None,
              geometric: tuple[Node, str] | None) -> list[Stmt]:
    """The centered decay after the standard one; ``fisher``: the names of the Fisher decay
    scale (unscaled, computed before the decays) and of its centered product (a path per
    ``fisher_wd``), else None; ``geometric``: the condition of the decay target's computation and
    the name of its centred copy (the target where that condition holds), else None."""
    scale = Node("neg", (Node("mul", (_h(COEF), rate), kind=Kind.HOST),), kind=Kind.HOST)
    mask = indicator(Node("ge", (Node("mul", (var(upd), var(t)), kind=Kind.ELEMENT),
                                 Node("const", attr=0)), kind=Kind.ELEMENT, boolean=True))

    def write(value: Node) -> Assign:
        return Assign("param", value, None, "param")

    plain = [write(Node("axpy", (var("param"), var(t), scale), kind=Kind.ELEMENT))]
    if cautious:
        masked = write(Node("addcmul", (var("param"), var(t), mask, scale), kind=Kind.ELEMENT))
        plain = [If(flag("cautious_wd"), [masked], plain)]
    decay: list[Stmt] = plain
    if fisher is not None:  # adv_optm's scaled_cwd * wd_scaler: the Fisher scale times (cwd * s), value -1
        minus_one = Node("const", attr=-1.0)
        unscaled, f = fisher
        scaled = Assign(f, Node("mul", (var(unscaled), Node("mul", (_h(COEF), rate), kind=Kind.HOST)),
                                kind=Kind.ELEMENT, attr="scalar_first"), None, "temp")
        on: list[Stmt] = [write(Node("addcmul", (var("param"), var(t), var(f), minus_one), kind=Kind.ELEMENT))]
        if cautious:
            masked = write(Node("addcmul", (var("param"), var(t), Node("mul", (mask, var(f)), kind=Kind.ELEMENT),
                                            minus_one), kind=Kind.ELEMENT))
            on = [If(flag("cautious_wd"), [masked], on)]
        decay = [switch("fisher_wd", [scaled, *on], plain)]
    on_cwd = Node("ne", (_h(COEF), Node("const", attr=0)), boolean=True)
    target = _target(t)
    if geometric is not None:
        target = [If(geometric[0], [Assign(t, var(geometric[1]), None, "temp")], target)]
    return [If(on_cwd, [*target, *decay], [])]


def _assigned(stmts: list[Stmt]) -> set[str]:
    return {s.target for s in walk_stmts(stmts) if isinstance(s, Assign)}


def _unplaced(stmts: list[Stmt]) -> list[Stmt]:
    """Copies of ``stmts`` without source positions (roles bind the originals only)."""
    return [If(s.cond, _unplaced(s.then), _unplaced(s.orelse)) if isinstance(s, If)
            else Assign(s.target, s.value, None, s.role) for s in stmts]


def _geometric(program: Program, body: list[Stmt], target: str, d: str, out: str) -> tuple[list[Stmt], Node] | None:
    """A decay toward a computed target (SignSGD's geometric decay toward ``sign(p) * ||p|| /
    sqrt(numel)``): adv_optm centres the same computation, ``get_signsgd_wd_target(p - anchor)``.
    After the conditional whose branch computes ``target``, under its condition: ``d = param -
    anchor`` (the parameter's own dtype) and that branch again with ``param`` read as ``d``, its
    temporaries renamed (``target`` to ``out``; its random draws come next in the stream, as
    adv_optm's second call draws). Returns the body and the condition, or None (no such branch)."""
    def find(stmts: list[Stmt]) -> tuple[list[Stmt], Node] | None:
        for i, s in enumerate(stmts):
            if not isinstance(s, If):
                continue
            # the branch computes the target, the other (if any) names the parameter itself
            if target in _assigned(s.then) and all(isinstance(x, Assign) and x.target == target
                                                   and is_var(x.value, "param") for x in s.orelse):
                taken = names_in(program) | {d, out}
                names = {"param": d, target: out}
                for name in sorted(_assigned(s.then) - {target}):
                    names[name] = fresh(program, f"cwd_{name}", taken)
                    taken.add(names[name])
                on = Node("and", (Node("ne", (_h(COEF), Node("const", attr=0)), boolean=True), s.cond), boolean=True)
                block = If(on, [*_target(d), *renamed(_unplaced(s.then), names)], [])
                return [*stmts[:i + 1], block, *stmts[i + 1:]], s.cond
            for branch in ("then", "orelse"):
                found = find(getattr(s, branch))
                if found is not None:
                    new = If(s.cond, found[0], s.orelse, s.pos) if branch == "then" else \
                        If(s.cond, s.then, found[0], s.pos)
                    return [*stmts[:i], new, *stmts[i + 1:]], found[1]
        return None

    return find(body)


def _apply(program: Program) -> Program:
    own_state(program, "centered_wd", ANCHOR, "anchor_scale", "anchor_min")
    hypers = dict(program.hypers)
    upd = role_target(program, "step_size", role_target(program, "direction", "update"))
    t = fresh(program, TARGET)
    match = role_sites(program, "decay", lambda s: s.target == "param")
    for name, pos in program.roles.get("decay", []):  # a declared decay must have the standard form
        copies = [s for s in walk_stmts(program.body) if isinstance(s, Assign) and (s.target, s.pos) == (name, pos)]
        # (one copy at least: an earlier feature's flag path may hold a rewritten one, Fisher's)
        if copies and all(_rate(s) is None and not _scaled_decay(s) for s in copies):
            raise FeatureError(f"feature 'centered_wd': the statement of role 'decay' ({where(pos)}) is not a "
                               "decoupled decay 'param = param + (-(weight_decay * s)) * param'", pos)
    cautious = "cautious_wd" in hypers
    fisher: tuple[str, str] | None = None
    if "fisher_wd" in hypers:
        unscaled = fresh(program, FISHER, {t})
        fisher = (unscaled, fresh(program, FISHER + "_scaled", {t, unscaled}))
    count = 0
    body = program.body
    geometric: tuple[Node, str] | None = None
    # a decay toward a computed target: its centred copy (one such target per program)
    computed = sorted({s.value.args[1].attr for s in walk_stmts(body) if isinstance(s, Assign) and match(s)
                       and s.value.op == Op.AXPY and s.value.args[1].op == Op.VAR and s.value.args[1].attr != "param"})
    if len(computed) > 1:
        raise FeatureError(f"feature 'centered_wd': decays toward several computed targets ({', '.join(computed)})")
    if computed:
        geo = fresh(program, TARGET + "_geometric", {t})
        found = _geometric(program, body, computed[0], fresh(program, TARGET + "_delta", {t, geo}), geo)
        if found is None:
            raise FeatureError(f"feature 'centered_wd': no conditional computes the decay target '{computed[0]}'")
        body, cond = found
        geometric = (cond, geo)

    def edit(stmts: list[Stmt]) -> list[Stmt]:
        """Before the last parameter write of the list that holds it (the update, after the
        standard decay found earlier in the same list); other lists: their conditionals. With
        ``fisher_wd``, the Fisher scale before the statement that holds the decay (adv_optm's
        ``wd_scaler``, from the parameter before either decay, whatever ``weight_decay``)."""
        nonlocal count
        writes = [i for i, s in enumerate(stmts) if isinstance(s, Assign) and s.target == "param" and _rate(s) is None]
        found = next(((j, r) for j, s in enumerate(stmts[:writes[-1]]) if (r := _contains(s, match)) is not None),
                     None) if writes else None
        if found is not None:
            count += 1
            (j, rate), last = found, writes[-1]
            before: list[Stmt] = []
            if fisher is not None:
                cond = Node("and", (Node("ne", (_h(COEF), Node("const", attr=0)), boolean=True), flag("fisher_wd")),
                            boolean=True)
                before = [If(cond, fisher_scale(program, fisher[0]), [])]
            return [*stmts[:j], *before, *stmts[j:last], *_centered(rate, upd, cautious, t, fisher, geometric),
                    *stmts[last:]]
        return [If(s.cond, edit(s.then), edit(s.orelse), s.pos) if isinstance(s, If) else s for s in stmts]

    body = edit(body)
    if not count:
        raise FeatureError("feature 'centered_wd' needs a decoupled decay 'param = param + (-(weight_decay * s)) * param'")
    on = Node("ne", (_h(COEF), Node("const", attr=0)), boolean=True)
    fp8 = Node("eq", (_h(MODE), Node("const", attr="float8")), boolean=True)
    coded = Node("or", (_mode("int8"), _mode("int4")), boolean=True)
    decl = StateDecl(ANCHOR, Kind.ELEMENT, "param", "param", on, "the parameter at initialisation (centered decay)",
                     dtype_when=(fp8, "float8_e4m3fn"), codec_rules=[(_mode(m), c) for m, c in CODED])
    # the blockwise anchors' per-block scale and minimum, written with the codes (adv_optm's keys)
    blocks = [StateDecl(key, Kind.BLOCK, "coded", "param", Node("and", (on, coded), boolean=True),
                        f"the anchor's per-block {what} ('int8', 'int4' modes)")
              for key, what in (("anchor_scale", "scale"), ("anchor_min", "minimum"))]
    checks = list(program.checks)
    structured = any(isinstance(s, Assign) and match(s) and _scaled_decay(s) for s in walk_stmts(program.body))
    if structured and "geometric_wd" in hypers:  # SinkSGD's: adv_optm scales the centered decay by it too
        both = Node("and", (on, flag("geometric_wd")), boolean=True)
        checks.append((Node("not", (both,), boolean=True),
                       "centered_wd with geometric_wd=True is not implemented for this optimizer's structured "
                       "decay; pass geometric_wd=False or centered_wd=0"))
    return program.copy(body=body, state=[*program.state, decl, *blocks], checks=checks)


FEATURE = Feature(
    name="centered_wd",
    doc="Centered weight decay: after the decay, a pull toward the parameter at initialisation (adv_optm).",
    transform=_apply,
    after=("cautious_wd", "fisher_wd"),
    before=("stochastic_rounding",),
    hyperparameters={
        COEF: HyperparameterSpec(default=0.0, min=0, doc="centered decay coefficient (a pull toward the initial "
                                 "parameter, scaled like weight_decay); 0: off"),
        MODE: HyperparameterSpec(default="float8", type="any", choices=["float8", "full", "int8", "int4"],
                                 doc="the anchor's storage: 'float8' (float8_e4m3fn, unscaled), 'full' (the "
                                 "parameter's dtype), 'int8' / 'int4' (asymmetric blocks of 128 / 32)"),
    },
)
