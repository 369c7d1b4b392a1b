"""The package's imports follow the pipeline: no module imports one of a later stage, and no two
modules import each other (directly or round a loop).

Every ``import`` / ``from ... import`` statement counts, at module level, inside functions and under
``if TYPE_CHECKING:`` alike, and so does ``importlib.import_module("literal")``: an import hidden in
a function is still a dependency. Importing ``a.b.c`` runs ``a/__init__.py`` and ``a/b/__init__.py``
first, so it is also an edge to those packages (except the importer's own packages, which are
initialised before it).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "optgen"

#: Layers in pipeline order; a module may import its own layer or an earlier one. The most
#: specific prefix decides a module's layer.
LAYERS: tuple[tuple[str, ...], ...] = (
    # no optgen dependencies: errors, file writing, Python-source quoting, the quantisers' maths
    ("optgen", "optgen.errors", "optgen.files", "optgen.pysource", "optgen.quant"),
    ("optgen.spec",),
    # optgen.quant.registry defines the block-quantised formats as IR codecs (subclasses of
    # optgen.ir.codec_base.Codec) that optgen.ir.codecs lists beside its own
    ("optgen.ir", "optgen.quant.registry"),
    # the torch meaning of IR values that the backends and the runtime share (host evaluation,
    # matrix views, Newton-Schulz, stochastic rounding)
    ("optgen.numerics",),
    ("optgen.features",),
    ("optgen.pipeline",),
    ("optgen.backends",),
    ("optgen.render",),  # Jinja: generated modules, and the kernel modules the runtime renders per path
    ("optgen.runtime",),
    ("optgen.bench", "optgen.smoke", "optgen.authoring", "optgen.cli"),
)

#: (importer, imported) pairs exempt from both checks, each with the reason it cannot be avoided.
ALLOWED: dict[tuple[str, str], str] = {}


def _modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = list(p.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = p
    return out


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The dotted names one statement (or ``importlib.import_module`` call) imports."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            pkg = module.split(".") if is_package else module.split(".")[:-1]
            pkg = pkg[:len(pkg) - node.level + 1]
            base = ".".join(pkg + ([node.module] if node.module else []))
        # ``from pkg import sub`` imports the submodule ``pkg.sub`` where one exists
        return [f"{base}.{a.name}" for a in node.names] + [base]
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
            and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
        return [node.args[0].value]
    return []


def import_graph() -> dict[str, dict[str, int]]:
    """importer -> {imported module: first line}, over the modules of ``optgen``."""
    mods = _modules()
    graph: dict[str, dict[str, int]] = {m: {} for m in mods}
    for m, path in mods.items():
        own = {".".join(m.split(".")[:i]) for i in range(1, m.count(".") + 2)}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = _imported(node, m, path.name == "__init__.py")
            if isinstance(node, ast.ImportFrom):  # the submodules named, else the module itself
                subs = [n for n in names[:-1] if n in mods]
                names = subs + ([names[-1]] if len(subs) < len(names) - 1 else [])
            for name in names:
                while name and name not in mods:
                    name = name.rpartition(".")[0]
                if not name:
                    continue  # not a module of optgen
                if name != m:
                    graph[m].setdefault(name, node.lineno)
                parts = name.split(".")
                for pkg in [".".join(parts[:i]) for i in range(1, len(parts))]:  # run first, implicitly
                    if pkg not in own and pkg in mods:
                        graph[m].setdefault(pkg, node.lineno)
    return graph


def layer_of(module: str) -> int:
    best, found = -1, -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, found = len(p), i
    assert found >= 0, f"{module} is in no layer of LAYERS: add it where it belongs in the pipeline"
    return found


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def _allowed_graph() -> dict[str, dict[str, int]]:
    graph = import_graph()
    return {a: {b: ln for b, ln in bs.items() if (a, b) not in ALLOWED} for a, bs in graph.items()}


def test_no_import_cycles() -> None:
    graph = _allowed_graph()
    found = []
    for comp in _cycles(graph):
        inside = set(comp)
        found.append("\n".join(f"  {a} -> {b} (line {graph[a][b]})" for a in comp for b in graph[a] if b in inside))
    assert not found, "import cycles:\n" + "\n\n".join(found)


def test_imports_follow_the_pipeline() -> None:
    wrong = [f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)}) at line {ln}"
             for a, bs in sorted(_allowed_graph().items()) for b, ln in sorted(bs.items()) if layer_of(b) > layer_of(a)]
    assert not wrong, "imports against the pipeline order (LAYERS):\n" + "\n".join(wrong)


def test_allow_list_is_used() -> None:
    graph = import_graph()
    stale = [pair for pair in ALLOWED if pair[1] not in graph.get(pair[0], {})]
    assert not stale, f"ALLOWED names imports that no longer exist: {stale}"


def test_the_analyser_sees_hidden_imports(tmp_path: Path) -> None:
    """The analyser itself: function-level, TYPE_CHECKING, relative and importlib imports are edges,
    and a loop through them is a cycle."""
    src = ast.parse(
        "import importlib\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from optgen.ir.nodes import Node\n"
        "def f():\n    from . import lower\n    importlib.import_module('optgen.spec.loader')\n"
    )
    names = [n for node in ast.walk(src) for n in _imported(node, "optgen.ir.reductions", False)]
    assert "optgen.ir.nodes.Node" in names and "optgen.ir.lower" in names and "optgen.spec.loader" in names
    assert _cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b": 1}, "b": {}}) == []
