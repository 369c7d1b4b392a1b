"""Prodigy_adv's D-adaptation against adv_optm 2.5.16 beyond the final parameters: the group keys
(``d``, ``d_max``, ``d_numerator``, ``k``) and the stored state after every step, ``prodigy_steps``
freezing ``d`` and freeing the slices, param groups with their own lr and betas, stepping
parameters one at a time, and the state_dict round trip."""

from __future__ import annotations

import pytest
import torch

from generated.prodigy_adv import Prodigy_adv
from tests.published import published_class

ADV = published_class("adv-optm==2.5.16", "adv_optm.Prodigy_adv")
GLOBALS = ("d", "d_max", "d_numerator", "k")
#: adv_optm's bookkeeping entries, which optgen does not keep
ADV_ONLY = {"step", "shifter", "effective_shape", "factored", "factored_2nd"}


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    # a matrix, an all-zero bias (p0 is then adv_optm's 0-d zero), a vector, a 3-D tensor, a scalar
    shapes = [(6, 5), (7,), (23,), (2, 3, 4), ()]
    out = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    with torch.no_grad():
        out[1].zero_()
    return out


def _grads(params: list[torch.Tensor], step: int) -> None:
    g = torch.Generator().manual_seed(1000 + step)
    for p in params:
        # a consistent direction plus noise, so that d grows as it does in training
        p.grad = (0.5 * p.detach() + 0.3 * torch.randn(p.shape, generator=g)).to(p.dtype)


def _run(make, steps: int, seed: int = 0, groups=None):
    params = _params(seed)
    opt = make(groups(params) if groups else params)
    history = []
    for i in range(steps):
        _grads(params, i)
        opt.step()
        history.append([tuple(g[k] for k in GLOBALS) for g in opt.param_groups])
    return params, opt, history


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("setting", [{}, {"state_precision": "factored", "weight_decay": 0.1, "slice_p": 2}],
                         ids=["dense", "factored"])
def test_group_keys_and_state_equal_adv_optm_every_step(backend: str, setting: dict) -> None:
    torch.set_default_dtype(torch.float32)
    p_adv, o_adv, h_adv = _run(lambda ps: ADV(ps, lr=0.5, **setting), 12)
    p_our, o_our, h_our = _run(lambda ps: Prodigy_adv(ps, lr=0.5, backend=backend, **setting), 12)
    assert h_our == h_adv  # d, d_max, d_numerator and k, exactly, after every step
    assert h_adv[-1][0][0] > 10 * h_adv[0][0][0], "d did not grow: the test cannot see D-adaptation"
    for a, b in zip(p_adv, p_our):
        assert torch.equal(a, b)
        sa = {k: v for k, v in o_adv.state[a].items() if k not in ADV_ONLY}
        sb = {k: v for k, v in o_our.state[b].items() if k != "step"}
        assert sa.keys() == sb.keys()
        for k in sa:
            assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape, k
            assert torch.equal(sa[k], sb[k]), k
    assert o_our.state[p_our[1]]["p0"].shape == ()  # the all-zero bias


def test_prodigy_steps_freezes_d_and_frees_the_slices() -> None:
    torch.set_default_dtype(torch.float32)
    p_adv, o_adv, h_adv = _run(lambda ps: ADV(ps, lr=0.5, prodigy_steps=4), 8)
    p_our, o_our, h_our = _run(lambda ps: Prodigy_adv(ps, lr=0.5, prodigy_steps=4), 8)
    assert h_our == h_adv
    assert len({h[0][0] for h in h_our[4:]}) == 1  # d frozen from step k = prodigy_steps on
    for a, b in zip(p_adv, p_our):
        assert torch.equal(a, b)
        assert "s" not in o_our.state[b] and "p0" not in o_our.state[b]


def test_groups_step_with_their_lr_and_the_first_groups_betas() -> None:
    """adv_optm reads betas and beta3 from param_groups[0] for every group (``first_group``)."""
    torch.set_default_dtype(torch.float32)

    def groups(ps):
        return [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.2, "betas": (0.5, 0.9), "beta3": 0.7}]

    p_adv, _, h_adv = _run(lambda g: ADV(g, lr=0.5), 10, groups=groups)
    p_our, _, h_our = _run(lambda g: Prodigy_adv(g, lr=0.5), 10, groups=groups)
    assert h_our == h_adv
    for a, b in zip(p_adv, p_our):
        assert torch.equal(a, b)


def test_step_parameter_then_finish_step_equals_step() -> None:
    """adv_optm's per-parameter API: step_parameter for each, then finish_step() (its
    calculate_d() + init_step()), in any order, gives step()'s result."""
    torch.set_default_dtype(torch.float32)
    p_ref, _, h_ref = _run(lambda ps: Prodigy_adv(ps, lr=0.5), 6)
    params = _params()
    opt = Prodigy_adv(params, lr=0.5)
    for i in range(6):
        _grads(params, i)
        for p in reversed(params):
            opt.step_parameter(p)
        opt.finish_step()
    assert [tuple(opt.param_groups[0][k] for k in GLOBALS)] == h_ref[-1]
    for a, b in zip(p_ref, params):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_state_dict_round_trip_mid_training(backend: str) -> None:
    torch.set_default_dtype(torch.float32)
    p_ref, _, h_ref = _run(lambda ps: Prodigy_adv(ps, lr=0.5, backend=backend), 8)
    params = _params()
    opt = Prodigy_adv(params, lr=0.5, backend=backend)
    for i in range(4):
        _grads(params, i)
        opt.step()
    saved = opt.state_dict()
    fresh = Prodigy_adv(params, lr=0.5, backend=backend)
    fresh.load_state_dict(saved)
    for i in range(4, 8):
        _grads(params, i)
        fresh.step()
    assert [tuple(fresh.param_groups[0][k] for k in GLOBALS)] == h_ref[-1]
    for a, b in zip(p_ref, params):
        assert torch.equal(a, b)


def test_lion_prodigy_factored_momentum_decays_with_beta2_unless_compat() -> None:
    """adv_optm 2.2.3 decays a factored Lion_Prodigy momentum with beta1 (§9.11); optgen uses
    beta2 unless compat_factored_beta1=True. With beta1 == beta2 the two agree, and agree with adv."""
    from generated.lion_prodigy_adv import Lion_Prodigy_adv

    adv = published_class("adv-optm==2.2.3", "adv_optm.Lion_Prodigy_adv")
    torch.set_default_dtype(torch.float32)
    runs = {}
    for betas in ((0.9, 0.9), (0.9, 0.99)):
        for compat in (False, True):
            params, _, hist = _run(lambda ps, b=betas, c=compat: Lion_Prodigy_adv(
                ps, lr=0.5, betas=b, nnmf_factor=True, compat_factored_beta1=c), 8)
            runs[betas, compat] = (params, hist)
        p_adv, _, h_adv = _run(lambda ps, b=betas: adv(ps, lr=0.5, betas=b, nnmf_factor=True), 8)
        assert runs[betas, True][1] == h_adv
        assert all(torch.equal(a, b) for a, b in zip(p_adv, runs[betas, True][0]))
    same = runs[(0.9, 0.9), False][0], runs[(0.9, 0.9), True][0]
    assert all(torch.equal(a, b) for a, b in zip(*same))
    fixed, compat = runs[(0.9, 0.99), False][0], runs[(0.9, 0.99), True][0]
    assert not all(torch.equal(a, b) for a, b in zip(fixed, compat))


@pytest.mark.parametrize("spec", ["prodigy_adv", "lion_prodigy_adv"])
def test_triton_d_adaptation_follows_the_reference(spec: str) -> None:
    """The triton backend (interpreter on CPU) while d grows: d, d_max, d_numerator and
    the parameters follow the reference to float32 rounding (the sums run in another order)."""
    pytest.importorskip("triton")
    import importlib

    cls = getattr(importlib.import_module(f"generated.{spec}"),
                  {"prodigy_adv": "Prodigy_adv", "lion_prodigy_adv": "Lion_Prodigy_adv"}[spec])
    torch.set_default_dtype(torch.float32)
    kwargs = {"lr": 0.5, "weight_decay": 0.1, "slice_p": 2, "d_limiter": False}
    p_ref, _, h_ref = _run(lambda ps: cls(ps, backend="reference", **kwargs), 16)
    p_tri, _, h_tri = _run(lambda ps: cls(ps, backend="triton", **kwargs), 16)
    assert h_ref[-1][0][0] > 3 * h_ref[0][0][0], "d did not grow: the test cannot see D-adaptation"
    for a, b in zip(h_ref, h_tri):
        assert a[0][3] == b[0][3]  # k
        for x, y in zip(a[0][:3], b[0][:3]):
            assert abs(x - y) <= 1e-5 * abs(x), (a, b)
    for a, b in zip(p_ref, p_tri):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (a - b).abs().max()
