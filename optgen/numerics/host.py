"""The host pass: evaluates host-scalar IR expressions for one parameter.

Host scalars are Python floats (``step.item()`` maths, as torch.optim's eager code computes bias
corrections), or, with ``step: {math: tensor}``, 0-d tensors in the step's dtype (as code that
writes ``beta1 ** step`` with a tensor step computes them). Values handed to device code are
always converted to Python numbers, which is exact.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch

from optgen.ir.nodes import Node
from optgen.ir.ops import Op
from optgen.numerics.shapes import effective_shape

_CMP = {Op.EQ: operator.eq, Op.NE: operator.ne, Op.LT: operator.lt, Op.LE: operator.le, Op.GT: operator.gt,
        Op.GE: operator.ge}


def _div(a: Any, b: Any) -> Any:
    try:
        return a / b
    except ZeroDivisionError:
        if a == 0 or a != a:
            return math.nan
        return math.copysign(math.inf, a) * math.copysign(1.0, b)


def _unary(fn_float, fn_tensor):
    def apply(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return fn_tensor(x)
        try:
            return fn_float(x)
        except ValueError:  # sqrt/log of a negative number: nan, as torch gives
            return math.nan
    return apply


def _float32(x: float) -> float:
    """A host value rounded to float32 (as a published ``torch.tensor(x, dtype=torch.float32)``)."""
    return torch.tensor(float(x), dtype=torch.float32).item()


def _floor(x: float) -> float:
    return float(math.floor(x)) if math.isfinite(x) else float(x)


def _mod(a: Any, b: Any) -> Any:
    """Python's ``a % b`` (the divisor's sign), torch.remainder for 0-d tensors; nan for ``b == 0``."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return torch.remainder(torch.as_tensor(a), torch.as_tensor(b))
    try:
        return float(a) % float(b)
    except ZeroDivisionError:
        return math.nan


def _sign(x: float) -> float:
    return float((x > 0) - (x < 0)) if x == x else x


_UNARY = {
    Op.NEG: _unary(operator.neg, torch.neg),
    Op.SQRT: _unary(math.sqrt, torch.sqrt),
    Op.ABS: _unary(abs, torch.abs),
    Op.SIGN: _unary(_sign, torch.sign),
    Op.EXP: _unary(math.exp, torch.exp),
    Op.LOG: _unary(lambda x: -math.inf if x == 0 else math.log(x), torch.log),
    Op.COS: _unary(math.cos, torch.cos),
    Op.SIN: _unary(math.sin, torch.sin),
    Op.FLOOR: _unary(_floor, torch.floor),
    Op.FLOAT32: _unary(_float32, lambda t: t.float()),
    Op.FLOAT64: _unary(float, lambda t: t.double()),
    Op.IS_FLOAT32: lambda x: isinstance(x, torch.Tensor) and x.dtype == torch.float32,
}


def meta_value(name: str, param: torch.Tensor, view: tuple[int, ...] | None = None) -> int | float:
    """Static facts about a parameter that specs may use (``rows``/``cols`` of the last two dims, of
    its matrix ``view`` when it is stepped as one)."""
    if name == "numel":
        return param.numel()
    if name == "eps":  # eps_of(param)
        return torch.finfo(param.dtype).eps
    if name == "ndim":
        return param.dim()
    shape = tuple(param.shape) if view is None else view
    if name == "rows":
        return shape[-2] if len(shape) >= 2 else 1
    if name == "cols":
        return shape[-1] if len(shape) >= 1 else 1
    if name == "bf16":
        return int(param.dtype == torch.bfloat16)
    if name == "dim0":  # the parameter's own leading dims (Muon's routing), whatever the view
        return param.shape[0] if param.dim() >= 1 else 1
    if name == "dim1":
        return param.shape[1] if param.dim() >= 2 else 1
    if name == "big_dims":
        return sum(1 for d in param.shape if d > 1)
    if name in ("square_rows", "square_cols"):  # the closest-to-square (d1, d2), whatever the view
        return effective_shape(param.numel())[name == "square_cols"]
    raise KeyError(name)


class HostContext:
    """What host expressions of one parameter can see."""

    __slots__ = ("group", "param", "state", "env", "step", "tensor_math", "self_ref", "inputs", "view")

    def __init__(self, group: dict, param: torch.Tensor, state: dict, tensor_math: bool,
                 view: tuple[int, ...] | None = None):
        self.group = group
        self.param = param
        #: the (d1, d2) matrix view the parameter is stepped as (feature ``factored``), or None
        self.view = view
        self.state = state
        self.env: dict[str, Any] = {}
        self.tensor_math = tensor_math
        step = state.get("step")
        if step is None:
            self.step = None
        else:
            self.step = step if tensor_math else step.item()
        self.self_ref: str | None = None
        #: per-parameter values the runtime computes each step (Kourkoutas-beta's beta2)
        self.inputs: dict[str, Any] = {}


def _var(node: Node, ctx: HostContext) -> Any:
    name = node.attr
    if name in ctx.env:
        return ctx.env[name]
    value = ctx.state[name]  # a host-state buffer: 0-d tensor
    if ctx.tensor_math or ctx.self_ref == name:
        return value
    return value.item()


def _hyper(node: Node, ctx: HostContext) -> Any:
    name, idx = node.attr
    value = ctx.group[name]
    return value[idx] if idx is not None else value


def _input(node: Node, ctx: HostContext) -> Any:
    if node.attr not in ctx.inputs:
        raise RuntimeError(f"the runtime provided no '{node.attr}' for this parameter")
    return ctx.inputs[node.attr]


def _param_attr(node: Node, ctx: HostContext) -> Any:
    name, default = node.attr
    return getattr(ctx.param, name, default)


def _pow(a: Any, b: Any) -> Any:
    try:
        return a**b
    except ZeroDivisionError:
        return math.inf
    except OverflowError:  # a float power past float64's range: IEEE's (and torch's) inf
        return math.inf if a > 0 or float(b) % 2 == 0 else -math.inf


def _atan2(a: Any, b: Any) -> Any:
    return math.atan2(a, b) if not isinstance(a, torch.Tensor) else torch.atan2(a, torch.as_tensor(b))


#: ops that read their node (leaves, and the logic that evaluates only some arguments)
_NODE_OPS: dict[str, Any] = {
    Op.CONST: lambda node, ctx: node.attr,
    Op.VAR: _var,
    Op.HYPER: _hyper,
    Op.STEP: lambda node, ctx: ctx.step,
    Op.META: lambda node, ctx: meta_value(node.attr, ctx.param, ctx.view),
    Op.HAS: lambda node, ctx: ctx.state.get(node.attr) is not None,
    Op.INPUT: _input,
    Op.PARAM_ATTR: _param_attr,
    Op.AND: lambda node, ctx: all(bool(evaluate(a, ctx)) for a in node.args),
    Op.OR: lambda node, ctx: any(bool(evaluate(a, ctx)) for a in node.args),
    Op.NOT: lambda node, ctx: not bool(evaluate(node.args[0], ctx)),
    # only the chosen side is evaluated (the other may be None)
    Op.WHERE: lambda node, ctx: evaluate(node.args[1] if bool(evaluate(node.args[0], ctx)) else node.args[2], ctx),
}

#: ops of two evaluated arguments
_BINARY: dict[str, Any] = {
    Op.ADD: operator.add,
    Op.SUB: operator.sub,
    Op.MUL: operator.mul,
    Op.DIV: _div,
    Op.MOD: _mod,
    Op.POW: _pow,
    **{op: (lambda a, b, _f=f: bool(_f(a, b))) for op, f in _CMP.items()},
    Op.MAX: max,
    Op.MIN: min,
    Op.ATAN2: _atan2,
}


def evaluate(node: Node, ctx: HostContext) -> Any:
    """Evaluate a host-kind node (the ops with ``host`` facts in :data:`optgen.ir.ops.OPS`)."""
    op = node.op
    f = _NODE_OPS.get(op)
    if f is not None:
        return f(node, ctx)
    f = _UNARY.get(op)
    if f is not None:
        return f(evaluate(node.args[0], ctx))
    f = _BINARY.get(op)
    if f is not None:
        return f(evaluate(node.args[0], ctx), evaluate(node.args[1], ctx))
    raise NotImplementedError(f"host op {op}")  # pragma: no cover


def run_host_block(stmts: list, ctx: HostContext, groups: list[dict] | None = None) -> list[str]:
    """Run host-only statements (a program's ``finalize``): temporaries go to ``ctx.env``, globals
    into ``ctx.group`` (later statements read the new value), a hyperparameter marked ``written``
    into each of ``groups``, computed from that group's values (and the globals and temporaries
    so far). Returns the globals written."""
    from optgen.ir.nodes import If

    written: list[str] = []
    for s in stmts:
        if isinstance(s, If):
            branch = s.then if bool(evaluate(s.cond, ctx)) else s.orelse
            written += [w for w in run_host_block(branch, ctx, groups) if w not in written]
        elif s.role == "group":
            for g in groups if groups is not None else [ctx.group]:
                own = HostContext({**g, **{k: ctx.group[k] for k in written}}, torch.empty(0), {},
                                  tensor_math=False)
                own.env.update(ctx.env)
                g[s.target] = evaluate(s.value, own)
            if groups is not None and s.target in ctx.group:
                ctx.group[s.target] = groups[0][s.target]
        elif s.role == "global":
            ctx.group[s.target] = evaluate(s.value, ctx)
            if s.target not in written:
                written.append(s.target)
        else:
            ctx.env[s.target] = evaluate(s.value, ctx)
    return written


def to_device_scalar(value: Any) -> Any:
    """A host value as the Python number device code takes (exact for 0-d tensors)."""
    if isinstance(value, torch.Tensor):
        return value.item()
    return value
