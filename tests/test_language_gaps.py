"""The language's gaps found by writing new specs (issue 15, item 5), each construct on a small spec.

Every construct runs on the reference, torch and triton (interpreter on CPU) backends, against
values computed here with plain torch; each also has a bad-input test for its error message.
Bounds: the reference and torch backends call the same torch ops as the plain-torch expectation
(4 ulps at unit scale); the triton backend computes in float32 with its own op order
(2e-6 * (1 + |p|), as tests/test_language_defects.py).
"""

from __future__ import annotations

import importlib
import itertools
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from optgen.errors import SpecError
from optgen.ir.library import FUNCTIONS, functions_table
from optgen.render import compile_spec

_packages = itertools.count()
SHAPES = [(5, 7), (300,), (3, 4, 6)]


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


BACKENDS = ["reference", "torch", *(["triton"] if _triton_available() else [])]


@pytest.fixture(autouse=True)
def _forget_kernel_modules():
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith(("optgen_kernel_cache.", "langgap_")):
            del sys.modules[name]


def _build(tmp_path: Path, monkeypatch, text: str, name: str = "demo"):
    pkg = f"langgap_{re.sub(r'[^0-9a-zA-Z_]', '_', tmp_path.name)}_{next(_packages)}"
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


def _error(tmp_path: Path, text: str) -> str:
    spec = tmp_path / "bad.yaml"
    spec.write_text(text, encoding="utf-8")
    with pytest.raises(SpecError) as exc:
        compile_spec(spec)
    return str(exc.value)


def _data(shapes, steps: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes] for _ in range(steps)]
    return params, grads


def _run(cls, backend: str, dtype: torch.dtype, steps: int, shapes=SHAPES, **kw):
    params0, grads = _data(shapes, steps, dtype)
    params = [torch.nn.Parameter(p.clone()) for p in params0]
    opt = cls(params, backend=backend, **kw)
    for g in grads:
        for p, gi in zip(params, g):
            p.grad = gi.clone()
        opt.step()
    return [p.detach() for p in params], opt


def _check(backend: str, expected: list[torch.Tensor], got: list[torch.Tensor], what: str) -> None:
    for e, g in zip(expected, got):
        assert g.dtype == e.dtype and g.shape == e.shape, what
        scale = 1 + e.abs().double()
        bound = 2e-6 * scale if backend == "triton" else 4 * torch.finfo(e.dtype).eps * scale
        diff = (g.double() - e.double()).abs()
        assert torch.all(diff <= bound), f"{what} {backend} {tuple(e.shape)}: max diff {diff.max():.3e}"


def _all_backends(cls, expect, dtype=torch.float32, steps: int = 3, shapes=SHAPES, **kw) -> None:
    params0, grads = _data(shapes, steps, dtype)
    expected = expect(params0, grads)
    for backend in BACKENDS:
        got, _ = _run(cls, backend, dtype, steps, shapes, **kw)
        _check(backend, expected, got, cls.__name__)


# --- the function library: listing, docs, nearest names -------------------------------------------

def test_show_functions_lists_the_library() -> None:
    r = subprocess.run([sys.executable, "-m", "optgen.cli", "show", "--functions"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for f in FUNCTIONS.values():
        assert f"`{f.name}`" in r.stdout, f.name
    row = next(line for line in r.stdout.splitlines() if line.startswith("| `rsqrt`"))
    assert "| 1 | - | yes |" in row  # arity, host, device


def test_docs_listing_is_the_library() -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "functions.md").read_text(encoding="utf-8")
    assert "\n".join(functions_table()) in doc, "docs/functions.md is stale: regenerate with `optgen show --functions`"


BASE = """\
name: demo
class: Demo
hyperparameters:
  lr: {default: 0.1, min: 0}
state:
  m: {kind: element}
update:
  - m = m * 0.5 + grad
  - param = param - lr * EXPR
"""


def test_unknown_function_suggests_the_nearest_names(tmp_path) -> None:
    msg = _error(tmp_path, BASE.replace("EXPR", "rownrm(m)"))
    assert msg.startswith(f"{tmp_path / 'bad.yaml'}:9:26: update[1]: unknown function 'rownrm'"), msg
    assert "did you mean 'rownorm', 'rowsum'" in msg
    msg = _error(tmp_path, BASE.replace("EXPR", "zzzz(m)"))
    assert "optgen show --functions" in msg


# --- cos, sin, floor, % ----------------------------------------------------------------------------

TRIG = """\
name: demo
class: Trig
hyperparameters:
  lr: {default: 0.1, min: 0}
  period: {default: 0.75}
state:
  m: {kind: element}
update:
  - phase = cos(step * 0.5) + sin(step) + floor(step / 2) + step % 3 + (-step) % 2.5
  - m = m * 0.5 + grad
  - u = cos(m) * sin(grad) + floor(m * 4) + m % period + 2.5 % (abs(m) + 1) + m % abs(grad)
  - param = param - lr * phase * u
"""


def _trig_expected(params, grads, lr=0.1, period=0.75):
    out = []
    for i, p in enumerate(params):
        p, m = p.clone(), torch.zeros_like(p)
        for step, g in enumerate((gs[i] for gs in grads), start=1):
            phase = math.cos(step * 0.5) + math.sin(step) + math.floor(step / 2) + step % 3 + (-step) % 2.5
            m = m * 0.5 + g
            u = (torch.cos(m) * torch.sin(g) + torch.floor(m * 4) + torch.remainder(m, period)
                 + torch.remainder(2.5, m.abs() + 1) + torch.remainder(m, g.abs()))
            p = p - (lr * phase) * u
        out.append(p)
    return out


def test_cos_sin_floor_mod(tmp_path, monkeypatch) -> None:
    built, module = _build(tmp_path, monkeypatch, TRIG)
    assert "F.cos_(" in built.text or "F.cos(" in built.text
    assert "L.remainder(" in built.triton_text and "tl.floor(" in built.triton_text
    _all_backends(module.Trig, _trig_expected)


def test_mod_sign_follows_the_divisor() -> None:
    from optgen.numerics.host import _mod

    assert _mod(-5.5, 2.0) == 0.5 and _mod(5.5, -2.0) == -0.5 and math.isnan(_mod(1.0, 0.0))


def test_mod_of_a_mask_is_refused(tmp_path) -> None:
    msg = _error(tmp_path, BASE.replace("EXPR", "(m > 0) % 2"))
    assert ":9:27: update[1]:" in msg and "boolean mask is not a number" in msg


def test_floor_takes_one_argument(tmp_path) -> None:
    msg = _error(tmp_path, BASE.replace("EXPR", "floor(m, 2)"))
    assert ":9:26: update[1]: floor() takes 1 arguments, got 2" in msg


# --- scalar-by-tensor true division ---------------------------------------------------------------

DIV = """\
name: demo
class: Div
hyperparameters:
  lr: {default: 0.1, min: 0}
state:
  m: {kind: element}
update:
  - m = m * 0.5 + grad
  - param = param - div(lr, abs(m) + 1) + div(m, 3) + div(grad, abs(m) + 2)
"""


def _div_expected(params, grads, lr=0.1):
    out = []
    for i, p in enumerate(params):
        p, m = p.clone(), torch.zeros_like(p)
        for g in (gs[i] for gs in grads):
            m = m * 0.5 + g
            p = p - torch.div(lr, m.abs() + 1) + m / 3 + g / (m.abs() + 2)
        out.append(p)
    return out


def test_true_division_of_a_host_scalar(tmp_path, monkeypatch) -> None:
    built, module = _build(tmp_path, monkeypatch, DIV)
    assert "F.sdiv(" in built.text
    _all_backends(module.Div, _div_expected)
    # bit for bit torch.div(s, t) on the torch backend, which `s / t` (reciprocal(t) * s) is not
    params0, grads = _data([(4096,)], 1, torch.float32)
    got, _ = _run(module.Div, "torch", torch.float32, 1, [(4096,)])
    m = torch.zeros_like(params0[0]) * 0.5 + grads[0][0]
    true = params0[0] - torch.div(0.1, m.abs() + 1) + m / 3 + grads[0][0] / (m.abs() + 2)
    recip = params0[0] - (m.abs() + 1).reciprocal() * 0.1 + m / 3 + grads[0][0] / (m.abs() + 2)
    assert torch.equal(got[0], true) and not torch.equal(got[0], recip)


def test_div_of_a_mask_is_refused(tmp_path) -> None:
    msg = _error(tmp_path, BASE.replace("EXPR", "div(lr, m > 0)"))
    assert ":9:" in msg and "boolean mask is not a number" in msg


# --- the parameter dtype's finfo.eps --------------------------------------------------------------

EPS = """\
name: demo
class: Eps
hyperparameters:
  lr: {default: 0.1, min: 0}
  eps: {default: 1.0e-30}
update:
  - tiny = max(eps, eps_of(param))
  - param = param - lr * grad / (abs(grad) + tiny * 1.0e5)
"""


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eps_of_param(tmp_path, monkeypatch, dtype) -> None:
    _, module = _build(tmp_path, monkeypatch, EPS)

    def expect(params, grads):
        tiny = max(1.0e-30, torch.finfo(dtype).eps)
        out = []
        for i, p in enumerate(params):
            p = p.clone()
            for g in (gs[i] for gs in grads):
                p = p - 0.1 * (g / (g.abs() + tiny * 1.0e5))
            out.append(p)
        return out

    params0, grads = _data(SHAPES, 2, dtype)
    expected = expect(params0, grads)
    for backend in BACKENDS:
        got, _ = _run(module.Eps, backend, dtype, 2)
        if dtype == torch.bfloat16:  # bf16 storage: one rounding of the stored value apart at most
            for e, g in zip(expected, got):
                assert torch.allclose(g.float(), e.float(), rtol=2 ** -7, atol=2 ** -7), backend
        else:
            _check(backend, expected, got, "eps_of")


def test_eps_of_takes_param(tmp_path) -> None:
    msg = _error(tmp_path, BASE.replace("EXPR", "eps_of(m)"))
    assert ":9:33: update[1]: eps_of() takes 'param'" in msg


# --- per-row / per-column norms and per-matrix means ----------------------------------------------

NORMS = """\
name: demo
class: Norms
hyperparameters:
  lr: {default: 0.1, min: 0}
state:
  r: {kind: row, init: zeros, if: "ndim >= 2"}
update:
  - if: ndim >= 2
    then:
      - r = rownorm(grad)
      - c = colnorm(grad)
      - k = matmean(r) + matmean(c)
      - param = param - lr * grad / (outer(r, c) + k)
    else:
      - param = param - lr * grad
"""


def _norms_expected(params, grads, lr=0.1):
    out = []
    for i, p in enumerate(params):
        p = p.clone()
        for g in (gs[i] for gs in grads):
            if p.dim() >= 2:
                r, c = g.norm(dim=-1), g.norm(dim=-2)
                k = r.mean(dim=-1) + c.mean(dim=-1)
                p = p - lr * (g / (r[..., :, None] * c[..., None, :] + k[..., None, None]))
            else:
                p = p - lr * g
        out.append(p)
    return out


def test_rownorm_colnorm_matmean(tmp_path, monkeypatch) -> None:
    _, module = _build(tmp_path, monkeypatch, NORMS)
    _all_backends(module.Norms, _norms_expected)


def test_rownorm_of_a_row_is_refused(tmp_path) -> None:
    text = NORMS.replace("c = colnorm(grad)", "c = colnorm(r)")
    msg = _error(tmp_path, text)
    assert ":11:" in msg and "colnorm() argument 1 must be per-element, got per-row" in msg
    msg = _error(tmp_path, NORMS.replace("matmean(r)", "matmean(grad)"))
    assert "matmean() argument 1 must be per-row or per-column, got per-element" in msg


# --- backend restrictions reported by `optgen check` at the spec line ----------------------------

HOST_IN_IF = """\
name: demo
class: HostIf
hyperparameters:
  lr: {default: 0.1, min: 0}
state:
  h: {kind: host, init: 0}
update:
  - if: step > 2
    then:
      - h = h + 1
  - param = param - lr * grad
"""


def test_check_reports_a_triton_refusal_at_the_spec_line(tmp_path) -> None:
    spec = tmp_path / "demo.yaml"
    spec.write_text(HOST_IN_IF, encoding="utf-8")
    r = subprocess.run([sys.executable, "-m", "optgen.cli", "check", str(spec)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr  # valid for the other backends
    assert f"{spec}:10:9: triton backend: host state updated inside a step-dependent condition ('h'" in r.stderr, r.stderr
    assert "the condition at line 8" in r.stderr
    spec.write_text(HOST_IN_IF.replace("if: step > 2", "if: lr > 2"), encoding="utf-8")
    r = subprocess.run([sys.executable, "-m", "optgen.cli", "check", str(spec)], capture_output=True, text=True)
    assert r.returncode == 0 and "triton backend" not in r.stderr, r.stderr


# --- a host value rounded to float32 --------------------------------------------------------------

F32 = """\
name: demo
class: F32
hyperparameters:
  lr: {default: 0.1, min: 0}
update:
  - s = float32(1 / 3) * 3 - 1
  - param = param - lr * grad - 1.0e3 * s * param
"""


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float32_of_a_host_value(tmp_path, monkeypatch, dtype) -> None:
    _, module = _build(tmp_path, monkeypatch, F32)
    s = torch.tensor(1 / 3, dtype=torch.float32).item() * 3 - 1  # 2.98e-8, not 0 as in float64
    assert s != 0.0

    def expect(params, grads):
        out = []
        for i, p in enumerate(params):
            p = p.clone()
            for g in (gs[i] for gs in grads):
                p = p - 0.1 * g - (1.0e3 * s) * p
            out.append(p)
        return out

    params0, grads = _data(SHAPES, 2, dtype)
    expected = expect(params0, grads)
    for backend in BACKENDS:
        if backend == "triton" and dtype == torch.float64:
            continue
        got, _ = _run(module.F32, backend, dtype, 2)
        _check(backend, expected, got, "float32")


def test_float32_takes_one_value(tmp_path) -> None:
    msg = _error(tmp_path, BASE.replace("EXPR", "float32(lr, 2)"))
    assert ":9:26: update[1]: float32() takes 1 arguments, got 2" in msg


# --- a construction-time constant: a global no finalize: statement assigns ----------------------------

CONST = """\
name: demo
class: Const
hyperparameters:
  lr: {default: 0.1, min: 0}
  warmup: {default: 4, type: int, min: 1}
globals:
  lr0: {init: lr / sqrt(warmup), doc: "the lr its group was added with, over sqrt(warmup)"}
state:
  m: {kind: element}
update:
  - m = m * 0.5 + grad
  - param = param - lr0 * m
"""


def _const_expected(params, grads, lr0):
    out = []
    for i, p in enumerate(params):
        p, m = p.clone(), torch.zeros_like(p)
        for g in (gs[i] for gs in grads):
            m = m * 0.5 + g
            p = p - lr0 * m
        out.append(p)
    return out


def test_construction_time_constant(tmp_path, monkeypatch) -> None:
    """A global without finalize: keeps the value its init gave when the group was added: a
    scheduler moving lr does not move it, and a checkpoint carries it."""
    _, module = _build(tmp_path, monkeypatch, CONST)
    _all_backends(module.Const, lambda p, g: _const_expected(p, g, 0.3 / 2), lr=0.3)
    for backend in BACKENDS:
        params0, grads = _data(SHAPES, 3, torch.float32)
        params = [torch.nn.Parameter(p.clone()) for p in params0]
        opt = module.Const(params, backend=backend, lr=0.3)
        sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.1)
        for g in grads:
            for p, gi in zip(params, g):
                p.grad = gi.clone()
            opt.step()
            sched.step()
        assert opt.param_groups[0]["lr"] != 0.3 and opt.param_groups[0]["lr0"] == 0.3 / 2
        _check(backend, _const_expected(params0, grads, 0.3 / 2), [p.detach() for p in params], "Const")
        again = module.Const([torch.nn.Parameter(p.clone()) for p in params0], backend=backend, lr=1.0)
        again.load_state_dict(opt.state_dict())
        assert again.param_groups[0]["lr0"] == 0.3 / 2


def test_accumulators_still_need_finalize(tmp_path) -> None:
    text = CONST.replace("globals:\n", "accumulators:\n  total: {init: 0.0}\nglobals:\n").replace(
        "  - param = param - lr0 * m\n", "  - param = param - lr0 * m\n  - total += sum(m)\n")
    msg = _error(tmp_path, text)
    assert "finalize: accumulators need finalize: statements that read them" in msg
