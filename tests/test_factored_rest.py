"""The factored states issue 16 items 4-5 adds: AdaMuon_adv's ``factored_2nd`` (adv_optm 2.5.16) and
factored Adopt_adv (adv_optm 2.2.3's ``nnmf_factor``), against the published code: bit-identical
(tolerance 0) on the torch and reference backends, float32 and bf16 parameters with stochastic
rounding, both test models.

AdaMuon orthogonalises the ``(shape[0], -1)`` matrix and factors v of the orthogonalised update on
the closest-to-square ``(d1, d2)`` view: the models' ``(4, 16)`` and ``(8, 16)`` matrices are
stepped as one view and factored on the other (``(8, 8)``, ``(16, 8)``; the ``square_*`` ops).

The full matrix (every case, both models, both dtypes, 100 steps) is ``extended``; the default run
takes a sample with fewer steps. The triton backend refuses AdaMuon's cross-view factors (a clear
error at construction) and runs factored Adopt 2.2.3 as the reference does (interpreter tolerance).
"""

from __future__ import annotations

import pytest
import torch

from tests.test_adv_rest import _compare

STEPS = 100
SAMPLE_STEPS = 8

#: (spec, setting): every setting this file covers
CASES: list[tuple[str, dict]] = [
    ("adamuon_adv", {"factored_2nd": True}),
    ("adamuon_adv", {"factored_2nd": True, "use_atan2": True, "weight_decay": 0.1}),
    ("adamuon_adv", {"factored_2nd": True, "eps": None, "nesterov": False, "rms_rescaling": False}),
    ("adamuon_adv", {"factored_2nd": True, "state_precision": "bf16_sr"}),
    ("adamuon_adv", {"factored_2nd": True, "vector_reshape": True, "cautious_wd": True, "weight_decay": 0.1}),
    ("adamuon_adv", {"factored_2nd": True, "orthogonal_gradient": "flattened", "approx_mars": True}),
    ("adamuon_adv", {"factored_2nd": True, "nnmf_factor": True}),  # the whole factoring wins
    ("adamuon_adv", {"factored_2nd": True, "auto_projection": False, "kappa_p": 2.0, "accelerated_ns": True}),
    ("adamuon_adv", {"factored_2nd": True, "state_precision": "int8_sr", "lr": 0.003}),
    ("adopt_adv_2_2_3", {"lr": 0.001, "nnmf_factor": True}),
    ("adopt_adv_2_2_3", {"lr": 0.001, "nnmf_factor": True, "use_AdEMAMix": True, "grams_moment": True,
                         "weight_decay": 0.1}),
    ("adopt_adv_2_2_3", {"lr": 0.001, "nnmf_factor": True, "vector_reshape": True, "cautious_mask": True,
                         "use_atan2": True}),
    ("adopt_adv_2_2_3", {"lr": 0.001, "nnmf_factor": True, "Simplified_AdEMAMix": True, "weight_decay": 0.1}),
    ("adopt_adv_2_2_3", {"lr": 0.001, "nnmf_factor": True, "betas": [0.0, 0.999], "use_AdEMAMix": True}),
    ("adopt_adv_2_2_3", {"lr": 0.001, "nnmf_factor": True, "kourkoutas_beta": True, "k_warmup_steps": 10}),
    ("adopt_adv_2_2_3", {"lr": 0.001, "nnmf_factor": True, "orthogonal_gradient": True, "cautious_wd": True,
                         "weight_decay": 0.05}),
]
#: the default run's sample: (case index, model, dtype)
SAMPLE = [(0, "mlp", torch.bfloat16), (1, "transformer", torch.float32), (3, "mlp", torch.bfloat16),
          (9, "transformer", torch.bfloat16), (11, "mlp", torch.float32)]


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


def _opt(spec: str, params: list, **kwargs):
    from tests.test_triton import _cls

    return _cls(spec)(params, **kwargs)


def test_factors_live_on_the_square_view() -> None:
    """A (4, 16) matrix stepped as itself keeps v's factors of its (8, 8) view, as adv_optm's
    ``effective_shape``; its momentum stays dense in the parameter's shape and dtype."""
    p = torch.nn.Parameter(torch.randn(4, 16, dtype=torch.bfloat16))
    opt = _opt("adamuon_adv", [p], factored_2nd=True, backend="torch")
    p.grad = torch.randn_like(p)
    opt.step()
    st = opt.state[p]
    assert st["mu_vbuf_nmf"].shape == (8,) and st["mv_vbuf_nmf"].shape == (8,)
    assert st["mu_vbuf_nmf"].dtype == torch.float32 and "second_momentum_buffer" not in st
    assert st["momentum_buffer"].shape == (4, 16) and st["momentum_buffer"].dtype == torch.bfloat16
    assert opt.state_dict()["state"][0]["effective_shape"] == (8, 8)


def test_normuon_ignores_factored_2nd() -> None:
    """With NorMuon there is no v to factor (adv_optm ignores factored_2nd): the same steps."""
    runs = []
    for extra in ({}, {"factored_2nd": True}):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(8, 16))
        opt = _opt("adamuon_adv", [p], normuon_variant=True, backend="reference", **extra)
        for _ in range(3):
            p.grad = torch.randn_like(p)
            opt.step()
        assert not any(k.endswith("_nmf") for k in opt.state[p])
        runs.append(p.detach().clone())
    assert torch.equal(*runs)


@pytest.mark.parametrize("direction", ["ours->published", "published->ours"])
def test_adamuon_factored_2nd_state_dict_crosses(direction: str) -> None:
    """adv_optm's state dict (its factors, effective_shape and shifter) continues in ours and back."""
    from tests.published import ours_factory, published_factory
    from tests.test_published_state_dicts import assert_same, crossed

    setting = {"factored_2nd": True, "weight_decay": 0.1}
    pub, ours = published_factory("adamuon_adv", setting), ours_factory("adamuon_adv", setting, "torch")
    first, second = (ours, pub) if direction == "ours->published" else (pub, ours)
    assert_same(*crossed(first, second, "mlp"))


def test_triton_refuses_cross_view_factors() -> None:
    """The triton kernels do not compute the square view's factors of a matrix stepped as another
    view: refused at construction, naming the reason and the way out; NorMuon (no v) runs."""
    pytest.importorskip("triton")
    p = torch.nn.Parameter(torch.randn(4, 16))
    with pytest.raises(RuntimeError, match=r"shape \(4, 16\).*factored_2nd.*backend='torch'"):
        _opt("adamuon_adv", [p], factored_2nd=True, backend="triton")
    _opt("adamuon_adv", [p], factored_2nd=True, normuon_variant=True, backend="triton")


def test_triton_factored_adopt_2_2_3_matches_reference() -> None:
    """The triton backend's factored Adopt 2.2.3 against the reference (tests/test_triton.py's
    shapes and tolerance, under the interpreter on CPU)."""
    pytest.importorskip("triton")
    from tests.test_triton import SHAPES, _run

    setting = {"lr": 0.001, "nnmf_factor": True, "use_AdEMAMix": True}
    expected, _ = _run("adopt_adv_2_2_3", setting, "reference", torch.float32, steps=3)
    got, _ = _run("adopt_adv_2_2_3", setting, "triton", torch.float32, steps=3)
    for e, g, shape in zip(expected, got, SHAPES):
        assert torch.all((g - e).abs() <= 2e-6 * (1 + e.abs())), f"{shape}: max diff {(g - e).abs().max():.3e}"
