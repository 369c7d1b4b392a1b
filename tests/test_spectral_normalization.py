"""adv_optm 2.5.16's ``spectral_normalization=True`` (feature spectral_normalization; math/adv-optm.md
§2.11, util/scaled_optm.py::scale_update) on every adv_optm class that has the flag, against the
published adv_optm from site-packages: bit-identical (tolerance 0) on the torch and reference
backends, float32 and bf16 parameters with stochastic rounding (both draw adv_optm's stream: the
spectral vectors at construction, then the rounding bits), over 100 steps on both models.

The full matrix is ``extended``; the default run takes a sample (fewer steps). The triton backend
refuses, at construction, a parameter whose step takes the power iteration (torch.mv's products are
not in its kernels); 0-D and 1-D parameters (the max-abs scaling) run there and are checked against
the reference backend under the interpreter.
"""

from __future__ import annotations

import pytest
import torch

from tests.models import make_model, max_diffs, train
from tests.published import ours_factory, published_factory

STEPS = 100
SAMPLE_STEPS = 6
ON = {"spectral_normalization": True}

#: (spec, setting): each with spectral_normalization=True
CASES: list[tuple[str, dict]] = [
    ("adamw_adv", {}),
    ("adamw_adv", {"use_atan2": True, "weight_decay": 0.1}),  # A is not applied under it
    ("adamw_adv", {"nesterov": True, "cautious_wd": True, "weight_decay": 0.1, "lr": 0.01}),
    ("adopt_adv", {"lr": 0.001}),  # a real step 0 (clip_lambda(0) = 0)
    ("adopt_adv", {"lr": 0.001, "use_atan2": True, "weight_decay": 0.05}),
    ("prodigy_adv", {"lr": 0.3}),
    ("prodigy_adv", {"lr": 0.3, "use_atan2": True, "weight_decay": 0.1}),
    ("lion_adv", {"lr": 0.001}),
    ("lion_adv", {"lr": 0.001, "weight_decay": 0.1, "kappa_p": 2.0}),
    ("signsgd_adv", {"lr": 0.001}),
    ("signsgd_adv", {"lr": 0.001, "normed_momentum": True, "snr_cond": True, "geometric_wd": True,
                     "weight_decay": 0.1}),  # snr_cond's 4/pi is not applied under it
    ("signsgd_adv", {"lr": 0.001, "momentum": 0.0}),
    ("muon_adv", {"lr": 0.01}),  # rms_rescaling turned off
    ("muon_adv", {"lr": 0.01, "normuon_variant": True, "weight_decay": 0.1}),
    ("adamuon_adv", {"lr": 0.01}),
    ("adamuon_adv", {"lr": 0.01, "use_atan2": True}),
    ("adamuon_adv", {"lr": 0.01, "normuon_variant": True}),
]
#: the default run's sample: (case index, model, dtype)
SAMPLE = [(1, "mlp", torch.bfloat16), (12, "mlp", torch.float32)]


def _ident(i: int) -> str:
    spec, setting = CASES[i]
    return f"{i}-{spec}" + "".join(f"-{k}={v}" for k, v in setting.items())


def _compare(spec: str, setting: dict, model: str, dtype: torch.dtype, steps: int) -> dict[str, float]:
    from adv_optm.util import param_update

    from optgen.numerics import stochastic

    torch.set_default_dtype(torch.float32)
    setting = {**ON, **setting}
    # the spectral vectors are drawn from adv_optm's stream at construction (re-seeded there only
    # for bf16 parameters, after the draws): both streams start from the seed here
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


@pytest.mark.parametrize(("spec", "setting"), [("muon_adv", {"lr": 0.01})])
def test_state_dict_keys_and_values_are_adv_optms(spec: str, setting: dict) -> None:
    """spectral_u (d_out) and spectral_v (d_in) in the parameter's dtype, on the parameters adv_optm
    keeps them for (2+ dims; Muon: its matrices only), equal to adv_optm's after a few steps."""
    from adv_optm.util import param_update

    from optgen.numerics import stochastic

    dtype = torch.bfloat16
    setting = {**ON, **setting}
    theirs, ours = [], []
    for make, out in ((published_factory(spec, setting, dtype), theirs),
                      (ours_factory(spec, setting, "torch", dtype), ours)):
        param_update.set_seed(torch.device("cpu"))
        stochastic.reseed({torch.device("cpu")})
        model = make_model("transformer", dtype)
        opt = make(model.parameters())
        batch = type(model).batch(dtype)
        for _ in range(2):
            opt.zero_grad()
            model.loss(batch).backward()
            opt.step()
        out.append(opt.state_dict()["state"])
    (a,), (b,) = theirs, ours
    assert a.keys() == b.keys()
    seen = 0
    for i in a:
        spectral = sorted(k for k in a[i] if k.startswith("spectral"))
        assert spectral == sorted(k for k in b[i] if k.startswith("spectral")), f"param {i}"
        for k in spectral:
            seen += 1
            assert a[i][k].dtype == b[i][k].dtype == dtype and a[i][k].shape == b[i][k].shape
            assert torch.equal(a[i][k], b[i][k]), f"param {i} {k}"
    assert seen >= 8


@pytest.mark.parametrize(("spec", "setting", "message"), [
    ("adamw_adv", {"state_precision": "factored"}, "spectral_normalization with factored states"),
    ("prodigy_adv", {"nnmf_factor": True}, "spectral_normalization with factored states"),
    ("lion_adv", {"stochastic_sign": True}, "spectral_normalization with stochastic_sign"),
    ("signsgd_adv", {"stochastic_sign": True}, "spectral_normalization and stochastic_sign are not implemented"),
    ("adopt_adv", {"factored_2nd": True}, r"spectral_normalization with factored states \(factored_2nd too\)"),
])
def test_unsupported_combinations_are_refused(spec: str, setting: dict, message: str) -> None:
    make = ours_factory(spec, {**ON, **setting}, "torch")
    with pytest.raises(ValueError, match=message):
        make([torch.nn.Parameter(torch.randn(4, 4))])


def test_triton_refuses_the_power_iteration_at_construction() -> None:
    make = ours_factory("adamw_adv", ON, "triton")
    with pytest.raises(RuntimeError, match=r"param_groups\[0\] \(a parameter of shape \(4, 4\)\) takes mv\(\)"):
        make([torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(4, 4))])
    ours_factory("adamw_adv", ON, "triton")([torch.nn.Parameter(torch.randn(4))])  # vectors run there
    ours_factory("adamw_adv", {}, "triton")([torch.nn.Parameter(torch.randn(4, 4))])  # the flag off


@pytest.mark.parametrize("spec", ["lion_adv"])
def test_triton_vectors_match_reference(spec: str) -> None:
    """0-D and 1-D parameters (u * s / max|u|) on triton under the interpreter against the reference."""
    pytest.importorskip("triton")
    from tests.test_triton import TOLERANCE, _run

    shapes = [(), (300,)]
    setting = {**ON, "lr": 0.001}
    expected, _ = _run(spec, setting, "reference", torch.float32, shapes=shapes, steps=2)
    got, _ = _run(spec, setting, "triton", torch.float32, shapes=shapes, steps=2)
    for e, g, shape in zip(expected, got, shapes):
        bound = TOLERANCE.get(spec, 2e-6) * (1 + e.abs())
        assert torch.all((g.cpu() - e).abs() <= bound), f"{shape}: max diff {(g.cpu() - e).abs().max():.3e}"
