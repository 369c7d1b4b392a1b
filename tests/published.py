"""Build the published optimizer a spec's ``matches:`` names, from the spec alone."""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path
from typing import Any

import torch

from optgen.spec.loader import load_spec

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"


def matched_specs() -> list[str]:
    return sorted(p.stem for p in SPECS.glob("*.yaml") if load_spec(p).model.matches is not None)


def published_factory(spec_name: str, setting: dict[str, Any], dtype: torch.dtype = torch.float32):
    spec = load_spec(SPECS / f"{spec_name}.yaml")
    m = spec.model.matches
    module, _, cls_name = m.class_.rpartition(".")
    cls = getattr(importlib.import_module(module), cls_name)
    kwargs = {}
    for name, value in setting.items():
        theirs = m.arguments.get(name, name)
        if theirs is None:
            continue
        kwargs[theirs] = tuple(value) if isinstance(value, list) else value
    if m.dtype_argument:
        kwargs[m.dtype_argument] = dtype

    def make(params):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # adams-torch warns about single-process mode
            return cls(params, **kwargs)

    return make


def ours_factory(spec_name: str, setting: dict[str, Any], backend: str, dtype: torch.dtype = torch.float32):
    import generated

    spec = load_spec(SPECS / f"{spec_name}.yaml")
    cls = getattr(generated, spec.model.class_)
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in setting.items()}
    if spec.model.matches.dtype_argument in spec.model.hyperparameters:
        kwargs[spec.model.matches.dtype_argument] = dtype
    return lambda params: cls(params, backend=backend, **kwargs)


def settings(spec_name: str) -> list[dict[str, Any]]:
    return load_spec(SPECS / f"{spec_name}.yaml").model.matches.settings
