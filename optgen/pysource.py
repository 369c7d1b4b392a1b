"""Python source text from spec values: what a spec's strings become where they land in a
generated module (a docstring, a comment, a literal), and the Jinja environment that refuses
anything else.

A spec is data that anyone may write, so none of its text is ever pasted into generated code as it
stands: a template may only output :class:`Code`, which the functions below make (or a code
generator makes from validated identifiers and IR nodes). Any other value reaching ``{{ }}`` is a
build error.
"""

from __future__ import annotations

import ast
import keyword
import math
import pprint
from typing import Any

import jinja2


class Code(str):
    """Text that is already Python source for the place it is rendered into."""


def _escape_char(c: str) -> str:
    o = ord(c)
    if o < 0x100:
        return f"\\x{o:02x}"
    if o < 0x10000:
        return f"\\u{o:04x}"
    return f"\\U{o:08x}"


def docstring_text(text: str, multiline: bool = False) -> Code:
    """``text`` for the inside of a ``\"\"\"...\"\"\"`` docstring: backslashes and every quote that
    could close it are escaped, as is every character Python would not keep as it is (NUL, CR,
    line and paragraph separators...). Newlines stay only with ``multiline``; otherwise they become
    spaces. The docstring's value is ``text`` again (up to the whitespace the renderer trims)."""
    out = []
    for i, c in enumerate(text):
        if c == "\\":
            out.append("\\\\")
        elif c == '"' and (i + 1 == len(text) or text[i + 1] == '"'):
            out.append('\\"')  # no two quotes in a row survive, nor one just before the closing quotes
        elif c == "\n":
            out.append("\n" if multiline else " ")
        elif c.isprintable():
            out.append(c)
        else:
            out.append(_escape_char(c))
    return Code("".join(out))


def comment_text(text: str) -> Code:
    """``text`` for one ``#`` comment line: every character that is not printable (newlines, CR,
    NUL, separators) is written as its escape, so the comment cannot end early."""
    return Code("".join(c if c.isprintable() else _escape_char(c) for c in text))


def identifier(name: str) -> Code:
    """A validated Python identifier (spec names are checked at load; this is the last guard)."""
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name) or not name.isascii():
        raise ValueError(f"{name!r} is not a Python identifier")
    return Code(name)


#: Names a data literal may use besides literals: the non-finite floats, imported from math.
NON_FINITE = ("inf", "nan")


def literal(value: Any) -> Code:
    """A Python literal of a spec value (None, bool, int, float, str and lists/tuples/dicts of them).
    Non-finite floats are written ``inf`` / ``nan`` (the module imports them: :func:`math_imports`)."""
    return data_literal(value, width=10_000)


def data_literal(value: Any, width: int = 108) -> Code:
    """:func:`pprint.pformat` of plain data, checked to be a literal: it must parse as one
    expression of literals, with only :data:`NON_FINITE` as names."""
    text = pprint.pformat(_plain(value), width=width, sort_dicts=True, indent=1)
    tree = ast.parse(text, mode="eval")
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in NON_FINITE:
            continue
        if not isinstance(node, (ast.Expression, ast.Constant, ast.List, ast.Tuple, ast.Dict, ast.UnaryOp,
                                 ast.USub, ast.Load)):
            raise TypeError(f"not plain data: {ast.dump(node)[:80]}")
    return Code(text)


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else _NonFinite(value)
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    raise TypeError(f"{type(value).__name__} is not plain data")


class _NonFinite(float):
    def __repr__(self) -> str:
        return "nan" if math.isnan(self) else ("inf" if self > 0 else "-inf")


def math_imports(*literals: str) -> list[str]:
    """The non-finite names (:data:`NON_FINITE`) that the rendered literals use, for
    ``from math import ...``."""
    used = set()
    for text in literals:
        used |= {n.id for n in ast.walk(ast.parse(text, mode="eval")) if isinstance(n, ast.Name)}
    return sorted(used & set(NON_FINITE))


def _finalize(value: Any) -> Any:
    if isinstance(value, Code):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise jinja2.TemplateError(
        f"unescaped {type(value).__name__} {str(value)[:60]!r} reached a template: render it through "
        "optgen.pysource (docstring_text, comment_text, literal, identifier) or mark generated code as Code"
    )


def environment(loader: jinja2.BaseLoader) -> jinja2.Environment:
    """The Jinja environment of generated modules: every ``{{ }}`` must be :class:`Code` (or an
    int); anything else is a build error, never a silent paste."""
    return jinja2.Environment(
        loader=loader,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        finalize=_finalize,
    )
