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
    registry = FEATURES
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
    return dict(FEATURES)
