"""Hostile specs: a spec file is data that anyone may write, so building and importing one must be
as safe as reading a data file. Each attack class of the security review is pinned here: strings
that would become code, names that would collide, inputs that made the loader traceback or hang,
`check` accepting what `build` rejects, file modes and leftovers, and the kernel cache.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jinja2
import pytest
import torch

from optgen.errors import SpecError
from optgen.pysource import Code, comment_text, docstring_text, environment
from optgen.render import compile_spec
from optgen.smoke import import_built, smoke_step
from optgen.spec.loader import load_spec
from optgen.spec.model import RESERVED_HYPERPARAMETERS
from tests.test_bad_specs import BASE  # the small spec every case mutates

ROOT = Path(__file__).resolve().parent.parent

PAYLOAD = 'm""" ; open("CANARY", "w") ; """'


def _write(tmp_path: Path, text: str | bytes, name: str = "demo.yaml") -> Path:
    p = tmp_path / name
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text, encoding="utf-8")
    return p


def _cli(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "optgen.cli", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=timeout)


def _hyper(doc_yaml: str) -> str:
    """BASE with one more hyperparameter, written as YAML flow text."""
    return BASE.replace("state:", f"  x: {doc_yaml}\nstate:")


# --- 1. No spec string is ever executable -------------------------------------------------------

# (name, spec text, the text that must come back from the module as data)
INJECTIONS = [
    ("doc closes the docstring", BASE.replace("min: 0}", "min: 0, doc: 'm\"\"\" ; open(\"CANARY\", \"w\") ; \"\"\"'}"), PAYLOAD),
    ("string default of type any", _hyper("{default: 'm\"\"\" ; open(\"CANARY\", \"w\") ; \"\"\"', type: any}"), PAYLOAD),
    ("spec doc", BASE.replace("class: Demo", "class: Demo\ndoc: 'a\"\"\" ; open(\"CANARY\", \"w\") ; \"\"\"b'"), None),
    ("matches.class", BASE.replace("class: Demo", "class: Demo\nmatches: {package: 'a==1', class: 'x\"\"\" ; open(\"CANARY\", \"w\") #'}"), None),
    ("matches.package", BASE.replace("class: Demo", "class: Demo\nmatches: {package: 'a==1\"\"\"; open(\"CANARY\", \"w\") #', class: x}"), None),
    ("backslashes", BASE.replace("min: 0}", "min: 0, doc: 'C:\\Users\\me\\'}"), "C:\\Users\\me\\"),
    ("NUL in a doc", BASE.replace("min: 0}", 'min: 0, doc: "a\\0b"}'), "a\x00b"),
    ("trailing quote", BASE.replace("min: 0}", "min: 0, doc: 'ends with \"'}"), 'ends with "'),
    ("line separators", BASE.replace("min: 0}", 'min: 0, doc: "a\\u2028b\\x85c\\rd"}'), "a\u2028b\x85c\rd"),
    ("escape-looking text", BASE.replace("min: 0}", "min: 0, doc: '\\N{BULLET} \\x41 \\u0041 {x} %s'}"), "\\N{BULLET} \\x41 \\u0041 {x} %s"),
    ("nan default", _hyper("{default: .nan}"), None),
    ("inf defaults", _hyper("{default: .inf}").replace("state:", "  y: {default: -.inf}\nstate:"), None),
    ("string default with a newline", _hyper('{default: "a\\n\\"\\"\\"\\nb", type: any}'), 'a\n"""\nb'),
]


@pytest.mark.parametrize("text,echo", [c[1:] for c in INJECTIONS], ids=[c[0] for c in INJECTIONS])
def test_spec_strings_never_run(tmp_path, monkeypatch, text: str, echo: str | None) -> None:
    monkeypatch.chdir(tmp_path)
    built = compile_spec(_write(tmp_path, text))
    compile(built.text, "demo.py", "exec")  # both modules are valid Python
    compile(built.triton_text, "demo_triton.py", "exec")
    module = import_built(built, "demo")
    assert not (tmp_path / "CANARY").exists()
    cls = module.Demo
    if echo is not None:  # the string comes back as data, unchanged, through the module
        hypers = dict(cls._program.hypers)
        assert echo in (hypers.get("x") and hypers["x"].default, hypers["lr"].doc)
        assert echo in cls.__doc__ or repr(echo) in cls.__doc__  # and as text in its docstring
    smoke_step(built, built.spec)


def test_statement_comments_stay_comments(tmp_path, monkeypatch) -> None:
    """Each statement's text is a comment above its code, in the torch step and in the triton
    kernels: text that would end the comment (newlines, CR, line separators) is escaped, so it
    can neither run nor change the code around it."""
    import optgen.backends.naming as naming

    hostile = 'x\nopen("CANARY", "w")\r\u2028# \x00"""'
    monkeypatch.setattr(naming, "expr_text", lambda n, parent=0: hostile)
    monkeypatch.chdir(tmp_path)
    built = compile_spec(_write(tmp_path, BASE))
    escaped = comment_text(hostile)
    for text in (built.text, built.triton_text):
        compile(text, "m.py", "exec")
        hits = [line for line in text.splitlines() if "CANARY" in line]
        assert hits and all(line.lstrip().startswith("# ") and line.endswith(escaped) for line in hits)
    import_built(built, "demo")
    smoke_step(built, built.spec)
    assert not (tmp_path / "CANARY").exists()


def test_nan_and_inf_defaults_import_as_floats(tmp_path) -> None:
    built = compile_spec(_write(tmp_path, _hyper("{default: .nan}").replace("state:", "  y: {default: -.inf}\nstate:")))
    module = import_built(built, "demo")
    import inspect

    sig = inspect.signature(module.Demo.__init__)
    assert sig.parameters["x"].default != sig.parameters["x"].default  # nan
    assert sig.parameters["y"].default == float("-inf")


def test_dtype_default_is_a_torch_dtype_name(tmp_path) -> None:
    text = _hyper("{default: 'float32 if open(\"CANARY\", \"w\") else 0', type: dtype}")
    with pytest.raises(SpecError, match=r"demo.yaml:6:6: hyperparameters.x: default 'float32 if open.* is not a "
                                        r"torch dtype name \(one of bfloat16, "):
        load_spec(_write(tmp_path, text))
    ok = compile_spec(_write(tmp_path, _hyper("{default: bfloat16, type: dtype}")))
    assert "x=torch.bfloat16," in ok.text


@pytest.mark.parametrize("file_name", ["evil\nimport os.yaml", "evil\rimport os.yaml", "a\u2028b.yaml", "q\"\"\"'.yaml"])
def test_file_name_is_escaped_in_comments(tmp_path, monkeypatch, file_name: str) -> None:
    monkeypatch.chdir(tmp_path)
    built = compile_spec(_write(tmp_path, BASE, file_name))
    first = built.text.splitlines()[0]
    assert first.startswith("# Generated by optgen") and "demo" not in built.text.splitlines()[1][:1]
    for text in (built.text, built.triton_text):
        compile(text, "m.py", "exec")
        assert all(line.startswith("#") for line in text.splitlines()[:2])
    assert import_built(built, "demo").Demo._program.source == file_name


def test_templates_refuse_unescaped_strings() -> None:
    env = environment(jinja2.DictLoader({"t": "x = {{ value }}"}))
    with pytest.raises(jinja2.TemplateError, match="unescaped str 'a' reached a template"):
        env.get_template("t").render(value="a")
    with pytest.raises(jinja2.TemplateError, match="unescaped float"):
        env.get_template("t").render(value=1.5)
    assert env.get_template("t").render(value=Code("1")) == "x = 1"


def test_escapers() -> None:
    assert comment_text("a\nb\rc\x00d\u2028") == "a\\x0ab\\x0dc\\x00d\\u2028"
    for text in ['"', '""', '"""', 'x"', '\\', '\\"""', "a\x00b", "\ud800", "tab\there"]:
        src = f'"""{docstring_text(text)}"""'
        assert eval(compile(src, "d", "eval")) == text  # noqa: S307 - our own escaped literal


# --- 2. Names cannot collide ---------------------------------------------------------------------

NAME_CASES = [
    ("temporary _k0", BASE.replace("- param = param - lr * m", "- _k0 = -9.1\n  - param = param * 0 + _k0"),
     "demo.yaml:10:5: update[1]: '_k0': names starting with '_' are reserved for optgen"),
    ("read of _c0", BASE.replace("lr * m", "lr * m * _c0"), "demo.yaml:10:30: update[1]: '_c0': names starting with '_'"),
    ("state _x", BASE.replace("m: {kind: element}", "m: {kind: element}\n  _x: {kind: element}"),
     "state: name '_x': names starting with '_' are reserved for optgen"),
    ("class keyword", BASE.replace("class: Demo", "class: def"), "demo.yaml:2:8: class: class name 'def' is not a valid identifier"),
    ("class torch", BASE.replace("class: Demo", "class: torch"), "class: class name 'torch' is a name the generated module uses"),
    ("class too long", BASE.replace("class: Demo", "class: D" + "x" * 120), "is longer than 100 characters"),
    ("name keyword", BASE.replace("name: demo", "name: import"), "name: name 'import' is a Python keyword"),
    ("name _triton", BASE.replace("name: demo", "name: sgd_triton"),
     "demo.yaml:1:7: name: name 'sgd_triton': the suffix '_triton' names the kernel module of spec 'sgd'"),
    ("name _ir", BASE.replace("name: demo", "name: sgd_ir"),
     "demo.yaml:1:7: name: name 'sgd_ir': the suffix '_ir' names the program-data module of spec 'sgd'"),
    ("name too long", BASE.replace("name: demo", "name: d" + "x" * 300), "is longer than 100 characters"),
    ("as name _", BASE.replace("as: [beta1, beta2]", "as: [_b1, beta2]"), "name '_b1': names starting with '_'"),
]
NAME_CASES += [
    (f"hyperparameter {n}", _hyper("{default: 1.0}").replace("  x: ", f"  {n}: "),
     f"hyperparameters: '{n}' is reserved: the generated optimizer uses this name")
    for n in ("self", "params", "backend", "super", "F", "torch", "defaults", "param_groups", "zero_grad", "state_dict")
]


@pytest.mark.parametrize("text,expected", [c[1:] for c in NAME_CASES], ids=[c[0] for c in NAME_CASES])
def test_names_cannot_collide(tmp_path, text: str, expected: str) -> None:
    with pytest.raises(SpecError) as info:
        compile_spec(_write(tmp_path, text))
    assert expected in str(info.value)


def test_reserved_hyperparameters_cover_the_optimizer() -> None:
    from optgen.runtime.base import GeneratedOptimizer

    public = {n for n in dir(torch.optim.Optimizer) if not n.startswith("_")}
    assert public <= RESERVED_HYPERPARAMETERS, public - RESERVED_HYPERPARAMETERS
    import inspect

    init = inspect.signature(GeneratedOptimizer.__init__).parameters
    assert set(init) - {"hyperparameters"} <= RESERVED_HYPERPARAMETERS


def test_two_specs_of_one_name_in_one_build(tmp_path) -> None:
    a = _write(tmp_path, BASE, "a.yaml")
    b = _write(tmp_path, BASE.replace("lr * m", "lr * 2 * m"), "b.yaml")
    out = tmp_path / "out"
    r = _cli("build", str(a), str(b), "--out", str(out))
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().endswith(f"b.yaml:1:7: name: 'demo' is also the name of {a}: two specs would write "
                                     "generated/demo.py") or "is also the name of" in r.stderr
    assert "Traceback" not in r.stderr and not out.exists()


# --- 3. The loader never tracebacks or hangs -----------------------------------------------------

def _alias_bomb(levels: int = 9, width: int = 9) -> str:
    lines = ["name: demo", "class: Demo", "x0: &a0 [lol]"]
    for i in range(1, levels + 1):
        lines.append(f"x{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
    return "\n".join(lines) + "\n" + BASE.split("class: Demo\n")[1]


LOADER_CASES = [
    ("invalid UTF-8", BASE.encode().replace(b"class: Demo", b"class: D\xffmo"), "demo.yaml:2:9: not UTF-8 text: byte 0xff"),
    ("merge key", BASE.replace("state:", "defaults: &d {default: 1.0}\nstate:").replace(
        "  betas:", "  x: {<<: *d}\n  betas:"), "YAML merge keys ('<<') are not supported in a spec"),
    ("python tag", BASE.replace("class: Demo", "class: !!python/object/apply:os.system [echo]"),
     "demo.yaml:2:8: YAML tag 'tag:yaml.org,2002:python/object/apply:os.system' is not allowed in a spec"),
    ("unknown tag", BASE.replace("class: Demo", "class: !foo Demo"), "demo.yaml:2:8: YAML tag '!foo' is not allowed"),
    ("3000-deep nesting", BASE + "x: " + "[" * 3000 + "]" * 3000 + "\n", "nested deeper than 64 levels"),
    ("5000-digit integer", _hyper("{default: " + "9" * 5000 + "}"), "hyperparameters.x.default: invalid value"),
    ("21-digit integer", _hyper("{default: " + "9" * 21 + "}"), "integer out of range (write large numbers as floats"),
    ("5000-digit integer in an expression", BASE.replace("lr * m", "lr * m * " + "9" * 5000),
     "update[1]: expression longer than 2000 characters"),
    ("integer too large in an expression", BASE.replace("lr * m", "lr * m * 1" + "0" * 400), "update[1]: number out of range"),
    ("600-term expression", BASE.replace("lr * m", "+".join(["m"] * 600)), "update[1]: expression nested deeper than 64 levels"),
    ("10**10**10", BASE.replace("lr * m", "lr * m * 10**10**10"),
     "demo.yaml:10:30: update[1]: constant expression 10 ** 10 ** 10 is out of range"),
    ("NUL in the file", BASE.replace("class: Demo", "class: De\0mo"), "demo.yaml:2:10: invalid YAML: unacceptable character #x0000"),
    ("NUL in extends", BASE.replace("class: Demo", 'class: Demo\nextends: "a\\0b"'), "extends: 'a\\x00b' is not a spec name"),
    ("300-character extends", BASE.replace("class: Demo", "class: Demo\nextends: " + "a" * 300), "is not a spec name"),
    ("extends a path", BASE.replace("class: Demo", "class: Demo\nextends: ../outside/evil"),
     "demo.yaml:3:10: extends: '../outside/evil' is not a spec name: extends names a spec of the same folder"),
    ("extends an absolute path", BASE.replace("class: Demo", "class: Demo\nextends: /etc/evil"), "'/etc/evil' is not a spec name"),
    ("alias bomb", _alias_bomb(), "the document expands to more than 100000 nodes (through aliases?)"),
    ("a date", _hyper("{default: 2026-12-01}"), "'2026-12-01' reads as a date: quote it to make it a string"),
    ("two documents", BASE + "---\nname: other\n", "a spec file holds one YAML document"),
    ("empty", "", "the spec is empty"),
    ("list key", BASE.replace("class: Demo", "class: Demo\n? [a, b]\n: 1"), "mapping keys must be scalars"),
]


@pytest.mark.parametrize("text,expected", [c[1:] for c in LOADER_CASES], ids=[c[0] for c in LOADER_CASES])
def test_loader_errors_cleanly(tmp_path, text, expected: str) -> None:
    path = _write(tmp_path, text)
    start = time.perf_counter()
    with pytest.raises(SpecError) as info:
        compile_spec(path)
    assert expected in str(info.value)
    assert time.perf_counter() - start < 10  # bounded: the alias bomb used to hang


def test_cli_check_prints_one_line(tmp_path) -> None:
    for name, text, expected in LOADER_CASES[:4] + NAME_CASES[:1]:
        r = _cli("check", str(_write(tmp_path, text)))
        assert r.returncode == 2 and "Traceback" not in r.stderr, (name, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and expected in r.stderr, (name, r.stderr)


def test_directory_argument(tmp_path) -> None:
    with pytest.raises(SpecError, match="is a directory, not a spec file"):
        load_spec(tmp_path)
    r = _cli("check", str(tmp_path))
    assert r.returncode == 2 and "is a directory, not a spec file" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifo_never_blocks(tmp_path) -> None:
    os.mkfifo(tmp_path / "parent.yaml")
    os.mkfifo(tmp_path / "fifo.yaml")
    child = _write(tmp_path, BASE.replace("class: Demo", "class: Demo\nextends: parent"))
    r = _cli("check", str(tmp_path / "fifo.yaml"), str(child), timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "fifo.yaml: not a regular file" in r.stderr
    assert "demo.yaml:3:10: extends: " in r.stderr and "parent.yaml: not a regular file" in r.stderr


def test_deep_extends_chain(tmp_path) -> None:
    for i in range(972):
        parent = f"extends: s{i + 1}\n" if i < 971 else ""
        _write(tmp_path, f"name: s{i}\n{parent}", f"s{i}.yaml")
    _write(tmp_path, BASE.replace("name: demo", "name: s972"), "s972.yaml")
    with pytest.raises(SpecError, match="extends: extends chain deeper than 32 specs"):
        load_spec(tmp_path / "s0.yaml")


def test_extends_link_outside_the_folder(tmp_path) -> None:
    (tmp_path / "outside").mkdir()
    (tmp_path / "specs").mkdir()
    _write(tmp_path / "outside", BASE, "evil.yaml")
    (tmp_path / "specs" / "evil.yaml").symlink_to(tmp_path / "outside" / "evil.yaml")
    child = _write(tmp_path / "specs", "name: child\nclass: Child\nextends: evil\n", "child.yaml")
    with pytest.raises(SpecError, match="extends: spec 'evil' is a link to a file outside the spec folder"):
        load_spec(child)


def test_large_exponent_is_bounded_at_build_time(tmp_path) -> None:
    # a non-constant exponent is a float power at run time: it cannot hang either
    built = compile_spec(_write(tmp_path, BASE.replace("lr * m", "lr * m * 2 ** (lr * 10)")))
    smoke_step(built, built.spec)


# --- 4. check and build agree --------------------------------------------------------------------

def test_prodigy_steps_variant_checks_builds_and_steps(tmp_path) -> None:
    for f in ("prodigy_adv.yaml",):
        (tmp_path / f).write_text((ROOT / "specs" / f).read_text())
    shutil.copytree(ROOT / "specs" / "blocks", tmp_path / "blocks")  # the blocks it includes
    variant = _write(tmp_path, "name: my_prodigy\nclass: MyProdigy\nextends: prodigy_adv\nhyperparameters:\n"
                               "  prodigy_steps: {default: 5}\n", "my_prodigy.yaml")
    r = _cli("check", str(variant))
    assert r.returncode == 0, r.stderr
    built = compile_spec(variant)
    module = import_built(built, "my_prodigy")
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = module.MyProdigy([p])
    for _ in range(7):
        p.grad = torch.randn(4, 3)
        opt.step()
    assert opt.param_groups[0]["k"] == 7
    assert "s" not in opt.state[p]  # prodigy_steps reached: the statistics are freed, as adv_optm does


def test_check_rejects_what_fails_to_step(tmp_path) -> None:
    # a constructor check that the defaults violate: build would write a class no one can construct
    text = BASE.replace("state:", "checks:\n  - {check: lr > 1, message: lr must exceed 1}\nstate:")
    r = _cli("check", str(_write(tmp_path, text)))
    assert r.returncode == 2
    assert "demo.yaml:11:3: update: the optimizer fails to step with its defaults on the torch backend: " \
           "ValueError: lr must exceed 1" in r.stderr


# --- 5. Files ------------------------------------------------------------------------------------

def test_build_keeps_the_umask(tmp_path) -> None:
    spec = _write(tmp_path, BASE)
    for umask, mode in ((0o022, 0o644), (0o077, 0o600), (0o002, 0o664)):
        out = tmp_path / f"out{umask:o}"
        code = f"import os, sys; os.umask({umask}); sys.argv = ['optgen', 'build', {str(spec)!r}, '--out', {str(out)!r}]; " \
               "from optgen.cli import app; app()"
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        files = sorted(out.iterdir())
        assert [f.name for f in files] == ["__init__.py", "demo.py", "demo_ir.py", "demo_triton.py"]
        assert {oct(f.stat().st_mode & 0o777) for f in files} == {oct(mode)}


def test_out_that_is_a_file(tmp_path) -> None:
    spec = _write(tmp_path, BASE)
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "sub"):
        r = _cli("build", str(spec), "--out", str(out))
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and f"optgen build: cannot write to {out}: " in r.stderr


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes to read-only folders")
def test_read_only_out(tmp_path) -> None:
    spec = _write(tmp_path, BASE)
    out = tmp_path / "ro"
    out.mkdir(mode=0o555)
    r = _cli("build", str(spec), "--out", str(out))
    assert r.returncode == 2 and "Permission denied" in r.stderr and "Traceback" not in r.stderr


def test_killed_build_leaves_no_temporaries(tmp_path) -> None:
    spec = _write(tmp_path, BASE)
    out = tmp_path / "out"
    marker = tmp_path / "writing"
    # a build whose writes stall half-way (after some bytes are in the file), killed with SIGKILL
    code = textwrap.dedent(f"""
        import os, sys, time
        import optgen.files as files
        def slow(fd, data):
            os.write(fd, data[: len(data) // 2])
            open({str(marker)!r}, "w").close()
            time.sleep(60)
        files._write_all = slow
        sys.argv = ["optgen", "build", {str(spec)!r}, "--out", {str(out)!r}]
        from optgen.cli import app
        app()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    try:
        deadline = time.time() + 60
        while not marker.exists():
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [p.name for p in out.iterdir()] == []  # nothing named, nothing half-written
    r = _cli("build", str(spec), "--out", str(out))
    assert r.returncode == 0 and sorted(p.name for p in out.iterdir()) == ["__init__.py", "demo.py", "demo_ir.py", "demo_triton.py"]


def test_stale_named_temporaries_are_swept(tmp_path) -> None:
    from optgen.files import write_atomic

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".demo.py.{dead.pid}.deadbeef.tmp"
    stale.write_text("half")
    other = tmp_path / ".notes.tmp"  # not ours: kept
    other.write_text("x")
    write_atomic(tmp_path / "demo.py", "x = 1\n")
    assert not stale.exists() and other.exists() and (tmp_path / "demo.py").read_text() == "x = 1\n"


# --- 6. The kernel cache is trusted only when it is ours ------------------------------------------

@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("OPTGEN_CACHE_DIR", str(folder))
    return folder


def _path_module(monkeypatch):
    pytest.importorskip("triton")
    from optgen.backends.triton_codegen import default_decisions
    from optgen.runtime import kernel_cache

    program = compile_spec(ROOT / "specs" / "adamw.yaml").program
    key = tuple(sorted({**default_decisions(program), **{k: True for k in default_decisions(program)}}.items()))
    # every load below is a fresh import (the module table caches a loaded path per process)
    monkeypatch.setattr(sys, "modules", dict(sys.modules))
    load = lambda: kernel_cache.load_path_module(program, "generated.adamw_triton", key)  # noqa: E731
    load.forget = lambda: [sys.modules.pop(k) for k in list(sys.modules)  # this path's module only
                           if k.startswith("optgen_kernel_cache.adamw_triton_")]
    return load


def test_cache_modules_are_verified(cache, monkeypatch) -> None:
    load = _path_module(monkeypatch)
    mod = load()
    (path,) = cache.glob("*.py")
    good = path.read_text()
    assert good.startswith("# optgen kernel cache: sha256 ") and mod.KERNELS
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    body = good.split("\n", 1)[1]
    tampered = {
        "edited": good.replace("tl.store(", "tl.store( ", 1),
        "truncated": good[: len(good) // 2],
        "empty": "",
        "binary": "\x00\xff\xfe garbage",
        "no header": body,
        "planted": good.split("\n", 1)[0] + "\nopen('CANARY', 'w')\n",
    }
    for what, text in tampered.items():
        path.write_bytes(text.encode("utf-8", "surrogateescape"))
        load.forget()
        mod = load()
        assert path.read_text() == good, what  # rendered again, not imported as it stood
        assert mod.KERNELS and not Path("CANARY").exists(), what


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_cache_never_runs_planted_bytecode(cache, monkeypatch, tmp_path) -> None:
    load = _path_module(monkeypatch)
    load()
    (path,) = cache.glob("*.py")
    import py_compile

    canary = tmp_path / "CANARY"
    evil = tmp_path / "evil.py"
    evil.write_text(f"open({str(canary)!r}, 'w').close()\n")
    pyc = cache / "__pycache__" / f"{path.stem}.{sys.implementation.cache_tag}.pyc"
    pyc.parent.mkdir()
    py_compile.compile(str(evil), cfile=str(pyc))
    load.forget()
    load()
    assert not canary.exists()


def test_cache_folder_of_others_is_refused(cache, monkeypatch) -> None:
    from optgen.runtime.kernel_cache import UntrustedCache

    load = _path_module(monkeypatch)
    cache.mkdir(mode=0o777)
    os.chmod(cache, 0o777)
    with pytest.raises(UntrustedCache, match="is writable by other users \\(mode 0777\\): refusing"):
        load()
    os.chmod(cache, 0o755)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        os.chown(cache, 65534, 65534)
        with pytest.raises(UntrustedCache, match="belongs to another user \\(uid 65534\\)"):
            load()
        os.chown(cache, 0, 0)
    load()  # our own folder, not writable by others: used


def test_temporary_fallback_is_private(monkeypatch, tmp_path) -> None:
    from optgen.runtime.kernel_cache import UntrustedCache

    load = _path_module(monkeypatch)
    monkeypatch.delenv("OPTGEN_CACHE_DIR", raising=False)
    home = tmp_path / "home-is-a-file"
    home.write_text("")
    monkeypatch.setenv("HOME", str(home))  # ~/.cache cannot be created
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    fallback = tmp_path / f"optgen-triton-{os.getuid()}"
    fallback.mkdir(mode=0o755)  # made beforehand by someone else, readable by all
    os.chmod(fallback, 0o755)
    with pytest.raises(UntrustedCache, match="is accessible by other users"):
        load()
    fallback.rmdir()
    load()
    assert oct(fallback.stat().st_mode & 0o777) == oct(0o700) and list(fallback.glob("*.py"))


# --- 7. Runtime ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_parameter_listed_twice(backend) -> None:
    from generated import AdamW

    p = torch.nn.Parameter(torch.randn(3))
    q = torch.nn.Parameter(torch.randn(2))
    msg = r"params: param group 0 lists the same parameter twice \(positions 0 and 2, shape \(3,\)\)"
    with pytest.raises(ValueError, match=msg):
        AdamW([p, q, p], backend=backend)
    opt = AdamW([q], backend=backend)
    with pytest.raises(ValueError, match="param group 1 lists the same parameter twice"):
        opt.add_param_group({"params": [p, p]})
    AdamW(iter([p, q]), backend=backend)  # an iterator is read once, as torch reads it


def test_terminal_escapes_are_shown_escaped(tmp_path) -> None:
    text = BASE.replace("class: Demo", 'class: Demo\ndoc: "evil \\x1b[31mred\\x1b]0;title\\x07"')
    r = _cli("show", str(_write(tmp_path, text)))
    assert r.returncode == 0 and "\x1b" not in r.stdout and "\x07" not in r.stdout
    assert "evil \\x1b[31mred\\x1b]0;title\\x07" in r.stdout


def test_global_named_like_a_group_key(tmp_path) -> None:
    text = BASE.replace("update:", "globals:\n  params: {init: 1.0}\nupdate:")
    with pytest.raises(SpecError, match="globals: 'params' is reserved: the generated optimizer uses this name"):
        load_spec(_write(tmp_path, text))
