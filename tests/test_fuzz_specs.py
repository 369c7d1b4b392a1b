"""Fuzzing the loader and `optgen check` with hypothesis, for a bounded number of examples.

Two properties, whatever a spec file holds:
- the loader returns a spec or raises :class:`SpecError` (a position and a message): never another
  exception, never a hang;
- a spec that the whole check pipeline accepts (load, lower, plan, render, import, step with its
  defaults) renders modules that are valid Python and run none of the spec's text.

The budget is ``OPTGEN_FUZZ_EXAMPLES`` examples per property (default 150; CI runs the default,
about 40 s on 2 cores). Set it higher to fuzz for longer locally.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from optgen.errors import SpecError
from optgen.render import compile_spec
from optgen.smoke import smoke_step
from optgen.spec.loader import load_spec

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = int(os.environ.get("OPTGEN_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

#: Small specs the mutations start from (the whole pipeline runs on each example).
BASES = ["sgd", "adam", "adamw", "rmsprop", "lion_adv", "signsgd_adv"]

#: Values an attacker (or a typo) puts where a spec expects something else.
HOSTILE = [
    'm""" ; open("CANARY", "w") ; """', "'; import os #", "x\ny", "a\rb", "C:\\Users\\me", "\x00", "\u2028",
    "_k0", "_c1", "self", "params", "backend", "torch", "F", "super", "state", "lr", "grad", "param",
    "float32 if open('CANARY', 'w') else 0", "10**10**10", "m" + "+m" * 300, "../outside/evil", "/etc/passwd",
    "sgd_triton", "import", "a" * 300, "", " ", "lerp(m, grad)", "sqrt(-1)", "where(lr > 0, 1.2, 0.5)",
    None, True, False, 0, -1, 1, 2**63, 10**30, 1e308, float("nan"), float("inf"), -float("inf"), 0.5,
    [], {}, [1, 2], {"a": 1}, ["x = 1"], [{"if": "lr > 0", "then": ["x = 1"]}],
]

DOMAIN_WORDS = ["float", "int", "bool", "any", "dtype", "element", "row", "col", "matrix", "tensor", "host",
                "zeros", "ones", "absent", "param", "tensor", "none", "float64", "eager", "lazy"]


def _paths(data: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(data, dict):
        for k, v in data.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            out += _paths(v, prefix + (i,))
    return out


def _get(data: Any, path: tuple) -> Any:
    for p in path:
        data = data[p]
    return data


@st.composite
def mutated_spec(draw) -> str:
    base = draw(st.sampled_from(BASES))
    data = yaml.safe_load((ROOT / "specs" / f"{base}.yaml").read_text())
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(data)
        path = draw(st.sampled_from(paths[1:]))
        parent, key = _get(data, path[:-1]), path[-1]
        kind = draw(st.sampled_from(["replace", "delete", "duplicate", "rename"]))
        value = draw(st.one_of(st.sampled_from(HOSTILE), st.sampled_from(DOMAIN_WORDS),
                               st.text(max_size=30), st.floats(allow_nan=True), st.integers(-10**6, 10**6)))
        if kind == "replace":
            parent[key] = value
        elif kind == "delete":
            del parent[key]
        elif kind == "duplicate" and isinstance(parent, list):
            parent.insert(key, parent[key])
        elif kind == "rename" and isinstance(parent, dict) and isinstance(value, str):
            parent[value] = parent.pop(key)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=False)


@FUZZ
@given(text=mutated_spec())
def test_check_pipeline_on_mutated_specs(tmp_path_factory, text: str) -> None:
    folder = tmp_path_factory.mktemp("fuzz")
    for base in BASES:  # extends: between the bases resolves inside this folder
        (folder / f"{base}.yaml").write_text((ROOT / "specs" / f"{base}.yaml").read_text())
    if not (folder / "blocks").exists():  # the blocks the bases include
        shutil.copytree(ROOT / "specs" / "blocks", folder / "blocks")
    path = folder / "mutant.yaml"
    path.write_text(text, encoding="utf-8")
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        try:
            built = compile_spec(path)
        except SpecError:
            return
        compile(built.text, "mutant.py", "exec")
        compile(built.triton_text, "mutant_triton.py", "exec")
        try:
            smoke_step(built, built.spec)
        except SpecError:
            pass
        assert not (folder / "CANARY").exists()
    finally:
        os.chdir(cwd)


_yaml_text = st.one_of(
    st.text(max_size=400),
    st.lists(st.sampled_from(["name: d\n", "class: D\n", "update:\n", "  - param = param\n", "- ", ": ", "&a ", "*a ",
                              "!!python/name:os.system ", "<<: ", "[", "]", "{", "}", "\t", "\x00", "\ufeff", "---\n",
                              "? ", "|\n", ">\n", "'", '"', "\\", "%YAML 1.1\n", "!x ", "extends: ", "../", "9" * 50,
                              "hyperparameters:\n  lr: {default: ", "state:\n  m: {kind: ", "\n"]), max_size=40)
    .map("".join),
)


@FUZZ
@given(text=_yaml_text, raw=st.binary(max_size=64))
def test_loader_returns_a_spec_or_a_spec_error(tmp_path_factory, text: str, raw: bytes) -> None:
    folder = tmp_path_factory.mktemp("load")
    for name, content in (("t.yaml", text.encode("utf-8", "surrogatepass")), ("b.yaml", raw),
                          ("tb.yaml", text.encode("utf-8", "surrogatepass") + raw)):
        path = folder / name
        path.write_bytes(content)
        try:
            load_spec(path)
        except SpecError as exc:
            assert exc.message  # a message, and a position whenever the file could be read
