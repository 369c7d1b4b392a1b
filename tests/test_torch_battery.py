"""The field's own battery: torch's OptimizerInfo database drives the generated torch.optim specs.

torch tests its optimizers with ``test/test_optim.py`` over the OptimizerInfo database that ships
in the wheel (``torch.testing._internal.common_optimizers``, which needs ``expecttest``). The test
file itself is not in the wheel, so this module takes every constructor input the database lists
for SGD, Adagrad, RMSprop, Adam, AdamW, NAdam, RAdam and Adafactor (``optim_inputs_func``: tensor lr,
maximize, amsgrad, centered, nesterov, decoupled decay, ...) and runs the properties
test_optim.py checks on CPU, with torch's class as the oracle, on the torch and reference
backends:

- the same parameters as torch's default CPU path over 30 steps of both test models, float64 and
  float32, bit for bit, with an LR scheduler stepping every step;
- state dicts cross both ways mid-training (ours into torch's class and torch's into ours) and
  training continues identically;
- ``step(closure)`` returns the closure's loss; a second param group with its own lr; parameters
  without gradients are left alone (their state as torch keeps it); 0-d and empty parameters
  (not for Adafactor, which torch fails on: an empty parameter is left alone by ours).

Intentional differences from torch.optim (README): complex parameters, ``differentiable=True`` and
``fused=True`` are not supported, and SparseAdam/LBFGS are out of scope.
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch

from optgen.spec.loader import load_spec
from tests.models import MODELS, make_model
from tests.published import ROOT

common_optimizers = pytest.importorskip("torch.testing._internal.common_optimizers")

NAMES = {"SGD": "sgd", "Adagrad": "adagrad", "RMSprop": "rmsprop", "Adam": "adam", "AdamW": "adamw",
         "NAdam": "nadam", "RAdam": "radam", "Adafactor": "adafactor"}
STEPS = 30
#: (model, dtype) of each equivalence run
CASES = [(m, d) for m in MODELS for d in (torch.float64, torch.float32)]


def _inputs() -> list[tuple[str, str, dict]]:
    out = []
    for info in common_optimizers.optim_db:
        name = info.optim_cls.__name__
        if name not in NAMES:
            continue
        for inp in info.optim_inputs_func(device="cpu", dtype=torch.float32):
            out.append((name, inp.desc, dict(inp.kwargs)))
    return out


INPUTS = _inputs()


def _ours(name: str):
    spec = NAMES[name]
    return getattr(importlib.import_module(f"generated.{spec}"), load_spec(ROOT / "specs" / f"{spec}.yaml").model.class_)


def _kwargs(kwargs: dict, dtype: torch.dtype) -> dict:
    # a tensor lr of the database is float32; each run takes its own copy
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}


def _train(model, opt, steps: int, sched=None, start: int = 0) -> None:
    batch = type(model).batch(next(model.parameters()).dtype, seed=1 + start)
    for _ in range(steps):
        opt.zero_grad()
        model.loss(batch).backward()
        opt.step()
        if sched is not None:
            sched.step()


def _sched(opt):
    return torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)


def _same(a, b) -> None:
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.equal(x, y), (x - y).abs().max()


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("name,desc,kwargs", INPUTS, ids=[f"{n}-{d}" for n, d, _ in INPUTS])
def test_database_inputs_match_torch(name: str, desc: str, kwargs: dict, backend: str) -> None:
    ours_cls, torch_cls = _ours(name), getattr(torch.optim, name)
    for model_name, dtype in CASES:
        if isinstance(kwargs.get("lr"), torch.Tensor) and dtype == torch.float64:
            continue  # torch's tensor lr is float32 here; the float32 runs cover it
        a, b = make_model(model_name, dtype), make_model(model_name, dtype)
        oa = ours_cls(a.parameters(), backend=backend, **_kwargs(kwargs, dtype))
        ob = torch_cls(b.parameters(), **_kwargs(kwargs, dtype))
        _train(a, oa, STEPS, _sched(oa))
        _train(b, ob, STEPS, _sched(ob))
        _same(a, b)


@pytest.mark.parametrize("name,desc,kwargs", INPUTS, ids=[f"{n}-{d}" for n, d, _ in INPUTS])
def test_state_dicts_cross_with_torch(name: str, desc: str, kwargs: dict) -> None:
    ours_cls, torch_cls = _ours(name), getattr(torch.optim, name)
    dtype = torch.float32
    a, b = make_model("mlp", dtype), make_model("mlp", dtype)
    oa, ob = ours_cls(a.parameters(), backend="torch", **_kwargs(kwargs, dtype)), torch_cls(b.parameters(), **_kwargs(kwargs, dtype))
    _train(a, oa, 10)
    _train(b, ob, 10)
    # swap: each continues from the other's state dict in a fresh optimizer of the other class
    a2, b2 = make_model("mlp", dtype), make_model("mlp", dtype)
    with torch.no_grad():
        for x, y, z, w in zip(a2.parameters(), b2.parameters(), a.parameters(), b.parameters()):
            x.copy_(w)
            y.copy_(z)
    oa2 = ours_cls(a2.parameters(), backend="torch", **_kwargs(kwargs, dtype))
    oa2.load_state_dict(copy.deepcopy(ob.state_dict()))  # state_dict() holds the live tensors
    ob2 = torch_cls(b2.parameters(), **_kwargs(kwargs, dtype))
    ob2.load_state_dict(copy.deepcopy(oa.state_dict()))
    _train(a2, oa2, 10, start=10)
    _train(b, ob, 10, start=10)
    _same(a2, b)
    _train(b2, ob2, 10, start=10)
    _train(a, oa, 10, start=10)
    _same(b2, a)


#: torch.optim.Adafactor divides by an empty parameter's numel (ZeroDivisionError at its first
#: step, test below); the odd-shapes test leaves it out there
NO_EMPTY = {"Adafactor"}


@pytest.mark.parametrize("name", sorted(NAMES))
def test_closure_groups_missing_grads_and_odd_shapes(name: str) -> None:
    ours_cls, torch_cls = _ours(name), getattr(torch.optim, name)
    shapes = [(4, 3), (), (0,), (5,), (2, 2)] if name not in NO_EMPTY else [(4, 3), (), (5,), (2, 2)]
    runs = []
    for cls, extra in ((ours_cls, {"backend": "torch"}), (ours_cls, {"backend": "reference"}), (torch_cls, {})):
        g = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64)) for s in shapes]
        frozen = ps[-1]
        opt = cls([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.05}], lr=0.01, **extra)

        def closure(ps=ps, frozen=frozen):
            for p in ps:
                p.grad = None if p is frozen else torch.ones_like(p) * 0.5 + p.detach() * 0.1
            return torch.tensor(1.25, dtype=torch.float64)

        for _ in range(5):
            assert float(opt.step(closure)) == 1.25
        # a parameter without a gradient gets state only where torch creates it eagerly (Adagrad)
        frozen_state = {k: float(v) if k == "step" else v.clone() for k, v in opt.state.get(frozen, {}).items()}
        runs.append(([p.detach().clone() for p in ps], frozen_state))
    for ours, state in runs[:2]:
        for x, y in zip(ours, runs[2][0]):
            assert torch.equal(x, y), (x - y).abs().max()
        assert state.keys() == runs[2][1].keys()
        assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(runs[2][1][k])) for k, v in state.items())


@pytest.mark.parametrize("name", sorted(NO_EMPTY))
def test_empty_parameter_where_torch_fails(name: str) -> None:
    """torch's Adafactor fails on an empty parameter (``param.norm() / numel ** 0.5``); ours leaves
    it alone and steps the others as torch steps them without it."""
    ours_cls, torch_cls = _ours(name), getattr(torch.optim, name)
    empty = torch.nn.Parameter(torch.zeros(0))
    empty.grad = torch.zeros(0)
    with pytest.raises(ZeroDivisionError):
        torch_cls([empty]).step()
    runs = []
    for cls, params in ((ours_cls, 2), (torch_cls, 1)):
        ps = [torch.nn.Parameter(torch.linspace(-1, 1, 6).view(2, 3)), torch.nn.Parameter(torch.zeros(0))][:params]
        opt = cls(ps, **({"backend": "torch"} if cls is ours_cls else {}))
        for _ in range(3):
            for p in ps:
                p.grad = p.detach() * 0.5 + 0.25
            opt.step()
        runs.append(ps)
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1].numel() == 0
