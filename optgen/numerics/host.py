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

_CMP = {"eq": operator.eq, "ne": operator.ne, "lt": operator.lt, "le": operator.le, "gt": operator.gt,
        "ge": operator.ge}


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
    "neg": _unary(operator.neg, torch.neg),
    "sqrt": _unary(math.sqrt, torch.sqrt),
    "abs": _unary(abs, torch.abs),
    "sign": _unary(_sign, torch.sign),
    "exp": _unary(math.exp, torch.exp),
    "log": _unary(lambda x: -math.inf if x == 0 else math.log(x), torch.log),
    "cos": _unary(math.cos, torch.cos),
    "sin": _unary(math.sin, torch.sin),
    "floor": _unary(_floor, torch.floor),
    "float32": _unary(_float32, lambda t: t.float()),
    "float64": _unary(float, lambda t: t.double()),
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


def evaluate(node: Node, ctx: HostContext) -> Any:
    """Evaluate a host-kind node."""
    op = node.op
    if op == "const":
        return node.attr
    if op == "var":
        name = node.attr
        if name in ctx.env:
            return ctx.env[name]
        value = ctx.state[name]  # a host-state buffer: 0-d tensor
        if ctx.tensor_math or ctx.self_ref == name:
            return value
        return value.item()
    if op == "hyper":
        name, idx = node.attr
        value = ctx.group[name]
        return value[idx] if idx is not None else value
    if op == "step":
        return ctx.step
    if op == "meta":
        return meta_value(node.attr, ctx.param, ctx.view)
    if op == "has":
        return ctx.state.get(node.attr) is not None
    if op == "input":
        if node.attr not in ctx.inputs:
            raise RuntimeError(f"the runtime provided no '{node.attr}' for this parameter")
        return ctx.inputs[node.attr]
    if op == "param_attr":
        name, default = node.attr
        return getattr(ctx.param, name, default)
    if op == "and":
        return all(bool(evaluate(a, ctx)) for a in node.args)
    if op == "or":
        return any(bool(evaluate(a, ctx)) for a in node.args)
    if op == "not":
        return not bool(evaluate(node.args[0], ctx))
    if op == "where":  # only the chosen side is evaluated (the other may be None)
        return evaluate(node.args[1] if bool(evaluate(node.args[0], ctx)) else node.args[2], ctx)
    args = [evaluate(a, ctx) for a in node.args]
    if op in _UNARY:
        return _UNARY[op](args[0])
    a, b = args[0], args[1] if len(args) > 1 else None
    if op == "add":
        return a + b
    if op == "sub":
        return a - b
    if op == "mul":
        return a * b
    if op == "div":
        return _div(a, b)
    if op == "mod":
        return _mod(a, b)
    if op == "pow":
        try:
            return a**b
        except ZeroDivisionError:
            return math.inf
        except OverflowError:  # a float power past float64's range: IEEE's (and torch's) inf
            return math.inf if a > 0 or float(b) % 2 == 0 else -math.inf
    if op in _CMP:
        return bool(_CMP[op](a, b))
    if op == "max":
        return max(a, b)
    if op == "min":
        return min(a, b)
    if op == "atan2":
        return math.atan2(a, b) if not isinstance(a, torch.Tensor) else torch.atan2(a, torch.as_tensor(b))
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
