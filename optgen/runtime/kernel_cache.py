"""Triton kernels of branch paths rendered at run time, cached as modules on disk.

A spec's generated ``<name>_triton.py`` carries the paths reachable with its hyperparameters at
their defaults; a parameter group that turns flags on takes another path, whose kernels are
rendered here the first time (the same code generator and template as ``optgen build``), written
atomically to ``$OPTGEN_CACHE_DIR`` (default ``~/.cache/optgen/triton``, or a private folder in
the temporary directory when that cannot be created) under a name hashed from the spec's sha256,
optgen's version, a hash of the code generator and templates, and the path.

The cache is code that this process will run, so it is trusted only when it is ours: the folder
must be owned by the user and writable by nobody else (the temporary fallback is created
``0700``), every module carries the sha256 of its text, recorded when it was rendered, and a
module whose text does not match (truncated, empty, edited) is rendered again. Modules are
compiled from the verified text; no bytecode is read from or written to ``__pycache__``.
"""

from __future__ import annotations

import functools
import hashlib
import linecache
import os
import stat
import sys
import tempfile
from pathlib import Path
from types import ModuleType

from optgen.files import write_atomic
from optgen.ir.nodes import Program

_HEADER = "# optgen kernel cache: sha256 "


class KernelCacheError(RuntimeError):
    """The kernel cache cannot be used (not writable, or not trusted)."""


class UntrustedCache(KernelCacheError):
    """The kernel cache folder may hold code written by someone else."""


def cache_dir() -> Path:
    return Path(os.environ.get("OPTGEN_CACHE_DIR") or Path.home() / ".cache" / "optgen" / "triton")


@functools.cache
def generator_hash() -> str:
    """A hash of the code that renders kernels (the compiler's stages and the templates), so a
    changed generator never reuses kernels an older one rendered."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    files = sorted([*root.glob("ir/*.py"), *root.glob("backends/*.py"), *root.glob("features/*.py"),
                    root / "render.py", root / "pysource.py", *root.glob("templates/*.j2")])
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _trusted(folder: Path, private: bool) -> Path:
    """``folder``, created if needed; refused unless it is a real folder owned by this user that
    no one else can write (``private``: that no one else can even read)."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode):
        raise UntrustedCache(f"kernel cache {folder} is not a folder (a link?): refusing to use it")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise UntrustedCache(f"kernel cache {folder} belongs to another user (uid {st.st_uid}): refusing to "
                             "load kernels from it; set OPTGEN_CACHE_DIR to a folder of your own")
    if st.st_mode & (0o077 if private else 0o022):
        raise UntrustedCache(f"kernel cache {folder} is {'accessible' if private else 'writable'} by other users "
                             f"(mode {stat.S_IMODE(st.st_mode):04o}): refusing to load kernels from it; "
                             f"`chmod go-rwx {folder}` or set OPTGEN_CACHE_DIR")
    return folder


def _folder() -> Path:
    try:
        return _trusted(cache_dir(), private=False)
    except UntrustedCache:
        raise
    except OSError:  # a read-only home: fall back to a private folder in the temporary directory
        uid = os.getuid() if hasattr(os, "getuid") else 0
        try:
            return _trusted(Path(tempfile.gettempdir()) / f"optgen-triton-{uid}", private=True)
        except OSError as exc:
            raise KernelCacheError(f"no writable kernel cache: {cache_dir()} and the temporary folder failed "
                                 f"({exc.strerror or exc}); set OPTGEN_CACHE_DIR to a writable folder") from None


def _stamped(text: str) -> str:
    return f"{_HEADER}{hashlib.sha256(text.encode('utf-8')).hexdigest()}\n{text}"


def _verified(path: Path) -> str | None:
    """The module text at ``path`` if its recorded hash matches it, else None."""
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    head, sep, body = raw.partition(b"\n")
    try:
        recorded = head.decode("ascii").removeprefix(_HEADER) if head.startswith(_HEADER.encode()) else None
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not sep or recorded is None or hashlib.sha256(body).hexdigest() != recorded:
        return None
    return _stamped(text)


def load_path_module(program: Program, module_name: str, key: tuple) -> ModuleType:
    """The module holding the kernels of branch path ``key`` of ``program`` (rendered if needed)."""
    from optgen import __version__

    digest = hashlib.sha256(repr((program.sha256, __version__, generator_hash(), key)).encode()).hexdigest()[:16]
    name = f"{module_name.rpartition('.')[2]}_{digest}"
    full = f"optgen_kernel_cache.{name}"
    if full in sys.modules:
        return sys.modules[full]
    path = _folder() / f"{name}.py"
    text = _verified(path)
    if text is None:  # not there yet, or not what was rendered: render it (again)
        from optgen.render import render_triton_module

        text = _stamped(render_triton_module(program, name, fixed=dict(key)))
        try:
            write_atomic(path, text)
        except OSError as exc:
            raise KernelCacheError(f"cannot write the kernel cache {path.parent}: {exc.strerror or exc}; set "
                                   "OPTGEN_CACHE_DIR to a writable folder of your own") from None
    mod = ModuleType(full)
    mod.__file__ = str(path)
    # Triton reads a kernel's source through inspect/linecache: it reads the verified text too
    linecache.cache[str(path)] = (len(text), None, text.splitlines(True), str(path))
    sys.modules[full] = mod
    try:
        exec(compile(text, str(path), "exec", dont_inherit=True), mod.__dict__)
    except BaseException:
        del sys.modules[full]
        raise
    return mod
