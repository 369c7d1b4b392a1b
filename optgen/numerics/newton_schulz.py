"""Newton-Schulz orthogonalisation (Muon), with adv_optm's exact operation sequence.

The quintic iteration ``A = X X^T; B = b A + c A A; X = a X + B X`` in bfloat16 on the matrix
normalised by ``max(||X||_F, eps)``, transposed so that it has at least as many columns as rows
(math/adv-optm.md §5.1). Each product is one ``addmm`` (``baddbmm`` for a stack of matrices of
one shape) with the same ``beta``/``alpha`` as adv_optm, so eager results match bit for bit.
"""

from __future__ import annotations

import torch


def newton_schulz(g: torch.Tensor, steps: int, eps: float, a: float, b: float, c: float) -> torch.Tensor:
    """The orthogonalised ``g`` (a matrix, or a stack of matrices), in ``g``'s dtype."""
    x = g.to(torch.bfloat16)
    transposed = x.size(-2) > x.size(-1)
    if transposed:
        x = x.mT
    x.div_(x.norm(dim=(-2, -1), keepdim=True).clamp_min_(eps))
    mm = torch.baddbmm if x.ndim > 2 else torch.addmm
    x = x.contiguous()
    gram = torch.empty((*x.shape[:-1], x.size(-2)), device=x.device, dtype=x.dtype)
    poly = torch.empty_like(gram)
    out = torch.empty_like(x)
    for _ in range(int(steps)):
        mm(gram, x, x.mT, beta=0.0, alpha=1.0, out=gram)
        mm(gram, gram, gram, beta=b, alpha=c, out=poly)
        mm(x, poly, x, beta=a, alpha=1.0, out=out)
        x, out = out, x
    if transposed:
        x = x.mT
    return x.to(g.dtype)


def cans(g: torch.Tensor, steps: int, eps: float, lower_bound: float) -> torch.Tensor:
    """Chebyshev-accelerated Newton-Schulz (CANS, adv_optm's ``accelerated_ns``): each step the cubic
    ``X = c1 X + c3 (X X^T) X`` whose coefficients follow the singular-value bounds ``[lb, ub]``
    (from ``[lower_bound, 1]``), recomputed on the host in double precision (math/adv-optm.md §5.2)."""
    x = g.to(torch.bfloat16)
    transposed = x.size(-2) > x.size(-1)
    if transposed:
        x = x.mT
    x.div_(x.norm(dim=(-2, -1), keepdim=True).clamp_min_(eps))
    mm = torch.baddbmm if x.ndim > 2 else torch.addmm
    x = x.contiguous()
    gram = torch.empty((*x.shape[:-1], x.size(-2)), device=x.device, dtype=x.dtype)
    out = torch.empty_like(x)
    lb, ub = lower_bound, 1.0
    for _ in range(int(steps)):
        lb_ub = lb * ub
        e_sq = (lb * lb + lb_ub + ub * ub) / 3.0
        k = 2.0 * e_sq**1.5
        ll = lb_ub * (lb + ub)
        denom = k + ll
        alpha = 6.0 / denom
        mm(gram, x, x.mT, beta=0.0, alpha=1.0, out=gram)
        mm(x, gram, x, beta=alpha * e_sq, alpha=-alpha / 3.0, out=out)
        x, out = out, x
        err = (k - ll) / denom
        lb, ub = 1.0 - err, 1.0 + err
    if transposed:
        x = x.mT
    return x.to(g.dtype)


def low_rank(g: torch.Tensor, rank: int, ortho, *args) -> torch.Tensor:
    """Low-rank orthogonalisation (adv_optm's ``low_rank_ortho``, arXiv 2509.11983): ``Q`` from the
    QR of ``g`` times a Gaussian sketch ``(n, r)`` (``r = min(rank, m, n)``, drawn from adv_optm's
    per-device stream in ``g``'s dtype), then ``Q ortho(Q^T g)`` with ``ortho`` Newton-Schulz or
    CANS and its arguments (math/adv-optm.md §5.3)."""
    from optgen.numerics import stochastic

    r = min(int(rank), g.size(-2), g.size(-1))
    if r <= 0:
        return ortho(g, *args)
    omega = stochastic.sketch((*g.shape[:-2], g.size(-1), r), g)  # one per matrix of a stack
    y = g @ omega
    q = torch.linalg.qr(y.float())[0].to(y.dtype) if y.dtype != torch.float32 else torch.linalg.qr(y)[0]
    return q @ ortho(q.mT @ g, *args)


def low_rank_newton_schulz(x: torch.Tensor, rank: int, steps: int, eps: float, a: float, b: float, c: float,
                           ) -> torch.Tensor:
    """:func:`low_rank` with :func:`newton_schulz`."""
    return low_rank(x, rank, newton_schulz, steps, eps, a, b, c)


def low_rank_cans(x: torch.Tensor, rank: int, steps: int, eps: float, lower_bound: float) -> torch.Tensor:
    """:func:`low_rank` with :func:`cans`."""
    return low_rank(x, rank, cans, steps, eps, lower_bound)


def rows(fn, x: torch.Tensor, *args) -> torch.Tensor:
    """``fn`` of ``x`` as the matrix ``(shape[0], -1)``, in ``x``'s shape."""
    if x.dim() < 2:
        raise RuntimeError(f"{fn.__name__}() needs a matrix, got shape {tuple(x.shape)}")
    return fn(x.flatten(1), *args).view(x.shape)
