"""Schedulers never rebuild anything on the triton backend.

``lr``, betas, momentum and weight decay are runtime values of the kernels (hyperparameter slots
read by the prologue), so a scheduler moving them every step must neither rebuild a group's tables
nor render kernels: exactly one table build per group over 25 steps under LambdaLR, OneCycleLR with
``cycle_momentum=True`` (it rewrites betas / momentum every step) and hand edits of each group's lr
and weight decay. The triton parameters must still follow the reference backend stepped under the
same schedule (the moving values are used, not frozen at build).
"""

from __future__ import annotations

import functools
import importlib

import pytest
import torch

from optgen.spec.loader import load_spec
from tests.published import ROOT

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(5, 7), (300,), (), (3, 4, 6)]
STEPS = 25  # CI time: the interpreter (a rebuild would show on the second step)
#: spec -> its constructor arguments for the test (momentum for SGD, so OneCycleLR can cycle it)
SPECS = {
    "adamw": {"weight_decay": 0.1},
    "adam": {},
    "sgd": {"momentum": 0.9},
    "nadam": {},
    "adams": {},
    "adamw_adv": {"weight_decay": 0.1},
    "prodigy_adv": {"weight_decay": 0.1, "lr": 0.1},  # OneCycleLR peaks at 10x lr: Prodigy at lr 10 diverges
    "muon_adv": {},
}


def _cls(spec: str):
    return getattr(importlib.import_module(f"generated.{spec}"), load_spec(ROOT / "specs" / f"{spec}.yaml").model.class_)


def _schedule(kind: str, opt):
    if kind == "lambda":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.1 * s))
    if kind == "onecycle":
        max_lr = [g["lr"] * 10 for g in opt.param_groups]
        # cycle_momentum rewrites betas (or momentum) every step; Muon_adv has neither (beta1)
        cycle = "betas" in opt.defaults or "momentum" in opt.defaults
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=STEPS + 1, cycle_momentum=cycle)
    return None


def _train(spec: str, backend: str, kind: str):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, device="cpu").to(DEVICE)) for s in SHAPES]
    groups = [{"params": params[:2]}, {"params": params[2:], "lr": 3e-4}]
    opt = _cls(spec)(groups, backend=backend, **SPECS[spec])
    sched = _schedule(kind, opt)
    for step in range(STEPS):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, device="cpu").to(DEVICE)
        if kind == "edits":  # a user's own schedule: per-group lr and weight decay moved by hand
            for i, g in enumerate(opt.param_groups):
                g["lr"] = 1e-3 * (1 + 0.5 * ((step + i) % 3))
                if "weight_decay" in g and g["weight_decay"]:
                    g["weight_decay"] = 0.1 + 0.01 * (step % 4)
        opt.step()
        if sched is not None:
            sched.step()
    return params, opt


@functools.cache
def _plain_builds(spec: str) -> int:
    return _train(spec, "triton", "none")[1]._triton_runner().builds


@pytest.mark.parametrize("kind", ["lambda", "onecycle", "edits"])
@pytest.mark.parametrize("spec", sorted(SPECS))
def test_scheduler_builds_tables_once(spec: str, kind: str) -> None:
    params, opt = _train(spec, "triton", kind)
    builds = opt._triton_runner().builds
    # One build per group (each group has its own tables), plus one where the first step creates a
    # state (SGD's momentum buffer: has() flips the path), exactly as without a scheduler.
    assert builds == _plain_builds(spec), f"{builds} table builds in {STEPS} steps"
    creates = spec == "sgd"
    assert builds == len(opt.param_groups) * (2 if creates else 1)
    ref, _ = _train(spec, "reference", kind)
    for p, r in zip(params, ref):
        tol = 5e-5 if spec in ("muon_adv", "prodigy_adv") else 2e-6
        assert torch.allclose(p.detach().cpu(), r.detach().cpu(), atol=tol, rtol=tol), (p - r).abs().max()


def test_a_flag_change_still_takes_another_path() -> None:
    """A flag that changes a kernel's structure still decides a path: SGD's nesterov switched on
    mid-training rebuilds. One that only guards element-wise statements is a select
    (AdamW's maximize): it rebuilds nothing. Both step as the reference backend does."""
    def run(backend: str, spec: str, flag: str):
        params, opt = _train(spec, backend, "lambda")
        opt.param_groups[0][flag] = True
        gen = torch.Generator().manual_seed(1)
        for _ in range(2):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(DEVICE)
            opt.step()
        return params, opt

    for spec, flag, path in (("sgd", "nesterov", True), ("adamw", "maximize", False)):
        params, opt = run("triton", spec, flag)
        builds = opt._triton_runner().builds
        assert builds > len(opt.param_groups) if path else builds == len(opt.param_groups), (flag, builds)
        ref, _ = run("reference", spec, flag)
        for p, r in zip(params, ref):
            assert torch.allclose(p.detach().cpu(), r.detach().cpu(), atol=2e-6, rtol=2e-6), (flag, (p - r).abs().max())


def test_a_moved_part_of_a_mixed_condition_takes_another_path() -> None:
    """adamw_adv's ``beta1 > 0 and ...ndim...`` is decided by the outcome of ``beta1 > 0``: moving
    beta1 within (0, 1) rebuilds nothing (above), setting it to 0 rebuilds once and drops the first
    moment exactly as the reference backend does."""
    def run(backend: str):
        params, opt = _train("adamw_adv", backend, "lambda")
        for g in opt.param_groups:
            g["betas"] = (0.0, g["betas"][1])
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(DEVICE)
            opt.step()
        return params, opt

    params, opt = run("triton")
    assert opt._triton_runner().builds == 2 * len(opt.param_groups)
    ref, _ = run("reference")
    for p, r in zip(params, ref):
        assert torch.allclose(p.detach().cpu(), r.detach().cpu(), atol=2e-6, rtol=2e-6), (p - r).abs().max()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("spec", ["adamw", "adams", "adamw_adv"])
def test_no_host_sync_under_a_scheduler(spec: str) -> None:
    """20 steps with LambdaLR after warm-up: no step synchronises with the device."""
    params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in SHAPES]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = _cls(spec)(params, backend="triton", **SPECS[spec])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.1 * s))
    for _ in range(2):  # tables, kernels and the first step's states
        opt.step()
        sched.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(20):
            opt.step()
            sched.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert opt._triton_runner().builds == 1


def test_a_flag_needing_an_unallocated_state_is_refused() -> None:
    """amsgrad switched on after the first step: its max_exp_avg_sq was never allocated. The runner
    refuses the path clearly (it read a null pointer before: a segfault)."""
    params, opt = _train("adamw", "triton", "none")
    opt.param_groups[0]["amsgrad"] = True
    for p in params:
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="state 'max_exp_avg_sq' of parameter 0 .* does not exist, but the "
                                           "branch path its group takes now reads it"):
        opt.step()
