"""Muon_adv / AdaMuon_adv's auxiliary AdamW features (the adam_* arguments; block features of
specs/blocks/adamw_aux.yaml, docs/block_features.md) against the published adv_optm 2.5.16 from
site-packages: bit-identical (tolerance 0) on the torch and reference backends, float32 and bf16
parameters with stochastic rounding, over 100 steps on both models.

The full matrix is ``extended``; the default run takes a sample (fewer steps). Each case switches on
at least one adam_* flag; ``use_muon=False`` sends the matrices through the aux path too (its 2-D
OrthoGrad and spectral normalisation), and the transformer's (3, 8, 8) and (8, 1) parameters take
the aux path with 2 or more dims under auto-routing.
"""

from __future__ import annotations

import pytest
import torch

from tests.models import make_model, max_diffs, train
from tests.published import ours_factory, published_factory

STEPS = 100
SAMPLE_STEPS = 12

#: (spec, setting): each with an aux feature on
CASES: list[tuple[str, dict]] = [
    ("muon_adv", {"adam_use_atan2": True}),
    ("muon_adv", {"adam_use_atan2": True, "adam_weight_decay": 0.1, "cautious_wd": True, "use_muon": False}),
    ("muon_adv", {"adam_nesterov": True}),
    ("muon_adv", {"adam_nesterov": True, "adam_nesterov_coef": 0.7, "adam_use_atan2": True,
                  "adam_betas": [0.8, 0.95]}),
    ("muon_adv", {"adam_orthogonal_gradient": "flattened", "adam_weight_decay": 0.05}),
    ("muon_adv", {"adam_orthogonal_gradient": "iterative", "use_muon": False}),
    ("muon_adv", {"adam_orthogonal_gradient": "flattened", "orthogonal_gradient": "flattened",
                  "adam_nesterov": True}),
    ("muon_adv", {"adam_spectral_normalization": True, "lr": 0.01}),
    ("muon_adv", {"adam_spectral_normalization": True, "adam_use_atan2": True, "lr": 0.01,
                  "use_muon": False}),  # the aux step size keeps 4/pi under it
    ("muon_adv", {"adam_spectral_normalization": True, "spectral_normalization": True, "lr": 0.01}),
    ("muon_adv", {"adam_fisher_wd": True, "adam_weight_decay": 0.1}),  # a no-op in adv_optm 2.5.16
    ("adamuon_adv", {"adam_use_atan2": True, "use_atan2": True}),
    ("adamuon_adv", {"adam_nesterov": True, "adam_orthogonal_gradient": "flattened", "adam_weight_decay": 0.1}),
    ("adamuon_adv", {"adam_spectral_normalization": True, "lr": 0.01, "adam_use_bias_correction": False}),
]
#: the default run's sample: (case index, model, dtype)
SAMPLE = [(1, "mlp", torch.bfloat16), (3, "transformer", torch.float32), (8, "transformer", torch.bfloat16),
          (11, "transformer", torch.bfloat16)]
#: the cases test_each_case_changes_adv_optms_step runs by default (all of them: extended)
QUICK = (5, 8, 10)


def _ident(i: int) -> str:
    spec, setting = CASES[i]
    return f"{i}-{spec}" + "".join(f"-{k}={v}" for k, v in setting.items())


def _compare(spec: str, setting: dict, model: str, dtype: torch.dtype, steps: int) -> dict[str, float]:
    from adv_optm.util import param_update

    from optgen.numerics import stochastic

    torch.set_default_dtype(torch.float32)
    # spectral vectors are drawn from adv_optm's stream at construction: both streams start here
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


def _published_run(spec: str, setting: dict, steps: int = 3) -> list[torch.Tensor]:
    from adv_optm.util import param_update

    param_update.set_seed(torch.device("cpu"))
    got, _ = train(make_model("transformer", torch.float32), published_factory(spec, setting), steps, torch.float32)
    return got


AUX_FLAGS = ("adam_use_atan2", "adam_nesterov", "adam_nesterov_coef", "adam_orthogonal_gradient",
             "adam_spectral_normalization", "adam_fisher_wd")


@pytest.mark.parametrize("index", [i if i in QUICK else pytest.param(i, marks=pytest.mark.extended)
                                   for i in range(len(CASES))], ids=[_ident(i) for i in range(len(CASES))])
def test_each_case_changes_adv_optms_step(index: int) -> None:
    """Each case's aux flags change the published step (so the comparison above tests them), but
    adam_fisher_wd, which adv_optm 2.5.16 ignores: its aux path reads the group's 'fisher_wd'."""
    spec, setting = CASES[index]
    without = {k: v for k, v in setting.items() if k not in AUX_FLAGS}
    diff = max_diffs(_published_run(spec, setting), _published_run(spec, without))[0]
    if "adam_fisher_wd" in setting:
        assert diff == 0.0
    else:
        assert diff > 0.0


def test_aux_flags_rewrite_the_aux_path_only() -> None:
    """The aux features read the adam_* flags, only on the aux path's statements; the matrix path
    keeps the spec's own flags (AdaMuon's use_atan2, orthogonal_gradient), and the aux states exist
    where the parameter is not a Muon matrix."""
    from optgen.ir.nodes import Assign, If, walk_nodes, walk_stmts
    from optgen.ir.ops import Op
    from optgen.pipeline import lower
    from optgen.spec.loader import load_spec
    from tests.published import SPECS

    program = lower(load_spec(SPECS / "adamuon_adv.yaml"))

    def flags(stmts) -> set[str]:
        out = set()
        for s in walk_stmts(stmts):
            out |= {n.attr[0] for n in walk_nodes(s.cond if isinstance(s, If) else s.value) if n.op == Op.HYPER}
        return out

    def writes(stmts, name: str) -> bool:
        return any(isinstance(s, Assign) and s.target == name for s in walk_stmts(stmts))

    # the routing conditionals: the matrix path (momentum_buffer) then, the aux AdamW (exp_avg_sq) else
    routes = [s for s in walk_stmts(program.body) if isinstance(s, If) and writes(s.then, "momentum_buffer")
              and not writes(s.then, "exp_avg_sq") and writes(s.orelse, "exp_avg_sq")
              and not writes(s.orelse, "momentum_buffer")]  # (not factored_2nd's square-view split)
    assert routes
    for branch in routes:
        matrix, aux = branch.then, branch.orelse
        assert {"adam_use_atan2", "adam_nesterov", "adam_orthogonal_gradient", "adam_spectral_normalization"} <= flags(aux)
        assert not {"use_atan2", "nesterov", "orthogonal_gradient", "spectral_normalization"} & flags(aux)
        assert not {"adam_use_atan2", "adam_nesterov", "adam_orthogonal_gradient"} & flags(matrix)
        assert any(isinstance(s, Assign) and s.value.op == Op.ATAN2 for s in walk_stmts(aux))
    v = program.state_decl("spectral_v")
    assert {"spectral_normalization", "adam_spectral_normalization"} <= {
        n.attr[0] for n in walk_nodes(v.cond) if n.op == Op.HYPER}


@pytest.mark.parametrize(("spec", "setting"), [("muon_adv", {"adam_spectral_normalization": True}),
                                               ("muon_adv", {"adam_spectral_normalization": True, "lr": 0.01,
                                                             "spectral_normalization": True})])
def test_spectral_states_are_adv_optms(spec: str, setting: dict) -> None:
    """spectral_u/v on the aux parameters with 2+ dims (and the matrices with the matrix flag on),
    equal to adv_optm's after two steps; the other keys the same too."""
    from adv_optm.util import param_update

    from optgen.numerics import stochastic
    from tests.published import same_value

    dtype = torch.bfloat16
    states = []
    for make in (published_factory(spec, setting, dtype), ours_factory(spec, setting, "torch", dtype)):
        param_update.set_seed(torch.device("cpu"))
        stochastic.reseed({torch.device("cpu")})
        model = make_model("transformer", dtype)
        opt = make(model.parameters())
        batch = type(model).batch(dtype)
        for _ in range(2):
            opt.zero_grad()
            model.loss(batch).backward()
            opt.step()
        states.append(opt.state_dict()["state"])
    theirs, ours = states
    assert theirs.keys() == ours.keys()
    seen = 0
    for i in theirs:
        assert sorted(theirs[i]) == sorted(ours[i]), i
        for k in theirs[i]:
            assert same_value(theirs[i][k], ours[i][k]), (i, k)
            seen += k.startswith("spectral")
    assert seen >= 4


@pytest.mark.parametrize(("setting", "message"), [
    ({"adam_orthogonal_gradient": "iterative"}, "adam_orthogonal_gradient='iterative'"),
    ({"adam_spectral_normalization": True}, r"takes mv\(\)/mv_t\(\)"),
])
def test_triton_refuses_what_its_kernels_lack(setting: dict, message: str) -> None:
    pytest.importorskip("triton")
    from tests.test_triton import _run

    with pytest.raises(RuntimeError, match=message):
        _run("muon_adv", setting, "triton", torch.float32, shapes=[(5, 7), (9, 1), (3, 4, 6)], steps=1)


@pytest.mark.parametrize(("spec", "setting"), [
    ("muon_adv", {"adam_use_atan2": True, "adam_weight_decay": 0.1, "adam_nesterov": True, "adam_nesterov_coef": 0.7}),
    ("adamuon_adv", {"adam_use_atan2": True, "use_atan2": True, "adam_orthogonal_gradient": "flattened"}),
])
def test_triton_matches_reference(spec: str, setting: dict) -> None:
    """The aux atan2, Nesterov and flattened OrthoGrad in the triton kernels (the interpreter on
    CPU), against the reference backend, on test_triton's shapes (0-D to 3-D, empty)."""
    pytest.importorskip("triton")
    from tests.test_triton import SHAPES, TOLERANCE, _run

    expected, _ = _run(spec, setting, "reference", torch.float32, steps=4)
    got, _ = _run(spec, setting, "triton", torch.float32, steps=4)
    for e, g, shape in zip(expected, got, SHAPES):
        bound = TOLERANCE.get(spec, 2e-6) * (1 + e.abs())
        assert torch.all((g.cpu() - e).abs() <= bound), f"{shape}: max diff {(g.cpu() - e).abs().max():.3e}"


@pytest.mark.parametrize("flag", [{"adam_kourkoutas_beta": True}])
def test_not_implemented_aux_flags_are_refused(flag: dict) -> None:
    (name, value), = flag.items()
    with pytest.raises(ValueError, match=name):
        ours_factory("muon_adv", flag, "torch")([torch.nn.Parameter(torch.randn(4))])


BLOCK = """\
block: inner
hyperparameters:
  b_atan2: {default: false}
  eps: {default: 1.0e-8}
features:
  - {feature: atan2, names: {use_atan2: b_atan2}}
roles: {denominator: denom, step_size: 'update#2'}
update:
  - denom = sqrt(buf) + eps
  - update = grad / denom
  - update = update * lr
  - param = param + -update
"""

DEMO = """\
name: demo
class: Demo
include: [inner]
hyperparameters:
  lr: {default: 0.1}
  plain: {default: false}
state:
  buf: {kind: element}
update:
  - buf = buf * 0.9 + grad * grad
  - if: plain
    then:
      - denom = sqrt(buf) + 1.0e-8
      - param = param - lr * grad / denom
    else:
      - use: inner
"""


def _demo(tmp_path, block: str = BLOCK, spec: str = DEMO):
    from optgen.pipeline import lower
    from optgen.spec.loader import load_spec

    (tmp_path / "blocks").mkdir(exist_ok=True)
    (tmp_path / "blocks" / "inner.yaml").write_text(block)
    (tmp_path / "demo.yaml").write_text(spec)
    return lower(load_spec(tmp_path / "demo.yaml"))


def test_a_blocks_feature_rewrites_its_statements_under_its_flag(tmp_path) -> None:
    from optgen.ir.nodes import Assign, If, walk_nodes, walk_stmts
    from optgen.ir.ops import Op

    program = _demo(tmp_path)
    (branch,) = [s for s in program.body if isinstance(s, If)]
    atan2s = [s for s in walk_stmts(branch.orelse) if isinstance(s, Assign) and s.value.op == Op.ATAN2]
    assert len(atan2s) == 1 and not any(
        isinstance(s, Assign) and s.value.op == Op.ATAN2 for s in walk_stmts(branch.then))
    switches = [s for s in walk_stmts(branch.orelse) if isinstance(s, If)]
    assert switches and all(any(n.op == Op.HYPER and n.attr[0] == "b_atan2" for n in walk_nodes(s.cond))
                            for s in switches)
    assert "use_atan2" not in dict(program.hypers)


@pytest.mark.parametrize(("block", "message"), [
    (BLOCK.replace("names: {use_atan2: b_atan2}", "names: {}"), "must give the block's name for its hyperparameter"),
    (BLOCK.replace("names: {use_atan2: b_atan2}", "names: {use_atan2: nope}"), "'nope', which is not a hyperparameter"),
    (BLOCK.replace("feature: atan2", "feature: atan3"), "block 'inner': unknown feature 'atan3'"),
    (BLOCK.replace("denom = sqrt(buf) + eps", "denom = sqrt(buf) + where(use_atan2, 0.0, eps)").replace(
        "  eps: {default: 1.0e-8}", "  eps: {default: 1.0e-8}\n  use_atan2: {default: false}"),
     "the block's statements read 'use_atan2'"),
    (BLOCK.replace("features:", "features: 3\nx:").replace("  - {feature: atan2, names: {use_atan2: b_atan2}}\n", ""),
     "unknown field 'x' in a block"),
])
def test_block_feature_errors(tmp_path, block: str, message: str) -> None:
    from optgen.errors import SpecError

    with pytest.raises(SpecError, match=message):
        _demo(tmp_path, block)
