"""adv_optm 2.5.16's centered weight decay, the modes and combinations issue 16 item 5 left: the
blockwise anchors (``centered_wd_mode='int8'`` / ``'int4'``, a read-only coded state:
optgen.ir.codecs.MinMaxBlocks) and centered decay with ``fisher_wd`` (both decays scaled by the
Fisher scale, math/adv-optm.md §2.10), against the published classes: bit-identical (tolerance 0)
on the torch and reference backends, float32 and bf16 parameters with stochastic rounding.

The full matrix (every case, both models, both dtypes, 100 steps) is ``extended``; the default run
takes a sample (a few cases, 12 steps). The codec itself is checked against adv_optm's
``_init_anchor`` / ``dequantize_anchor`` on ragged sizes, the state dicts against adv_optm's keys,
dtypes and shapes (loaded both ways), and the triton backend refuses the blockwise modes by name.
"""

from __future__ import annotations

import pytest
import torch

from tests.models import make_model, max_diffs, train
from tests.published import ours_factory, published_factory

STEPS = 100
SAMPLE_STEPS = 12

#: (spec, setting): every class that takes centered_wd, each blockwise mode, and fisher_wd
CASES: list[tuple[str, dict]] = [
    ("adamw_adv", {"centered_wd": 0.5, "centered_wd_mode": "int8", "weight_decay": 0.1, "lr": 0.01}),
    ("adamw_adv", {"centered_wd": 0.5, "centered_wd_mode": "int4", "cautious_wd": True, "lr": 0.01}),
    ("adopt_adv", {"centered_wd": 0.5, "centered_wd_mode": "int8", "lr": 0.003}),
    ("prodigy_adv", {"centered_wd": 0.5, "centered_wd_mode": "int4", "weight_decay": 0.1, "lr": 1.0}),
    ("lion_adv", {"centered_wd": 0.5, "centered_wd_mode": "int8", "lr": 0.001}),
    ("signsgd_adv", {"centered_wd": 0.5, "centered_wd_mode": "int4", "cautious_wd": True, "lr": 0.001}),
    ("sinksgd_adv", {"centered_wd": 0.5, "centered_wd_mode": "int8", "weight_decay": 0.1, "lr": 0.001}),
    ("muon_adv", {"centered_wd": 0.5, "centered_wd_mode": "int4", "weight_decay": 0.1, "lr": 0.01}),
    ("adamuon_adv", {"centered_wd": 0.5, "centered_wd_mode": "int8", "cautious_wd": True, "lr": 0.01}),
    # Fisher decay scales the centered decay too (computed before either decay, whatever weight_decay)
    ("adamw_adv", {"centered_wd": 0.5, "fisher_wd": True, "weight_decay": 0.1, "lr": 0.01}),
    ("adamw_adv", {"centered_wd": 0.5, "fisher_wd": True, "centered_wd_mode": "int8", "lr": 0.01}),
    ("adamw_adv", {"centered_wd": 0.5, "fisher_wd": True, "use_atan2": True, "cautious_wd": True,
                   "weight_decay": 0.1, "centered_wd_mode": "full", "lr": 0.01}),
    ("adopt_adv", {"centered_wd": 0.5, "fisher_wd": True, "weight_decay": 0.1, "cautious_wd": True, "lr": 0.003}),
    ("prodigy_adv", {"centered_wd": 0.5, "fisher_wd": True, "centered_wd_mode": "int4", "lr": 1.0}),
    # SignSGD's geometric decay: the centred target is get_signsgd_wd_target(p - anchor) (its
    # stochastic sign draws next in the stream); without weight_decay the plain p - anchor
    ("signsgd_adv", {"centered_wd": 0.5, "geometric_wd": True, "weight_decay": 0.1, "centered_wd_mode": "int8",
                     "lr": 0.001}),
    ("signsgd_adv", {"centered_wd": 0.5, "geometric_wd": True, "weight_decay": 0.1, "cautious_wd": True,
                     "stochastic_sign": True, "centered_wd_mode": "full", "lr": 0.001}),
    ("signsgd_adv", {"centered_wd": 0.5, "geometric_wd": True, "weight_decay": 0.1, "normed_momentum": True,
                     "snr_cond": True, "lr": 0.001}),
    ("signsgd_adv", {"centered_wd": 0.5, "geometric_wd": True, "centered_wd_mode": "int4", "lr": 0.001}),
]
#: the default run's sample: (case index, model, dtype)
SAMPLE = [(0, "mlp", torch.bfloat16), (1, "mlp", torch.float32), (7, "mlp", torch.float32),
          (10, "mlp", torch.bfloat16), (11, "mlp", torch.float32)]


def _ident(i: int) -> str:
    spec, setting = CASES[i]
    return f"{i}-{spec}-" + "-".join(f"{k}={v}" for k, v in setting.items())


def _compare(spec: str, setting: dict, model: str, dtype: torch.dtype, steps: int) -> dict[str, float]:
    from adv_optm.util import param_update

    from optgen.numerics import stochastic

    torch.set_default_dtype(torch.float32)
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
