"""Writing generated files: atomically, with the user's umask, and never leaving a half-written
or temporary file behind, even when the process is killed mid-write."""

from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path

#: Temporary names are ``.<file>.<pid>.<random>.tmp`` in the target's folder.
_TMP_SUFFIX = ".tmp"


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never half.

    The new file gets mode ``0o666`` less the umask, as any file the user creates. On Linux its
    data is written to an unnamed file (``O_TMPFILE``) that gets a name only once it is complete,
    so a kill while writing leaves nothing in the folder; elsewhere a named temporary is removed on
    any exception and swept by the next write to the folder if a hard kill left it there.
    """
    path = Path(path)
    folder = path.parent
    data = text.encode("utf-8")
    sweep_temporaries(folder)
    tmp = folder / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{_TMP_SUFFIX}"
    fd = _open_unnamed(folder)
    try:
        if fd is None:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            named = True
        else:
            named = False
        _write_all(fd, data)
        if not named:
            _name_unnamed(fd, tmp)  # the name appears only now, with the whole file
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    finally:
        if fd is not None:
            os.close(fd)


def _open_unnamed(folder: Path) -> int | None:
    flag = getattr(os, "O_TMPFILE", None)
    if flag is None or not os.path.isdir("/proc/self/fd"):
        return None
    try:
        return os.open(folder, flag | os.O_WRONLY, 0o666)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOTSUP):
            return None  # the file system has no unnamed files
        raise


def _name_unnamed(fd: int, target: Path) -> None:
    # linkat(AT_SYMLINK_FOLLOW) through /proc/self/fd: CPython uses linkat only with a dir_fd
    proc = os.open("/proc/self/fd", os.O_RDONLY)
    try:
        os.link(str(fd), target, src_dir_fd=proc, follow_symlinks=True)
    finally:
        os.close(proc)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def sweep_temporaries(folder: Path) -> None:
    """Remove temporaries that an earlier, killed writer left in ``folder`` (its pid is gone)."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        name = entry.name
        if not (name.startswith(".") and name.endswith(_TMP_SUFFIX)):
            continue
        parts = name[: -len(_TMP_SUFFIX)].rsplit(".", 2)
        if len(parts) != 3 or not parts[1].isdigit():
            continue
        if _alive(int(parts[1])) and int(parts[1]) != os.getpid():
            continue
        try:
            os.unlink(entry.path)
        except OSError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
