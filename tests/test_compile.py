"""torch.compile around the whole training step (forward, backward, ``step()``, ``zero_grad``).

The optimizer step is one deliberate graph break (``torch.compiler.disable``): it runs the same
eager code as without compile, so (a) a compiled function that steps equals eager stepping bit for
bit for every spec, Prodigy's accumulators included, and (b) a compiled training step has no more
graph breaks and graphs than ``torch.optim.AdamW`` on the same model, with an LR scheduler moving
lr every step (counted in the same test), and gives the eager result up to the compiled
forward/backward's own rounding.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from torch._dynamo.utils import counters

from optgen.spec.loader import load_spec
from tests.models import MLP
from tests.published import ROOT

ALL = sorted(p.stem for p in (ROOT / "specs").glob("*.yaml"))
#: the specs whose whole compiled training loop is compared (the rest: the compiled step alone)
TRAINED = ["adamw", "adams", "prodigy_adv", "lion_prodigy_adv", "muon_adv", "adamw_adv"]


def _cls(spec: str):
    name = load_spec(ROOT / "specs" / f"{spec}.yaml").model.class_
    return getattr(importlib.import_module(f"generated.{spec}"), name)


def _make(spec: str | None):
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2) if spec is None else _cls(spec)(model.parameters(), backend="torch")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1 / (1 + 0.1 * k))
    return model, opt, sched


def _train(spec: str | None, compiled: bool, steps: int = 20):
    model, opt, sched = _make(spec)
    batch = MLP.batch(torch.float32)

    def train_step():
        opt.zero_grad()
        loss = model.loss(batch)
        loss.backward()
        opt.step()
        return loss

    fn = torch.compile(train_step) if compiled else train_step
    for _ in range(steps):
        fn()
        sched.step()
    return [p.detach().clone() for p in model.parameters()], opt


def _counted(spec: str | None) -> tuple[int, int, list]:
    torch._dynamo.reset()
    counters.clear()
    params, _ = _train(spec, compiled=True)
    return sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"], params


@pytest.fixture(scope="module")
def torch_counts() -> tuple[int, int]:
    breaks, graphs, _ = _counted(None)
    return breaks, graphs


@pytest.mark.parametrize("spec", TRAINED)
def test_compiled_training_step(spec: str, torch_counts) -> None:
    breaks, graphs, params = _counted(spec)
    assert breaks <= torch_counts[0] and graphs <= torch_counts[1], (breaks, graphs, torch_counts)
    eager, _ = _train(spec, compiled=False)
    for p, e in zip(params, eager):
        # inductor's forward/backward round differently from eager's (torch.optim.AdamW: ~1e-6)
        assert torch.allclose(p, e, rtol=1e-4, atol=1e-5), (p - e).abs().max()


@pytest.mark.parametrize("spec", ALL)
def test_compiled_step_is_the_eager_step(spec: str) -> None:
    """Gradients set eagerly, ``opt.step()`` inside a compiled function: bit-identical to eager."""
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model, opt, sched = _make(spec)
        gen = torch.Generator().manual_seed(1)
        fn = torch.compile(opt.step) if compiled else opt.step
        for _ in range(5):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=gen)
            fn()
            sched.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b), (a - b).abs().max()


def test_optimizer_constructed_inside_a_compiled_function() -> None:
    torch.manual_seed(0)
    model = MLP()
    cls = _cls("adamw")

    @torch.compile
    def build_and_step():
        opt = cls(model.parameters(), lr=1e-2)
        loss = model.loss(MLP.batch(torch.float32))
        loss.backward()
        opt.step()
        return opt

    opt = build_and_step()
    assert all(int(opt.state[p]["step"]) == 1 for p in model.parameters())
