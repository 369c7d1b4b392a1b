"""Names and comments of generated code, shared by the torch and triton code generators.

Generated code is meant to be read: a value is named after the IR name it holds (``exp_avg``,
``denom``), a hoisted host scalar after what it computes (``one_minus_beta1`` for ``1 - beta1``),
and each statement of the step appears as a comment above the code it becomes. Names come only
from validated IR identifiers (never from free spec text), every kernel or function gets its own
:class:`Names` so a local never shadows another (a numeric suffix on a clash), and everything is
a function of the IR alone: the runtime renders the kernels of other branch paths from the
program data and gets the same text as ``optgen build``.
"""

from __future__ import annotations

import keyword
from collections.abc import Iterable
from dataclasses import replace

from optgen.ir.nodes import Assign, Node, Program, walk_nodes, walk_stmts
from optgen.ir.pretty import expr_text, set_aliases
from optgen.pysource import Code, comment_text

#: words for the operators of a hoisted host value's descriptive name
_WORDS = {"add": "plus", "sub": "minus", "mul": "times", "div": "over", "pow": "pow"}
#: casts and copies, invisible in a name
_SILENT = {"float32", "float64", "copy"}
_NUMBERS = {0: "zero", 1: "one", 2: "two", 0.5: "half"}
#: longest descriptive name; a longer description falls back to ``k`` / ``c``
_MAX_NAME = 40


def local_base(name: str) -> str:
    """``name`` as the stem of a generated local: no leading underscores (generated modules keep
    those for their own module-level names), never empty, never a keyword."""
    base = name.lstrip("_")
    if not base or not base.isidentifier() or not base.isascii() or keyword.iskeyword(base):
        base = "v_" + base if base.isidentifier() and base.isascii() else "v"
    return base


class Names:
    """The locals of one generated function: each :meth:`new` name is distinct from every other
    and from the reserved ones (a ``_1``, ``_2``... suffix on a clash), in a deterministic order."""

    def __init__(self, reserved: Iterable[str] = ()):
        self.taken: set[str] = set(reserved)

    def new(self, hint: str) -> str:
        base = local_base(hint)
        name, i = base, 0
        while name in self.taken:
            i += 1
            name = f"{base}_{i}"
        self.taken.add(name)
        return name

    def reserve(self, names: Iterable[str]) -> None:
        self.taken.update(names)


class SourceText:
    """What the statements of one hoisted program say, for comments and names.

    Hoisting moved every host subexpression of a device statement into a temporary ``_k<n>`` (and
    every condition into ``_c<n>``); the comments put them back, so a comment reads as the spec's
    statement (``exp_avg = lerp(exp_avg, grad, 1 - beta1)``), not as ``lerp(exp_avg, grad, _k2)``.
    """

    def __init__(self, program: Program):
        set_aliases(program.hypers)  # tuple hyperparameters by their ``as:`` names (beta1, beta2)
        self.aliases = {(name, i): alias for name, h in program.hypers for i, alias in enumerate(h.as_ or ())}
        self.hoisted: dict[str, Node] = {}
        for s in walk_stmts(program.body):
            if isinstance(s, Assign) and s.value.is_host and _is_hoisted(s.target):
                self.hoisted.setdefault(s.target, s.value)
        self._host_names: dict[str, str] = {}

    # -- comments ------------------------------------------------------------------------------
    def unhoisted(self, n: Node) -> Node:
        """``n`` with each hoisted temporary replaced by its expression (and a coded state's
        decode / encode by the state and the value: what the spec wrote)."""
        if n.op == "var" and n.attr in self.hoisted:
            return self.unhoisted(self.hoisted[n.attr])
        if n.op == "decode":  # attr: (codec, state, non_neg)
            return Node("var", kind=n.kind, attr=n.attr[1])
        if n.op == "encode":
            return self.unhoisted(n.args[0])
        if n.op == "reduced":
            return Node("var", kind=n.kind, attr=n.attr)
        if not n.args:
            return n
        return replace(n, args=tuple(self.unhoisted(a) for a in n.args))

    def expr(self, n: Node) -> str:
        return expr_text(self.unhoisted(n))

    def statement(self, s: Assign) -> Code:
        """The statement as one comment line's text (escaped: see :func:`comment_text`)."""
        op = "+=" if s.role == "accumulate" else "="
        return comment_text(f"{s.target} {op} {self.expr(s.value)}")

    def condition(self, cond: Node) -> Code:
        return comment_text(f"if {self.expr(cond)}:")

    # -- names ---------------------------------------------------------------------------------
    def host_name(self, name: str) -> str:
        """The stem of a local holding host value ``name``: its own name, or for a hoisted
        temporary a description of its expression (``one_minus_beta1``, ``neg_step_size``)."""
        if name not in self._host_names:
            if name in self.hoisted:
                described = self.describe(self.hoisted[name])
                fallback = "c" if name.startswith("_c") else "k"
                self._host_names[name] = described if described and len(described) <= _MAX_NAME else fallback
            else:
                self._host_names[name] = local_base(name)
        return self._host_names[name]

    def hyper_name(self, attr: tuple) -> str:
        name, idx = attr
        if idx is None:
            return name
        return self.aliases.get((name, idx), f"{name}{idx}")

    def describe(self, n: Node, depth: int = 0) -> str | None:
        """A name for a small host expression, or None when it has no short one."""
        if depth > 4:
            return None
        op = n.op
        if op == "hyper":
            return self.hyper_name(n.attr)
        if op == "var":
            return self.host_name(n.attr)
        if op == "const":
            v = n.attr
            return _NUMBERS.get(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
        if op in ("step", "meta"):
            return "step" if op == "step" else str(n.attr)
        parts = [self.describe(a, depth + 1) for a in n.args]
        if any(p is None for p in parts):
            return None
        if op in _WORDS and len(parts) == 2:
            return f"{parts[0]}_{_WORDS[op]}_{parts[1]}"
        if op in _SILENT and len(parts) == 1:
            return parts[0]
        if op == "neg":
            return f"neg_{parts[0]}"
        if op == "not":
            return f"not_{parts[0]}"
        if len(parts) == 1 and op.isidentifier():
            return f"{op}_{parts[0]}"
        return None


def _is_hoisted(name: str) -> bool:
    """A temporary made by :mod:`optgen.ir.hoist` (``_k<n>``, ``_c<n>``)."""
    return len(name) > 2 and name[:2] in ("_k", "_c") and name[2:].isdigit()


def reads_of(n: Node) -> set[str]:
    """The IR names an expression reads."""
    return {x.attr for x in walk_nodes(n) if x.op == "var"}
