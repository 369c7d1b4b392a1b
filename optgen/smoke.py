"""What ``optgen check`` adds to a build: the rendered module is imported (from memory, nothing
written) and its optimizer steps small parameters with every hyperparameter at its default, on
the torch and reference backends. A spec that ``check`` accepts therefore builds, imports and
steps."""

from __future__ import annotations

import types

import torch

from optgen.errors import SpecError

#: Parameter shapes of the smoke step: a matrix, a vector, a batched matrix and a scalar.
SHAPES = ((3, 4), (5,), (2, 3, 2), ())


def import_built(text: str, name: str) -> types.ModuleType:
    """Execute a rendered module's text as a fresh module (it is not put in ``sys.modules``)."""
    module = types.ModuleType(f"optgen_check.{name}")
    module.__dict__["__file__"] = f"<optgen check {name}>"
    exec(compile(text, module.__dict__["__file__"], "exec"), module.__dict__)
    return module


def smoke_step(built, spec) -> None:
    """Import ``built`` (a :class:`optgen.render.Built`) and take three steps with its defaults;
    any failure is a :class:`SpecError` at the spec's ``update:``."""
    where = spec.position("update") or spec.position()
    try:
        module = import_built(built.text, built.module)
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
