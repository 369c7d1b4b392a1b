"""Every spec with ``matches:`` against the published implementation it names: 200 steps (100 for
adv_optm's) on two real small models, every listed hyperparameter setting, float64 and float32,
both backends.

Tolerance: 0 (bit-identical). The IR names the published code's rounding (torch.lerp's branches,
mul_ then addcmul_, addcdiv's association, s / t as reciprocal-multiply, host scalars in double or
in the step's dtype) and both backends run the same single torch op per IR op on CPU, so any
difference at all means the spec or a backend departs from the published order of operations.
"""

from __future__ import annotations

import pytest
import torch

from tests.models import make_model, max_diffs, train
from tests.published import matched_specs, ours_factory, published_factory, settings, spec_package

STEPS = 200
#: adv_optm specs have many flag settings each: 100 steps (the issue's floor) keeps CI time in check
ADV_STEPS = 100
CASES = [
    (spec, i, setting)
    for spec in matched_specs()
    for i, setting in enumerate(settings(spec))
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("model", ["mlp", "transformer"])
@pytest.mark.parametrize(("spec", "index", "setting"), CASES, ids=[f"{s}-{i}" for s, i, _ in CASES])
def test_matches_published(spec: str, index: int, setting: dict, model: str, dtype: torch.dtype) -> None:
    if dtype == torch.float64 and setting.get("orthogonal_gradient") not in (None, False, "disabled"):
        pytest.skip("adv_optm computes OrthoGrad in float32 whatever the dtype; optgen in the parameter's "
                    "precision (a documented deviation): compared in float32 only")
    torch.set_default_dtype(dtype)  # published optimizers keep `step` in the default dtype
    steps = ADV_STEPS if spec_package(spec).startswith("adv-optm") else STEPS
    expected, ref_losses = train(make_model(model, dtype), published_factory(spec, setting, dtype), steps, dtype)
    assert all(x == x for x in ref_losses), "the published optimizer diverged: a bad setting"
    went_down = ref_losses[-1] < ref_losses[0]
    assert went_down != setting.get("maximize", False), "the published optimizer did not train: a bad setting"
    for backend in ("torch", "reference"):
        got, losses = train(make_model(model, dtype), ours_factory(spec, setting, backend, dtype), steps, dtype)
        abs_d, rel_d = max_diffs(got, expected)
        assert abs_d == 0.0, f"{backend}: max abs diff {abs_d:.3e}, rel {rel_d:.3e} after {steps} steps"
        assert losses == ref_losses
