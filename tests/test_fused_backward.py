"""The fused backward pass: each parameter stepped from its post-accumulate-grad hook and its
gradient freed at once gives the same parameters as backward() then step(), on every backend."""

from __future__ import annotations

import importlib

import pytest
import torch

from tests.models import make_model

CASES = [("adamw", "AdamW", {}), ("adamw_adv", "AdamW_adv", {"weight_decay": 0.1, "use_atan2": True}),
         ("adamw_adv", "AdamW_adv", {"kourkoutas_beta": True, "k_warmup_steps": 2}),
         ("lion_adv", "Lion_adv", {}), ("adopt_adv", "Adopt_adv", {"lr": 1e-3}),
         ("adamw_adv", "AdamW_adv", {"nnmf_factor": True}), ("muon_adv", "Muon_adv", {"weight_decay": 0.1}),
         # finalize (Prodigy's d) runs once when the backward pass ends; sums in parameter order
         ("prodigy_adv", "Prodigy_adv", {"lr": 0.3, "weight_decay": 0.1})]
BACKENDS = ["torch", "reference", "triton"]


def _cls(spec: str, name: str):
    return getattr(importlib.import_module(f"generated.{spec}"), name)


def _train(model, opt, fused: bool, steps: int) -> None:
    batch = model.batch(torch.float32)
    handle = opt.attach_fused_backward() if fused else None
    for _ in range(steps):
        loss = model.loss(batch)
        loss.backward()
        if not fused:
            opt.step()
            opt.zero_grad()
        else:
            assert all(p.grad is None for p in model.parameters()), "gradients must be freed in backward"
    if handle is not None:
        handle.remove()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("spec", "name", "kwargs"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_fused_backward_equals_step(spec: str, name: str, kwargs: dict, backend: str) -> None:
    if backend == "triton":
        pytest.importorskip("triton")
    steps = 5 if backend == "triton" else 30
    results = []
    for fused in (False, True):
        model = make_model("transformer", torch.float32)
        opt = _cls(spec, name)(model.parameters(), backend=backend, **kwargs)
        _train(model, opt, fused, steps)
        results.append([p.detach().clone() for p in model.parameters()])
        assert all(int(opt.state[p]["step"]) == steps for p in model.parameters() if "step" in opt.state[p])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_remove_detaches_and_step_parameter_checks_membership() -> None:
    model = make_model("mlp", torch.float32)
    opt = _cls("adamw", "AdamW")(model.parameters())
    with opt.attach_fused_backward():
        model.loss(model.batch(torch.float32)).backward()
    assert all(p.grad is None for p in model.parameters())
    model.loss(model.batch(torch.float32)).backward()  # detached: gradients stay
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="not in any param group"):
        stranger = torch.nn.Parameter(torch.ones(2))
        stranger.grad = torch.ones(2)
        opt.step_parameter(stranger)
