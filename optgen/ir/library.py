"""The fixed function library of the expression language (the facts about every IR op are in
:mod:`optgen.ir.ops`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Function:
    """A function a spec may call: its arity and what it does, for docs and error messages."""

    name: str
    arity: tuple[int, int]
    doc: str
    host: bool = True  # may be applied to host scalars
    tensor: bool = True  # may be applied to device values


FUNCTIONS: dict[str, Function] = {
    f.name: f
    for f in [
        Function("sqrt", (1, 1), "square root"),
        Function("rsqrt", (1, 1), "1 / sqrt(x)", host=False),
        Function("abs", (1, 1), "absolute value"),
        Function("sign", (1, 1), "sign (0 at 0)"),
        Function("exp", (1, 1), "e ** x"),
        Function("log", (1, 1), "natural logarithm"),
        Function("cos", (1, 1), "cosine (radians)"),
        Function("sin", (1, 1), "sine (radians)"),
        Function("floor", (1, 1), "largest integer not above x (torch.floor / math.floor, as a float)"),
        Function("div", (2, 2), "div(a, b): true division a / b, also for a host a over a device b "
                 "(torch.div; 'a / b' with a host a is torch's 'reciprocal(b) * a')"),
        Function("reciprocal", (1, 1), "1 / x", host=False),
        Function("copy", (1, 1), "a fresh copy (torch.clone)", host=False),
        Function("contiguous", (1, 1), "x in row-major memory order (torch's .contiguous(); reductions "
                 "sum in memory order, so this pins the rounding of a later norm)", host=False),
        Function("atan2", (2, 2), "atan2(y, x), the angle of (x, y)"),
        Function("atan", (1, 1), "arctangent (torch.atan)", host=False),
        Function("maximum", (2, 2), "elementwise maximum"),
        Function("minimum", (2, 2), "elementwise minimum"),
        Function("max", (2, 2), "maximum of two host scalars", tensor=False),
        Function("min", (2, 2), "minimum of two host scalars", tensor=False),
        Function("clamp", (3, 3), "clamp(x, lo, hi)", host=False),
        Function("lerp", (3, 3), "lerp(a, b, w) = a + w * (b - a), with torch.lerp's two branches", host=False),
        Function("where", (3, 3), "where(cond, a, b), elementwise (or one of two host scalars)"),
        Function("matvec", (2, 2), "W v over the last two dims: per-element W, per-column v -> per-row", host=False),
        Function("matvec_t", (2, 2), "W^T u: per-element W, per-row u -> per-column", host=False),
        Function("mv", (2, 2), "mv(W, v): W v of a 2-D per-element W and a per-column v -> per-row, with torch.mv's "
                 "rounding (matvec sums as einsum does; torch and reference backends)", host=False),
        Function("mv_t", (2, 2), "mv_t(W, u): W^T u of a 2-D per-element W and a per-row u -> per-column, with "
                 "torch.mv(W.mT, u)'s rounding (in W's memory layout)", host=False),
        Function("normalize", (1, 1), "x / max(||x||, 1e-12) along the last dim of a per-row/per-column value", host=False),
        Function("dot", (2, 2), "sum of a*b along the last dim of per-row/per-column values -> per-matrix", host=False),
        Function("outer", (2, 2), "outer(r, c): per-row r times per-column c -> per-element", host=False),
        Function("rowsum", (1, 1), "sum over the last dim of a per-element value -> per-row", host=False),
        Function("colsum", (1, 1), "sum over the second-to-last dim -> per-column", host=False),
        Function("sum", (1, 1), "sum over the whole tensor -> per-tensor", host=False),
        Function("mean", (1, 1), "mean over the whole tensor -> per-tensor", host=False),
        Function("norm", (1, 1), "Euclidean norm of the whole tensor -> per-tensor", host=False),
        Function("maxabs", (1, 1), "largest |x| over the whole tensor (torch.max(x.abs()); 0 for an empty "
                 "tensor) -> per-tensor", host=False),
        Function("rownorm", (1, 1), "Euclidean norm over the last dim of a per-element value -> per-row "
                 "(torch's x.norm(dim=-1))", host=False),
        Function("rowmaxabs", (1, 1), "largest |x| over the last dim of a per-element value -> per-row "
                 "(torch.linalg.vector_norm(x, inf, dim=-1))", host=False),
        Function("colmaxabs", (1, 1), "largest |x| over the second-to-last dim -> per-column", host=False),
        Function("colnorm", (1, 1), "Euclidean norm over the second-to-last dim -> per-column (x.norm(dim=-2))",
                 host=False),
        Function("matmean", (1, 1), "mean over the last dim of a per-row/per-column value -> per-matrix "
                 "(x.mean(dim=-1))", host=False),
        Function("vdot", (2, 2), "sum of a * b over the whole tensor or slice, or of two per-row/per-column "
                 "values (torch.dot of the flattened tensors) -> per-tensor",
                 host=False),
        Function("strided", (1, 1), "every k-th element of the flattened x (x.flatten()[::k], k the spec's "
                 "slice_stride) -> per-slice", host=False),
        Function("rand_like", (1, 2), "rand_like(x[, seed]): uniform random numbers in [0, 1) of x's shape and dtype "
                 "(torch.rand_like from torch's default generator, in parameter order, on the torch and reference "
                 "backends; seeded Philox, per seed and tensor, in triton)", host=False),
        Function("stream_rand", (1, 2), "stream_rand(x[, seed]): uniform random numbers in [0, 1) of x's shape and "
                 "dtype from adv_optm's per-device stream, the one stochastic rounding draws from (torch.rand with "
                 "that generator, in parameter order, on the torch and reference backends; seeded Philox, per seed "
                 "and tensor, in triton)", host=False),
        Function("maxabs_dim", (2, 2), "maxabs_dim(x, d): the largest |x| along dim d of the parameter's shape "
                 "(torch.linalg.vector_norm(x, inf, dim=d, keepdim=True)), broadcast along that dim: per-element "
                 "(torch and reference backends)", host=False),
        Function("cast", (2, 2), "cast(x, like): x in the dtype of like (a mask as the gradient's dtype)", host=False),
        Function("float32", (1, 1), "x computed on in float32 (a no-op for float32 values); of a host value: "
                 "the value rounded to float32 (a published float32 scalar)"),
        Function("float64", (1, 1), "x computed on in float64 (a per-tensor value read to the host as a Python "
                 "float, as published code's x.item() maths; the triton backend computes on in float32); of a host "
                 "value: the value itself"),
        Function("axpy", (3, 3), "axpy(a, x, s): a + s * x with torch's a.add(x, alpha=s) rounding, s a host or "
                 "per-tensor value (alpha = s.item(), as published code passes a host-computed scalar)", host=False),
        Function("stochastic_round", (2, 2), "stochastic_round(x, seed): float32 x to bfloat16 by adding random low "
                 "16 bits and truncating (adv_optm's stream on CPU backends; seeded Philox in triton)", host=False),
        Function("newton_schulz", (6, 6), "newton_schulz(x, steps, eps, a, b, c): Muon's quintic Newton-Schulz "
                 "orthogonalisation of x as the matrix (shape[0], -1), in bfloat16 (adv_optm's sequence)", host=False),
        Function("cans", (4, 4), "cans(x, steps, eps, lower_bound): Chebyshev-accelerated Newton-Schulz (CANS) of "
                 "x as the matrix (shape[0], -1), in bfloat16 (adv_optm's accelerated_ns)", host=False),
        Function("low_rank_newton_schulz", (7, 7), "low_rank_newton_schulz(x, rank, steps, eps, a, b, c): "
                 "newton_schulz of x's rank-r projection on a Gaussian sketch (adv_optm's low_rank_ortho)",
                 host=False),
        Function("low_rank_cans", (5, 5), "low_rank_cans(x, rank, steps, eps, lower_bound): cans of x's "
                 "rank-r projection on a Gaussian sketch", host=False),
        Function("viewnorm", (2, 2), "viewnorm(x, d): the Euclidean norm of x seen as the matrix (shape[0], -1) "
                 "along its dim d (0: each column, 1: each row), kept so that it broadcasts against x: per-element "
                 "(torch.linalg.vector_norm(x2d, 2, d, keepdim=True); torch and reference backends)", host=False),
        Function("viewmean", (2, 2), "viewmean(x, d): the mean of x seen as the matrix (shape[0], -1) along its "
                 "dim d, kept as viewnorm's (torch and reference backends)", host=False),
        Function("sinkhorn", (4, 4), "sinkhorn(x, param, iterations, orthogonal): adv_optm's SR-Sinkhorn of x seen "
                 "as the matrix (shape[0], -1): 'iterations' alternating normalisations of the longer dim, then the "
                 "other, to sqrt of the other's length; with 'orthogonal', each followed by a projection orthogonal "
                 "to param's rows / columns (torch and reference backends)", host=False),
        Function("orthograd_iterative", (2, 2), "orthograd_iterative(g, param): adv_optm's rank-2 OrthoGrad of g "
                 "seen as the matrix (shape[0], -1): 3 alternating projections orthogonal to param's columns / rows "
                 "with 1.01 over-relaxation, each restoring the original norms (torch and reference backends)",
                 host=False),
        Function("eps_of", (1, 1), "eps_of(param): torch.finfo(param.dtype).eps, a parameter fact", tensor=False),
        Function("is_float32", (1, 1), "is_float32(x): whether the host value x is a float32 0-d tensor (a "
                 "hyperparameter given as torch.tensor(v), or a value computed from one): published code that mixes "
                 "such a tensor with Python floats computes in float32 (torch.optim.Adafactor's tensor lr)",
                 tensor=False),
        Function("has", (1, 1), "whether a state buffer exists for this parameter", tensor=False),
        Function("param_attr", (2, 2), "param_attr('name', default): an attribute of the parameter", tensor=False),
    ]
}

COMPARISONS = {"==": "eq", "!=": "ne", "<": "lt", "<=": "le", ">": "gt", ">=": "ge"}


#: Binary operators of the expression language beyond + - * / ** (the IR op each becomes).
OPERATORS = {"%": "mod"}


def nearest_functions(name: str, n: int = 3) -> str:
    """A ``(did you mean 'a', 'b'?)`` suffix naming the library functions nearest ``name``."""
    import difflib

    close = difflib.get_close_matches(name, sorted(FUNCTIONS), n=n, cutoff=0.6)
    if not close:
        return " (optgen show --functions lists the library)"
    return f" (did you mean {', '.join(repr(c) for c in close)}?)"


def functions_table() -> list[str]:
    """The function library as Markdown table rows (``optgen show --functions``, docs/functions.md)."""
    rows = ["| function | arguments | host | device | what it computes |", "|---|---|---|---|---|"]
    for f in FUNCTIONS.values():
        lo, hi = f.arity
        arity = str(lo) if lo == hi else f"{lo}-{hi}"
        rows.append(f"| `{f.name}` | {arity} | {'yes' if f.host else '-'} | {'yes' if f.tensor else '-'} "
                    f"| {f.doc.replace('|', '/')} |")
    rows.append("| `a % b` | operator | yes | yes | remainder with the divisor's sign (Python %, torch.remainder) |")
    return rows
