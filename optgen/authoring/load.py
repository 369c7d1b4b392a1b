"""Build a spec into a private, importable package (the triton backend imports its kernel module
by name) and find the published class its ``matches:`` names."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

from optgen.files import write_atomic
from optgen.render import Built, compile_spec

_counter = [0]


def build_class(spec_path: str | Path) -> tuple[Built, type]:
    """Compile ``spec_path`` and import its optimizer class from a fresh temporary package."""
    built = compile_spec(spec_path)
    return built, import_class(built)


def import_class(built: Built) -> type:
    """Import a compiled spec's optimizer class from a fresh temporary package."""
    _counter[0] += 1
    tmp = Path(tempfile.mkdtemp(prefix="optgen_author_"))
    pkg_name = f"optgen_author_{_counter[0]}_{built.module}"
    (tmp / pkg_name).mkdir()
    for name, text in built.files().items():
        write_atomic(tmp / pkg_name / name, text)
    write_atomic(tmp / pkg_name / "__init__.py", "")
    sys.path.insert(0, str(tmp))
    try:
        module = importlib.import_module(f"{pkg_name}.{built.module}")
    finally:
        sys.path.remove(str(tmp))
    return getattr(module, built.program.class_name)


def _base_version(v: str) -> str:
    return v.split("+", 1)[0]


def published_class(package: str, class_path: str, root: Path | None = None) -> tuple[type | None, str]:
    """The class ``module.Class`` of the pinned ``name==version``, or None and why not.

    The installed distribution is used when its version is the pinned one (a local suffix such as
    ``+cpu`` aside); otherwise a side install in ``.deps/<name>_<version>`` (``pip install --no-deps
    --target``, as the README's test command lays out adv-optm 2.2.3) is imported under its own name.
    """
    name, _, version = package.partition("==")
    module, _, cls_name = class_path.rpartition(".")
    try:
        installed = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        installed = None
    try:
        if installed is not None and _base_version(installed) == _base_version(version):
            return getattr(importlib.import_module(module), cls_name), ""
        top, _, rest = module.partition(".")
        folder = (root or Path.cwd()) / ".deps" / f"{name.replace('-', '_')}_{version.replace('.', '_')}"
        init = folder / top / "__init__.py"
        if not init.exists():
            why = f"{name} {installed} is installed, the spec pins {version}" if installed else f"{name} is not installed"
            return None, why
        alias = f"{top}_{version.replace('.', '_')}"
        if alias not in sys.modules:
            spec = importlib.util.spec_from_file_location(alias, init, submodule_search_locations=[str(folder / top)])
            mod = importlib.util.module_from_spec(spec)
            sys.modules[alias] = mod
            spec.loader.exec_module(mod)
        return getattr(importlib.import_module(f"{alias}.{rest}" if rest else alias), cls_name), ""
    except Exception as exc:  # an import failing inside the published package
        return None, f"cannot import {class_path}: {type(exc).__name__}: {exc}"


def handed(matches: Any, params) -> list:
    """The parameters both classes are handed in a comparison: every one, the 2-D ones where the
    published class refuses others (``matches.parameters: matrices``, torch.optim.Muon), the
    non-empty ones where it fails on empty ones (``nonempty``, torch.optim.Adafactor)."""
    params = list(params)
    which = matches.parameters if matches is not None else "all"
    if which == "all":
        return params

    def keep(p) -> bool:
        return p.dim() == 2 if which == "matrices" else p.numel() > 0

    if params and isinstance(params[0], dict):  # param groups
        return [{**g, "params": [p for p in g["params"] if keep(p)]} for g in params]
    return [p for p in params if keep(p)]


def published_factory(cls: type, matches: Any, setting: dict[str, Any], dtype: Any):
    """A ``params -> optimizer`` of the published class with ``setting`` (our argument names)."""
    kwargs = {}
    for name, value in setting.items():
        theirs = matches.arguments.get(name, name)
        if theirs is not None:
            kwargs[theirs] = tuple(value) if isinstance(value, list) else value
    if matches.dtype_argument:
        kwargs[matches.dtype_argument] = dtype

    def make(params):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cls(handed(matches, params), **kwargs)

    return make


def ours_factory(cls: type, built: Built, setting: dict[str, Any], backend: str, dtype: Any):
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in setting.items()}
    m = built.spec.model.matches
    if m is not None and m.dtype_argument and m.dtype_argument in built.spec.model.hyperparameters:
        kwargs[m.dtype_argument] = dtype

    def make(params):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cls(handed(m, params), backend=backend, **kwargs)

    return make
