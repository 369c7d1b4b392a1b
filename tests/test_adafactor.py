"""Adafactor (issue 16 item 4, not yet a shipped spec): tests/wip/adafactor.yaml against
torch.optim.Adafactor 2.13 (the published package is the oracle), built into a temporary package.

It exercises the language additions it needs on the torch and reference backends: float64() (the
RMS scalings torch computes with .item() in Python floats), axpy() with a per-tensor scale (torch's
add(alpha=python float)), a None inside a tuple hyperparameter (eps=(None, 1e-3)), and the
published layout's keepdim (row_var / col_var saved as torch's (R, 1) / (1, C)). Left open (so the
spec is not in specs/ and the generic battery): a tensor lr, with which torch computes the relative
step in float32, and the triton backend's bf16 check.
"""

from __future__ import annotations

import copy
import importlib
import itertools
import sys
from pathlib import Path

import pytest
import torch

from optgen.render import compile_spec
from tests.models import make_model

SPEC = Path(__file__).parent / "wip" / "adafactor.yaml"
SETTINGS = [{}, {"lr": 0.005, "beta2_decay": -0.5, "eps": (1e-30, 1e-3), "d": 2.0, "weight_decay": 0.01},
            {"lr": 0.02, "eps": (None, 1e-2), "maximize": True}]
_packages = itertools.count()


@pytest.fixture
def adafactor(tmp_path: Path, monkeypatch):
    pkg = f"adafactor_wip_{next(_packages)}"
    folder = tmp_path / pkg
    folder.mkdir()
    spec = folder / "adafactor.yaml"
    spec.write_text(SPEC.read_text(encoding="utf-8"), encoding="utf-8")
    (folder / "__init__.py").write_text("", encoding="utf-8")
    for name, text in compile_spec(spec).files().items():
        (folder / name).write_text(text, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield importlib.import_module(f"{pkg}.adafactor").Adafactor
    for name in [m for m in sys.modules if m.startswith(pkg)]:
        del sys.modules[name]


def _train(model, opt, steps: int, start: int = 0) -> list[float]:
    batch = type(model).batch(next(model.parameters()).dtype, seed=1 + start)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model.loss(batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _cases():
    out = []
    for i, model, dtype in itertools.product(range(len(SETTINGS)), ("mlp", "transformer"), (torch.float64, torch.float32)):
        sample = (i, model, dtype) in ((1, "mlp", torch.float64), (0, "transformer", torch.float32))
        out.append(pytest.param(i, model, dtype, id=f"{i}-{model}-{str(dtype)[6:]}",
                                marks=() if sample else (pytest.mark.extended,)))
    return out


@pytest.mark.parametrize(("index", "model_name", "dtype"), _cases())
def test_matches_torch(adafactor, index: int, model_name: str, dtype: torch.dtype) -> None:
    torch.set_default_dtype(dtype)  # torch keeps step in the default dtype
    setting = SETTINGS[index]
    steps = 20
    ref = make_model(model_name, dtype)
    ref_losses = _train(ref, torch.optim.Adafactor(ref.parameters(), **setting), steps)
    for backend in ("torch", "reference"):
        ours = make_model(model_name, dtype)
        losses = _train(ours, adafactor(ours.parameters(), backend=backend, **setting), steps)
        for x, y in zip(ours.parameters(), ref.parameters()):
            assert torch.equal(x, y), f"{backend}: {(x - y).abs().max():.3e}"
        assert losses == ref_losses


def test_state_dicts_cross_with_torch_in_its_shapes(adafactor) -> None:
    a, b = make_model("transformer", torch.float32), make_model("transformer", torch.float32)
    oa = adafactor(a.parameters(), backend="torch", weight_decay=0.01)
    ob = torch.optim.Adafactor(b.parameters(), weight_decay=0.01)
    _train(a, oa, 4)
    _train(b, ob, 4)
    sa, sb = oa.state_dict(), ob.state_dict()
    assert {k: {n: tuple(t.shape) for n, t in v.items()} for k, v in sa["state"].items()} == \
        {k: {n: tuple(t.shape) for n, t in v.items()} for k, v in sb["state"].items()}  # (R, 1) / (1, C)
    assert sa["param_groups"] == sb["param_groups"]
    oa.load_state_dict(copy.deepcopy(sb))
    ob.load_state_dict(copy.deepcopy(sa))
    _train(a, oa, 4, start=4)
    _train(b, ob, 4, start=4)
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.equal(x, y)


def test_torchs_messages(adafactor) -> None:
    params = [torch.nn.Parameter(torch.zeros(2, 2))]
    for kwargs in ({"lr": -1.0}, {"beta2_decay": 0.5}, {"eps": (-1.0, 1e-3)}, {"eps": (None, -1.0)}, {"d": 0.5},
                   {"weight_decay": -1.0}):
        with pytest.raises(ValueError) as theirs:
            torch.optim.Adafactor(params, **kwargs)
        with pytest.raises(ValueError) as ours:
            adafactor(params, **kwargs)
        assert str(ours.value) == str(theirs.value)
