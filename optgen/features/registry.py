"""The features by name, and the resolver that checks a spec's list (existence, requirements,
conflicts, ``after``/``before`` order)."""

from __future__ import annotations

from optgen.errors import SpecError, did_you_mean
from optgen.features import (
    Feature,
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
    spectral_normalization,
    state_precision,
    stochastic_rounding,
)

#: every feature, by name
FEATURES: dict[str, Feature] = {m.FEATURE.name: m.FEATURE for m in (
    orthograd, maximize, amsgrad, normed_momentum, nesterov, grams, cautious, ademamix, simplified_ademamix,
    atan2, atan2_adams, fisher_wd, cautious_wd, centered_wd, kourkoutas_beta, stochastic_rounding, factored,
    spectral_decay, spectral_normalization, clip_grad, coupled, state_precision, adamw_prune
)}


def resolve_features(spec) -> list[Feature]:
    """The spec's features, checked for existence, requirements and conflicts."""
    names = spec.model.features
    check_order(names, lambda i: (spec.source.text_at(("features", i)), f"features[{i}]"))
    return [FEATURES[n] for n in names]


def check_order(names: list[str], where, prefix: str = "") -> None:
    """``names`` (a features: list) checked: each feature exists, has what it needs, conflicts with
    none listed, is listed once and in the order its ``after``/``before`` ask; ``where(i)``: the
    position and field of entry ``i`` (errors are reported there, ``prefix`` before the message)."""
    registry = FEATURES
    for i, name in enumerate(names):
        pos, field = where(i)
        if name not in registry:
            raise SpecError(pos, field, f"{prefix}unknown feature '{name}'{did_you_mean(name, registry)}")
        f = registry[name]
        for other in f.conflicts:
            if other in names:
                raise SpecError(pos, field, f"{prefix}feature '{name}' conflicts with '{other}'")
        for need in f.requires:
            if need not in names:
                raise SpecError(pos, field, f"{prefix}feature '{name}' needs feature '{need}'")
        if name in names[:i]:
            raise SpecError(pos, field, f"{prefix}feature '{name}' is listed twice")
        for other in f.after:
            if other in names[i + 1:]:
                raise SpecError(pos, field, f"{prefix}feature '{name}' must come after '{other}' "
                                f"(features[{names.index(other)}])")
        for other in f.before:
            if other in names[:i]:
                raise SpecError(pos, field, f"{prefix}feature '{name}' must come before '{other}' "
                                f"(features[{names.index(other)}])")


def available() -> dict[str, Feature]:
    """All registered features by name."""
    return dict(FEATURES)
