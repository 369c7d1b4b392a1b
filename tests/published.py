"""Build the published optimizer a spec's ``matches:`` names, from the spec alone."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from optgen.authoring.load import handed as _handed
from optgen.spec.loader import load_spec

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"


def matched_specs() -> list[str]:
    return sorted(p.stem for p in SPECS.glob("*.yaml") if load_spec(p).model.matches is not None)


#: Releases that cannot share site-packages with the pinned one live in their own folder, installed
#: by the README's test command with ``pip install --no-deps --target DIR``.
SIDE_INSTALLS = {"adv-optm==2.2.3": ROOT / ".deps" / "adv_optm_2_2_3"}


def _side_package(package: str, module: str):
    """``module`` from the side install of ``package``, imported under its own name.

    The release is loaded as ``<top>_<version>`` (its relative imports follow), so it lives next to
    the site-packages release of the same package without either seeing the other.
    """
    folder = SIDE_INSTALLS[package]
    top, _, rest = module.partition(".")
    alias = f"{top}_{package.rpartition('==')[2].replace('.', '_')}"
    if alias not in sys.modules:
        init = folder / top / "__init__.py"
        if not init.exists():
            raise RuntimeError(
                f"{package} is not installed in {folder}: run "
                f"`pip install --no-deps --target {folder.relative_to(ROOT)} {package}` (the README's test command does)"
            )
        spec = importlib.util.spec_from_file_location(alias, init, submodule_search_locations=[str(folder / top)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[alias] = mod
        spec.loader.exec_module(mod)
    return importlib.import_module(f"{alias}.{rest}" if rest else alias)


def published_class(package: str, class_path: str):
    """The published class ``class_path`` (``module.Class``) from ``package`` (pinned ``name==version``)."""
    module, _, cls_name = class_path.rpartition(".")
    if package in SIDE_INSTALLS:
        return getattr(_side_package(package, module), cls_name)
    return getattr(importlib.import_module(module), cls_name)


def published_factory(spec_name: str, setting: dict[str, Any], dtype: torch.dtype = torch.float32):
    spec = load_spec(SPECS / f"{spec_name}.yaml")
    m = spec.model.matches
    cls = published_class(m.package, m.class_)
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
            return cls(handed(spec_name, params), **kwargs)

    return make


def handed(spec_name: str, params) -> list:
    """The parameters the tests hand both classes (:func:`optgen.authoring.load.handed`)."""
    return _handed(load_spec(SPECS / f"{spec_name}.yaml").model.matches, params)


def same_value(x: Any, y: Any) -> bool:
    """Two state-dict values are equal: tensors bit for bit (shape, dtype and device too), through
    nested dicts and lists (bitsandbytes' layout nests its quantisation state in a dict per
    parameter), other values of one type and equal."""
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        return isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape and \
            x.dtype == y.dtype and x.device == y.device and torch.equal(x, y)
    if isinstance(x, dict) or isinstance(y, dict):
        return isinstance(x, dict) and isinstance(y, dict) and sorted(x) == sorted(y) and \
            all(same_value(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)) or isinstance(y, (list, tuple)):
        return type(x) is type(y) and len(x) == len(y) and all(same_value(a, b) for a, b in zip(x, y))
    return type(x) is type(y) and x == y


def dtype_argument(spec_name: str, dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The published argument that must equal the parameters' dtype (adams' master_dtype), for the
    classes that take it."""
    model = load_spec(SPECS / f"{spec_name}.yaml").model
    arg = model.matches.dtype_argument if model.matches is not None else None
    return {arg: dtype} if arg in model.hyperparameters else {}


def ours_factory(spec_name: str, setting: dict[str, Any], backend: str, dtype: torch.dtype = torch.float32):
    spec = load_spec(SPECS / f"{spec_name}.yaml")
    cls = getattr(importlib.import_module(f"generated.{spec_name}"), spec.model.class_)
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in setting.items()}
    kwargs.update(dtype_argument(spec_name, dtype))
    return lambda params: cls(handed(spec_name, params), backend=backend, **kwargs)


def spec_package(spec_name: str) -> str:
    return load_spec(SPECS / f"{spec_name}.yaml").model.matches.package


def settings(spec_name: str) -> list[dict[str, Any]]:
    return load_spec(SPECS / f"{spec_name}.yaml").model.matches.settings
