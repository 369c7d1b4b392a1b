"""What ``optgen check`` adds to a build: the rendered module is imported (from memory, nothing
written) and its optimizer steps small parameters with every hyperparameter at its default, on
the torch and reference backends. A spec that ``check`` accepts therefore builds, imports and
steps."""

from __future__ import annotations

import itertools
import sys
import types
from typing import Any

import torch

from optgen.errors import SpecError

#: Parameter shapes of the smoke step: a matrix, a vector, a batched matrix and a scalar.
SHAPES = ((3, 4), (5,), (2, 3, 2), ())


_PACKAGES = itertools.count()


def import_built(built: Any, name: str | None = None) -> types.ModuleType:
    """Execute a rendered optimizer module (a :class:`optgen.render.Built`) as a fresh module,
    from memory: its program-data module first, in a throwaway package that the relative import
    of the optimizer module finds and that leaves ``sys.modules`` once both are loaded."""
    name = name or built.module
    package = f"optgen_check_{next(_PACKAGES)}"
    pkg = types.ModuleType(package)
    pkg.__path__ = []
    modules = {package: pkg}
    try:
        for mod_name, text in ((f"{built.module}_ir", built.ir_text), (name, built.text)):
            module = types.ModuleType(f"{package}.{mod_name}")
            module.__dict__.update(__file__=f"<optgen check {mod_name}>", __package__=package)
            modules[module.__name__] = module
            sys.modules.update(modules)
            exec(compile(text, module.__file__, "exec"), module.__dict__)
    finally:
        for key in modules:
            sys.modules.pop(key, None)
    return module


def smoke_step(built, spec) -> None:
    """Import ``built`` (a :class:`optgen.render.Built`) and take three steps with its defaults;
    any failure is a :class:`SpecError` at the spec's ``update:``."""
    where = spec.position("update") or spec.position()
    try:
        module = import_built(built)
    except Exception as exc:  # a render bug: the module must always import
        raise SpecError(where, "update", f"the generated module does not import: {type(exc).__name__}: {exc}") from None
    cls = getattr(module, built.program.class_name)
    for backend in ("torch", "reference"):
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float32)) for s in SHAPES]
        try:
            opt = cls(params, backend=backend)
            for _ in range(3):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
                opt.step()
        except Exception as exc:
            raise SpecError(where, "update", f"the optimizer fails to step with its defaults on the {backend} "
                            f"backend: {type(exc).__name__}: {exc}") from None
