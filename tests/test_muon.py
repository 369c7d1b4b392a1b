"""Muon_adv / AdaMuon_adv pieces against adv_optm's own helpers: routing, Newton-Schulz, errors
(the whole step is compared in test_equivalence, test_triton and test_stochastic_rounding)."""

from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optgen.numerics.newton_schulz import newton_schulz

muon_util = pytest.importorskip("adv_optm.util.Muon_util")


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _cls(spec: str, name: str):
    return getattr(importlib.import_module(f"generated.{spec}"), name)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 600), min_size=0, max_size=4).filter(lambda s: _numel(s) <= 200_000))
def test_routing_is_adv_optm_suitability(shape: list[int]) -> None:
    """The spec's `suits_muon` fact routes exactly the parameters adv_optm's test accepts."""
    p = torch.nn.Parameter(torch.zeros(shape))
    opt = _cls("muon_adv", "Muon_adv")([p])
    expected = muon_util._is_suitable_for_muon(p)
    assert ("momentum_buffer" in opt.state[p]) == expected, shape
    assert ("exp_avg_sq" in opt.state[p]) == (not expected), shape


def test_group_routing_keys() -> None:
    w, v = torch.nn.Parameter(torch.zeros(8, 8)), torch.nn.Parameter(torch.zeros(8, 8))
    opt = _cls("adamuon_adv", "AdaMuon_adv")([{"params": [w], "optim_type": "adam"}, {"params": [v], "use_muon": False}])
    assert "exp_avg" in opt.state[w] and "exp_avg" in opt.state[v]
    x = torch.nn.Parameter(torch.zeros(3, 300))  # unsuitable (3 rows), but forced
    opt = _cls("muon_adv", "Muon_adv")([{"params": [x], "optim_type": "muon"}])
    assert "momentum_buffer" in opt.state[x]


def test_use_muon_on_a_vector_is_a_clear_error() -> None:
    p = torch.nn.Parameter(torch.zeros(5))
    with pytest.raises(RuntimeError, match="needs a parameter with 2 or more dims"):
        _cls("muon_adv", "Muon_adv")([p], use_muon=True)


@pytest.mark.parametrize("shape", [(16, 16), (24, 10), (10, 24), (1, 7), (32, 4)])
@pytest.mark.parametrize("eps", [1e-7, None])
def test_newton_schulz_is_adv_optm_bit_for_bit(shape: tuple[int, int], eps: float | None) -> None:
    g = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
    theirs = muon_util.newton_schulz(g, steps=5, eps=eps)
    mine = newton_schulz(g, 5, eps if eps is not None else 1 / g.numel() ** 0.5, 3.4445, -4.7750, 2.0315)
    assert mine.dtype == g.dtype and torch.equal(mine, theirs)


def test_batched_newton_schulz_orthogonalises_each_matrix() -> None:
    """The triton backend's batched call: each matrix of the stack close to its own result."""
    g = torch.randn(3, 12, 20, generator=torch.Generator().manual_seed(0))
    stacked = newton_schulz(g, 5, 1e-7, 3.4445, -4.7750, 2.0315)
    for k in range(3):
        single = newton_schulz(g[k], 5, 1e-7, 3.4445, -4.7750, 2.0315)
        torch.testing.assert_close(stacked[k], single, rtol=0, atol=2e-2)  # bf16 products
    s = torch.linalg.svdvals(stacked[0].double())
    assert 0.5 < s.min() and s.max() < 1.3  # the quintic's band around 1


@pytest.mark.parametrize("low_rank", [False, True])
@pytest.mark.parametrize("shape", [(16, 24), (24, 10)])
def test_cans_and_low_rank_are_adv_optm_bit_for_bit(shape: tuple[int, int], low_rank: bool) -> None:
    """CANS (adaptive bound) and the low-rank projection, from the same seeded stream as adv_optm's."""
    from adv_optm.util import param_update

    from optgen.numerics import newton_schulz as ns
    from optgen.numerics import stochastic

    g = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    m, n = shape
    lb = max(1 / (m * n) ** 0.5, abs(1 / n**0.5 - 1 / m**0.5))
    for cns in (False, True):
        param_update.set_seed(g.device)
        theirs = muon_util.newton_schulz(g, steps=5, eps=1e-7, cns=cns, low_rank_ortho=low_rank, ortho_rank=6)
        stochastic.reseed({g.device})
        if cns:
            mine = (ns.low_rank_cans(g, 6, 5, 1e-7, lb) if low_rank else ns.cans(g, 5, 1e-7, lb))
        else:
            args = (5, 1e-7, 3.4445, -4.7750, 2.0315)
            mine = ns.low_rank_newton_schulz(g, 6, *args) if low_rank else ns.newton_schulz(g, *args)
        assert torch.equal(mine, theirs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("spec", "extra"), [("muon_adv", {}), ("adamuon_adv", {"accelerated_ns": True})])
def test_low_rank_ortho_trains_as_adv_optm(spec: str, extra: dict, dtype: torch.dtype) -> None:
    """low_rank_ortho over 30 steps of the transformer block: bit-identical to adv_optm on the torch
    and reference backends, the Gaussian sketches (and bf16 rounding) drawn from the same stream."""
    from adv_optm.util import param_update

    from optgen.numerics import stochastic
    from tests.models import make_model, max_diffs, train
    from tests.published import ours_factory, published_factory

    torch.set_default_dtype(torch.float32)
    setting = {"low_rank_ortho": True, "ortho_rank": 4, "weight_decay": 0.1, **extra}
    param_update.set_seed(torch.device("cpu"))
    expected, ref_losses = train(make_model("transformer", dtype), published_factory(spec, setting), 30, dtype)
    for backend in ("torch", "reference"):
        stochastic.reseed({torch.device("cpu")})
        got, losses = train(make_model("transformer", dtype), ours_factory(spec, setting, backend), 30, dtype)
        assert max_diffs(got, expected)[0] == 0.0, backend
        assert losses == ref_losses
    full, _ = train(make_model("transformer", dtype), ours_factory(spec, {**setting, "low_rank_ortho": False},
                                                                    "torch"), 30, dtype)
    assert max_diffs(full, expected)[0] > 0, "the low-rank path made no difference: the test cannot fail"


def test_low_rank_on_triton_at_full_rank_is_the_full_orthogonalisation() -> None:
    """The triton backend's low-rank call stage: with ortho_rank >= min(m, n) the projection keeps the
    whole column space, so Q NS(Q^T M) = NS(M) up to bf16 rounding (orthogonal equivariance)."""
    pytest.importorskip("triton")
    cls = _cls("muon_adv", "Muon_adv")
    results = []
    for low_rank in (False, True):
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((8, 12), (12, 8), (6, 6))]
        opt = cls(params, lr=0.01, low_rank_ortho=low_rank, ortho_rank=16, backend="triton")
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        results.append([p.detach().clone() for p in params])
    for full, projected in zip(*results):
        # bf16 products differ by ~2e-4 after 3 steps of ~2e-3 updates (RMS 0.2 lr); a rank-2 projection
        # moves the parameters by ~1e-2
        assert (full - projected).abs().max() < 1e-3
