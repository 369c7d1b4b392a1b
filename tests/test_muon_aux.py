"""Muon_adv / AdaMuon_adv's auxiliary AdamW features (the adam_* arguments; block features of
specs/blocks/adamw_aux.yaml, docs/block_features.md) against the published adv_optm 2.5.16 from
site-packages: bit-identical (tolerance 0) on the torch and reference backends, float32 and bf16
parameters with stochastic rounding, over 100 steps on both models.

The full matrix is ``extended``; the default run takes a sample (fewer steps). Each case switches on
at least one adam_* flag; ``use_muon=False`` sends the matrices through the aux path too (its 2-D
OrthoGrad and spectral normalisation), and the transformer's (3, 8, 8) and (8, 1) parameters take
the aux path with 2 or more dims under auto-routing.
"""

from __future__ import annotations

import pytest
import torch

from tests.models import make_model, max_diffs, train
from tests.published import ours_factory, published_factory

STEPS = 100
SAMPLE_STEPS = 12

#: (spec, setting): each with an aux feature on
CASES: list[tuple[str, dict]] = [
    ("muon_adv", {"adam_use_atan2": True}),
    ("muon_adv", {"adam_use_atan2": True, "adam_weight_decay": 0.1, "cautious_wd": True, "use_muon": False}),
    ("muon_adv", {"adam_nesterov": True}),
    ("muon_adv", {"adam_nesterov": True, "adam_nesterov_coef": 0.7, "adam_use_atan2": True,
                  "adam_betas": [0.8, 0.95]}),
    ("muon_adv", {"adam_orthogonal_gradient": "flattened", "adam_weight_decay": 0.05}),
    ("muon_adv", {"adam_orthogonal_gradient": "iterative", "use_muon": False}),
    ("muon_adv", {"adam_orthogonal_gradient": "flattened", "orthogonal_gradient": "flattened",
                  "adam_nesterov": True}),
    ("muon_adv", {"adam_spectral_normalization": True, "lr": 0.01}),
    ("muon_adv", {"adam_spectral_normalization": True, "adam_use_atan2": True, "lr": 0.01,
                  "use_muon": False}),  # the aux step size keeps 4/pi under it
    ("muon_adv", {"adam_spectral_normalization": True, "spectral_normalization": True, "lr": 0.01}),
    ("muon_adv", {"adam_fisher_wd": True, "adam_weight_decay": 0.1}),  # a no-op in adv_optm 2.5.16
    ("adamuon_adv", {"adam_use_atan2": True, "use_atan2": True}),
    ("adamuon_adv", {"adam_nesterov": True, "adam_orthogonal_gradient": "flattened", "adam_weight_decay": 0.1}),
    ("adamuon_adv", {"adam_spectral_normalization": True, "lr": 0.01, "adam_use_bias_correction": False}),
]
#: the default run's sample: (case index, model, dtype)
SAMPLE = [(1, "mlp", torch.bfloat16), (3, "transformer", torch.float32), (5, "mlp", torch.float32),
          (8, "transformer", torch.bfloat16), (9, "transformer", torch.float32), (11, "transformer", torch.bfloat16)]


def _ident(i: int) -> str:
    spec, setting = CASES[i]
    return f"{i}-{spec}" + "".join(f"-{k}={v}" for k, v in setting.items())


def _compare(spec: str, setting: dict, model: str, dtype: torch.dtype, steps: int) -> dict[str, float]:
    from adv_optm.util import param_update

    from optgen.numerics import stochastic

    torch.set_default_dtype(torch.float32)
    # spectral vectors are drawn from adv_optm's stream at construction: both streams start here
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
