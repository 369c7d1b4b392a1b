"""Muon_adv / AdaMuon_adv pieces against adv_optm's own helpers: routing, Newton-Schulz, errors
(the whole step is compared in test_equivalence, test_triton and test_stochastic_rounding)."""

from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optgen.runtime.newton_schulz import newton_schulz

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
