"""Load YAML while keeping the line and column of every node.

The result is plain Python data plus a map from a path (a tuple of keys and list indices) to the
position of the node there, so that every later error can name ``file:line:column``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from optgen.errors import Position, SpecError

Path = tuple[Any, ...]


@dataclass
class SourceMap:
    """Positions of the nodes of one YAML document, keyed by path."""

    file: str
    positions: dict[Path, Position] = field(default_factory=dict)
    #: Columns to add to reach the first character of a scalar's text (1 for quoted scalars).
    text_offsets: dict[Path, int] = field(default_factory=dict)

    def at(self, path: Path) -> Position | None:
        """The position of ``path``, or of its nearest ancestor that has one."""
        path = tuple(path)
        while True:
            if path in self.positions:
                return self.positions[path]
            if not path:
                return None
            path = path[:-1]

    def text_at(self, path: Path) -> Position | None:
        """Where the text of the scalar at ``path`` starts (inside its quotes)."""
        pos = self.at(path)
        if pos is None:
            return None
        return pos.shifted(self.text_offsets.get(tuple(path), 0))


#: Bounds on what a spec file may make the loader do (a spec is data, and may come from anyone).
MAX_DEPTH = 64  # nested mappings / sequences
MAX_NODES = 100_000  # nodes after expanding aliases (a "billion laughs" document stops here)
MAX_INT = 2**63 - 1  # integer magnitude; larger numbers are written as floats (1.0e30)

#: The only tags a spec may carry (explicit ``!!str`` resolves to these too).
_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "seq", "map")}


def _pos(file: str, mark) -> Position:
    return Position(file, mark.line + 1, mark.column + 1) if mark is not None else Position(file, 1, 1)


def _bounded_events(text: str, file: str) -> None:
    """Walk the YAML event stream once (iteratively, so it cannot recurse or expand anything) and
    refuse what would make composing it deep, huge or typed beyond plain data."""
    depth = 0
    sizes: dict[str, int] = {}  # anchor -> nodes it expands to
    open_: list[tuple[str | None, int]] = []  # (anchor, nodes so far) per open collection
    total = 0
    documents = 0
    try:
        for ev in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(ev, yaml.DocumentStartEvent):
                documents += 1
                if documents > 1:
                    raise SpecError(_pos(file, ev.start_mark), "", "a spec file holds one YAML document")
            tag = getattr(ev, "tag", None)
            if tag is not None and tag not in _TAGS:
                raise SpecError(_pos(file, ev.start_mark), "", f"YAML tag {tag!r} is not allowed in a spec")
            if isinstance(ev, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
                depth += 1
                if depth > MAX_DEPTH:
                    raise SpecError(_pos(file, ev.start_mark), "", f"nested deeper than {MAX_DEPTH} levels")
                open_.append((ev.anchor, 1))
                continue
            if isinstance(ev, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
                depth -= 1
                anchor, n = open_.pop()
                added = n
            elif isinstance(ev, yaml.ScalarEvent):
                if ev.style is None and ev.value == "<<":
                    raise SpecError(_pos(file, ev.start_mark), "", "YAML merge keys ('<<') are not supported in a spec")
                anchor, added = ev.anchor, 1
            elif isinstance(ev, yaml.AliasEvent):
                anchor, added = None, sizes.get(ev.anchor, 1)
            else:
                continue
            if anchor is not None:
                sizes[anchor] = added
            total += added
            if total > MAX_NODES:
                raise SpecError(_pos(file, ev.start_mark), "",
                                f"the document expands to more than {MAX_NODES} nodes (through aliases?)")
            if open_:
                a, n = open_[-1]
                open_[-1] = (a, n + added)
    except yaml.MarkedYAMLError as exc:
        raise SpecError(_pos(file, exc.problem_mark or exc.context_mark), "", f"invalid YAML: {exc.problem or exc}") from None
    except yaml.YAMLError as exc:  # the reader: a character YAML does not accept (NUL, ...)
        raise SpecError(_offset_position(text, file, getattr(exc, "position", 0)), "", f"invalid YAML: {_reader_reason(exc)}") from None


def _reader_reason(exc: yaml.YAMLError) -> str:
    ch = getattr(exc, "character", None)
    if ch is None:
        return str(exc).splitlines()[0]
    code = ord(ch) if isinstance(ch, str) else int(ch)
    return f"unacceptable character #x{code:04x} (control characters are not allowed)"


def _offset_position(text: str, file: str, offset: int) -> Position:
    """The 1-based line and column of character ``offset`` of ``text``."""
    offset = max(0, min(offset, len(text)))
    line = text.count("\n", 0, offset) + 1
    return Position(file, line, offset - (text.rfind("\n", 0, offset) + 1) + 1)


def load_yaml(text: str, file: str) -> tuple[Any, SourceMap]:
    """Parse one YAML document into data and a :class:`SourceMap`.

    Only plain data is accepted: strings, numbers, booleans, null, lists and mappings, within the
    bounds above; anything else is a :class:`SpecError` with a position, never a traceback.
    """
    smap = SourceMap(file)
    _bounded_events(text, file)
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        raise SpecError(_pos(file, exc.problem_mark or exc.context_mark), "", f"invalid YAML: {exc.problem or exc}") from None
    finally:
        loader.dispose()
    if node is None:
        raise SpecError(Position(file, 1, 1), "", "the spec is empty")

    def scalar(n: yaml.Node, path: Path) -> Any:
        here = smap.positions[path]
        try:
            value = yaml.SafeLoader.construct_object(loader, n)
        except (yaml.YAMLError, ValueError, OverflowError) as exc:
            raise SpecError(here, _dotted(path), f"invalid value {n.value[:40]!r}: {str(exc).splitlines()[0]}") from None
        if value is not None and not isinstance(value, (str, int, float, bool)):
            raise SpecError(here, _dotted(path),
                            f"{n.value[:40]!r} reads as a {type(value).__name__}: quote it to make it a string")
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
            raise SpecError(here, _dotted(path), "integer out of range (write large numbers as floats, e.g. 1.0e30)")
        return value

    def walk(n: yaml.Node, path: Path) -> Any:
        smap.positions[path] = Position(file, n.start_mark.line + 1, n.start_mark.column + 1)
        if isinstance(n, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for key_node, value_node in n.value:
                kpos = Position(file, key_node.start_mark.line + 1, key_node.start_mark.column + 1)
                if not isinstance(key_node, yaml.ScalarNode):
                    raise SpecError(kpos, _dotted(path), "mapping keys must be scalars")
                smap.positions[path + ("<key>",)] = kpos
                key = scalar(key_node, path + ("<key>",))
                del smap.positions[path + ("<key>",)]
                if key is None:
                    raise SpecError(kpos, _dotted(path), "mapping keys must be scalars")
                if key in out:
                    raise SpecError(kpos, _dotted(path + (key,)), f"duplicate key '{key}'")
                out[key] = walk(value_node, path + (key,))
                # A key's own position is more useful than its value's for "unknown key" errors.
                smap.positions[path + (key, "<key>")] = kpos
            return out
        if isinstance(n, yaml.SequenceNode):
            return [walk(v, path + (i,)) for i, v in enumerate(n.value)]
        if n.style in ("'", '"'):
            smap.text_offsets[path] = 1
        return scalar(n, path)

    loader = yaml.SafeLoader("")
    try:
        data = walk(node, ())
    finally:
        loader.dispose()
    return data, smap


def _dotted(path: Path) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


dotted = _dotted
