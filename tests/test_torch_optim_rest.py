"""The rest of torch.optim 2.13 (issue 16, item 4): Adamax, Adadelta, Rprop, ASGD and Muon
against torch's own classes, beyond what tests/test_equivalence.py runs for every spec:

- the constructor: argument names, order, positional/keyword-only kinds and defaults as torch's;
  torch's ValueError messages for refused values; ``differentiable=True`` refused clearly;
- state dicts cross both ways mid-training (ours into torch's class, torch's into ours) and
  training continues bit for bit;
- (extended) every constructor input torch's OptimizerInfo database lists for these classes on
  CPU, 30 steps of both test models, float64 and float32, on the torch and reference backends.

torch's class is the oracle throughout (the published package, pinned at 2.13.0).
"""

from __future__ import annotations

import copy
import importlib
import inspect

import pytest
import torch

from optgen.spec.loader import load_spec
from tests.models import MODELS, make_model
from tests.published import ROOT, handed

NAMES = {"Adamax": "adamax", "Adadelta": "adadelta", "Rprop": "rprop", "ASGD": "asgd", "Muon": "muon"}


def _ours(name: str):
    spec = NAMES[name]
    return getattr(importlib.import_module(f"generated.{spec}"), load_spec(ROOT / "specs" / f"{spec}.yaml").model.class_)


def _theirs(name: str):
    return getattr(torch.optim, name)


@pytest.mark.parametrize("name", sorted(NAMES))
def test_constructor_is_torchs(name: str) -> None:
    ours = inspect.signature(_ours(name)).parameters
    theirs = inspect.signature(_theirs(name)).parameters
    assert [n for n in ours if n != "backend"] == list(theirs)
    for n, p in theirs.items():
        assert ours[n].kind == p.kind, n
        if p.default is not inspect.Parameter.empty:
            assert ours[n].default == p.default, n


#: refused values: torch's ValueError message is ours
BAD = [
    ("Adamax", {"lr": -1.0}), ("Adamax", {"eps": -1.0}), ("Adamax", {"betas": (1.0, 0.9)}),
    ("Adamax", {"betas": (0.9, -0.1)}), ("Adamax", {"weight_decay": -0.1}),
    ("Adadelta", {"lr": -1.0}), ("Adadelta", {"rho": 1.5}), ("Adadelta", {"eps": -1.0}),
    ("Adadelta", {"weight_decay": -1.0}),
    ("Rprop", {"lr": -1.0}), ("Rprop", {"etas": (1.5, 1.2)}), ("Rprop", {"etas": (0.5, 0.9)}),
    ("ASGD", {"lr": -1.0}), ("ASGD", {"weight_decay": -1.0}),
    ("Muon", {"lr": -1.0}), ("Muon", {"momentum": -1.0}), ("Muon", {"weight_decay": -1.0}),
    ("Muon", {"adjust_lr_fn": "spectral"}),
]


@pytest.mark.parametrize(("name", "kwargs"), BAD, ids=[f"{n}-{next(iter(k))}" for n, k in BAD])
def test_torchs_messages(name: str, kwargs: dict) -> None:
    params = [torch.nn.Parameter(torch.zeros(2, 2))]
    with pytest.raises(ValueError) as theirs:
        _theirs(name)(params, **kwargs)
    with pytest.raises(ValueError) as ours:
        _ours(name)(params, **kwargs)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("name", sorted(n for n in NAMES if n not in ("Muon", "Adafactor")))  # no such flags
def test_differentiable_refused_capturable_and_foreach_accepted(name: str) -> None:
    params = [torch.nn.Parameter(torch.zeros(2, 2))]
    with pytest.raises(ValueError, match="differentiable"):
        _ours(name)(params, differentiable=True)
    _ours(name)(params, foreach=True, capturable=False)
    _ours(name)(params, foreach=False)


def _train(model, opt, steps: int, start: int = 0) -> None:
    batch = type(model).batch(next(model.parameters()).dtype, seed=1 + start)
    for _ in range(steps):
        opt.zero_grad()
        model.loss(batch).backward()
        opt.step()


def _same(a, b) -> None:
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.equal(x, y), (x - y).abs().max()


#: settings that reach every state and branch (ASGD's averaging starts at t0 = 5)
CROSS = {"Adamax": {"weight_decay": 0.01}, "Adadelta": {"lr": 0.5}, "Rprop": {"lr": 0.001},
         "ASGD": {"t0": 5.0, "weight_decay": 0.01}, "Muon": {"lr": 0.01}}


@pytest.mark.parametrize("name", sorted(NAMES))
def test_state_dicts_cross_with_torch(name: str) -> None:
    spec, kwargs = NAMES[name], CROSS[name]
    ours_cls, torch_cls = _ours(name), _theirs(name)
    a, b = make_model("mlp", torch.float32), make_model("mlp", torch.float32)
    oa = ours_cls(handed(spec, a.parameters()), backend="torch", **kwargs)
    ob = torch_cls(handed(spec, b.parameters()), **kwargs)
    _train(a, oa, 8)
    _train(b, ob, 8)
    _same(a, b)
    def layout(opt):
        return {k: {key: tuple(getattr(t, "shape", ())) for key, t in v.items()} for k, v in opt.state_dict()["state"].items()}

    assert layout(oa) == layout(ob)
    a2, b2 = make_model("mlp", torch.float32), make_model("mlp", torch.float32)
    with torch.no_grad():
        for x, y, z, w in zip(a2.parameters(), b2.parameters(), a.parameters(), b.parameters()):
            x.copy_(w)
            y.copy_(z)
    oa2 = ours_cls(handed(spec, a2.parameters()), backend="torch", **kwargs)
    oa2.load_state_dict(copy.deepcopy(ob.state_dict()))
    ob2 = torch_cls(handed(spec, b2.parameters()), **kwargs)
    ob2.load_state_dict(copy.deepcopy(oa.state_dict()))
    _train(a2, oa2, 8, start=8)
    _train(b, ob, 8, start=8)
    _same(a2, b)
    _train(b2, ob2, 8, start=8)
    _train(a, oa, 8, start=8)
    _same(b2, a)


def _database() -> list[tuple[str, str, dict]]:
    try:
        common = importlib.import_module("torch.testing._internal.common_optimizers")
    except Exception:  # the database needs expecttest: without it these cases are not collected
        return []
    out = []
    for info in common.optim_db:
        name = info.optim_cls.__name__
        if name in NAMES:
            for inp in info.optim_inputs_func(device="cpu", dtype=torch.float32):
                out.append((name, inp.desc, dict(inp.kwargs)))
    return out


DATABASE = _database()


@pytest.mark.extended
@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize(("name", "desc", "kwargs"), DATABASE, ids=[f"{n}-{d}" for n, d, _ in DATABASE])
def test_database_inputs_match_torch(name: str, desc: str, kwargs: dict, backend: str) -> None:
    spec = NAMES[name]
    for model_name in MODELS:
        for dtype in (torch.float64, torch.float32):
            if isinstance(kwargs.get("lr"), torch.Tensor) and dtype == torch.float64:
                continue  # the database's tensor lr is float32: the float32 runs cover it
            torch.set_default_dtype(dtype)  # torch keeps step (and ASGD's eta, mu) in the default dtype
            kw = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
            a, b = make_model(model_name, dtype), make_model(model_name, dtype)
            oa = _ours(name)(handed(spec, a.parameters()), backend=backend, **kw)
            kw = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
            ob = _theirs(name)(handed(spec, b.parameters()), **kw)
            _train(a, oa, 30)
            _train(b, ob, 30)
            _same(a, b)
