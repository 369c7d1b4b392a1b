"""Multi-tensor ops for the torch backend: one call covers every tensor of a bucket.

Each op takes lists of tensors and host scalars that are either one number for the whole bucket
or a list with one number per tensor. Where torch has a ``_foreach_*`` kernel it is used;
otherwise (per-row/per-matrix linear algebra, ops torch has no foreach form of) the op loops over
tensors, never over elements. Ops ending in ``_`` write into their first argument.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as TF

from optgen.ir.codecs import FloatCodec, codec_for
from optgen.numerics import matrix_view, stochastic
from optgen.numerics import newton_schulz as ns
from optgen.numerics import sinkhorn as sk
from optgen.runtime import sharding

Tensors = list[torch.Tensor]
Scalar = Any  # float | bool | list[float]


_REDUCED = (torch.bfloat16, torch.float16)


def _each(s: Scalar, n: int) -> list:
    return s if isinstance(s, list) else [s] * n


def _tensors(b: Any) -> bool:
    """Whether ``b`` is one tensor per parameter (as opposed to a host scalar or scalar list).
    ``torch._foreach_*`` ops return tuples, so a computed operand may be a tuple, not a list."""
    return isinstance(b, (list, tuple)) and len(b) > 0 and isinstance(b[0], torch.Tensor)


# -- alignment of shape kinds ------------------------------------------------------------
_ALIGN = {
    ("matrix", "row"): (-1,),
    ("matrix", "col"): (-1,),
    ("matrix", "element"): (-1, -1),
    ("row", "element"): (-1,),
    ("col", "element"): (-2,),
}


def align(xs: Tensors, src: str, dst: str) -> Tensors:
    """Views of per-row/per-column/per-matrix values that broadcast against ``dst`` values."""
    dims = _ALIGN[(src, dst)]
    out = []
    for x in xs:
        for d in dims:
            x = x.unsqueeze(d)
        out.append(x)
    if dst == "element" and (b := sharding.active()) is not None:
        return b.to_elements(out)  # ZeRO's flat shards: this rank's part of the broadcast value
    return out


# -- elementwise, out of place -------------------------------------------------------------
def _binary(name: str):
    fe = getattr(torch, f"_foreach_{name}")
    fe_ = getattr(torch, f"_foreach_{name}_")
    single = getattr(torch, name)

    def op(a: Tensors, b: Tensors | Scalar) -> Tensors:
        if _tensors(b):
            if all(x.shape == y.shape for x, y in zip(a, b)):
                return fe(a, b)
            return [single(x, y) for x, y in zip(a, b)]
        return fe(a, b)

    def op_(a: Tensors, b: Tensors | Scalar) -> Tensors:
        if _tensors(b) and not all(
            x.shape == y.shape for x, y in zip(a, b)
        ):
            for x, y in zip(a, b):
                getattr(x, f"{name}_")(y)
            return a
        if name == "mul" and a and a[0].dtype in _REDUCED and a[0].device.type == "cpu" and not (
                _tensors(b)):
            # torch 2.13's CPU _foreach_mul_(bf16/fp16 list, scalar or scalar list) rounds the scalar
            # to the list's dtype first (x.mul_(s) does not): 0.99 becomes 0.98828125 for bf16
            for x, s in zip(a, _each(b, len(a))):
                x.mul_(s)
            return a
        fe_(a, b)
        return a

    return op, op_


add, add_ = _binary("add")
sub, sub_ = _binary("sub")
mul, mul_ = _binary("mul")
div, div_ = _binary("div")


def _unary(name: str):
    fe = getattr(torch, f"_foreach_{name}")
    fe_ = getattr(torch, f"_foreach_{name}_")

    def op(a: Tensors) -> Tensors:
        return fe(a)

    def op_(a: Tensors) -> Tensors:
        fe_(a)
        return a

    return op, op_


neg, neg_ = _unary("neg")
sqrt, sqrt_ = _unary("sqrt")
abs, abs_ = _unary("abs")  # noqa: A001
sign, sign_ = _unary("sign")
exp, exp_ = _unary("exp")
log, log_ = _unary("log")
reciprocal, reciprocal_ = _unary("reciprocal")
cos, cos_ = _unary("cos")
sin, sin_ = _unary("sin")
floor, floor_ = _unary("floor")


def rsqrt(a: Tensors) -> Tensors:
    return [torch.rsqrt(x) for x in a]


def rsqrt_(a: Tensors) -> Tensors:
    for x in a:
        x.rsqrt_()
    return a


def rand_like(a: Tensors, seed: Scalar = None) -> Tensors:
    """torch.rand_like of each tensor, in list order (the default generator's stream; ``seed`` is
    the triton backend's)."""
    return [torch.rand_like(x) for x in a]


def stream_rand(a: Tensors, seed: Scalar = None) -> Tensors:
    """Uniform [0, 1) numbers like each tensor from adv_optm's per-device stream, in list order
    (``seed`` is the triton backend's)."""
    return [stochastic.uniform(x) for x in a]


def maxabs_dim(a: Tensors, dim: int) -> Tensors:
    """The largest ``|x|`` along ``dim`` of each tensor, as a size-1 dim (broadcasts against it)."""
    return [stochastic.maxabs_dim(x, dim) for x in a]


def atan(a: Tensors) -> Tensors:
    return [torch.atan(x) for x in a]


def atan_(a: Tensors) -> Tensors:
    for x in a:
        x.atan_()
    return a


def _unsharded(op: str) -> None:
    if sharding.active() is not None:
        raise NotImplementedError(f"{op}() of a sharded parameter: the reduction across ranks is not implemented yet")


def viewnorm(a: Tensors, dim: int) -> Tensors:
    """The norm of each tensor as the matrix ``(shape[0], -1)`` along ``dim``, kept (broadcasts against it)."""
    _unsharded("viewnorm")
    return [sk.view_norm(x, int(dim)) for x in a]


def viewmean(a: Tensors, dim: int) -> Tensors:
    """The mean of each tensor as the matrix ``(shape[0], -1)`` along ``dim``, kept."""
    _unsharded("viewmean")
    return [sk.view_mean(x, int(dim)) for x in a]


def sinkhorn(a: Tensors, p: Tensors, iterations: Scalar, orthogonal: Scalar) -> Tensors:
    """SR-Sinkhorn of each tensor (one at a time); sharded, each matrix whole on one rank (the
    orthogonal form, which also needs the parameter's rows there, is not implemented sharded)."""
    n = len(a)
    its, orth = _each(iterations, n), _each(orthogonal, n)
    if (b := sharding.active()) is not None:
        if any(bool(o) for o in orth):
            raise NotImplementedError("sinkhorn(orthogonal=True) of a sharded parameter is not implemented yet")
        return b.whole(a, lambda t, i: sk.sinkhorn(t, t, int(its[i]), False))
    return [sk.sinkhorn(x, w, int(k), bool(o)) for x, w, k, o in zip(a, p, its, orth)]


def orthograd_iterative(g: Tensors, p: Tensors) -> Tensors:
    """Rank-2 OrthoGrad of each gradient against its parameter (one at a time)."""
    _unsharded("orthograd_iterative")
    return [sk.orthograd_iterative(x, w) for x, w in zip(g, p)]


def copy(a: Tensors) -> Tensors:
    return [x.clone() for x in a]


def rdiv(a: Tensors, s: Scalar) -> Tensors:
    """``s / a`` as torch computes it for a Python scalar: ``reciprocal(a) * s``."""
    return mul_(reciprocal(a), s)


def rdiv_(a: Tensors, s: Scalar) -> Tensors:
    return mul_(reciprocal_(a), s)


def sdiv(a: Tensors, s: Scalar) -> Tensors:
    """``s / a`` as a true division (``torch.div(s, a)``), not torch's ``reciprocal(a) * s``."""
    return [torch.div(k, x) for x, k in zip(a, _each(s, len(a)))]


def mod(a: Tensors, b: Tensors | Scalar) -> Tensors:
    """``a % b`` with the divisor's sign (torch.remainder, Python's %)."""
    b_ = b if _tensors(b) else _each(b, len(a))
    return [torch.remainder(x, y) for x, y in zip(a, b_)]


def rmod(a: Tensors, s: Scalar) -> Tensors:
    """``s % a`` for a host scalar ``s``."""
    return [torch.remainder(k, x) for x, k in zip(a, _each(s, len(a)))]


def rsub(a: Tensors, s: Scalar) -> Tensors:
    """``s - a``."""
    return add_(neg(a), s)


def rsub_(a: Tensors, s: Scalar) -> Tensors:
    return add_(neg_(a), s)


def pow(a: Tensors, s: Scalar) -> Tensors:  # noqa: A001
    return torch._foreach_pow(a, s)


def pow_(a: Tensors, s: Scalar) -> Tensors:
    torch._foreach_pow_(a, s)
    return a


def axpy(a: Tensors, b: Tensors, s: Scalar) -> Tensors:
    """``a + s * b`` with torch's ``add(alpha=s)`` rounding (``s``: one number, or one per tensor:
    numbers or 0-d tensors, which torch reads as their ``.item()``)."""
    if isinstance(s, (list, tuple)):
        return [torch.add(x, y, alpha=k) for x, y, k in zip(a, b, s)]
    return torch._foreach_add(a, b, alpha=s)


def axpy_(a: Tensors, b: Tensors, s: Scalar) -> Tensors:
    if isinstance(s, (list, tuple)):
        for x, y, k in zip(a, b, s):
            x.add_(y, alpha=k)
    else:
        torch._foreach_add_(a, b, alpha=s)
    return a


def addcmul(a: Tensors, b: Tensors, c: Tensors, s: Scalar) -> Tensors:
    return addcmul_([x.clone() for x in a], b, c, s)


def addcmul_(a: Tensors, b: Tensors, c: Tensors, s: Scalar) -> Tensors:
    if isinstance(s, list):
        torch._foreach_addcmul_(a, b, c, s)
    else:
        torch._foreach_addcmul_(a, b, c, value=s)
    return a


def addcdiv(a: Tensors, b: Tensors, c: Tensors, s: Scalar) -> Tensors:
    return addcdiv_([x.clone() for x in a], b, c, s)


def addcdiv_(a: Tensors, b: Tensors, c: Tensors, s: Scalar) -> Tensors:
    if isinstance(s, list):
        torch._foreach_addcdiv_(a, b, c, s)
    else:
        torch._foreach_addcdiv_(a, b, c, value=s)
    return a


def lerp(a: Tensors, b: Tensors, w: Scalar | Tensors) -> Tensors:
    return lerp_([x.clone() for x in a], b, w)


def lerp_(a: Tensors, b: Tensors, w: Scalar | Tensors) -> Tensors:
    if isinstance(w, list):
        for x, y, k in zip(a, b, w):
            x.lerp_(y, k)
    else:
        torch._foreach_lerp_(a, b, w)
    return a


def maximum(a: Tensors, b: Tensors | Scalar) -> Tensors:
    if _tensors(b):
        return torch._foreach_maximum(a, b)
    return [x.clamp_min(k) for x, k in zip(a, _each(b, len(a)))]


def maximum_(a: Tensors, b: Tensors | Scalar) -> Tensors:
    if _tensors(b):
        torch._foreach_maximum_(a, b)
    else:
        for x, k in zip(a, _each(b, len(a))):
            x.clamp_min_(k)
    return a


def minimum(a: Tensors, b: Tensors | Scalar) -> Tensors:
    if _tensors(b):
        return torch._foreach_minimum(a, b)
    return [x.clamp_max(k) for x, k in zip(a, _each(b, len(a)))]


def minimum_(a: Tensors, b: Tensors | Scalar) -> Tensors:
    if _tensors(b):
        torch._foreach_minimum_(a, b)
    else:
        for x, k in zip(a, _each(b, len(a))):
            x.clamp_max_(k)
    return a


def clamp(a: Tensors, lo: Scalar, hi: Scalar) -> Tensors:
    n = len(a)
    return [x.clamp(lo_, hi_) for x, lo_, hi_ in zip(a, _each(lo, n), _each(hi, n))]


def atan2(a: Tensors, b: Tensors) -> Tensors:
    return [torch.atan2(x, y) for x, y in zip(a, b)]


def where(c: Tensors, a: Tensors | Scalar, b: Tensors | Scalar, like: Tensors | None = None) -> Tensors:
    """Elementwise choice; between two numbers the result takes ``like``'s dtypes (as a Python
    scalar does against a tensor) instead of torch's default dtype."""
    n = len(c)
    a_ = a if _tensors(a) else _each(a, n)
    b_ = b if _tensors(b) else _each(b, n)
    if like is not None and not _tensors(a) and not _tensors(b):
        a_ = [torch.tensor(x, dtype=p.dtype, device=p.device) for x, p in zip(a_, like)]
    return [torch.where(m, x, y) for m, x, y in zip(c, a_, b_)]


def _compare(fn):
    def op(a: Tensors, b: Tensors | Scalar) -> Tensors:
        b_ = b if _tensors(b) else _each(b, len(a))
        return [fn(x, y) for x, y in zip(a, b_)]
    return op


eq, ne, lt, le, gt, ge = (_compare(f) for f in (torch.eq, torch.ne, torch.lt, torch.le, torch.gt, torch.ge))


# -- per-row / per-matrix linear algebra and reductions --------------------------------------
# Under sharded parameters (optgen.runtime.sharding) these ops run through the bucket's layout:
# FSDP2's rows sum partial results over ranks, ZeRO's flat shards read the whole tensors. ``kind``
# names the operand's shape kind.
def _matvec(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.einsum("...nm,...m->...n", x, y)


def _matvec_t(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.einsum("...nm,...n->...m", x, y)


def _dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.einsum("...n,...n->...", x, y)


def _outer(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.einsum("...n,...m->...nm", x, y)


def _vdot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.dot(x.reshape(-1), y.reshape(-1))


def matvec(w: Tensors, v: Tensors) -> Tensors:
    """``W v`` batched over leading dims (the einsum adams-torch uses)."""
    if (b := sharding.active()) is not None:
        return b.matvec(w, v, _matvec)
    return [_matvec(x, y) for x, y in zip(w, v)]


def mv(w: Tensors, v: Tensors) -> Tensors:
    """``W v`` of 2-D matrices with ``torch.mv``'s rounding (adv_optm's spectral normalisation)."""
    if sharding.active() is not None:
        raise NotImplementedError("mv() of a sharded parameter (spectral normalisation) is not implemented yet")
    return [torch.mv(x, y) for x, y in zip(w, v)]


def mv_t(w: Tensors, u: Tensors) -> Tensors:
    """``W^T u`` of 2-D matrices with ``torch.mv(W.mT, u)``'s rounding (in ``W``'s memory layout)."""
    if sharding.active() is not None:
        raise NotImplementedError("mv_t() of a sharded parameter (spectral normalisation) is not implemented yet")
    return [torch.mv(x.mT, y) for x, y in zip(w, u)]


def matvec_t(w: Tensors, u: Tensors) -> Tensors:
    """``W^T u`` batched over leading dims."""
    if (b := sharding.active()) is not None:
        return b.matvec_t(w, u, _matvec_t)
    return [_matvec_t(x, y) for x, y in zip(w, u)]


def normalize(x: Tensors, kind: str = "row") -> Tensors:
    if (b := sharding.active()) is not None:
        return b.normalize(x, kind)
    return [TF.normalize(t, dim=-1) for t in x]


def dot(a: Tensors, b: Tensors, kind: str = "row") -> Tensors:
    if (lay := sharding.active()) is not None:
        return lay.dot(a, b, kind, _dot)
    return [_dot(x, y) for x, y in zip(a, b)]


def outer(a: Tensors, b: Tensors) -> Tensors:
    if (lay := sharding.active()) is not None:
        return lay.outer(a, b, _outer)
    return [_outer(x, y) for x, y in zip(a, b)]


def _unsharded(op: str) -> None:
    if sharding.active() is not None:
        raise RuntimeError(f"{op}: the closest-to-square view of a sharded parameter is not implemented")


def square_outer(a: Tensors, b: Tensors, like: Tensors) -> Tensors:
    _unsharded("square_outer")
    return [matrix_view.square_outer(x, y, z) for x, y, z in zip(a, b, like)]


def square_rowsum(x: Tensors) -> Tensors:
    _unsharded("square_rowsum")
    return [matrix_view.as_square(t).sum(-1) for t in x]


def square_colsum(x: Tensors) -> Tensors:
    _unsharded("square_colsum")
    return [matrix_view.as_square(t).sum(-2) for t in x]


def rowsum(x: Tensors) -> Tensors:
    if (b := sharding.active()) is not None:
        return b.rowsum(x)
    return [t.sum(-1) for t in x]


def colsum(x: Tensors) -> Tensors:
    if (b := sharding.active()) is not None:
        return b.colsum(x)
    return [t.sum(-2) for t in x]


def sum(x: Tensors, kind: str = "element") -> Tensors:  # noqa: A001
    if (b := sharding.active()) is not None:
        return b.total(x, kind, "sum")
    return [t.sum() for t in x]


def mean(x: Tensors, kind: str = "element") -> Tensors:
    if (b := sharding.active()) is not None:
        return b.total(x, kind, "mean")
    return [t.mean() for t in x]


def maxabs(x: Tensors, kind: str = "element") -> Tensors:
    """``torch.max(t.abs())`` of each tensor (StableSPAM's largest gradient magnitude)."""
    if sharding.active() is not None:
        raise NotImplementedError("maxabs() of a sharded parameter: the max across ranks is not implemented yet")
    return [torch.max(t.abs()) if t.numel() else t.new_zeros(()) for t in x]  # 0 for an empty tensor


def norm(x: Tensors, kind: str = "element") -> Tensors:
    if (b := sharding.active()) is not None:
        return b.total(x, kind, "norm")
    return list(torch._foreach_norm(x))


def rownorm(x: Tensors) -> Tensors:
    """``x.norm(dim=-1)`` of each per-element value: one norm per row."""
    if (b := sharding.active()) is not None:
        return b.rownorm(x)
    return [t.norm(dim=-1) for t in x]


def colnorm(x: Tensors) -> Tensors:
    """``x.norm(dim=-2)``: one norm per column."""
    if (b := sharding.active()) is not None:
        return b.colnorm(x)
    return [t.norm(dim=-2) for t in x]


def rowmaxabs(x: Tensors) -> Tensors:
    """The largest ``|x|`` of each row (``vector_norm(x, inf, dim=-1)``)."""
    if sharding.active() is not None:
        raise NotImplementedError("rowmaxabs() of a sharded parameter: the max across ranks is not implemented yet")
    return [torch.linalg.vector_norm(t, ord=float("inf"), dim=-1) for t in x]


def colmaxabs(x: Tensors) -> Tensors:
    """The largest ``|x|`` of each column (``vector_norm(x, inf, dim=-2)``)."""
    if sharding.active() is not None:
        raise NotImplementedError("colmaxabs() of a sharded parameter: the max across ranks is not implemented yet")
    return [torch.linalg.vector_norm(t, ord=float("inf"), dim=-2) for t in x]


def matmean(x: Tensors, kind: str = "row") -> Tensors:
    """``x.mean(dim=-1)`` of each per-row / per-column value: one mean per matrix."""
    if (b := sharding.active()) is not None:
        return b.matmean(x, kind)
    return [t.mean(dim=-1) for t in x]


def cast(a: Tensors, like: Tensors) -> Tensors:
    return [x.to(y.dtype) for x, y in zip(a, like)]


def contiguous(a: Tensors) -> Tensors:
    return [x.contiguous() for x in a]


def float32(a: Tensors) -> Tensors:
    return [x.float() for x in a]


def float64(a: Tensors) -> Tensors:
    return [x.double() for x in a]


def decode(codec: str, non_neg: bool, stored: dict[str, Tensors], like: Tensors | None = None) -> Tensors:
    """The float32 values of a coded state (feature state_precision), one tensor per parameter,
    of the codes' shapes (``like``'s, the parameters', for codes packed per byte)."""
    c = codec_for(codec)
    if isinstance(c, FloatCodec):
        return [x.float() for x in stored[""]]
    shapes = like if like is not None else stored[""]
    return [c.decode({k: v[i] for k, v in stored.items()}, tuple(x.shape), non_neg)
            for i, x in enumerate(shapes)]


def encode_(codec: str, non_neg: bool, stored: dict[str, Tensors], value: Tensors) -> None:
    """Write float32 ``value`` into a coded state's stored tensors (random bits, where the codec
    takes them, drawn from adv_optm's stream tensor by tensor)."""
    c = codec_for(codec)
    if isinstance(c, FloatCodec) and not c.stochastic and all(t is not None for t in stored[""]):
        torch._foreach_copy_(stored[""], value)  # round to nearest even
        return
    for i, x in enumerate(value):
        shape = c.draws(x.numel())
        bits = stochastic.draw_bits(shape, x.device) if shape is not None else None
        for suffix, v in c.encode(x, non_neg, bits).items():
            if stored[suffix][i] is None:  # a state created by its first write: its stored tensors with it
                stored[suffix][i] = v.detach().clone()
            else:
                stored[suffix][i].copy_(v)


def stochastic_round(a: Tensors, seed: Scalar) -> Tensors:
    return [stochastic.round_bf16(x) for x in a]


def _orthogonaliser(op: str):
    fn = getattr(ns, op)

    def apply(x: Tensors, *args: Scalar) -> Tensors:
        """Muon's orthogonalisation of each tensor as a ``(shape[0], -1)`` matrix (one at a time:
        adv_optm's eager products and random stream, bit for bit)."""
        n = len(x)
        per = [_each(a, n) for a in args]
        if (b := sharding.active()) is not None:  # each matrix whole on one rank
            return b.whole(x, lambda t, i: ns.rows(fn, t, *(a[i] for a in per)))
        return [ns.rows(fn, t, *(a[i] for a in per)) for i, t in enumerate(x)]

    apply.__name__ = op
    return apply


newton_schulz = _orthogonaliser("newton_schulz")
cans = _orthogonaliser("cans")
low_rank_newton_schulz = _orthogonaliser("low_rank_newton_schulz")
low_rank_cans = _orthogonaliser("low_rank_cans")


def strided(x: Tensors, k: Scalar) -> Tensors:
    """Every k-th element of each flattened tensor (views where the memory allows)."""
    if (lay := sharding.active()) is not None and hasattr(lay, "strided"):  # the slice of the whole
        return lay.strided(x, _each(k, len(x)))
    return [t.reshape(-1)[:: int(s)] for t, s in zip(x, _each(k, len(x)))]


def vdot(a: Tensors, b: Tensors, kind: str = "element") -> Tensors:
    if (lay := sharding.active()) is not None:
        return lay.vdot(a, b, kind, _vdot)
    return [_vdot(x, y) for x, y in zip(a, b)]


# -- writes -----------------------------------------------------------------------------------
def assign_(dst: Tensors, src: Tensors) -> Tensors:
    """Write ``src`` into ``dst`` (dtype-converting like ``copy_``)."""
    torch._foreach_copy_(dst, src)
    return dst


def store(state: dict[str, list], name: str, value: Sequence[torch.Tensor]) -> list:
    """Write a state that may not exist yet: copy into existing buffers, create missing ones."""
    current = state[name]
    out = []
    for old, new in zip(current, value):
        if old is None:
            out.append(new.detach().clone())
        else:
            old.copy_(new)
            out.append(old)
    state[name] = out
    return out
