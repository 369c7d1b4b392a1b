"""The adv_optm options issue 16 item 5 adds (factored_2nd, centered weight decay, spectral
normalisation, stochastic sign, iterative OrthoGrad, SinkSGD_adv, Muon's aux-Adam features, factored
Adopt 2.2.3) against the published adv_optm (2.5.16 from site-packages, 2.2.3 from
``.deps/adv_optm_2_2_3``): bit-identical (tolerance 0) on the torch and reference backends, float32
and bf16 parameters with stochastic rounding (both backends draw adv_optm's random stream).

The full matrix (every case, both models, both dtypes, 100 steps) is ``extended``; the default run
takes a sample (a few cases, fewer steps). The triton backend is checked against the reference
backend under the interpreter (its own atan2, summation order and Philox rounding: the tolerance of
tests/test_triton.py).
"""

from __future__ import annotations

import pytest
import torch

from tests.models import make_model, max_diffs, train
from tests.published import ours_factory, published_factory

STEPS = 100
SAMPLE_STEPS = 12

#: (spec, setting): every option this file covers, each where adv_optm has it
CASES: list[tuple[str, dict]] = [
    ("adamw_adv", {"factored_2nd": True, "weight_decay": 0.1}),
    ("adamw_adv", {"factored_2nd": True, "normed_momentum": True, "nesterov": True}),
    ("adamw_adv", {"factored_2nd": True, "use_atan2": True, "vector_reshape": True}),
    ("adopt_adv", {"lr": 0.001, "factored_2nd": True, "weight_decay": 0.1}),
    ("adopt_adv", {"lr": 0.001, "factored_2nd": True, "use_atan2": True, "nesterov": True}),
    ("prodigy_adv", {"lr": 0.1, "factored_2nd": True, "weight_decay": 0.1}),
    ("prodigy_adv", {"lr": 0.1, "factored_2nd": True, "use_atan2": True}),
    ("adamw_adv", {"centered_wd": 0.5, "weight_decay": 0.1, "cautious_wd": True, "lr": 0.01}),
    ("adamw_adv", {"centered_wd": 0.5, "centered_wd_mode": "full", "lr": 0.01}),
    ("adopt_adv", {"centered_wd": 0.5, "weight_decay": 0.1, "lr": 0.003}),
    ("prodigy_adv", {"centered_wd": 0.5, "weight_decay": 0.1, "lr": 1.0}),
    ("lion_adv", {"centered_wd": 0.5, "centered_wd_mode": "full", "lr": 0.001}),
    ("signsgd_adv", {"centered_wd": 0.5, "cautious_wd": True, "lr": 0.001}),
    ("muon_adv", {"centered_wd": 0.5, "weight_decay": 0.1, "cautious_wd": True, "lr": 0.01}),
    ("adamuon_adv", {"centered_wd": 0.5, "centered_wd_mode": "full", "lr": 0.01}),
    # stochastic sign: its noise comes from adv_optm's stream (re-seeded before each run)
    ("lion_adv", {"stochastic_sign": True, "lr": 0.001}),
    ("lion_adv", {"stochastic_sign": True, "weight_decay": 0.1, "cautious_wd": True, "betas": [0.95, 0.98]}),
    ("signsgd_adv", {"stochastic_sign": True, "lr": 0.001}),
    ("signsgd_adv", {"stochastic_sign": True, "normed_momentum": True, "nesterov": True, "lr": 0.001}),
    ("signsgd_adv", {"stochastic_sign": True, "geometric_wd": True, "weight_decay": 0.1, "normed_momentum": True,
                     "snr_cond": True, "lr": 0.001}),
    ("signsgd_adv", {"stochastic_sign": True, "geometric_wd": True, "weight_decay": 0.1, "momentum": 0.0}),
    ("signsgd_adv", {"stochastic_sign": True, "state_precision": "bf16_sr", "momentum": 0.95, "lr": 0.001}),
    # geometric decay's target from the parameter in its own dtype (bf16 differed by 7.6e-6 before)
    ("signsgd_adv", {"geometric_wd": True, "weight_decay": 0.1, "momentum": 0.0}),
]
#: the default run's sample: (case index, model, dtype)
SAMPLE = [(0, "mlp", torch.bfloat16), (3, "mlp", torch.float32), (7, "mlp", torch.bfloat16),
          (11, "mlp", torch.float32), (15, "transformer", torch.bfloat16), (19, "transformer", torch.float32),
          (22, "mlp", torch.bfloat16)]


def _ident(i: int) -> str:
    spec, setting = CASES[i]
    return f"{i}-{spec}-" + "-".join(f"{k}={v}" for k, v in setting.items())


def _compare(spec: str, setting: dict, model: str, dtype: torch.dtype, steps: int) -> dict[str, float]:
    from adv_optm.util import param_update

    from optgen.numerics import stochastic

    torch.set_default_dtype(torch.float32)
    # adv_optm re-seeds its stream at construction only for bf16 parameters: the stochastic sign's
    # float32 runs start both streams from the seed here
    param_update.set_seed(torch.device("cpu"))
    expected, ref_losses = train(make_model(model, dtype), published_factory(spec, setting, dtype), steps, dtype)
    assert all(x == x for x in ref_losses), "the published optimizer diverged: a bad setting"
    out = {}
    for backend in ("torch", "reference"):
        stochastic.reseed({torch.device("cpu")})
        got, losses = train(make_model(model, dtype), ours_factory(spec, setting, backend, dtype), steps, dtype)
        out[backend] = max_diffs(got, expected)[0]
        assert out[backend] == 0.0, f"{backend}: max abs diff {out[backend]:.3e} after {steps} steps"
        assert losses == ref_losses
    return out


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


def _triton(index: int, steps: int) -> None:
    pytest.importorskip("triton")
    from tests.test_triton import SHAPES, TOLERANCE, _run

    spec, setting = CASES[index]
    expected, _ = _run(spec, setting, "reference", torch.float32, steps=steps)
    got, _ = _run(spec, setting, "triton", torch.float32, steps=steps)
    for e, g, shape in zip(expected, got, SHAPES):
        bound = TOLERANCE.get(spec, 2e-6) * (1 + e.abs())
        assert torch.all((g - e).abs() <= bound), f"{shape}: max diff {(g - e).abs().max():.3e}"


#: the default run's triton sample (the interpreter is slow)
TRITON_SAMPLE = [7]


@pytest.mark.parametrize("index", TRITON_SAMPLE, ids=[_ident(i) for i in TRITON_SAMPLE])
def test_triton_sample_matches_reference(index: int) -> None:
    _triton(index, 3)


#: the cases triton can match the reference on (the stochastic sign's noise is Philox there)
DETERMINISTIC = [i for i, (_, setting) in enumerate(CASES) if not setting.get("stochastic_sign")]


@pytest.mark.extended
@pytest.mark.parametrize("index", DETERMINISTIC, ids=[_ident(i) for i in DETERMINISTIC])
def test_triton_matches_reference(index: int) -> None:
    _triton(index, 5)


@pytest.mark.parametrize("spec", ["lion_adv", "signsgd_adv"])
def test_triton_stochastic_sign_is_calibrated(spec: str) -> None:
    """The triton backend's stochastic sign (Philox noise, not adv_optm's stream): one step from zero
    momentum moves the parameter by -lr * sign(y + U[-1, 1)), y the gradient divided by its row
    max-abs, then by its column max-abs (math §2.14, computed here with torch): every move is +-1,
    the elements where |y| = 1 keep the gradient's sign, and the sign is unbiased for y (its
    deviation over 1920 elements within 5 sigma); vectors take the plain sign."""
    pytest.importorskip("triton")
    from tests.test_triton import _cls

    gen = torch.Generator().manual_seed(0)
    g = torch.randn(48, 40, generator=gen) * torch.rand(48, 1, generator=gen) * torch.rand(1, 40, generator=gen)
    gv = torch.randn(17, generator=gen)
    p, v = torch.nn.Parameter(torch.zeros(48, 40)), torch.nn.Parameter(torch.zeros(17))
    first = {"betas": [0.0, 0.0]} if spec == "lion_adv" else {"momentum": 0.0}
    opt = _cls(spec)([p, v], lr=1.0, stochastic_sign=True, backend="triton", **first)
    p.grad, v.grad = g.clone(), gv.clone()
    opt.step()
    s = -p.detach()
    y = g / g.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
    y = y / y.abs().amax(dim=0, keepdim=True).clamp_min(1e-12)
    assert set(s.unique().tolist()) <= {-1.0, 1.0}
    ones = y.abs() == 1
    assert ones.any() and torch.equal(s[ones], torch.sign(y[ones]))
    z = ((s - y).sum() / (1 - y * y).sum().sqrt()).item()
    assert abs(z) < 5, z
    assert torch.equal(-v.detach(), torch.sign(gv))
