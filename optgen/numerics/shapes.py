"""The closest-to-square matrix of a flat parameter (adv_optm's ``_get_effective_shape``): the
view factored states live on (optgen.numerics.matrix_view) and the ``square_rows``/``square_cols``
facts of host expressions."""

from __future__ import annotations

import functools
import math


@functools.lru_cache(maxsize=4096)
def effective_shape(numel: int) -> tuple[int, int]:
    """The factor pair ``(d1, d2)`` of ``numel`` closest to its square root, ``d1 >= d2`` (adv_optm's
    ``_get_effective_shape``: a prime gives ``(numel, 1)``, 0 gives ``(0, 0)``)."""
    if numel <= 0:
        return (0, 0)
    for i in range(math.isqrt(numel), 0, -1):
        if numel % i == 0:
            return (numel // i, i)
    return (numel, 1)  # pragma: no cover - i = 1 always divides
