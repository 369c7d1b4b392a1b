"""Features: each one is a transformation of the IR that any spec can switch on under ``features:``.

A feature declares the hyperparameters it adds, what it needs and what it conflicts with, and
rewrites the lowered :class:`~optgen.ir.nodes.Program`. The registry below maps names to features.
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

    def apply(self, program: Program) -> Program:
        return self.transform(program)


def _registry() -> dict[str, Feature]:
    from optgen.features import maximize

    return {f.name: f for f in (maximize.FEATURE,)}


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
        out.append(f)
    return out


def available() -> dict[str, Feature]:
    """All registered features by name."""
    return _registry()
