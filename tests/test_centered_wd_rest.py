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


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_codec_matches_adv_optm(mode: str, dtype: torch.dtype) -> None:
    """Codes, scales and minima as adv_optm's ``_init_anchor`` stores them, and the decode as its
    ``dequantize_anchor``, on sizes with a partial last block, exact blocks and constant blocks; the
    encode leaves its input alone."""
    from adv_optm.util.centered_decay import _init_anchor, dequantize_anchor

    from optgen.ir.codecs import codec_for

    codec = codec_for(f"anchor_{mode}")
    gen = torch.Generator().manual_seed(1)
    for shape in [(7,), (33, 5), (128,), (3, 4, 5), (64, 64), (40,)]:
        p = (torch.randn(shape, generator=gen) * 3).to(dtype)
        if shape == (40,):
            p[:32] = 0.25  # a constant block: scale 0 becomes 1
        before = p.clone()
        theirs: dict = {}
        _init_anchor(p, theirs, {"centered_wd": 0.5, "centered_wd_mode": mode})
        ours = codec.encode(p, False, None)
        assert torch.equal(p, before)
        assert ours[""].dtype == torch.int8 and ours[""].shape == theirs["anchor_data"].shape
        assert torch.equal(ours[""], theirs["anchor_data"])
        assert torch.equal(ours["_scale"].to(dtype), theirs["anchor_scale"])
        assert torch.equal(ours["_min"].to(dtype), theirs["anchor_min"])
        stored = {"": theirs["anchor_data"], "_scale": theirs["anchor_scale"], "_min": theirs["anchor_min"]}
        for out in (torch.float32, dtype):
            expected = dequantize_anchor(p, theirs, {"centered_wd_mode": mode}, out)
            assert torch.equal(codec.decode(stored, tuple(shape), False).to(out), expected)


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("direction", ["ours->published", "published->ours"])
def test_state_dict_crosses(mode: str, direction: str) -> None:
    """adv_optm's keys, dtypes and shapes (``anchor_data`` int8 (blocks, 128) or packed flat,
    ``anchor_scale`` / ``anchor_min`` per block in the parameter's dtype), and a state dict loaded
    across continues bit for bit (3 + 3 steps)."""
    from tests.test_published_state_dicts import assert_same, crossed

    setting = {"centered_wd": 0.5, "centered_wd_mode": mode, "weight_decay": 0.1, "lr": 0.01}
    pub, ours = published_factory("adamw_adv", setting), ours_factory("adamw_adv", setting, "torch")
    model = make_model("mlp", torch.float32)
    saved = [make(list(model.parameters())).state_dict()["state"] for make in (pub, ours)]
    for theirs, mine in zip(*(list(s.values()) for s in saved)):
        for key in ("anchor_data", "anchor_scale", "anchor_min"):
            assert (mine[key].dtype, mine[key].shape) == (theirs[key].dtype, theirs[key].shape), key
            assert torch.equal(mine[key], theirs[key]), key
    first, second = (ours, pub) if direction == "ours->published" else (pub, ours)
    a, b = crossed(first, second, "mlp")
    assert_same(a, b)


def test_state_dict_of_another_layout_is_refused() -> None:
    """An int8 anchor loaded where the group's mode is int4 has the wrong shape: named."""
    from tests.test_published_state_dicts import checkpoint

    model = make_model("mlp", torch.float32)
    params = list(model.parameters())
    base = {"centered_wd": 0.5, "lr": 0.01}
    saved = checkpoint(ours_factory("adamw_adv", {**base, "centered_wd_mode": "int8"}, "torch")(params).state_dict())
    other = ours_factory("adamw_adv", {**base, "centered_wd_mode": "int4"}, "torch")(params)
    saved["param_groups"][0]["centered_wd_mode"] = "int4"
    with pytest.raises(ValueError, match="anchor_data"):
        other.load_state_dict(saved)


def test_sinksgd_geometric_is_refused() -> None:
    """SinkSGD's structured decay (adv_optm scales the centered decay by its per-element scaler)."""
    model = make_model("mlp", torch.float32)
    with pytest.raises(ValueError, match="geometric_wd"):
        ours_factory("sinksgd_adv", {"centered_wd": 0.5, "geometric_wd": True, "weight_decay": 0.1},
                     "torch")(list(model.parameters()))


#: the triton cases (flat passes: the anchor decoded in registers)
TRITON = [0, 1, 4, 10, 14]


@pytest.mark.parametrize("index", TRITON[:1], ids=[_ident(i) for i in TRITON[:1]])
def test_triton_sample_matches_reference(index: int) -> None:
    _triton(index, 3)


@pytest.mark.extended
@pytest.mark.parametrize("index", TRITON, ids=[_ident(i) for i in TRITON])
def test_triton_matches_reference(index: int) -> None:
    _triton(index, 5)


def _triton(index: int, steps: int) -> None:
    pytest.importorskip("triton")
    from tests.test_triton import SHAPES, TOLERANCE, _run

    spec, setting = CASES[index]
    expected, _ = _run(spec, setting, "reference", torch.float32, steps=steps)
    got, _ = _run(spec, setting, "triton", torch.float32, steps=steps)
    for e, g, shape in zip(expected, got, SHAPES):
        bound = TOLERANCE.get(spec, 2e-6) * (1 + e.abs())
        assert torch.all((g - e).abs() <= bound), f"{shape}: max diff {(g - e).abs().max():.3e}"
