"""Errors that point at a place in a spec file."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Position:
    """A 1-based line and column in a spec file."""

    file: str
    line: int
    column: int

    def shifted(self, columns: int) -> Position:
        return Position(self.file, self.line, self.column + columns)

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


class SpecError(Exception):
    """A problem in a spec, reported as ``file:line:column: field: message``."""

    def __init__(self, position: Position | None, field: str, message: str):
        self.position = position
        self.field = field
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.position}: " if self.position else ""
        field = f"{self.field}: " if self.field else ""
        return f"{where}{field}{self.message}"


def did_you_mean(name: str, candidates) -> str:
    """A ``(did you mean 'x'?)`` suffix, or an empty string."""
    import difflib

    close = difflib.get_close_matches(name, sorted(set(candidates)), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
