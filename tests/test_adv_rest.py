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
]
#: the default run's sample: (case index, model, dtype)
SAMPLE = [(0, "mlp", torch.bfloat16), (3, "mlp", torch.float32), (7, "mlp", torch.bfloat16),
          (11, "mlp", torch.float32)]


def _ident(i: int) -> str:
    spec, setting = CASES[i]
    return f"{i}-{spec}-" + "-".join(f"{k}={v}" for k, v in setting.items())


def _compare(spec: str, setting: dict, model: str, dtype: torch.dtype, steps: int) -> dict[str, float]:
    torch.set_default_dtype(torch.float32)
    expected, ref_losses = train(make_model(model, dtype), published_factory(spec, setting, dtype), steps, dtype)
    assert all(x == x for x in ref_losses), "the published optimizer diverged: a bad setting"
    out = {}
    for backend in ("torch", "reference"):
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


@pytest.mark.extended
@pytest.mark.parametrize("index", range(len(CASES)), ids=[_ident(i) for i in range(len(CASES))])
def test_triton_matches_reference(index: int) -> None:
    _triton(index, 5)
