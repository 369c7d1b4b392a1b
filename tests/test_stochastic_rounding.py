"""bf16 parameters with stochastic rounding against adv_optm: the torch and reference backends draw
adv_optm's random stream (generator per device, seeded 42 at construction) and must match it bit
for bit over 100 steps; triton (Philox numbers) is checked in distribution."""

from __future__ import annotations

import pytest
import torch

from optgen.numerics import stochastic
from tests.models import make_model, max_diffs, train
from tests.published import ours_factory, published_factory, settings

STEPS = 100
# (spec, setting index): the first setting of each spec without OrthoGrad (computed in float32 by
# adv_optm whatever the dtype), plus decay / cautious decay where the spec tests them, and one
# factored-state setting per spec that has them (float32 factors, upcast gradient, one SR write)
CASES = [
    (spec, i) for spec in ("adamw_adv", "adopt_adv", "lion_adv", "signsgd_adv", "adamw_adv_2_2_3",
                           "adopt_adv_2_2_3", "simplified_ademamix")
    for i in (1, 2)
] + [("adamw_adv", 13), ("adopt_adv", 12), ("lion_adv", 6), ("signsgd_adv", 10)] + [  # factored states
    ("muon_adv", 1), ("muon_adv", 2), ("adamuon_adv", 1), ("adamuon_adv", 6)] + [  # Newton-Schulz in bf16 too
    ("prodigy_adv", 2), ("lion_prodigy_adv", 1)]  # s and p0 in bf16 (as adv_optm keeps them)


#: each case on one model in the default run (alternating), on the other under -m extended (CI time)
MODEL_CASES = [pytest.param(spec, i, model, id=f"{spec}-{i}-{model}",
                            marks=[] if (k + j) % 2 == 0 else [pytest.mark.extended])
               for k, (spec, i) in enumerate(CASES) for j, model in enumerate(("mlp", "transformer"))]


@pytest.mark.parametrize(("spec", "index", "model"), MODEL_CASES)
def test_bf16_stochastic_rounding_matches_adv_optm(spec: str, index: int, model: str) -> None:
    setting = settings(spec)[index]
    assert not setting.get("orthogonal_gradient")
    torch.set_default_dtype(torch.float32)
    expected, ref_losses = train(make_model(model, torch.bfloat16), published_factory(spec, setting), STEPS, torch.bfloat16)
    rne, _ = train(make_model(model, torch.bfloat16), ours_factory(spec, {**setting, "stochastic_rounding": False},
                                                                   "torch"), STEPS, torch.bfloat16)
    assert max_diffs(rne, expected)[0] > 0, "stochastic rounding made no difference: the test cannot fail"
    for backend in ("torch", "reference"):
        got, losses = train(make_model(model, torch.bfloat16), ours_factory(spec, setting, backend), STEPS,
                            torch.bfloat16)
        abs_d, rel_d = max_diffs(got, expected)
        assert abs_d == 0.0, f"{backend}: max abs diff {abs_d:.3e} (rel {rel_d:.3e}) after {STEPS} steps"
        assert losses == ref_losses


def test_round_bf16_is_unbiased_and_exact_on_bf16_values() -> None:
    stochastic.reseed({torch.device("cpu")})
    x = torch.full((200_000,), 1.0 + 2**-9, dtype=torch.float32)  # a quarter of the way to the next bf16
    r = stochastic.round_bf16(x).float()
    lo, hi = 1.0, 1.0 + 2**-7
    assert set(r.unique().tolist()) == {lo, hi}
    frac_up = (r == hi).double().mean().item()
    assert abs(frac_up - 0.25) < 0.005
    y = torch.randn(1000).to(torch.bfloat16).float()  # already bf16: never moves
    assert torch.equal(stochastic.round_bf16(y).float(), y)
    neg = stochastic.round_bf16(-x).float()  # sign-magnitude: negative values round in magnitude alike
    assert abs((neg == -hi).double().mean().item() - 0.25) < 0.005


@pytest.mark.parametrize(("spec", "index"), [("adamw_adv", 13), ("muon_adv", 1)])
def test_cpu_cache_chunks_keep_results_and_random_stream(monkeypatch, spec: str, index: int) -> None:
    """The torch backend steps CPU buckets in cache-sized chunks: tiny chunks (every tensor alone)
    must give adv_optm's bits too, random stream included."""
    from optgen.runtime import executors

    monkeypatch.setattr(executors, "CPU_CHUNK_ELEMENTS", 64)
    setting = settings(spec)[index]
    torch.set_default_dtype(torch.float32)
    expected, _ = train(make_model("transformer", torch.bfloat16), published_factory(spec, setting), 30, torch.bfloat16)
    got, _ = train(make_model("transformer", torch.bfloat16), ours_factory(spec, setting, "torch"), 30, torch.bfloat16)
    assert max_diffs(got, expected)[0] == 0.0
