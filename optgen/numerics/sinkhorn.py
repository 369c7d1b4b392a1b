"""Alternating row / column normalisations of a parameter-shaped value seen as the matrix
``(shape[0], -1)``: adv_optm 2.5.16's SR-Sinkhorn (SinkSGD_adv, math/adv-optm.md §3.6) and its
rank-2 ("iterative") OrthoGrad (§2.6), with the published operation sequence so that eager results
match bit for bit, and the per-row / per-column reductions of that view the SinkSGD step reads.

Every function computes in its input's dtype (no upcast, as published) and returns a new tensor:
the published code works in place on a view of its input (``p.grad`` itself where the gradient was
not upcast); here the caller's tensor, and so the user's ``.grad``, is left as it was.

The matrix is ``(m, n) = (shape[0], numel / shape[0])``. The dim normalised first is the longer
one: dim 0 (each column) when ``m > n``, else dim 1 (each row). A norm along dim ``d`` is floored
at ``1 / sqrt(size of d)``, the norm of a one-element unit vector.
"""

from __future__ import annotations

import math

import torch

#: rank-2 OrthoGrad's passes and over-relaxation (adv_optm's iters=3 and value=-1.01)
ORTHO_PASSES = 3
ORTHO_RELAX = 1.01


def _matrix(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.dim() < 2:
        raise RuntimeError(f"{what}() needs a parameter with 2 or more dims, got shape {tuple(x.shape)}")
    return x.reshape(x.shape[0], -1)


def view_norm(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The Euclidean norm along ``dim`` of ``x`` as the matrix ``(shape[0], -1)``, kept: shaped
    ``(shape[0], 1, ...)`` (dim 1) or ``(1, *shape[1:])`` (dim 0), so that it broadcasts against
    ``x`` (``torch.linalg.vector_norm(x2d, 2, dim, keepdim=True)``)."""
    x2 = _matrix(x, "viewnorm")
    return torch.linalg.vector_norm(x2, ord=2, dim=dim, keepdim=True).view(_kept(x, dim))


def view_mean(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The mean along ``dim`` of ``x`` as the matrix ``(shape[0], -1)``, kept as :func:`view_norm`."""
    x2 = _matrix(x, "viewmean")
    return x2.mean(dim=dim, keepdim=True).view(_kept(x, dim))


def _kept(x: torch.Tensor, dim: int) -> tuple[int, ...]:
    if dim == 1:
        return (x.shape[0],) + (1,) * (x.dim() - 1)
    if dim == 0:
        return (1, *x.shape[1:])
    raise RuntimeError(f"a dim of the (shape[0], -1) matrix is 0 or 1, got {dim}")


def _first_dim(x2: torch.Tensor) -> int:
    return 0 if x2.shape[0] > x2.shape[1] else 1


def _project(p2: torch.Tensor, u2: torch.Tensor, p_sq: torch.Tensor, dim: int, relax: float) -> None:
    """``u2 -= relax * (<p, u> / ||p||^2) p`` along ``dim``, in place (one addcmul)."""
    proj = torch.sum(p2 * u2, dim=dim, keepdim=True) / p_sq
    u2.addcmul_(proj, p2, value=-relax)


def _renorm(u2: torch.Tensor, dim: int, target: float | torch.Tensor) -> None:
    """``u2 *= target / max(||u2||_dim, 1/sqrt(size of dim))``, in place."""
    floor = 1 / math.sqrt(u2.shape[dim])
    u2.mul_(target / u2.norm(p=2, dim=dim, keepdim=True).clamp_min_(floor))


def sinkhorn(x: torch.Tensor, p: torch.Tensor, iterations: int, orthogonal: bool) -> torch.Tensor:
    """SR-Sinkhorn of ``x`` (2 or more dims): ``iterations`` times, the first dim normalised to
    ``sqrt`` of its length's partner (columns to ``sqrt(m)`` when normalising dim 0, rows to
    ``sqrt(n)``), then the other; with ``orthogonal``, after each normalisation the rows / columns
    are projected orthogonal to ``p``'s (``1e-30`` guard on ``||p||^2``) and renormalised."""
    if x.numel() == 0:
        return x.clone()
    u2 = _matrix(x, "sinkhorn").clone()
    m, n = u2.shape
    dim = _first_dim(u2)
    first, second = (math.sqrt(m), math.sqrt(n)) if dim == 0 else (math.sqrt(n), math.sqrt(m))
    if orthogonal:
        p2 = _matrix(p, "sinkhorn")
        p_sq_first = torch.sum(p2 * p2, dim=dim, keepdim=True).add_(1e-30)
        p_sq_second = torch.sum(p2 * p2, dim=1 - dim, keepdim=True).add_(1e-30)
    for _ in range(int(iterations)):
        for d, target, p_sq in ((dim, first, "first"), (1 - dim, second, "second")):
            _renorm(u2, d, target)
            if orthogonal:
                _project(p2, u2, p_sq_first if p_sq == "first" else p_sq_second, d, 1.0)
                _renorm(u2, d, target)
    return u2.view(x.shape)


def orthograd_iterative(g: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Rank-2 OrthoGrad of ``g`` (2 or more dims): :data:`ORTHO_PASSES` times along the first dim,
    then the other, ``g -= 1.01 * (<p, g> / (||p||^2 + 1e-30)) p`` and the norm along that dim
    restored to the original gradient's (each floored as in :func:`sinkhorn`)."""
    if g.numel() == 0:
        return g.clone()
    g2 = _matrix(g, "orthograd_iterative").clone()
    p2 = _matrix(p, "orthograd_iterative")
    dim = _first_dim(g2)
    dims = (dim, 1 - dim)
    p_sq = [torch.sum(p2 * p2, dim=d, keepdim=True).add_(1e-30) for d in dims]
    targets = [g2.norm(p=2, dim=d, keepdim=True).clamp_min_(1 / math.sqrt(g2.shape[d])) for d in dims]
    for _ in range(ORTHO_PASSES):
        for d, sq, target in zip(dims, p_sq, targets):
            _project(p2, g2, sq, d, ORTHO_RELAX)
            _renorm(g2, d, target)
    return g2.view(g.shape)
