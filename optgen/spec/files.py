"""Reading a spec file (or a block) safely: never blocking on a FIFO, never reading a device or a
folder, bounded in size, UTF-8 checked with the position of a bad byte. Shared by the loader and
the block composition, below both."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from optgen.errors import Position, SpecError

#: Largest spec or block file read.
MAX_SPEC_BYTES = 1 << 20


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)



def read_spec_text(path: Path, shown: str, pos: Position | None = None, field_name: str = "") -> str:
    """The UTF-8 text of the regular file at ``path``: never blocks (a FIFO), never reads a device
    or a folder, and stops at :data:`MAX_SPEC_BYTES`."""
    where = (pos, field_name) if pos is not None else (None, "")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise SpecError(*where, f"{shown}: no such spec file") from None
    except IsADirectoryError:
        raise SpecError(*where, f"{shown}: is a directory, not a spec file") from None
    except (OSError, ValueError) as exc:  # permissions, a name too long, a NUL in the name
        raise SpecError(*where, f"{shown}: cannot open: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise SpecError(*where, f"{shown}: is a directory, not a spec file")
        if not stat.S_ISREG(st.st_mode):
            raise SpecError(*where, f"{shown}: not a regular file")
        with os.fdopen(fd, "rb") as f:
            fd = -1
            raw = f.read(MAX_SPEC_BYTES + 1)
    except OSError as exc:
        raise SpecError(*where, f"{shown}: cannot read: {exc.strerror or exc}") from None
    finally:
        if fd >= 0:
            os.close(fd)
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError(Position(shown, 1, 1), "", f"the spec file is larger than {MAX_SPEC_BYTES} bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        col = len(raw[raw.rfind(b"\n", 0, exc.start) + 1: exc.start].decode("utf-8", "replace")) + 1
        raise SpecError(Position(shown, line, col), "", f"not UTF-8 text: byte 0x{raw[exc.start]:02x} cannot be decoded") from None
