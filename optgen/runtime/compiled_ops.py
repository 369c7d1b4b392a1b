"""The multi-tensor ops of :mod:`optgen.runtime.foreach`, written per tensor for torch.compile.

The ``"compiled"`` backend traces a generated ``_device_step`` with ``F`` bound to this module.
Host scalars arrive as 0-d float64 tensors (lists of them, one per tensor) instead of Python
floats, so a moving lr does not recompile. Each op is a plain per-tensor torch op: inductor fuses
the whole chain of one tensor into one loop, where ``torch._foreach_*`` with scalar tensors would
not accept them (or would keep one kernel per op). Scalars are cast to the op's math dtype first,
as the eager kernels cast a Python scalar (fp32 math for fp32/bf16/fp16, fp64 for fp64).
Ops that take no host scalar come from :mod:`optgen.runtime.foreach` unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

from optgen.runtime import foreach as _fe

Tensors = list[torch.Tensor]
Scalar = Any


def __getattr__(name: str) -> Any:  # ops without host scalars: the eager module's
    return getattr(_fe, name)


def _math(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _s(s: Any, x: torch.Tensor) -> Any:
    """One host scalar against ``x``: a 0-d tensor in ``x``'s math dtype, or the Python value."""
    if isinstance(s, torch.Tensor) and s.dim() == 0 and s.is_floating_point():
        return s.to(_math(x))
    return s


def _per(b: Any, a: Tensors) -> list:
    """``b`` (tensors, a scalar or per-tensor scalars) as one operand per tensor of ``a``."""
    if _fe._tensors(b):
        return list(b)
    vals = b if isinstance(b, list) else [b] * len(a)
    return [_s(v, x) for v, x in zip(vals, a)]


# closures hold op names, not torch builtins: dynamo cannot guard on a builtin in a closure cell
def _binary(name: str):
    def op(a: Tensors, b: Any) -> Tensors:
        return [getattr(torch, name)(x, y) for x, y in zip(a, _per(b, a))]

    def op_(a: Tensors, b: Any) -> Tensors:
        for x, y in zip(a, _per(b, a)):
            getattr(x, f"{name}_")(y)
        return a

    return op, op_


add, add_ = _binary("add")
sub, sub_ = _binary("sub")
mul, mul_ = _binary("mul")
div, div_ = _binary("div")


def _unary(name: str):
    def op(a: Tensors) -> Tensors:
        return [getattr(x, name)() for x in a]

    def op_(a: Tensors) -> Tensors:
        for x in a:
            getattr(x, f"{name}_")()
        return a

    return op, op_


neg, neg_ = _unary("neg")
sqrt, sqrt_ = _unary("sqrt")
abs, abs_ = _unary("abs")  # noqa: A001
sign, sign_ = _unary("sign")
exp, exp_ = _unary("exp")
log, log_ = _unary("log")
reciprocal, reciprocal_ = _unary("reciprocal")
rsqrt, rsqrt_ = _unary("rsqrt")


def rdiv(a: Tensors, s: Scalar) -> Tensors:
    """``s / a`` as eager torch computes it for a Python scalar: ``reciprocal(a) * s``."""
    return mul_(reciprocal(a), s)


def rdiv_(a: Tensors, s: Scalar) -> Tensors:
    return mul_(reciprocal_(a), s)


def rsub(a: Tensors, s: Scalar) -> Tensors:
    return add_(neg(a), s)


def rsub_(a: Tensors, s: Scalar) -> Tensors:
    return add_(neg_(a), s)


def pow(a: Tensors, s: Scalar) -> Tensors:  # noqa: A001
    return [torch.pow(x, k) for x, k in zip(a, _per(s, a))]


def pow_(a: Tensors, s: Scalar) -> Tensors:
    for x, k in zip(a, _per(s, a)):
        x.pow_(k)
    return a


# add(alpha=), addcmul and addcdiv take only Python numbers as scalars: written out in the
# operation order of torch's CPU kernels (a + alpha * b, a + value * b * c, a + value * b / c)
def axpy(a: Tensors, b: Tensors, s: Scalar) -> Tensors:
    return [x + k * y for x, y, k in zip(a, b, _per(s, a))]


def axpy_(a: Tensors, b: Tensors, s: Scalar) -> Tensors:
    for x, y, k in zip(a, b, _per(s, a)):
        x.add_(k * y)
    return a


def addcmul(a: Tensors, b: Tensors, c: Tensors, s: Scalar) -> Tensors:
    return [x + k * y * z for x, y, z, k in zip(a, b, c, _per(s, a))]


def addcmul_(a: Tensors, b: Tensors, c: Tensors, s: Scalar) -> Tensors:
    for x, y, z, k in zip(a, b, c, _per(s, a)):
        x.add_(k * y * z)
    return a


def addcdiv(a: Tensors, b: Tensors, c: Tensors, s: Scalar) -> Tensors:
    return [x + k * y / z for x, y, z, k in zip(a, b, c, _per(s, a))]


def addcdiv_(a: Tensors, b: Tensors, c: Tensors, s: Scalar) -> Tensors:
    for x, y, z, k in zip(a, b, c, _per(s, a)):
        x.add_(k * y / z)
    return a


def _weight(w: Any, x: torch.Tensor) -> Any:
    # a tensor weight of lerp must have the input's dtype
    return w.to(x.dtype) if isinstance(w, torch.Tensor) else w


def lerp(a: Tensors, b: Tensors, w: Any) -> Tensors:
    return [torch.lerp(x, y, _weight(k, x)) for x, y, k in zip(a, b, _per(w, a))]


def lerp_(a: Tensors, b: Tensors, w: Any) -> Tensors:
    for x, y, k in zip(a, b, _per(w, a)):
        x.lerp_(y, _weight(k, x))
    return a


def maximum(a: Tensors, b: Any) -> Tensors:
    return [torch.maximum(x, y) if isinstance(y, torch.Tensor) and y.dim() else x.clamp_min(y)
            for x, y in zip(a, _per(b, a))]


def maximum_(a: Tensors, b: Any) -> Tensors:
    for x, y in zip(a, _per(b, a)):
        if isinstance(y, torch.Tensor) and y.dim():
            torch.maximum(x, y, out=x)
        else:
            x.clamp_min_(y)
    return a


def minimum(a: Tensors, b: Any) -> Tensors:
    return [torch.minimum(x, y) if isinstance(y, torch.Tensor) and y.dim() else x.clamp_max(y)
            for x, y in zip(a, _per(b, a))]


def minimum_(a: Tensors, b: Any) -> Tensors:
    for x, y in zip(a, _per(b, a)):
        if isinstance(y, torch.Tensor) and y.dim():
            torch.minimum(x, y, out=x)
        else:
            x.clamp_max_(y)
    return a


def clamp(a: Tensors, lo: Scalar, hi: Scalar) -> Tensors:
    return [x.clamp(l_, h_) for x, l_, h_ in zip(a, _per(lo, a), _per(hi, a))]


def where(c: Tensors, a: Any, b: Any, like: Tensors | None = None) -> Tensors:
    """Elementwise choice; between two scalars the result takes ``like``'s dtype (eager's rule)."""
    ref = like if like is not None else c
    a_, b_ = _per(a, ref), _per(b, ref)
    out = []
    for m, x, y, p in zip(c, a_, b_, ref):
        if like is not None and not (isinstance(x, torch.Tensor) and x.dim()) and not (
                isinstance(y, torch.Tensor) and y.dim()):
            x = x.to(p.dtype) if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=p.dtype, device=p.device)
            y = y.to(p.dtype) if isinstance(y, torch.Tensor) else torch.tensor(y, dtype=p.dtype, device=p.device)
        out.append(torch.where(m, x, y))
    return out


def _compare(name: str):
    def op(a: Tensors, b: Any) -> Tensors:
        return [getattr(torch, name)(x, y) for x, y in zip(a, _per(b, a))]
    return op


eq, ne, lt, le, gt, ge = (_compare(f) for f in ("eq", "ne", "lt", "le", "gt", "ge"))


# Muon's orthogonalisations run inside the graph as opaque custom ops: their bfloat16 addmm
# chain is the eager one (adv_optm's products, bit for bit), which inductor would decompose and
# round otherwise; the element-wise ops around them still fuse. Their host arguments are numbers
# (constants of the graph: optgen.runtime.compiled.number_args).
@torch.library.custom_op("optgen::newton_schulz", mutates_args=())
def _newton_schulz(g: torch.Tensor, steps: int, eps: float, a: float, b: float, c: float) -> torch.Tensor:
    from optgen.numerics import newton_schulz as ns

    # clone: eager writes a bf16 input in place; contiguous: the fake's layout
    return ns.rows(ns.newton_schulz, g.clone(), steps, eps, a, b, c).contiguous()


@torch.library.custom_op("optgen::cans", mutates_args=())
def _cans(g: torch.Tensor, steps: int, eps: float, lower_bound: float) -> torch.Tensor:
    from optgen.numerics import newton_schulz as ns

    return ns.rows(ns.cans, g.clone(), steps, eps, lower_bound).contiguous()


@_newton_schulz.register_fake
def _(g, steps, eps, a, b, c):
    return g.new_empty(g.shape)


@_cans.register_fake
def _(g, steps, eps, lower_bound):
    return g.new_empty(g.shape)


def _orthogonaliser(op):
    def apply(x: Tensors, steps: Any, *args: Any) -> Tensors:
        n = len(x)
        per = [_fe._each(a, n) for a in (steps, *args)]
        return [op(t, int(per[0][i]), *(float(a[i]) for a in per[1:])) for i, t in enumerate(x)]

    return apply


newton_schulz = _orthogonaliser(_newton_schulz)
cans = _orthogonaliser(_cans)
