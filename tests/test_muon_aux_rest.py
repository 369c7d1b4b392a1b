"""Muon_adv / AdaMuon_adv's aux AdamW storage arguments (adam_state_precision, adam_nnmf_factor,
adam_factored_2nd: block features factored and state_precision of specs/blocks/adamw_aux.yaml)
against the published adv_optm 2.5.16: bit-identical on the torch and reference backends, the same
harness as tests/test_muon_aux.py. The default run takes a sample (12 steps); the 100-step matrix
is ``extended``. (adam_state_precision='fp16' with bf16 parameters crashes in adv_optm itself: a
float16 state lerped with a bfloat16 gradient; it runs with float32 ones.)
"""

from __future__ import annotations

import pytest
import torch

from tests.published import ours_factory
from tests.test_muon_aux import SAMPLE_STEPS, STEPS, _compare

CASES: list[tuple[str, dict]] = [
    ("muon_adv", {"adam_state_precision": "bf16_sr"}),
    ("muon_adv", {"adam_state_precision": "int8_sr", "adam_weight_decay": 0.1}),
    ("muon_adv", {"adam_state_precision": "fp32"}),
    ("muon_adv", {"adam_state_precision": "factored"}),
    ("muon_adv", {"adam_nnmf_factor": True, "adam_use_atan2": True}),
    ("muon_adv", {"adam_factored_2nd": True}),
    ("muon_adv", {"adam_state_precision": "factored", "use_muon": False, "adam_nesterov": True}),
    ("adamuon_adv", {"adam_factored_2nd": True, "adam_use_atan2": True}),
    ("adamuon_adv", {"adam_state_precision": "bf16_sr", "state_precision": "int8_sr"}),
]
SAMPLE = [(0, "mlp", torch.bfloat16), (3, "transformer", torch.bfloat16), (5, "transformer", torch.bfloat16),
          (7, "transformer", torch.bfloat16)]


def _ident(i: int) -> str:
    spec, setting = CASES[i]
    return f"{i}-{spec}" + "".join(f"-{k}={v}" for k, v in setting.items())


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


@pytest.mark.parametrize("setting", [{"adam_nnmf_factor": True, "adam_state_precision": "bf16_sr"},
                                     {"adam_spectral_normalization": True, "adam_factored_2nd": True}])
def test_unimplemented_combinations_are_refused(setting: dict) -> None:
    with pytest.raises(ValueError, match="adam_"):
        ours_factory("muon_adv", setting, "torch")([torch.nn.Parameter(torch.randn(4))])
