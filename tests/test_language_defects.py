"""Language and backend defects users found (issue 13, item 7), each pinned by a spec that hit it.

Every test steps small parameters (0-D, 1-D, 2-D, 3-D batched) over several steps on the torch
and triton backends against the reference backend, the oracle. Tolerances: the torch backend
calls the same torch ops as the reference (``_foreach_*`` forms of them), so it may differ by a
rounding or two of the last op at most: 4 ulps of the dtype at unit scale. The triton backend
computes in float32 with its own op order (test_triton.py's bound: 2e-6 * (1 + |p|), about 16
ulps). Where the reference itself was wrong (constants in float32 for float64 parameters), the
test also checks a closed form.
"""

from __future__ import annotations

import importlib
import itertools
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from optgen.errors import SpecError
from optgen.render import compile_spec
from optgen.smoke import import_built, smoke_step

SHAPES = [(5, 7), (300,), (), (3, 4, 6)]
_packages = itertools.count()


@pytest.fixture(autouse=True)
def _forget_kernel_modules():
    """Drop the modules these specs put in sys.modules (their packages, run-time rendered kernel
    paths): other tests look the kernel cache's modules up by prefix."""
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith(("optgen_kernel_cache.", "langdefect_")):
            del sys.modules[name]


def _build(tmp_path: Path, monkeypatch, text: str, name: str = "demo"):
    """Render ``text`` into a package of its own (the triton backend imports its kernel module
    by name) and import it."""
    pkg = f"langdefect_{re.sub(r'[^0-9a-zA-Z_]', '_', tmp_path.name)}_{next(_packages)}"
    folder = tmp_path / pkg
    folder.mkdir()
    spec = folder / f"{name}.yaml"
    spec.write_text(text, encoding="utf-8")
    built = compile_spec(spec)
    (folder / "__init__.py").write_text("", encoding="utf-8")
    for file_name, module_text in built.files().items():
        (folder / file_name).write_text(module_text, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    return built, importlib.import_module(f"{pkg}.{name}")


def _run(cls, backend: str, dtype: torch.dtype, steps: int = 4, shapes=SHAPES, **kw):
    """Seeded params and gradients; the params and every state tensor after ``steps`` steps."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)) for s in shapes]
    opt = cls(params, backend=backend, **kw)
    grads = []
    for _ in range(steps):
        grads.append([])
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype)
            grads[-1].append(p.grad.clone())
        opt.step()
    states = [{k: v.detach().clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)} for p in params]
    return [p.detach().clone() for p in params], states, grads


def _bound(backend: str, dtype: torch.dtype, expected: torch.Tensor) -> torch.Tensor:
    scale = 1 + expected.abs().double()
    if backend == "triton":
        return 2e-6 * scale
    return 4 * torch.finfo(dtype).eps * scale


def _assert_close(backend: str, dtype: torch.dtype, expected, got, what: str) -> None:
    assert got.dtype == expected.dtype, f"{what}: {got.dtype} != {expected.dtype}"
    assert got.shape == expected.shape, what
    diff = (got.double() - expected.double()).abs()
    assert torch.all(diff <= _bound(backend, dtype, expected)), f"{what}: max diff {diff.max():.3e}"


def _compare(cls, backends, dtypes, steps: int = 4, **kw) -> None:
    """Every backend against the reference: params and every state."""
    for dtype in dtypes:
        ref_p, ref_s, _ = _run(cls, "reference", dtype, steps, **kw)
        for backend in backends:
            if backend == "triton" and dtype == torch.float64:
                continue  # triton steps float32 / bfloat16 / float16 parameters only
            got_p, got_s, _ = _run(cls, backend, dtype, steps, **kw)
            for i, (e, g) in enumerate(zip(ref_p, got_p)):
                _assert_close(backend, dtype, e, g, f"{backend} {dtype} param {SHAPES[i]}")
            for i, (es, gs) in enumerate(zip(ref_s, got_s)):
                assert sorted(es) == sorted(gs), f"{backend} {dtype} state keys {SHAPES[i]}"
                for k in es:
                    if es[k].is_floating_point():
                        _assert_close(backend, dtype, es[k], gs[k], f"{backend} {dtype} state {k} {SHAPES[i]}")
                    else:
                        assert torch.equal(es[k], gs[k]), f"{backend} {dtype} state {k} {SHAPES[i]}"


BACKENDS = ["torch", "triton"]
FLOATS = [torch.float32, torch.float64]


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _backends() -> list[str]:
    return BACKENDS if _triton_available() else ["torch"]


# --- 1. state names that are kernel locals ------------------------------------------------------

COLLIDING = """\
name: demo
class: Demo
hyperparameters:
  lr: {default: 1.0e-2, min: 0}
  beta: {default: 0.9}
state:
  mask: {kind: element}
  offs: {kind: element}
  t: {kind: element}
  n: {kind: element}
  pid: {kind: row, init: ones, if: "ndim >= 2"}
  tab: {kind: matrix, init: zeros, if: "ndim >= 2"}
update:
  - mask = lerp(mask, grad, 1 - beta)
  - offs = offs * beta + (1 - beta) * grad * grad
  - t = maximum(t * beta, abs(grad))
  - n = mask / (sqrt(offs) + 1.0e-8)
  - if: has(pid)
    then:
      - pid = lerp(pid, rowsum(grad * grad), 1 - beta)
      - tab = dot(pid, pid)
      - n = n / (sqrt(pid) + 1)
  - param = param - lr * (n + 0.01 * t)
"""


def test_state_names_that_are_kernel_locals(tmp_path, monkeypatch) -> None:
    # `mask` was edited into the flat block's call by text (DT_mask became DT_None / DT_offs < n)
    built, module = _build(tmp_path, monkeypatch, COLLIDING)
    if _triton_available():
        assert "DT_mask" in built.triton_text and "DT_None" not in built.triton_text
    _compare(module.Demo, _backends(), [torch.float32], steps=4)


def test_kernel_names_are_not_edited_into_spec_text(tmp_path, monkeypatch) -> None:
    # a spec whose names contain the old placeholder names of the kernels (_KS, _KP) reaches the
    # kernels only behind prefixes: the kernels are named where they are written
    text = COLLIDING.replace("name: demo", "name: ks").replace("class: Demo", "class: KS")
    text = text.replace("  t: {kind: element}", "  KS_block: {kind: element}").replace("t = maximum(t", "KS_block = maximum(KS_block")
    text = text.replace("0.01 * t)", "0.01 * KS_block)")
    built, module = _build(tmp_path, monkeypatch, text, name="ks")
    if _triton_available():
        assert "DT_KS_block" in built.triton_text
        kernels = re.findall(r"^def (\w+)\(", built.triton_text, flags=re.M)
        assert kernels and all(k.startswith("_ks_") for k in kernels), kernels
    _compare(module.KS, _backends(), [torch.float32], steps=3)


# --- 2. maximum / minimum / comparisons with a computed second operand --------------------------

COMPUTED = """\
name: demo
class: Demo
hyperparameters:
  lr: {default: 1.0e-2, min: 0}
  beta: {default: 0.9}
state:
  m: {kind: element}
  v: {kind: element}
update:
  - m = maximum(m * beta, abs(grad))
  - v = minimum(v + 1, abs(grad) * 2)
  - u = where(grad * grad > m * v, m, grad)
  - w = where(grad * grad <= abs(v), m * 2, abs(grad))
  - z = lerp(m, grad, abs(grad) / (1 + abs(grad)))
  - param = param - lr * (u + w + clamp(z, -1, 1))
"""


def test_computed_second_operands(tmp_path, monkeypatch) -> None:
    # _foreach_abs / _foreach_mul return tuples: they were taken for host scalars
    _, module = _build(tmp_path, monkeypatch, COMPUTED)
    _compare(module.Demo, _backends(), FLOATS, steps=4)


# --- 3. a choice between two constants takes the parameter's dtype ------------------------------

CONSTANTS = """\
name: demo
class: Demo
hyperparameters:
  lr: {default: 0.1, min: 0}
state:
  c: {kind: element}
update:
  - c = where(grad > 0, 1.2, 0.5)
  - param = param - lr * where(grad * param > 0.1, 1.3, 0.7) * grad
"""


def test_constants_take_the_parameter_dtype(tmp_path, monkeypatch) -> None:
    _, module = _build(tmp_path, monkeypatch, CONSTANTS)
    for backend in ("reference", "torch"):
        for dtype in FLOATS:
            gen = torch.Generator().manual_seed(0)
            p = torch.nn.Parameter(torch.randn((5, 7), generator=gen, dtype=dtype))
            expected = p.detach().clone()
            opt = module.Demo([p], backend=backend)
            for _ in range(3):
                g = torch.randn((5, 7), generator=gen, dtype=dtype)
                p.grad = g.clone()
                # torch with Python scalars against a tensor: the constants in the tensor's dtype
                k = torch.where(g * expected > 0.1, torch.tensor(1.3, dtype=dtype), 0.7)
                expected = torch.addcmul(expected, k, g, value=-0.1)  # `a + s * b * c` is addcmul
                opt.step()
                c = opt.state[p]["c"]
                assert c.dtype == dtype
                assert torch.equal(c, torch.where(g > 0, torch.tensor(1.2, dtype=dtype), 0.5)), (backend, dtype)
            assert torch.equal(p.detach(), expected), (backend, dtype)
    _compare(module.Demo, _backends(), FLOATS, steps=4)


# --- 4. a host state read by device code ---------------------------------------------------------

HOST_STATE = """\
name: demo
class: Demo
hyperparameters:
  lr: {default: 1.0e-2, min: 0}
  beta: {default: 0.9}
state:
  m: {kind: element}
  acc: {kind: host, init: 1.0}
  acc64: {kind: host, init: 0.5, dtype: float64}
update:
  - m = where(grad > acc64, grad * acc, lerp(m, grad, 1 - beta))
  - acc = acc * beta
  - acc64 = acc64 * beta + 0.1
  - param = param - lr * m * acc - acc64 * grad
"""


def test_host_state_in_device_expressions(tmp_path, monkeypatch) -> None:
    # read before and after its update in the same step; torch raised KeyError: 'acc'
    _, module = _build(tmp_path, monkeypatch, HOST_STATE)
    _compare(module.Demo, _backends(), FLOATS, steps=4)
    _, states, _ = _run(module.Demo, "torch", torch.float64, steps=3)
    assert states[0]["acc"].item() == pytest.approx(0.9**3, rel=1e-6)  # float32 state


# --- 5. conditions on globals --------------------------------------------------------------------

GLOBALS = """\
name: demo
class: Demo
hyperparameters:
  lr: {default: 1.0e-2, min: 0}
  warm: {default: 2, type: int, min: 0}
globals:
  k: {init: 0}
  g: {init: 1.0}
accumulators:
  tot: {init: 0.0}
state:
  m: {kind: element}
update:
  - tot += sum(grad * grad)
  - if: k >= warm
    then: [m = grad * 2]
    else: [m = copy(grad)]
  - if: g > 0.3 and numel > 3
    then: [m = m * g]
  - param = param - lr * m
finalize:
  - k = k + 1
  - g = g * 0.5 + 0 * sqrt(tot)
"""


def test_conditions_on_globals(tmp_path, monkeypatch) -> None:
    # `optgen build` raised KeyError: 'k' (the default branch decisions did not know the globals)
    _, module = _build(tmp_path, monkeypatch, GLOBALS)
    _compare(module.Demo, _backends(), FLOATS, steps=5)
    # the reference follows the conditions step by step: k = 0, 1, 2, ...; g = 1, 0.5, 0.25, ...
    params, _, grads = _run(module.Demo, "reference", torch.float64, steps=5)
    for i, shape in enumerate(SHAPES):
        expected = _initial(i)
        for step, gs in enumerate(grads):
            m = gs[i] * 2 if step >= 2 else gs[i].clone()
            g = 0.5**step
            if g > 0.3 and expected.numel() > 3:
                m = m * g
            expected = torch.add(expected, m, alpha=-0.01)  # `a - s * b` is add(alpha=-s)
        assert torch.equal(params[i], expected), shape


def _initial(index: int) -> torch.Tensor:
    """The initial value of ``_run``'s parameter ``index``."""
    gen = torch.Generator().manual_seed(0)
    values = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    return values[index]


def test_failing_default_conditions_do_not_crash_the_build(tmp_path) -> None:
    # a condition whose host maths overflows at the defaults (10.0 ** 400): host maths is IEEE's,
    # so it is inf > 0, true; the build renders, and every backend takes the true branch
    text = GLOBALS.replace("if: k >= warm", "if: 10.0 ** (k + 400) > 0")
    spec = tmp_path / "demo.yaml"
    spec.write_text(text, encoding="utf-8")
    built = compile_spec(spec)
    smoke_step(built, built.spec)
    cls = import_built(built, "demo").Demo
    for backend in ("reference", "torch"):
        p = torch.nn.Parameter(torch.zeros(5))
        p.grad = torch.ones(5)
        opt = cls([p], backend=backend)
        opt.step()
        assert torch.equal(opt.state[p]["m"], torch.full((5,), 2.0)), backend  # m = grad * 2


# --- 6. matches.settings are validated as the constructor validates them -------------------------

SETTINGS = """\
name: demo
class: Demo
matches:
  package: demo==1.0
  class: demo.Demo
  settings:
    - {}
    - {lr: 0.1, betas: [0.8, 0.9], mode: b, flag: true}
    - SETTING
hyperparameters:
  lr: {default: 1.0e-3, min: 0}
  betas: {default: [0.9, 0.999], as: [beta1, beta2], min: 0, max_exclusive: 1}
  mode: {default: a, type: any, choices: [a, b]}
  flag: {default: false}
  fixed: {default: 1.0, constructor: false}
checks:
  - check: not flag or lr > 0.01
    message: flag needs a learning rate above 0.01
state:
  m: {kind: element}
update:
  - m = lerp(m, grad, 1 - beta1)
  - param = param - lr * fixed * m
"""

BAD_SETTINGS = [
    ("{lrr: 0.1}", "lrr", "'lrr' is not an argument of Demo (did you mean 'lr'?)"),
    ("{beta1: 0.5}", "beta1", "'beta1' is not an argument of Demo"),
    ("{fixed: 2.0}", "fixed", "'fixed' is fixed by the class (constructor: false)"),
    ("{lr: -1.0}", "lr", "Invalid lr: -1.0 (must be >= 0"),
    ("{lr: fast}", "lr", "lr must be a number, got 'fast'"),
    ("{betas: [0.9]}", "betas", "Invalid betas: expected 2 values"),
    ("{betas: [0.9, 1.0]}", "betas", "Invalid betas[1]: 1.0 (must be >= 0"),
    ("{mode: c}", "mode", "mode='c' is not supported; supported: 'a', 'b'"),
    ("{flag: 1}", "flag", "flag must be True or False, got 1"),
    ("{flag: true}", None, "flag needs a learning rate above 0.01"),
]


@pytest.mark.parametrize("setting,key,message", BAD_SETTINGS, ids=[b[0] for b in BAD_SETTINGS])
def test_settings_are_validated_like_the_constructor(tmp_path, setting: str, key: str | None, message: str) -> None:
    text = SETTINGS.replace("SETTING", setting)
    spec = tmp_path / "demo.yaml"
    spec.write_text(text, encoding="utf-8")
    line = text.splitlines().index(f"    - {setting}") + 1
    field = "matches.settings[2]" + (f".{key}" if key else "")
    with pytest.raises(SpecError) as err:
        compile_spec(spec)
    text_of = str(err.value)
    assert re.match(rf"(.*/)?demo\.yaml:{line}:\d+: {re.escape(field)}: ", text_of), text_of
    assert message in text_of, text_of
    # and the constructor does refuse it (the check runs the constructor's own validation)
    good = compile_spec(_write_spec(tmp_path / "ok", SETTINGS.replace("    - SETTING\n", "")))
    cls = import_built(good, "demo").Demo
    kwargs = _yaml_flow(setting)
    with pytest.raises((TypeError, ValueError)):
        cls([torch.nn.Parameter(torch.zeros(3))], **kwargs)


def test_valid_settings_pass_check(tmp_path) -> None:
    spec = _write_spec(tmp_path, SETTINGS.replace("SETTING", "{lr: 0.5, flag: true, betas: [0.0, 0.5]}"))
    built = compile_spec(spec)
    smoke_step(built, built.spec)


def test_check_reports_a_bad_setting_without_a_traceback(tmp_path) -> None:
    spec = _write_spec(tmp_path, SETTINGS.replace("SETTING", "{mode: c}"))
    r = subprocess.run([sys.executable, "-m", "optgen.cli", "check", str(spec)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "matches.settings[2].mode: Demo() would refuse it" in r.stderr, r.stderr


def _write_spec(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    spec = folder / "demo.yaml"
    spec.write_text(text, encoding="utf-8")
    return spec


def _yaml_flow(text: str) -> dict:
    value = yaml.safe_load(text)
    return {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
