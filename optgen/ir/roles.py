"""The roles a base spec declares for features to rewrite: the IR's vocabulary (``roles:`` in a spec
binds each to statements when it is lowered; :mod:`optgen.features` looks statements up by role)."""

from __future__ import annotations

#: The roles a base spec declares under ``roles:`` (role -> a statement) for features to rewrite.
#: A role the spec does not declare is inferred from the dialect of today's specs (the names in
#: :mod:`optgen.features`), with the same exact cardinality.
ROLES = {
    "first_moment": "the first-moment EMA of a state: m = lerp(m, g, w) or m * b1 + c * (1 - b1) * g",
    "second_moment": "the second-moment EMA of a state: v = v * b2 + c * (1 - b2) * g * g",
    "direction": "the direction taken from the first moment: d = copy(m) or d = m",
    "denominator": "the denominator with its epsilon: d = x + eps or d = eps + x (eps a host value); the "
                   "divisions by it are found from it",
    "step_size": "the direction scaled by the step size: d = d * s or d = s * d (s a host value)",
    "decay": "decoupled weight decay: param = param + s * param or param = param * (1 - s)",
    "param_write": "the parameter's update by the direction",
}
#: roles that may bind several statements (one per path of the spec: Muon's matrix and Adam paths)
MULTI_ROLES = ("decay", "param_write")
