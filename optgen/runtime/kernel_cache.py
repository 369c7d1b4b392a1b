"""Triton kernels of branch paths rendered at run time, cached as modules on disk.

A spec's generated ``<name>_triton.py`` carries the paths reachable with its hyperparameters at
their defaults; a parameter group that turns flags on takes another path, whose kernels are
rendered here the first time (the same code generator and template as ``optgen build``), written
atomically to ``$OPTGEN_CACHE_DIR`` (default ``~/.cache/optgen/triton``, or the temporary folder
when that cannot be created) under a name hashed from
the spec's sha256, optgen's version and the path, and imported from there afterwards.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType

from optgen.ir.nodes import Program


def cache_dir() -> Path:
    return Path(os.environ.get("OPTGEN_CACHE_DIR") or Path.home() / ".cache" / "optgen" / "triton")


def load_path_module(program: Program, module_name: str, key: tuple) -> ModuleType:
    """The module holding the kernels of branch path ``key`` of ``program`` (rendered if needed)."""
    from optgen import __version__

    digest = hashlib.sha256(repr((program.sha256, __version__, key)).encode()).hexdigest()[:16]
    name = f"{module_name.rpartition('.')[2]}_{digest}"
    path = cache_dir() / f"{name}.py"
    if not path.exists():
        from optgen.render import render_triton_module

        text = render_triton_module(program, name, fixed=dict(key))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError:  # a read-only home: fall back to the temporary folder
            path = Path(tempfile.gettempdir()) / f"optgen-triton-{os.getuid()}" / path.name
            path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    full = f"optgen_kernel_cache.{name}"
    if full in sys.modules:
        return sys.modules[full]
    spec = importlib.util.spec_from_file_location(full, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[full] = mod
    spec.loader.exec_module(mod)
    return mod
