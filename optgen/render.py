"""Rendering: a lowered program becomes ``generated/<name>.py`` through the Jinja templates."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import jinja2

from optgen import __version__
from optgen.backends.torch_codegen import render_device_step
from optgen.backends.triton_codegen import render_kernels
from optgen.backends.triton_plan import TritonUnsupported
from optgen.ir.codecs import codec_for
from optgen.ir.hoist import hoist
from optgen.ir.nodes import Program
from optgen.ir.pretty import set_aliases, stmts_text
from optgen.ir.serial import program_to_data
from optgen.pipeline import lower
from optgen.pysource import (
    Code,
    comment_text,
    data_literal,
    docstring_text,
    environment,
    identifier,
    literal,
    math_imports,
)
from optgen.spec.loader import Spec, load_spec

#: The Jinja templates, package data of optgen (so a plain install or a wheel renders too).
TEMPLATES = Path(__file__).resolve().parent / "templates"


@dataclass
class Built:
    program: Program
    module: str  # module name inside generated/
    text: str
    triton_text: str  # generated/<module>_triton.py
    spec: Spec
    ir_text: str = ""  # generated/<module>_ir.py: the program as data, which <module>.py loads

    def files(self) -> dict[str, str]:
        """File name -> text of every module this spec renders to."""
        return {f"{self.module}.py": self.text, f"{self.module}_ir.py": self.ir_text,
                f"{self.module}_triton.py": self.triton_text}


def compile_spec(path: str | Path) -> Built:
    """Load, lower, hoist and render one spec (nothing is written)."""
    spec = load_spec(path)
    lowered = lower(spec)
    program = hoist(lowered)  # hoisting builds new statement lists; `lowered` keeps the spec's form
    set_aliases(program.hypers)
    text = render_module(program, lower_text=stmts_text(lowered.body))
    return Built(program, spec.name, text, render_triton_module(program, spec.name), spec, render_ir_module(program))


def render_triton_module(program: Program, module: str, fixed: dict[str, bool] | None = None) -> str:
    """The Triton kernels and launch plan of a hoisted program (by default: its branch paths with
    hyperparameters at their defaults; ``fixed``: the path these conditions select)."""
    try:
        kernels, plan = render_kernels(program, f"_{module}", fixed)
        unsupported = None
    except TritonUnsupported as exc:  # the module then says why the backend is unavailable
        kernels, plan, unsupported = [], None, str(exc)
    plan_text = data_literal(plan.to_data() if plan is not None else None)
    # module-level source of the codecs the kernels call (feature state_precision: an import)
    preamble = "".join(dict.fromkeys(codec_for(c).triton_source for c in (plan.codecs if plan is not None else ())))
    text = _env().get_template("triton_kernels.py.j2").render(
        **_header(program),
        preamble=Code(preamble.strip()),
        kernels=[{"kind": comment_text(k.kind), "text": Code(k.text), "name": identifier(k.name)} for k in kernels],
        plan=plan_text,
        math_imports=Code(", ".join(math_imports(plan_text))),
        unsupported=literal(unsupported),
    )
    return _tidy(text)


def _env() -> jinja2.Environment:
    return environment(jinja2.FileSystemLoader(str(TEMPLATES)))


def _header(program: Program) -> dict[str, Code]:
    """What the header comment and first docstring line of both modules say."""
    return {
        "version": comment_text(__version__),
        "source": comment_text(program.source),
        "sha256": comment_text(program.sha256),
        "class_name": identifier(program.class_name),
    }


def _default_code(h) -> Code:
    value = h.default
    if h.inferred_type() == "dtype" and value is not None:
        return Code(f"torch.{identifier(value)}")  # a name from TORCH_DTYPES (checked at load)
    if h.as_ is not None:
        return literal(tuple(value))
    return literal(value)


def render_module(program: Program, lower_text: list[str]) -> str:
    doc = (program.doc or "").strip()
    summary, _, details = doc.partition("\n")
    args = []
    for name, h in program.hypers:
        if not h.constructor:
            continue
        default = _default_code(h)
        args.append({"name": identifier(name), "default": default, "default_doc": docstring_text(default),
                     "doc": docstring_text((h.doc or name).strip()), "keyword": h.keyword_only})
    non_finite = math_imports(*(a["default"] for a in args))
    matches = None
    if program.matches is not None:
        matches = docstring_text(f"``{program.matches.class_}`` from ``{program.matches.package}``")
    text = _env().get_template("optimizer.py.j2").render(
        **_header(program),
        summary=docstring_text(summary.strip() or program.class_name),
        details=docstring_text(details.strip(), multiline=True),
        matches=matches,
        equations=[docstring_text(line) for line in lower_text],
        module=identifier(program.name),
        non_finite=Code(", ".join(non_finite)),
        device_step=Code(render_device_step(program)),
        args=args,
        positional=[a for a in args if not a["keyword"]],
        keyword=[a for a in args if a["keyword"]],
    )
    return _tidy(text)


def render_ir_module(program: Program) -> str:
    """``<module>_ir.py``: the hoisted program as plain data (the interpreter's and the runtime's
    input), apart from the optimizer module so that one reads as code."""
    data = data_literal(program_to_data(program))
    text = _env().get_template("optimizer_ir.py.j2").render(
        **_header(program),
        module=identifier(program.name),
        non_finite=Code(", ".join(math_imports(data))),
        program_data=Code("\n".join("    " + line for line in data.splitlines())),
    )
    return _tidy(text)


def _tidy(text: str) -> str:
    # Deterministic, formatter-clean output: no trailing spaces, at most two blank lines in a row.
    lines = [line.rstrip() for line in text.splitlines()]
    out: list[str] = []
    for line in lines:
        if not line and len(out) >= 2 and not out[-1] and not out[-2]:
            continue
        out.append(line)
    return "\n".join(out).rstrip() + "\n"


_ALL = re.compile(r'^__all__ = \["([A-Za-z_][A-Za-z0-9_]*)"\]$', re.M)


def render_init(modules: dict[str, str]) -> str:
    """``generated/__init__.py`` importing every generated class (module name -> class name)."""
    lines = [
        f"# Generated by optgen {__version__}. Do not edit: run `optgen build --all`.",
        '"""Optimizers generated by optgen from ``specs/``."""',
        "",
    ]
    # A class name several specs share (one published class, two releases) is exported from the
    # module named after it; the others stay importable from their own modules.
    exported = {}
    for mod in sorted(modules):
        cls = modules[mod]
        if cls not in exported or mod == cls.lower():
            exported[cls] = mod
    for mod in sorted(exported.values()):
        lines.append(f"from .{mod} import {modules[mod]}")
    lines.append("")
    lines.append("__all__ = [")
    for cls in sorted(exported):
        lines.append(f'    "{cls}",')
    lines.append("]")
    return "\n".join(lines) + "\n"


def init_for(out_dir: Path, extra: dict[str, str] | None = None) -> str:
    """The ``__init__.py`` for the generated modules in ``out_dir`` plus ``extra``."""
    modules: dict[str, str] = {}
    for f in sorted(out_dir.glob("*.py")):
        if f.name == "__init__.py":
            continue
        m = _ALL.search(f.read_text(encoding="utf-8"))
        if m:
            modules[f.stem] = m.group(1)
    modules.update(extra or {})
    return render_init(modules)
