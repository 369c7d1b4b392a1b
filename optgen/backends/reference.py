"""The reference backend: walks the IR for one parameter at a time with plain torch ops.

Slow and obviously right; any dtype (float64 for tests). It is the oracle for the other backends.
Each IR op maps to the single torch op whose rounding it names (``addcmul`` is ``torch.addcmul``,
``lerp`` is ``torch.lerp``, ``rdiv`` is ``s / t``...).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as TF

from optgen.ir.codecs import codec_for, stored_names
from optgen.ir.nodes import Assign, If, Kind, Node, Program, Stmt
from optgen.ir.ops import CALLS, OWN_SHAPE, Op
from optgen.numerics import newton_schulz as ns
from optgen.numerics import sinkhorn as sk
from optgen.numerics import stochastic
from optgen.numerics.host import HostContext, evaluate, to_device_scalar
from optgen.numerics.matrix_view import ViewedState, as_square, as_view, square_outer, view_shape


def _align(x: Any, src: Kind, dst: Kind) -> Any:
    """Reshape a smaller-kind value so that it broadcasts against ``dst`` values."""
    if not isinstance(x, torch.Tensor) or src in (Kind.HOST, Kind.TENSOR) or src == dst:
        return x
    if src == Kind.MATRIX:
        return x[..., None] if dst in (Kind.ROW, Kind.COL) else x[..., None, None]
    if src == Kind.ROW:
        return x.unsqueeze(-1)
    if src == Kind.COL:
        return x.unsqueeze(-2)
    return x


class _Frame:
    def __init__(self, program: Program, param: torch.Tensor, grad: torch.Tensor, state: dict, group: dict,
                 view: tuple[int, int] | None):
        self.program = program
        self.param = as_view(param, view, "parameter")
        self.state = state
        self.locals: dict[str, Any] = {"grad": as_view(grad, view, "gradient")}
        self.host = HostContext(group, param, state, program.step_math == "tensor", view)
        self.acc: list[tuple[str, Any]] = []
        #: this step's optimizer-wide reductions (``reductions:``), by name
        self.reduced: dict[str, Any] = {}


def run(program: Program, param: torch.Tensor, grad: torch.Tensor, state: dict, group: dict,
        inputs: dict[str, Any] | None = None, acc: list[tuple[str, Any]] | None = None,
        reduced: dict[str, Any] | None = None) -> None:
    """Apply one step of ``program`` to ``param`` (in place), updating ``state``; ``inputs`` are the
    per-parameter values the runtime computed for this step; the values of ``acc += value``
    statements are appended to ``acc`` as ``(accumulator, value)``; ``reduced`` holds the step's
    optimizer-wide reductions (0-d tensors). A parameter the program steps
    as a matrix view (feature ``factored``) is stepped on views of it and of its state."""
    view = view_shape(program, param, group, state)
    viewed = ViewedState(program, state, view, param)
    frame = _Frame(program, param, grad, viewed.view, group, view)
    frame.host.inputs = inputs or {}
    frame.acc = acc if acc is not None else []
    frame.reduced = reduced or {}
    _block(program.body, frame)
    viewed.write_back()


def _block(stmts: list[Stmt], f: _Frame) -> None:
    for s in stmts:
        if isinstance(s, If):
            cond = evaluate(s.cond, f.host)
            _block(s.then if bool(cond) else s.orelse, f)
        else:
            _assign(s, f)


def _assign(s: Assign, f: _Frame) -> None:
    if s.value.is_host:
        if s.role == "host_state":
            f.host.self_ref = s.target
            value = evaluate(s.value, f.host)
            f.host.self_ref = None
            f.state[s.target].copy_(torch.as_tensor(value))
        else:
            f.host.env[s.target] = evaluate(s.value, f.host)
        return
    if s.value.op == Op.ENCODE:  # a coded state's write: every tensor its codec stores
        _encode(s.target, s.value, f)
        return
    value = _eval(s.value, f)
    if s.role == "accumulate":
        f.acc.append((s.target, value))
    elif s.role == "param":
        f.param.copy_(value)
    elif s.role == "state":
        buf = f.state.get(s.target)
        if buf is None:
            f.state[s.target] = value.detach().clone()
        else:
            buf.copy_(value)
    else:
        f.locals[s.target] = value


def _read(name: str, kind: Kind, f: _Frame) -> Any:
    if kind == Kind.HOST:
        if name in f.host.env:
            return to_device_scalar(f.host.env[name])
        return to_device_scalar(evaluate(Node("var", attr=name), f.host))
    if name == "param":
        return f.param
    if name in f.locals:
        return f.locals[name]
    return f.state[name]


def _encode(name: str, n: Node, f: _Frame) -> None:
    codec, non_neg = codec_for(n.attr[0]), n.attr[1]
    x = _eval(n.args[0], f)
    shape = codec.draws(x.numel())
    bits = stochastic.draw_bits(shape, x.device) if shape is not None else None
    for suffix, value in codec.encode(x, non_neg, bits).items():
        buf = f.state.get(name + suffix)
        if buf is None:  # a state created by its first write: its stored tensors with it
            f.state[name + suffix] = value.detach().clone()
        else:
            buf.copy_(value)


def _decode(n: Node, f: _Frame) -> Any:
    codec, name, non_neg = codec_for(n.attr[0]), n.attr[1], n.attr[2]
    stored = {suffix: f.state[key] for suffix, key in stored_names(name, codec, non_neg).items()}
    # packed or padded codes do not have the parameter's shape
    shape = f.state[name].shape if codec.codes_shaped() else f.param.shape
    return codec.decode(stored, tuple(shape), non_neg)


def _eval(n: Node, f: _Frame) -> Any:
    if n.is_host:
        return to_device_scalar(evaluate(n, f.host))
    if n.op == Op.VAR:
        return _read(n.attr, n.kind, f)
    if n.op == Op.DECODE:
        return _decode(n, f)
    if n.op == Op.REDUCED:
        return f.reduced[n.attr]
    raw = [_eval(a, f) for a in n.args]
    if n.op == Op.STRIDED:
        return raw[0].reshape(-1)[:: int(raw[1])]
    # Broadcast smaller kinds against the result's kind, except for ops with their own shape rules.
    if n.op not in OWN_SHAPE:
        raw = [_align(v, a.kind, n.kind) for v, a in zip(raw, n.args)]
    if n.op == Op.WHERE and not any(isinstance(v, torch.Tensor) for v in raw[1:]):
        # a choice between two numbers: numbers take the parameter's dtype, as a Python scalar
        # does against a tensor (torch.where of two scalars would give the default dtype)
        raw[1] = torch.tensor(raw[1], dtype=f.param.dtype, device=f.param.device)
    return _OPS[n.op](*raw)


def _clamp_min(a: Any, b: Any) -> Any:
    return torch.maximum(a, b) if isinstance(b, torch.Tensor) else a.clamp_min(b)


def _clamp_max(a: Any, b: Any) -> Any:
    return torch.minimum(a, b) if isinstance(b, torch.Tensor) else a.clamp_max(b)


_OPS = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b,
    "rdiv": lambda t, s: s / t,
    "rsub": lambda t, s: s - t,
    "sdiv": lambda t, s: torch.div(s, t),
    "mod": torch.remainder,
    "rmod": lambda t, s: torch.remainder(s, t),
    "cos": torch.cos,
    "sin": torch.sin,
    "floor": torch.floor,
    "neg": lambda a: -a,
    "pow": lambda a, s: torch.pow(a, s),
    "sqrt": torch.sqrt,
    "rsqrt": torch.rsqrt,
    "abs": torch.abs,
    "sign": torch.sign,
    "exp": torch.exp,
    "log": torch.log,
    "reciprocal": torch.reciprocal,
    "copy": lambda a: a.clone(),
    "contiguous": lambda a: a.contiguous(),
    "atan2": torch.atan2,
    "maximum": _clamp_min,
    "minimum": _clamp_max,
    "clamp": lambda x, lo, hi: torch.clamp(x, lo, hi),
    "lerp": lambda a, b, w: torch.lerp(a, b.expand_as(a) if isinstance(b, torch.Tensor) else b, w),
    "where": torch.where,
    "addcmul": lambda a, b, c, s: torch.addcmul(a, b, c, value=s),
    "addcdiv": lambda a, b, c, s: torch.addcdiv(a, b, c, value=s),
    "axpy": lambda a, b, s: torch.add(a, b, alpha=s),
    "eq": torch.eq,
    "ne": torch.ne,
    "lt": torch.lt,
    "le": torch.le,
    "gt": torch.gt,
    "ge": torch.ge,
    "matvec": lambda w, v: torch.einsum("...nm,...m->...n", w, v),
    "matvec_t": lambda w, u: torch.einsum("...nm,...n->...m", w, u),
    "mv": lambda w, v: torch.mv(w, v),
    "mv_t": lambda w, u: torch.mv(w.mT, u),
    "normalize": lambda x: TF.normalize(x, dim=-1),
    "dot": lambda a, b: torch.einsum("...n,...n->...", a, b),
    "outer": lambda a, b: torch.einsum("...n,...m->...nm", a, b),
    "rowsum": lambda x: x.sum(-1),
    "colsum": lambda x: x.sum(-2),
    "square_outer": square_outer,
    "square_rowsum": lambda x: as_square(x).sum(-1),
    "square_colsum": lambda x: as_square(x).sum(-2),
    "sum": lambda x: x.sum(),
    "mean": lambda x: x.mean(),
    "norm": lambda x: torch.linalg.vector_norm(x),
    "maxabs": lambda x: torch.max(x.abs()) if x.numel() else x.new_zeros(()),  # 0 for an empty tensor
    "rownorm": lambda x: x.norm(dim=-1),
    "colnorm": lambda x: x.norm(dim=-2),
    "rowmaxabs": lambda x: torch.linalg.vector_norm(x, ord=float("inf"), dim=-1),
    "colmaxabs": lambda x: torch.linalg.vector_norm(x, ord=float("inf"), dim=-2),
    "matmean": lambda x: x.mean(dim=-1),
    "vdot": lambda a, b: torch.dot(a.reshape(-1), b.reshape(-1)),
    "float32": lambda a: a.float(),
    "float64": lambda a: a.double(),
    "rand_like": lambda x, seed=None: torch.rand_like(x),
    "stream_rand": lambda x, seed=None: stochastic.uniform(x),
    "maxabs_dim": lambda x, d: stochastic.maxabs_dim(x, int(d)),
    "atan": torch.atan,
    "viewnorm": lambda x, d: sk.view_norm(x, int(d)),
    "viewmean": lambda x, d: sk.view_mean(x, int(d)),
    "sinkhorn": lambda x, p, iters, ortho: sk.sinkhorn(x, p, int(iters), bool(ortho)),
    "orthograd_iterative": sk.orthograd_iterative,
    "cast": lambda a, like: a.to(like.dtype),
    "stochastic_round": lambda x, seed: stochastic.round_bf16(x),
    **{op: (lambda x, *args, _f=getattr(ns, op): ns.rows(_f, x, *args)) for op in CALLS},
}
