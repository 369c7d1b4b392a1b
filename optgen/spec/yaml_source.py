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


def load_yaml(text: str, file: str) -> tuple[Any, SourceMap]:
    """Parse one YAML document into data and a :class:`SourceMap`."""
    smap = SourceMap(file)
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        pos = Position(file, mark.line + 1, mark.column + 1) if mark else Position(file, 1, 1)
        raise SpecError(pos, "", f"invalid YAML: {exc.problem or exc}") from None
    finally:
        loader.dispose()
    if node is None:
        raise SpecError(Position(file, 1, 1), "", "the spec is empty")

    def walk(n: yaml.Node, path: Path) -> Any:
        smap.positions[path] = Position(file, n.start_mark.line + 1, n.start_mark.column + 1)
        if isinstance(n, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for key_node, value_node in n.value:
                key = yaml.SafeLoader.construct_object(loader, key_node)
                if not isinstance(key, (str, int, float, bool)):
                    raise SpecError(smap.positions[path], _dotted(path), "mapping keys must be scalars")
                if key in out:
                    kpos = Position(file, key_node.start_mark.line + 1, key_node.start_mark.column + 1)
                    raise SpecError(kpos, _dotted(path + (key,)), f"duplicate key '{key}'")
                out[key] = walk(value_node, path + (key,))
                # A key's own position is more useful than its value's for "unknown key" errors.
                smap.positions[path + (key, "<key>")] = Position(
                    file, key_node.start_mark.line + 1, key_node.start_mark.column + 1
                )
            return out
        if isinstance(n, yaml.SequenceNode):
            return [walk(v, path + (i,)) for i, v in enumerate(n.value)]
        if n.style in ("'", '"'):
            smap.text_offsets[path] = 1
        return yaml.SafeLoader.construct_object(loader, n)

    loader = yaml.SafeLoader("")
    data = walk(node, ())
    loader.dispose()
    return data, smap


def _dotted(path: Path) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


dotted = _dotted
