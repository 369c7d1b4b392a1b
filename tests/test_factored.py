"""Feature ``factored``: the matrix view, the 1-bit packing, and the stored state, against adv_optm's
own helpers and optimizers (the step itself is compared in test_equivalence / test_triton)."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optgen.numerics.matrix_view import effective_shape, pack_bits, unpack_bits

adv_fac = pytest.importorskip("adv_optm.util.factorization_util")
SHIFTER = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
#: 0-d, 1-D, prime numel, a square, a batched 3-D tensor, (1, 1), empty
SHAPES = [(), (12,), (7, 13), (5, 7), (16, 16), (3, 4, 6), (1, 1), (0, 4)]


def _generated(spec: str, cls: str):
    return getattr(importlib.import_module(f"generated.{spec}"), cls)


def test_effective_shape_matches_adv_optm_exhaustively() -> None:
    for n in range(0, 3000):
        assert effective_shape(n) == adv_fac._get_effective_shape(n), n


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=10**9))
def test_effective_shape_is_the_closest_factor_pair(n: int) -> None:
    d1, d2 = effective_shape(n)
    assert (d1, d2) == adv_fac._get_effective_shape(n)
    assert d1 * d2 == n and d1 >= d2


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 9), st.integers(0, 40), st.integers(0, 2**31 - 1))
def test_pack_bits_is_adv_optm_layout_and_round_trips(rows: int, cols: int, seed: int) -> None:
    bits = torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed)) > 0.5
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, -(-cols // 8))
    if rows and cols:  # adv_optm's own packer cannot take empty tensors
        assert torch.equal(packed, adv_fac._pack_bools(bits, SHIFTER))
        assert torch.equal(adv_fac._unpack_bools(packed, cols, SHIFTER), bits)
    assert torch.equal(unpack_bits(packed, cols), bits)


def test_pack_bits_is_lsb_first() -> None:
    bits = torch.zeros(1, 10, dtype=torch.bool)
    bits[0, 0] = bits[0, 9] = True
    assert pack_bits(bits).tolist() == [[1, 2]]


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_state_is_adv_optm_state_bit_for_bit(backend: str) -> None:
    """After 12 steps: the same state keys (less adv_optm's bookkeeping), shapes, dtypes and bytes."""
    import adv_optm

    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen) for s in SHAPES if 0 not in s]  # adv_optm fails on empty ones
    ours = [torch.nn.Parameter(x.clone()) for x in init]
    theirs = [torch.nn.Parameter(x.clone()) for x in init]
    setting = {"lr": 1e-2, "state_precision": "factored", "weight_decay": 0.1}
    opt = _generated("adamw_adv", "AdamW_adv")(ours, backend=backend, **setting)
    ref = adv_optm.AdamW_adv(theirs, **setting)
    for _ in range(12):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
    bookkeeping = {"step", "factored", "factored_2nd", "effective_shape", "shifter"}
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
        mine, published = opt.state[a], ref.state[b]
        assert set(mine) - {"step"} == set(published) - bookkeeping, (a.shape, set(mine), set(published))
        for key in set(mine) - {"step"}:
            x, y = mine[key], published[key]
            assert x.dtype == y.dtype and x.shape == y.shape, key
            assert torch.equal(x, y), key


def test_state_bytes_per_parameter() -> None:
    """Factored AdamW: two fp32 vectors per moment plus one bit of sign per element."""
    p = torch.nn.Parameter(torch.zeros(1024, 1024))
    for setting in ({}, {"state_precision": "factored"}):
        opt = _generated("adamw_adv", "AdamW_adv")([p], **setting)
        size = sum(t.numel() * t.element_size() for k, t in opt.state[p].items() if k != "step")
        expected = 8 * p.numel() if not setting else 4 * 1024 * 4 + 1024 * 128
        assert size == expected, setting


@pytest.mark.parametrize("spec,cls", [("adamw_adv", "AdamW_adv"), ("lion_adv", "Lion_adv")])
def test_state_dict_round_trip_keeps_factors_and_bits(spec: str, cls: str) -> None:
    gen = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    opt = _generated(spec, cls)(params, nnmf_factor=True)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())  # as from disk: the live dict shares the step tensors
    clone = [torch.nn.Parameter(p.detach().clone()) for p in params]
    again = _generated(spec, cls)(clone, nnmf_factor=True)
    again.load_state_dict(saved)
    for p, q in zip(params, clone):
        for key, value in opt.state[p].items():
            assert again.state[q][key].dtype == value.dtype and torch.equal(again.state[q][key], value), key
        p.grad = torch.randn(p.shape, generator=gen)
        q.grad = p.grad.clone()
    opt.step()
    again.step()
    assert all(torch.equal(p, q) for p, q in zip(params, clone))


def test_vectors_stay_dense_in_float32_unless_reshaped() -> None:
    p, v = torch.nn.Parameter(torch.zeros(4, 6, dtype=torch.float64)), torch.nn.Parameter(torch.zeros(5))
    opt = _generated("adamw_adv", "AdamW_adv")([p, v], state_precision="factored")
    assert set(opt.state[v]) == {"step", "exp_avg", "exp_avg_sq"}
    assert opt.state[v]["exp_avg"].dtype == torch.float32  # adv_optm's float32 states under 'factored'
    assert opt.state[p]["mu_m_nmf"].shape == (6,) and opt.state[p]["mv_m_nmf"].shape == (4,)
    assert opt.state[p]["sign"].shape == (6, 1)
    reshaped = _generated("adamw_adv", "AdamW_adv")([v], state_precision="factored", vector_reshape=True)
    assert set(reshaped.state[v]) == {"step", "mu_m_nmf", "mv_m_nmf", "sign", "mu_v_nmf", "mv_v_nmf"}


def test_triton_packs_the_same_sign_bits_as_reference() -> None:
    """The triton kernels read and write the packed bytes themselves (tiled passes)."""
    pytest.importorskip("triton")
    from tests.published import settings as spec_settings
    from tests.test_triton import _run

    setting = spec_settings("adamw_adv")[13]
    assert setting.get("state_precision") == "factored"
    _, ref = _run("adamw_adv", setting, "reference", torch.float32, steps=6)
    _, tri = _run("adamw_adv", setting, "triton", torch.float32, steps=6)
    checked = 0
    for p, q in zip(ref.param_groups[0]["params"], tri.param_groups[0]["params"]):
        a, b = ref.state[p], tri.state[q]
        assert set(a) == set(b)
        if "sign" in a:
            assert torch.equal(a["sign"], b["sign"].cpu()), p.shape
            checked += a["sign"].numel()
        for key in ("mu_m_nmf", "mv_m_nmf", "mu_v_nmf", "mv_v_nmf"):
            if key in a:
                torch.testing.assert_close(b[key].cpu(), a[key], rtol=1e-5, atol=1e-12)
    assert checked > 100


@pytest.mark.parametrize("setting", [{"nnmf_factor": True}, {"state_precision": "factored", "normuon_variant": True}])
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_muon_factored_momentum_matches_adv_optm_under_its_compat_flag(backend: str, setting: dict) -> None:
    """adv_optm 2.5.16's factored Muon subtracts the orthogonalised matrix unscaled (§9.2): with
    ``compat_unscaled_factored=True`` optgen reproduces it bit for bit; by default it scales the
    update like the dense path (RMS 0.2 lr)."""
    import adv_optm

    gen = torch.Generator().manual_seed(3)
    shapes = [(12, 10), (16, 4, 3), (7,)]  # two Muon matrices (the conv-like one flattened), one aux-Adam vector
    init = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(8)]
    cls = _generated("muon_adv", "Muon_adv")

    def run(make):
        params = [torch.nn.Parameter(x.clone()) for x in init]
        opt = make(params)
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()
        return params, opt

    theirs, _ = run(lambda ps: adv_optm.Muon_adv(ps, lr=1e-3, **setting))
    ours, opt = run(lambda ps: cls(ps, lr=1e-3, backend=backend, compat_unscaled_factored=True, **setting))
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert set(opt.state[ours[0]]) >= {"mu_mbuf_nmf", "mv_mbuf_nmf", "sign_buf"}
    scaled, _ = run(lambda ps: cls(ps, lr=1e-3, backend=backend, **setting))
    moved = (scaled[0] - init[0]).pow(2).mean().sqrt().item()
    assert 0.2e-3 * 8 * 0.5 < moved < 0.2e-3 * 8 * 1.01, moved  # 8 steps of RMS 0.2 lr, at most aligned
