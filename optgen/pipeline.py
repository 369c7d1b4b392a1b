"""The compiler's passes, in order, in one place: render, the CLI, authoring and the tests all run
a spec through these functions.

    load      optgen.spec.loader.load_spec     YAML -> a validated Spec (positions kept)
    lower     optgen.ir.lower.lower_base       Spec -> IR Program (the base spec's statements)
    features  optgen.features (Feature.apply)  IR -> IR, each feature a transformation bound to roles
              (the features of the blocks used first, on their statements: features.scoped)
    published optgen.ir.lower.attach_published the published state-dict layout, on the featured IR
    check     check_settings (here)            every ``matches.settings`` entry is a valid call
    hoist     optgen.ir.hoist.hoist            host work out of the element statements
    plan      optgen.backends.*                per backend: the torch step, the triton plan and kernels

This module sits above ``ir`` and ``features`` (and uses the runtime's host evaluator to check the
settings), so the IR never imports the features that transform it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from optgen.errors import SpecError, did_you_mean
from optgen.features.registry import resolve_features
from optgen.features.rewrite import FeatureError
from optgen.features.scoped import apply_block_features
from optgen.ir.hoist import hoist
from optgen.ir.lower import attach_published, lower_base
from optgen.ir.nodes import Program
from optgen.spec.loader import Spec, load_spec

#: The passes, in the order every entry point runs them (``optgen show`` and the docs name them).
PASSES = ("load", "lower", "features", "published", "check", "hoist", "plan")


def lower(spec: Spec) -> Program:
    """Lower a loaded spec into an IR :class:`Program` with its features applied, its published
    layout attached and its test settings checked (not hoisted: the form ``optgen show`` prints)."""
    features = resolve_features(spec)
    # A spec may re-declare a feature's hyperparameter (to place it or change its default): the
    # spec's declaration wins.
    extra_hypers = [(n, h) for f in features for n, h in f.hyperparameters.items()
                    if n not in spec.model.hyperparameters]
    program, facts = lower_base(spec, extra_hypers)
    # the features of the blocks the spec uses, on their statements only, before the spec's own
    program = apply_block_features(program)
    for i, f in enumerate(features):
        try:
            program = f.apply(program)
        except FeatureError as exc:
            # at the statement it concerns where there is one, else at the feature's entry
            at = exc.pos if exc.pos is not None else spec.source.text_at(("features", i))
            raise SpecError(at, f"features[{i}]", str(exc)) from None
    program = attach_published(spec, program, facts)
    check_settings(spec, program)
    return program


def compile_program(path: Path | str) -> Program:
    """Every pass up to the backends' plans: load, lower, features, published, check, hoist."""
    return hoist(lower(load_spec(Path(path))))


def check_settings(spec: Spec, program: Program) -> None:
    """Each ``matches.settings`` entry is a constructor call the equivalence tests make: it must be
    one the generated constructor accepts (argument names, then each value's type, range and
    choices, then the spec's checks), reported at the entry instead of failing in a test."""
    import torch

    from optgen.numerics.host import HostContext, evaluate
    from optgen.spec.values import validate_hyperparameter as _validate_hyper  # the constructor's own rule

    if spec.model.matches is None:
        return
    hypers = dict(program.hypers)
    accepted = [n for n, h in program.hypers if h.constructor]
    for i, setting in enumerate(spec.model.matches.settings):
        entry = ("matches", "settings", i)
        group: dict[str, Any] = {n: tuple(h.default) if isinstance(h.default, list) else h.default
                                 for n, h in program.hypers}
        for key, value in setting.items():
            pos, field = spec.source.at((*entry, key)), f"matches.settings[{i}].{key}"
            h = hypers.get(key)
            if h is None or not h.constructor:
                why = "is not an argument" if h is None else "is fixed by the class (constructor: false), not an argument"
                raise SpecError(pos, field, f"'{key}' {why} of {program.class_name}{did_you_mean(key, accepted)}")
            value = tuple(value) if isinstance(value, list) else value
            try:
                _validate_hyper(key, h, value)
            except (TypeError, ValueError) as exc:
                raise SpecError(pos, field, f"{program.class_name}() would refuse it: {exc}") from None
            group[key] = value
        ctx = HostContext(group, torch.empty(0), {}, tensor_math=False)
        for node, message in program.checks:
            if not evaluate(node, ctx):
                raise SpecError(spec.source.at(entry), f"matches.settings[{i}]",
                                f"{program.class_name}() would refuse it: {message}")
