"""Features: each one is a transformation of the IR that any spec can switch on under ``features:``.

A feature declares the hyperparameters it adds, what it needs and what it conflicts with, and
rewrites the lowered :class:`~optgen.ir.nodes.Program`. The registry below maps names to features.

Features that adv_optm exposes as constructor flags (``use_atan2``, ``nesterov``, ...) wrap what
they rewrite in ``if <flag>:`` with the original statement as the other branch: the flag is a
per-group hyperparameter, and every backend specialises each combination used (the torch backend
buckets parameters by branch path, the triton backend renders one kernel set per path), so no
element ever branches on it. Features apply in the order the spec lists them; a feature's
``after``/``before`` say which orders it needs, and the resolver checks them.

A base spec names what features rewrite under ``roles:`` (see ``optgen.ir.roles.ROLES``:
``first_moment``, ``second_moment``, ``direction``, ``denominator``, ``step_size``, ``decay``, ...),
each bound to exactly one statement (``decay``: one per path). Every feature that rewrites a
statement of the base finds it by role and matches its IR structure with exact cardinality
(:func:`optgen.features.rewrite.rewrite_role` / ``find_role``: none or several is an error at the
spec's lines); its temporaries take names the spec does not use (``rewrite.fresh``), and the
states it keeps under published keys (``max_exp_avg_sq``, ``exp_avg_slow``, ``anchor_data``, ...)
are an error where the spec declares them. A role a spec does not declare is inferred from
today's dialect, with the same cardinality: the denominator is a temporary ``denom``
(``denom = ... + eps``), the direction is ``update`` (divided by ``denom``, then
``update = update * step_size``), the first moment is the EMA of ``exp_avg`` followed by
``update = copy(exp_avg)``, the second moment ``exp_avg_sq``, and decoupled decay is
``param = param + s * param`` (or ``param * (1 - s)``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from optgen.errors import SpecError, did_you_mean
from optgen.ir.nodes import Program
from optgen.spec.model import HyperparameterSpec


@dataclass(frozen=True)
class Feature:
    name: str
    doc: str
    transform: Callable[[Program], Program]
    hyperparameters: dict[str, HyperparameterSpec] = field(default_factory=dict)
    requires: tuple[str, ...] = ()
    conflicts: tuple[str, ...] = ()
    #: features this one must come after / before where both are listed (the resolver checks it)
    after: tuple[str, ...] = ()
    before: tuple[str, ...] = ()

    def apply(self, program: Program) -> Program:
        return self.transform(program)


def _registry() -> dict[str, Feature]:
    from optgen.features import (
        adamw_prune,
        ademamix,
        amsgrad,
        atan2,
        atan2_adams,
        cautious,
        cautious_wd,
        centered_wd,
        clip_grad,
        coupled,
        factored,
        fisher_wd,
        grams,
        kourkoutas_beta,
        maximize,
        nesterov,
        normed_momentum,
        orthograd,
        simplified_ademamix,
        spectral_decay,
        state_precision,
        stochastic_rounding,
    )

    mods = (orthograd, maximize, amsgrad, normed_momentum, nesterov, grams, cautious, ademamix, simplified_ademamix,
            atan2, atan2_adams, fisher_wd, cautious_wd, centered_wd, kourkoutas_beta, stochastic_rounding, factored, spectral_decay, clip_grad,
            coupled, state_precision, adamw_prune)
    return {m.FEATURE.name: m.FEATURE for m in mods}


def resolve_features(spec) -> list[Feature]:
    """The spec's features, checked for existence, requirements and conflicts."""
    registry = _registry()
    names = spec.model.features
    out = []
    for i, name in enumerate(names):
        pos = spec.source.text_at(("features", i))
        if name not in registry:
            raise SpecError(pos, f"features[{i}]", f"unknown feature '{name}'{did_you_mean(name, registry)}")
        f = registry[name]
        for other in f.conflicts:
            if other in names:
                raise SpecError(pos, f"features[{i}]", f"feature '{name}' conflicts with '{other}'")
        for need in f.requires:
            if need not in names:
                raise SpecError(pos, f"features[{i}]", f"feature '{name}' needs feature '{need}'")
        if name in names[:i]:
            raise SpecError(pos, f"features[{i}]", f"feature '{name}' is listed twice")
        for other in f.after:
            if other in names[i + 1:]:
                raise SpecError(pos, f"features[{i}]", f"feature '{name}' must come after '{other}' "
                                f"(features[{names.index(other)}])")
        for other in f.before:
            if other in names[:i]:
                raise SpecError(pos, f"features[{i}]", f"feature '{name}' must come before '{other}' "
                                f"(features[{names.index(other)}])")
        out.append(f)
    return out


def available() -> dict[str, Feature]:
    """All registered features by name."""
    return _registry()
