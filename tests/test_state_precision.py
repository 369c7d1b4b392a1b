"""Feature state_precision (docs/state_precision.md) against its oracles.

- adv_optm 2.5.16 (installed) is the oracle of its ``state_precision`` values: the codecs against
  ``util/state_util.py``'s ``set_state``/``get_state`` on odd shapes, and every adv_optm spec that
  takes them trained against the published class with the same random stream, bit for bit.
- For another spec (the adamw spec with the feature listed), the oracle is
  ``torch.optim.AdamW`` stepped on the decoded float32 states, its new states then rounded to
  bfloat16 / float16 (round to nearest even): what storing them in that dtype means.
"""

from __future__ import annotations

import importlib
import shutil
import sys
from pathlib import Path

import pytest
import torch

from optgen.ir.codecs import codec_for
from optgen.numerics import stochastic
from optgen.render import compile_spec
from tests.models import make_model, max_diffs, train
from tests.published import ours_factory, published_factory

su = pytest.importorskip("adv_optm.util.state_util")
pu = pytest.importorskip("adv_optm.util.param_update")

CPU = torch.device("cpu")
SHAPES = [(), (0,), (1,), (7,), (2048,), (3, 700), (2, 3, 1001)]
ROOT = Path(__file__).resolve().parents[1]


def _seed_both() -> None:
    pu.set_seed(CPU)
    stochastic.reseed({CPU})


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("non_neg", [False, True])
@pytest.mark.parametrize("precision", ["int8_sr", "bf16_sr"])
def test_codec_matches_adv_optm_set_and_get_state(precision: str, non_neg: bool, shape: tuple) -> None:
    codec = codec_for(precision)
    g = torch.Generator().manual_seed(len(shape) * 7 + non_neg)
    x = torch.randn(shape, generator=g) * 3
    if non_neg:
        x = x.abs()
    st: dict = {}
    su.init_state_tensor(st, "k", x.shape, precision, CPU, torch.float32, non_neg=non_neg)
    pu.set_seed(CPU)
    if precision == "int8_sr" and x.numel() == 0:
        # adv_optm's replicate padding refuses an empty tensor; ours stores empty codes and scales
        with pytest.raises(RuntimeError):
            su.set_state(st, "k", x, precision, None, non_neg=non_neg)
        out = codec.encode(x, non_neg, torch.zeros(0, dtype=torch.int32))
        assert out[""].shape == x.shape and out["_scale"].shape == (0,) == st["k_scale"].shape
        assert codec.decode(out, tuple(x.shape), non_neg).shape == x.shape
        return
    su.set_state(st, "k", x, precision, None, non_neg=non_neg)
    pu.set_seed(CPU)  # the same stream for ours
    size = codec.draws(x.numel())
    bits = torch.randint(0, 1 << 16, size, dtype=torch.int32, generator=pu.get_generator(CPU))
    ours = codec.encode(x, non_neg, bits)
    for suffix, value in ours.items():
        theirs = st["k" + suffix]
        assert value.dtype == theirs.dtype and torch.equal(value, theirs), suffix
    decoded = codec.decode(ours, tuple(x.shape), non_neg)
    assert torch.equal(decoded, su.get_state(st, "k", precision))
    if x.numel() > 4:
        assert not torch.equal(decoded, x)  # the codes do round: the comparison can fail


def _matches(spec: str, precision: str, model: str, steps: int, dtype: torch.dtype, backends, setting=None) -> None:
    setting = {"state_precision": precision, **(setting or {})}
    _seed_both()
    expected, losses = train(make_model(model, dtype), published_factory(spec, setting), steps, dtype)
    _seed_both()
    plain, _ = train(make_model(model, dtype), published_factory(spec, {k: v for k, v in setting.items()
                                                                         if k != "state_precision"}), steps, dtype)
    if precision not in ("fp32", "fp16"):
        assert max_diffs(plain, expected)[0] > 0, "the precision made no difference: the test cannot fail"
    for backend in backends:
        _seed_both()
        got, ours = train(make_model(model, dtype), ours_factory(spec, setting, backend), steps, dtype)
        d = max_diffs(got, expected)
        assert d[0] == 0.0, f"{spec} {precision} {backend}: max diffs {d} after {steps} steps"
        assert ours == losses


@pytest.mark.parametrize("precision", [pytest.param("fp32", marks=pytest.mark.extended), "bf16_sr", "int8_sr"])
def test_adamw_adv_matches_adv_optm(precision: str) -> None:
    _matches("adamw_adv", precision, "mlp", 3, torch.float32, ("torch", "reference"))


def test_adamw_adv_fp16_matches_adv_optm_on_fp16_params() -> None:
    """adv_optm's fp16 keeps the state float16 and runs the maths in it (with float32 parameters
    its lerp_ refuses the mixed dtypes): float16 parameters."""
    _matches("adamw_adv", "fp16", "mlp", 10, torch.float16, ("torch",), {"eps": 1e-4})  # 1e-8 is 0 in fp16


def test_bf16_params_round_states_then_params_in_adv_optm_order() -> None:
    """bf16 parameters: two state draws then the parameter's own, per parameter (the torch
    backend steps such a bucket parameter by parameter)."""
    _matches("adamw_adv", "bf16_sr", "mlp", 4, torch.bfloat16, ("torch", "reference"))


ADV = [("adopt_adv", {}), ("prodigy_adv", {}), ("signsgd_adv", {"momentum": 0.9}), ("muon_adv", {}),
       ("adamuon_adv", {})]


@pytest.mark.extended
@pytest.mark.parametrize("model", ["mlp", "transformer"])
@pytest.mark.parametrize("precision", ["fp32", "bf16_sr", "int8_sr"])
@pytest.mark.parametrize(("spec", "setting"), [("adamw_adv", {}), *ADV], ids=lambda x: x if isinstance(x, str) else "")
def test_every_adv_spec_matches_adv_optm_100_steps(spec: str, setting: dict, precision: str, model: str) -> None:
    _matches(spec, precision, model, 100, torch.float32, ("torch", "reference"), setting)


@pytest.mark.parametrize(("spec", "setting"), [a if a[0] in ("adopt_adv", "muon_adv") else
                                               pytest.param(*a, marks=pytest.mark.extended) for a in ADV],
                         ids=[s for s, _ in ADV])
def test_other_adv_specs_int8_sr_sample(spec: str, setting: dict) -> None:
    _matches(spec, "int8_sr", "mlp", 3, torch.float32, ("torch",), setting)


def test_state_dict_has_adv_optm_layout_and_round_trips() -> None:
    setting = {"state_precision": "int8_sr"}
    _seed_both()
    model = make_model("mlp", torch.float32)
    theirs = published_factory("adamw_adv", setting)(model.parameters())
    train(model, lambda ps: theirs, 3, torch.float32)
    model2 = make_model("mlp", torch.float32)
    ours = ours_factory("adamw_adv", setting, "torch")(model2.parameters())
    train(model2, lambda ps: ours, 3, torch.float32)
    a, b = theirs.state_dict(), ours.state_dict()
    for i, s in a["state"].items():
        o = b["state"][i]
        for k, v in s.items():
            if isinstance(v, torch.Tensor):
                assert o[k].dtype == v.dtype and o[k].shape == v.shape, k
        assert {k for k in s if isinstance(s[k], torch.Tensor)} <= set(o)
    fresh = ours_factory("adamw_adv", setting, "torch")(make_model("mlp", torch.float32).parameters())
    fresh.load_state_dict(b)
    for p, q in zip(fresh.state.values(), ours.state.values()):
        for k, v in q.items():
            if isinstance(v, torch.Tensor):
                assert p[k].dtype == v.dtype and torch.equal(p[k], v), k


# -- another spec: adamw with the feature listed -------------------------------------------------
def _adamw_with_feature(tmp_path: Path):
    """specs/adamw.yaml with feature state_precision listed (after adam's two) and its argument placed
    last in the constructor order: nothing else changes."""
    shutil.copytree(ROOT / "specs" / "blocks", tmp_path / "blocks")
    shutil.copy(ROOT / "specs" / "adam.yaml", tmp_path / "adam.yaml")
    text = (ROOT / "specs" / "adamw.yaml").read_text()
    assert "features:" not in text
    path = tmp_path / "adamw.yaml"
    text = text.replace("class: AdamW\n", "class: AdamW\nfeatures: [maximize, amsgrad, state_precision]\n", 1)
    path.write_text(text.replace("decoupled_weight_decay]", "decoupled_weight_decay, state_precision]", 1))
    built = compile_spec(path)
    pkg = tmp_path / f"sp_pkg_{tmp_path.name}"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name, body in built.files().items():
        (pkg / name).write_text(body)
    sys.path.insert(0, str(tmp_path))
    try:
        module = importlib.import_module(f"{pkg.name}.{built.module}")
    finally:
        sys.path.remove(str(tmp_path))
    return getattr(module, built.program.class_name)


@pytest.mark.parametrize("precision", ["bf16", pytest.param("fp16", marks=pytest.mark.extended)])
def test_another_spec_takes_the_precision_by_naming_it(tmp_path, precision: str) -> None:
    cls = _adamw_with_feature(tmp_path)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    hp = dict(lr=1e-2, weight_decay=0.1)
    model = make_model("mlp", torch.float32)
    ours = cls(model.parameters(), state_precision=precision, backend="torch", **hp)
    ref_model = make_model("mlp", torch.float32)
    ref = torch.optim.AdamW(ref_model.parameters(), **hp)
    batch = type(model).batch(torch.float32)
    for _ in range(10):
        for m, o in ((model, ours), (ref_model, ref)):
            o.zero_grad()
            m.loss(batch).backward()
            o.step()
        for st in ref.state.values():  # the oracle's states, stored in dtype
            for k in ("exp_avg", "exp_avg_sq"):
                st[k].copy_(st[k].to(dtype).float())
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)
        assert ours.state[p]["exp_avg"].dtype == dtype
        assert torch.equal(ours.state[p]["exp_avg"].float(), ref.state[q]["exp_avg"])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_triton_float_codecs_equal_reference_on_odd_shapes(tmp_path, precision: str) -> None:
    """Under the interpreter the triton kernels decode and encode in registers: on 0-d, empty,
    odd-sized and batched parameters the stored bf16/fp16 states equal the reference backend's
    bit for bit after one step (the float32 maths of both round alike on these values)."""
    pytest.importorskip("triton")
    cls = _adamw_with_feature(tmp_path)
    shapes = [(), (0,), (5,), (3, 257), (2, 3, 129)]
    runs = []
    for backend in ("reference", "triton"):
        g = torch.Generator().manual_seed(3)
        ps = [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i))) for i, s in enumerate(shapes)]
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g) if p.numel() else torch.zeros(p.shape)
        opt = cls(ps, state_precision=precision, backend=backend, lr=1e-2)
        opt.step()
        runs.append((ps, opt))
    (ps_r, opt_r), (ps_t, opt_t) = runs
    for a, b in zip(ps_r, ps_t):
        assert torch.equal(opt_r.state[a]["exp_avg"], opt_t.state[b]["exp_avg"])
        assert torch.equal(opt_r.state[a]["exp_avg_sq"], opt_t.state[b]["exp_avg_sq"])
        assert opt_t.state[b]["exp_avg"].dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def test_triton_int8_sr_codes_within_one_of_reference() -> None:
    """int8_sr in the triton kernels: the per-2048 absmax is a row reduction of the tile (tiles of
    whole blocks), the codes use Philox bits (another stream than adv_optm's): after two steps on
    0-d, empty, odd, batched and two-block parameters the codes differ from the reference's by at
    most one and the scales by float32 rounding."""
    pytest.importorskip("triton")
    from generated import AdamW_adv

    shapes = [(), (0,), (5,), (3, 700), (2, 3, 1001), (4096,)]
    runs = []
    for backend in ("reference", "triton"):
        g = torch.Generator().manual_seed(3)
        ps = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g)
        opt = AdamW_adv(ps, state_precision="int8_sr", backend=backend)
        opt.step()
        opt.step()
        runs.append((ps, opt))
    for a, b in zip(runs[0][0], runs[1][0]):
        for k, dtype in (("exp_avg", torch.int8), ("exp_avg_sq", torch.uint8)):
            sa, sb = runs[0][1].state[a], runs[1][1].state[b]
            assert sb[k].dtype == dtype and sb[k].shape == a.shape
            assert sb[k + "_scale"].shape == sa[k + "_scale"].shape == (-(-a.numel() // 2048),)
            if a.numel():
                assert (sa[k].int() - sb[k].int()).abs().max() <= 1
                torch.testing.assert_close(sb[k + "_scale"], sa[k + "_scale"], rtol=1e-6, atol=0)


def test_with_factored_2nd_sample() -> None:
    """adv_optm's factored_2nd: the second moment factored, the first moment coded."""
    _matches("adamw_adv", "int8_sr", "mlp", 3, torch.float32, ("torch",), {"factored_2nd": True})


@pytest.mark.extended
@pytest.mark.parametrize("model", ["mlp", "transformer"])
@pytest.mark.parametrize("precision", ["bf16_sr", "int8_sr"])
@pytest.mark.parametrize("spec", ["adamw_adv", "adopt_adv", "prodigy_adv"])
def test_with_factored_2nd_100_steps(spec: str, precision: str, model: str) -> None:
    _matches(spec, precision, model, 100, torch.float32, ("torch", "reference"), {"factored_2nd": True})


def _with_feature(tmp_path: Path, spec: str):
    """specs/<spec>.yaml with feature state_precision listed last and its argument placed last in
    the constructor order: nothing else changes."""
    import re

    for f in (ROOT / "specs").glob("*.yaml"):
        shutil.copy(f, tmp_path / f.name)
    if not (tmp_path / "blocks").exists():
        shutil.copytree(ROOT / "specs" / "blocks", tmp_path / "blocks")
    path = tmp_path / f"{spec}.yaml"
    text = path.read_text()
    text, n = re.subn(r"^features: \[([^\]]*)\]", r"features: [\1, state_precision]", text, count=1, flags=re.M)
    assert n == 1
    text = re.sub(r"(constructor_order: \[[^\]]*)\]", r"\1, state_precision]", text, count=1)
    path.write_text(text)
    built = compile_spec(path)
    pkg = tmp_path / f"sp_{spec}"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name, body in built.files().items():
        (pkg / name).write_text(body)
    sys.path.insert(0, str(tmp_path))
    try:
        module = importlib.import_module(f"{pkg.name}.{built.module}")
    finally:
        sys.path.remove(str(tmp_path))
    return getattr(module, built.program.class_name)


GENERIC = [("lion_adv", ("exp_avg",), {"lr": 1e-3}), ("adams", ("exp_avg", "exp_avg_sq"), {"lr": 1e-3})]


@pytest.mark.parametrize(("spec", "keys", "hp"), GENERIC, ids=[g[0] for g in GENERIC])
def test_other_specs_take_bf16_by_naming_it(tmp_path, spec: str, keys: tuple, hp: dict) -> None:
    """The published class, its states rounded to bfloat16 (nearest even) after every step, is
    the oracle of ``state_precision='bf16'`` on a spec that only lists the feature."""
    cls = _with_feature(tmp_path, spec)
    published = published_factory(spec, hp)
    model, ref_model = make_model("mlp", torch.float32), make_model("mlp", torch.float32)
    ours = cls(model.parameters(), state_precision="bf16", backend="torch", **hp)
    ref = published(ref_model.parameters())
    batch = type(model).batch(torch.float32)
    for _ in range(5):
        for m, o in ((model, ours), (ref_model, ref)):
            o.zero_grad()
            m.loss(batch).backward()
            o.step()
        for st in ref.state.values():
            for k in keys:
                if k in st:
                    st[k].copy_(st[k].to(torch.bfloat16).float())
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)
        for k in keys:
            if k in ref.state[q]:
                assert ours.state[p][k].dtype == torch.bfloat16
                assert torch.equal(ours.state[p][k].float(), ref.state[q][k].reshape(p.shape))  # adams: flat


def test_compiled_backend_steps_stochastic_codecs_eagerly_and_exactly() -> None:
    """backend='compiled': a path that draws adv_optm's stream runs the eager step (as stochastic
    parameter rounding does), so it stays bit-identical."""
    _matches("adamw_adv", "int8_sr", "mlp", 3, torch.float32, ("compiled",))


@pytest.mark.extended  # inductor's compile of the step: ~25 s
def test_compiled_backend_compiles_the_float_codecs(tmp_path) -> None:
    """bf16 states through inductor: the stored states equal the eager torch backend's after one
    step, to one bf16 rounding of the float32 maths (inductor may fuse differently)."""
    cls = _adamw_with_feature(tmp_path)
    runs = []
    for backend in ("torch", "compiled"):
        model = make_model("mlp", torch.float32)
        opt = cls(model.parameters(), state_precision="bf16", backend=backend, lr=1e-2)
        train(model, lambda ps, o=opt: o, 2, torch.float32)
        runs.append((list(model.parameters()), opt))
    for a, b in zip(runs[0][0], runs[1][0]):
        s, t = runs[0][1].state[a]["exp_avg"], runs[1][1].state[b]["exp_avg"]
        assert t.dtype == torch.bfloat16
        assert (s.float() - t.float()).abs().max() <= s.float().abs().max() * 2 ** -7


def _rounded(buf: torch.Tensor, precision: str) -> torch.Tensor:
    """What storing ``buf`` at ``precision`` keeps: nearest-even for the dtypes, adv_optm's
    ``set_state`` / ``get_state`` (drawing from its stream) for the stochastic ones."""
    if precision in ("bf16", "fp16"):
        return buf.to({"bf16": torch.bfloat16, "fp16": torch.float16}[precision]).float()
    st: dict = {}
    su.init_state_tensor(st, "k", buf.shape, precision, CPU, torch.float32, non_neg=False)
    su.set_state(st, "k", buf, precision, None, non_neg=False)
    return su.get_state(st, "k", precision)


SGD_SETTINGS = [{"momentum": 0.9, "weight_decay": 0.01}, {"momentum": 0.8, "nesterov": True}]


def _sgd_cases() -> list:
    """Every precision x setting x model; two in the default run (one a stochastic codec with its scales)."""
    default = {("int8_sr", "decay", "mlp"), ("bf16", "nesterov", "mlp")}
    return [pytest.param(p, s, m, id=f"{p}-{name}-{m}", marks=() if (p, name, m) in default else pytest.mark.extended)
            for p in ("bf16", "fp16", "bf16_sr", "int8_sr") for name, s in zip(("decay", "nesterov"), SGD_SETTINGS)
            for m in ("mlp", "transformer")]


@pytest.mark.parametrize(("precision", "setting", "model"), _sgd_cases())
def test_sgd_momentum_buffer_created_by_its_first_write_is_coded(tmp_path, precision: str, setting: dict,
                                                                 model: str) -> None:
    """SGD's momentum buffer does not exist until the first step with momentum writes it: under
    ``state_precision`` it is created coded (codes and scales), then decoded and re-encoded by every
    step. Oracle: torch.optim.SGD, each new buffer rounded after the step, in parameter order."""
    cls = _with_feature(tmp_path, "sgd")
    hp = {"lr": 0.05, **setting}
    theirs_model = make_model(model, torch.float32)
    ref = torch.optim.SGD(theirs_model.parameters(), **hp)
    batch = type(theirs_model).batch(torch.float32)
    results = {}
    for backend in ("torch", "reference"):
        stochastic.reseed({CPU})
        m = make_model(model, torch.float32)
        ours = cls(m.parameters(), state_precision=precision, backend=backend, **hp)
        assert not ours.state, "no state before the first step"
        for _ in range(12):
            ours.zero_grad()
            m.loss(batch).backward()
            ours.step()
        results[backend] = (m, ours)
    pu.set_seed(CPU)
    for _ in range(12):
        ref.zero_grad()
        theirs_model.loss(batch).backward()
        ref.step()
        for q in theirs_model.parameters():
            buf = ref.state[q]["momentum_buffer"]
            buf.copy_(_rounded(buf, precision))
    unrounded = make_model(model, torch.float32)
    plain = torch.optim.SGD(unrounded.parameters(), **hp)
    for _ in range(12):
        plain.zero_grad()
        unrounded.loss(batch).backward()
        plain.step()
    assert max_diffs(list(unrounded.parameters()), list(theirs_model.parameters()))[0] > 0, "no rounding: cannot fail"
    codec = codec_for(precision)
    for backend, (m, ours) in results.items():
        assert max_diffs(list(m.parameters()), list(theirs_model.parameters()))[0] == 0.0, backend
        for p, q in zip(m.parameters(), theirs_model.parameters()):
            st = ours.state[p]
            stored = {s.suffix: st["momentum_buffer" + s.suffix] for s in codec.stored(False)}
            assert set(st) == {"momentum_buffer" + s for s in stored}, (backend, sorted(st))
            assert str(stored[""].dtype) == "torch." + codec.stored(False)[0].dtype
            assert torch.equal(codec.decode(stored, tuple(p.shape), False), ref.state[q]["momentum_buffer"])


@pytest.mark.parametrize("precision", ["bf16", pytest.param("fp16", marks=pytest.mark.extended), "int8_sr"])
def test_sgd_coded_momentum_buffer_on_triton_and_compiled(tmp_path, precision: str) -> None:
    """The triton kernels (under the interpreter) create the coded buffer in its storage dtype and
    step within float32 rounding of the reference; a stochastic codec there needs a step count,
    which SGD does not keep: refused by name. The compiled backend steps like the reference."""
    pytest.importorskip("triton")
    cls = _with_feature(tmp_path, "sgd")
    hp = {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01, "state_precision": precision}
    runs = {}
    for backend in ("reference", "compiled", "triton"):
        stochastic.reseed({CPU})
        m = make_model("mlp", torch.float32)
        opt = cls(m.parameters(), backend=backend, **hp)
        batch = type(m).batch(torch.float32)
        try:
            for _ in range(3):
                opt.zero_grad()
                m.loss(batch).backward()
                opt.step()
        except RuntimeError as exc:
            assert backend == "triton" and codec_for(precision).stochastic, exc
            assert "seeds its random stream with the step count" in str(exc)
            continue
        runs[backend] = (m, opt)
    ref_model, ref = runs.pop("reference")
    assert set(runs) == ({"compiled"} if codec_for(precision).stochastic else {"compiled", "triton"})
    for backend, (m, opt) in runs.items():
        for p, q in zip(m.parameters(), ref_model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=backend)
            assert opt.state[p]["momentum_buffer"].dtype == ref.state[q]["momentum_buffer"].dtype
            assert opt.state[p].keys() == ref.state[q].keys()
