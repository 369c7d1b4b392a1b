"""SinkSGD_adv and rank-2 ("iterative") OrthoGrad (issue 16 item 5) against the published adv_optm
2.5.16 from site-packages: bit-identical (tolerance 0) on the torch and reference backends, float32
and bf16 parameters with stochastic rounding (both backends draw adv_optm's random stream, re-seeded
before each run), math/adv-optm.md §3.6 and §2.6.

The full matrix (every case, both models, both dtypes, 100 steps) is ``extended``; the default run
takes a sample (a few cases, fewer steps) and checks the numerics (SR-Sinkhorn, rank-2 OrthoGrad)
against adv_optm's own functions on shapes the models lack. The triton backend refuses SinkSGD_adv
at construction and the iterative OrthoGrad path when a group takes it (tested here).
"""

from __future__ import annotations

import pytest
import torch

from tests.test_adv_rest import _compare

STEPS = 100
SAMPLE_STEPS = 4

#: (spec, setting): SinkSGD_adv's options, then 'iterative' OrthoGrad on every 2.5.16 spec with it
CASES: list[tuple[str, dict]] = [
    ("sinksgd_adv", {}),
    ("sinksgd_adv", {"momentum": 0.9, "weight_decay": 0.1}),
    ("sinksgd_adv", {"momentum": 0.9, "nesterov": True, "cautious_wd": True, "weight_decay": 0.2}),
    ("sinksgd_adv", {"momentum": 0.95, "normed_momentum": True}),
    ("sinksgd_adv", {"momentum": 0.9, "normed_momentum": True, "nesterov": True, "nesterov_coef": 0.5}),
    ("sinksgd_adv", {"momentum": 0.9, "normed_momentum": True, "snr_cond": True}),
    ("sinksgd_adv", {"momentum": 0.9, "snr_cond": True, "geometric_wd": True, "weight_decay": 0.1}),
    ("sinksgd_adv", {"momentum": 0.9, "geometric_wd": True, "weight_decay": 0.1, "cautious_wd": True}),
    ("sinksgd_adv", {"geometric_wd": True, "weight_decay": 0.1}),
    ("sinksgd_adv", {"orthogonal_sinkhorn": True, "sinkhorn_iterations": 3, "momentum": 0.9}),
    ("sinksgd_adv", {"orthogonal_sinkhorn": True, "normed_momentum": True, "momentum": 0.9, "snr_cond": True,
                     "geometric_wd": True, "weight_decay": 0.05}),
    ("sinksgd_adv", {"sinkhorn_iterations": 1, "orthogonal_gradient": "iterative"}),
    ("sinksgd_adv", {"sinkhorn_iterations": 0, "momentum": 0.5, "nesterov": True}),
    ("sinksgd_adv", {"momentum": 0.9, "orthogonal_gradient": "flattened", "normed_momentum": True}),
    ("sinksgd_adv", {"centered_wd": 0.5, "cautious_wd": True, "momentum": 0.9, "lr": 0.0003}),
    ("sinksgd_adv", {"centered_wd": 0.5, "centered_wd_mode": "full", "weight_decay": 0.1}),
    ("sinksgd_adv", {"momentum": 0.9, "state_precision": "bf16_sr"}),
    ("sinksgd_adv", {"momentum": 0.9, "state_precision": "int8_sr", "nesterov": True}),
    ("sinksgd_adv", {"momentum": 0.9, "state_precision": "fp32", "snr_cond": True, "normed_momentum": True}),
    ("adamw_adv", {"orthogonal_gradient": "iterative"}),
    ("adamw_adv", {"orthogonal_gradient": "iterative", "state_precision": "fp32", "weight_decay": 0.1}),
    ("adopt_adv", {"orthogonal_gradient": "iterative", "lr": 0.001}),
    ("prodigy_adv", {"orthogonal_gradient": "iterative", "lr": 0.3}),
    ("lion_adv", {"orthogonal_gradient": "iterative"}),
    ("signsgd_adv", {"orthogonal_gradient": "iterative", "normed_momentum": True}),
    ("muon_adv", {"orthogonal_gradient": "iterative", "lr": 0.01}),
    ("adamuon_adv", {"orthogonal_gradient": "iterative", "lr": 0.01}),
]
#: the default run's sample: (case index, model, dtype)
SAMPLE = [(6, "transformer", torch.bfloat16), (10, "mlp", torch.float32), (16, "mlp", torch.float32),
          (19, "mlp", torch.bfloat16)]


def _cls(spec: str):
    import importlib

    from optgen.spec.loader import load_spec
    from tests.published import ROOT

    return getattr(importlib.import_module(f"generated.{spec}"), load_spec(ROOT / "specs" / f"{spec}.yaml").model.class_)


def _ident(i: int) -> str:
    spec, setting = CASES[i]
    return f"{i}-{spec}-" + "-".join(f"{k}={v}" for k, v in setting.items())


@pytest.mark.parametrize(("index", "model", "dtype"), SAMPLE,
                         ids=[f"{_ident(i)}-{m}-{str(d)[6:]}" for i, m, d in SAMPLE])
def test_sample_matches_adv_optm(index: int, model: str, dtype: torch.dtype) -> None:
    spec, setting = CASES[index]
    _compare(spec, setting, model, dtype, SAMPLE_STEPS)


@pytest.mark.extended
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("model", ["mlp", "transformer"])
@pytest.mark.parametrize("index", range(len(CASES)), ids=[_ident(i) for i in range(len(CASES))])
def test_matches_adv_optm(index: int, model: str, dtype: torch.dtype) -> None:
    spec, setting = CASES[index]
    _compare(spec, setting, model, dtype, STEPS)


#: wide, tall, square, a column, a row, 3-D and 4-D (seen as (shape[0], -1))
SHAPES = [(5, 12), (12, 5), (7, 7), (9, 1), (1, 9), (3, 4, 6), (2, 3, 2, 5)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_numerics_match_adv_optm_functions(dtype: torch.dtype) -> None:
    """optgen.numerics.sinkhorn against adv_optm's util/sinkhorn.py and util/OrthoGrad.py, in
    the input's dtype, bit for bit; optgen's leave their input alone, adv_optm's work in place."""
    from adv_optm.util.OrthoGrad import iterative_ortho_project
    from adv_optm.util.sinkhorn import apply_sr_sinkhorn

    from optgen.numerics import sinkhorn as sk

    gen = torch.Generator().manual_seed(0)
    for shape in SHAPES:
        p = torch.randn(shape, generator=gen).to(dtype)
        g = (torch.randn(shape, generator=gen) * torch.rand(shape[0], *[1] * (len(shape) - 1), generator=gen)).to(dtype)
        before = g.clone()
        for iters, ortho in ((5, False), (2, True), (0, False)):
            assert torch.equal(sk.sinkhorn(g, p, iters, ortho), apply_sr_sinkhorn(g.clone(), iters, p, ortho))
        assert torch.equal(sk.orthograd_iterative(g, p), iterative_ortho_project(p, g.clone()))
        assert torch.equal(g, before)
        g2 = g.view(shape[0], -1)
        for d in (0, 1):
            assert torch.equal(sk.view_norm(g, d).reshape(-1), torch.linalg.vector_norm(g2, 2, dim=d).reshape(-1))
            assert torch.equal(sk.view_mean(g, d).reshape(-1), g2.mean(dim=d).reshape(-1))


def test_grad_is_left_as_given() -> None:
    """adv_optm normalises p.grad in place (normed_momentum's Sinkhorn, the vectors' sign, the
    iterative OrthoGrad where the gradient is not upcast); optgen leaves the user's .grad alone."""
    params = [torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(5))]
    for spec, kw in (("sinksgd_adv", {"normed_momentum": True, "momentum": 0.9, "orthogonal_gradient": "iterative"}),
                     ("adamw_adv", {"orthogonal_gradient": "iterative"})):
        for backend in ("torch", "reference"):
            opt = _cls(spec)(params, backend=backend, **kw)
            grads = [torch.randn(p.shape) for p in params]
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
            assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))


@pytest.mark.parametrize(("setting", "message"), [
    ({"state_precision": "factored"}, "factored states"),
    ({"nnmf_factor": True}, "factored states"),
    ({"snr_cond": True, "normed_momentum": True}, "snr_cond needs momentum > 0"),
    ({"spectral_normalization": True}, "spectral_normalization=True is not supported"),
    ({"centered_wd": 0.1, "geometric_wd": True}, "centered_wd with geometric_wd=True is not implemented"),
    ({"sinkhorn_iterations": -1}, "sinkhorn_iterations"),
])
def test_not_implemented_options_are_refused(setting: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _cls("sinksgd_adv")([torch.nn.Parameter(torch.randn(3, 2))], **setting)


def test_triton_refuses_iterative_orthograd_with_a_message() -> None:
    """The triton backend has no rank-2 OrthoGrad: a group taking that path is refused by name
    (its other paths keep their kernels: 'flattened' still runs)."""
    pytest.importorskip("triton")
    from tests.test_triton import DEVICE

    p = torch.nn.Parameter(torch.randn(4, 3, device=DEVICE))
    opt = _cls("adamw_adv")([p], backend="triton", orthogonal_gradient="iterative")
    p.grad = torch.randn_like(p)
    with pytest.raises(RuntimeError, match="orthogonal_gradient='iterative'.*not implemented yet"):
        opt.step()
