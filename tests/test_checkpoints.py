"""Checkpoints and copies behave as torch.optim's (issue 13, item 2).

Older state dicts (missing group keys, a ``step`` saved as a number), ``copy.deepcopy`` and pickle of
an optimizer with its parameters, load-state-dict hooks, values the class fixes, shape checks on
load, a checkpoint taken in another process; and the small defects of item 7 (tensor ``betas``,
``differentiable=True``, SGD's state without momentum). torch.optim is the oracle wherever the spec
reproduces one of its classes; otherwise the optimizer that never stopped is.
"""

from __future__ import annotations

import copy
import io
import pickle
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import generated
from tests.models import make_model
from tests.published import ROOT, published_factory

DTYPE = torch.float32
# Settings that create every kind of state the runtime stores: element, per-row/column factors and
# packed sign bits (factored), per-slice statistics and globals (Prodigy), Muon's matrices, eager
# state (Adagrad), conditional buffers (amsgrad, centered, momentum).
SETTINGS: dict[str, tuple[str, dict]] = {
    "adamw": ("AdamW", {"amsgrad": True, "weight_decay": 0.05}),
    "adam": ("Adam", {"weight_decay": 0.01}),
    "sgd": ("SGD", {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.01}),
    "nadam": ("NAdam", {"lr": 0.01}),
    "radam": ("RAdam", {"lr": 0.01}),
    "adagrad": ("Adagrad", {"lr": 0.05}),
    "rmsprop": ("RMSprop", {"lr": 0.005, "momentum": 0.9, "centered": True}),
    "adams": ("Adams", {}),
    "adamw_adv": ("AdamW_adv", {"state_precision": "factored", "weight_decay": 0.1}),
    "prodigy_adv": ("Prodigy_adv", {}),
    "muon_adv": ("Muon_adv", {}),
    "lion_adv": ("Lion_adv", {"weight_decay": 0.01}),
}
TORCH_SPECS = ["adamw", "adam", "sgd", "nadam", "radam", "adagrad", "rmsprop"]
BACKENDS = ["torch", "reference"]
CASES = [(s, b) for s in SETTINGS for b in BACKENDS]


def make(spec: str, params, backend: str = "torch", **extra):
    cls_name, kw = SETTINGS[spec]
    return getattr(generated, cls_name)(params, backend=backend, **{**kw, **extra})


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, seed0: int) -> None:
    """``steps`` steps, each on its own batch (seeded by the step's index)."""
    for i in range(steps):
        opt.zero_grad()
        model.loss(model.batch(DTYPE, seed=seed0 + i)).backward()
        opt.step()


def params_of(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"parameter {i} differs: max |diff| {(x - y).abs().max().item()}"


def saved(opt: torch.optim.Optimizer) -> dict:
    """The optimizer's state dict as a checkpoint holds it (through torch.save/torch.load)."""
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def resumed(spec: str, model: torch.nn.Module, sd: dict, backend: str, make_opt=None):
    """A fresh copy of ``model`` and a fresh optimizer that loads ``sd``."""
    m2 = copy.deepcopy(model)
    opt2 = (make_opt or (lambda ps: make(spec, ps, backend)))(m2.parameters())
    opt2.load_state_dict(sd)
    return m2, opt2


# -- 1. older state dicts: missing group keys ------------------------------------------------------
#: group keys newer torch.optim (and adv_optm) releases added; an older checkpoint lacks them
NEWER_KEYS = ("maximize", "foreach", "differentiable", "capturable", "fused", "nesterov", "amsgrad",
              "decoupled_weight_decay", "centered", "stochastic_rounding", "orthogonal_gradient", "cautious_mask")


@pytest.mark.parametrize("spec,backend", CASES)
def test_missing_group_keys_take_the_spec_defaults(spec: str, backend: str) -> None:
    """Every hyperparameter still at its default may be missing from a loaded group: it loads,
    the group gets the default back, and training continues identically."""
    model = make_model("transformer", DTYPE)
    opt = make(spec, model.parameters(), backend)
    train(model, opt, 3, 0)
    sd = saved(opt)
    hypers = dict(type(opt)._program.hypers)
    removed = set()
    for g in sd["param_groups"]:
        for name in list(g):
            h = hypers.get(name)
            if h is not None and h.per_group and g[name] == _default(h) and name != "lr":
                del g[name]
                removed.add(name)
    assert removed & set(NEWER_KEYS) or spec in ("adams", "prodigy_adv", "lion_adv", "muon_adv"), removed
    m2, opt2 = resumed(spec, model, sd, backend)
    for g, g2 in zip(opt.param_groups, opt2.param_groups):
        assert set(g) == set(g2)
        assert all(_equal(g[k], g2[k]) for k in g if k != "params")
    train(model, opt, 3, 3)
    train(m2, opt2, 3, 3)
    assert_same(params_of(model), params_of(m2))


@pytest.mark.parametrize("spec", TORCH_SPECS)
def test_missing_newer_keys_load_as_torch_loads_them(spec: str) -> None:
    """The keys torch.optim's own ``__setstate__`` fills in: the same checkpoint continues in
    torch.optim and in the generated class identically."""
    cls_name, kw = SETTINGS[spec]
    model = make_model("transformer", DTYPE)
    opt = published_factory(spec, kw)(model.parameters())
    train(model, opt, 3, 0)
    sd = saved(opt)
    for g in sd["param_groups"]:
        for k in NEWER_KEYS:
            if k in g and k not in kw:
                del g[k]
    results = []
    for make_opt in (published_factory(spec, kw), lambda ps: make(spec, ps)):
        m2, opt2 = resumed(spec, model, copy.deepcopy(sd), "torch", make_opt)
        train(m2, opt2, 3, 3)
        results.append(params_of(m2))
    assert_same(*results)


def test_missing_globals_start_from_their_initial_values() -> None:
    """A group without Prodigy's ``d`` (and the other globals) gets them as a new group would."""
    model = make_model("mlp", DTYPE)
    opt = make("prodigy_adv", model.parameters())
    train(model, opt, 3, 0)
    sd = saved(opt)
    names = [g.name for g in type(opt)._program.globals]
    assert "d" in names
    for g in sd["param_groups"]:
        for n in names:
            del g[n]
    fresh = make("prodigy_adv", make_model("mlp", DTYPE).parameters())
    m2, opt2 = resumed("prodigy_adv", model, sd, "torch")
    for n in names:
        assert opt2.param_groups[0][n] == fresh.param_groups[0][n]
    assert opt.param_groups[0]["d"] != fresh.param_groups[0]["d"]  # the test removes a moved value
    train(m2, opt2, 2, 3)
    assert all(torch.isfinite(p).all() for p in m2.parameters())


# -- 2. a step saved as a plain number ---------------------------------------------------------------
@pytest.mark.parametrize("spec,backend", CASES)
@pytest.mark.parametrize("kind", [int, float])
def test_step_saved_as_a_number(spec: str, backend: str, kind: type) -> None:
    model = make_model("mlp", DTYPE)
    opt = make(spec, model.parameters(), backend)
    train(model, opt, 3, 0)
    sd = saved(opt)
    steps = [st for st in sd["state"].values() if "step" in st]
    if spec == "sgd":
        assert not steps  # torch.optim.SGD keeps no step
        return
    assert steps
    for st in steps:
        step = st["step"]  # adv_optm's layout (matches.state_dict) already saves an int
        st["step"] = kind(step.item() if isinstance(step, torch.Tensor) else step)
    m2, opt2 = resumed(spec, model, sd, backend)
    for p in m2.parameters():
        step = opt2.state[p]["step"]
        assert isinstance(step, torch.Tensor) and step.dtype == torch.get_default_dtype() and step.item() == 3
    train(model, opt, 3, 3)
    train(m2, opt2, 3, 3)
    assert_same(params_of(model), params_of(m2))


@pytest.mark.parametrize("spec", [s for s in TORCH_SPECS if s != "sgd"])
def test_step_as_a_number_as_torch_loads_it(spec: str) -> None:
    cls_name, kw = SETTINGS[spec]
    model = make_model("mlp", DTYPE)
    opt = published_factory(spec, kw)(model.parameters())
    train(model, opt, 3, 0)
    sd = saved(opt)
    for st in sd["state"].values():
        st["step"] = int(st["step"].item())
    results = []
    for make_opt in (published_factory(spec, kw), lambda ps: make(spec, ps)):
        m2, opt2 = resumed(spec, model, copy.deepcopy(sd), "torch", make_opt)
        train(m2, opt2, 3, 3)
        results.append(params_of(m2))
    assert_same(*results)


# -- 3. deepcopy and pickle ------------------------------------------------------------------------
@pytest.mark.parametrize("spec,backend", CASES)
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_continue_identically(spec: str, backend: str, how: str) -> None:
    """``(model, opt)`` copied mid-training: the copy keeps its class, backend and state (its own
    tensors, keyed by its own parameters) and both continue bit for bit alike."""
    model = make_model("transformer", DTYPE)
    opt = make(spec, model.parameters(), backend)
    train(model, opt, 3, 0)
    if how == "deepcopy":
        m2, opt2 = copy.deepcopy((model, opt))
    else:
        m2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    assert type(opt2) is type(opt) and opt2.backend == backend
    assert [p for g in opt2.param_groups for p in g["params"]] == list(m2.parameters())
    assert set(opt2.state) <= set(m2.parameters())
    train(model, opt, 3, 3)
    train(m2, opt2, 3, 3)
    assert_same(params_of(model), params_of(m2))
    sd, sd2 = opt.state_dict(), opt2.state_dict()
    assert sd["param_groups"] == sd2["param_groups"]


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copy_drops_hooks_as_torch_does(how: str) -> None:
    clone = copy.deepcopy if how == "deepcopy" else lambda x: pickle.loads(pickle.dumps(x))
    counts = []
    for opt in (torch.optim.AdamW(make_model("mlp", DTYPE).parameters()),
                generated.AdamW(make_model("mlp", DTYPE).parameters())):
        opt.register_step_post_hook(_post_step_hook)
        opt.register_load_state_dict_pre_hook(_load_pre_hook)
        c = clone(opt)
        counts.append((len(c._optimizer_step_post_hooks), len(c._optimizer_load_state_dict_pre_hooks)))
    assert counts[0] == counts[1]


def test_triton_copy_rebuilds_its_runner() -> None:
    """The triton runner (compiled kernels, tables keyed by parameter ids) is not copied: the copy
    builds its own and continues exactly as the original (Triton's interpreter on CPU)."""
    pytest.importorskip("triton")
    from optgen.runtime.triton_runner import interpreting

    if not torch.cuda.is_available() and not interpreting():
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = make_model("mlp", DTYPE).to(device)
    opt = generated.AdamW(model.parameters(), backend="triton", weight_decay=0.1)

    def run(m, o, n, seed0):
        for i in range(n):
            o.zero_grad()
            x, y = m.batch(DTYPE, seed=seed0 + i)
            m.loss((x.to(device), y.to(device))).backward()
            o.step()

    run(model, opt, 2, 0)
    assert opt._triton is not None
    m2, opt2 = copy.deepcopy((model, opt))
    assert opt2.backend == "triton" and opt2._triton is None
    run(model, opt, 2, 2)
    run(m2, opt2, 2, 2)
    assert_same(params_of(model), params_of(m2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_kourkoutas_checkpoint_and_copy_of_float64_params(backend: str) -> None:
    """Kourkoutas-beta's running norm is the runtime's (no spec state): float32 for float64
    parameters too, through a load (torch would cast it to the parameter's dtype) and a copy."""
    model = make_model("transformer", torch.float64)
    kw = {"kourkoutas_beta": True, "k_warmup_steps": 4}
    opt = generated.AdamW_adv(model.parameters(), backend=backend, **kw)

    def run(m, o, n, seed0):
        for i in range(n):
            o.zero_grad()
            m.loss(m.batch(torch.float64, seed=seed0 + i)).backward()
            o.step()

    run(model, opt, 3, 0)
    m2, opt2 = resumed("adamw_adv", model, saved(opt), backend,
                       lambda ps: generated.AdamW_adv(ps, backend=backend, **kw))
    assert all(st["kourkoutas_r_ema"].dtype == torch.float32 for st in opt2.state.values())
    m3, opt3 = copy.deepcopy((model, opt))
    for m, o in ((model, opt), (m2, opt2), (m3, opt3)):
        run(m, o, 3, 3)
    assert_same(params_of(model), params_of(m2))
    assert_same(params_of(model), params_of(m3))


# -- 4. load-state-dict hooks ----------------------------------------------------------------------
@pytest.mark.parametrize("spec,backend", CASES)
def test_load_hooks_are_honoured_for_every_state(spec: str, backend: str) -> None:
    """A pre hook's returned dict is what loads, for every state (also those with a declared
    dtype and host scalars such as NAdam's ``mu_product``); hooks run in torch.optim's order."""
    model = make_model("transformer", DTYPE)
    opt = make(spec, model.parameters(), backend)
    train(model, opt, 2, 0)
    sd = saved(opt)
    calls = []

    def replace(optimizer, state_dict):
        calls.append(("pre", optimizer.param_groups[0] is original))
        new = copy.deepcopy(state_dict)
        for st in new["state"].values():
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and k != "step":
                    st[k] = torch.full_like(v, 3 if v.dtype == torch.uint8 else 0.25)
        return new

    def first(optimizer, state_dict):
        calls.append(("first", None))

    def post(optimizer):
        calls.append(("post", optimizer.param_groups[0] is not original))

    m2 = copy.deepcopy(model)
    opt2 = make(spec, m2.parameters(), backend)
    original = opt2.param_groups[0]  # torch replaces the groups between the pre and the post hooks
    opt2.register_load_state_dict_pre_hook(replace)
    opt2.register_load_state_dict_pre_hook(first, prepend=True)
    opt2.register_load_state_dict_post_hook(post)
    opt2.load_state_dict(sd)
    assert calls == [("first", None), ("pre", True), ("post", True)]
    checked = 0
    for p in m2.parameters():
        for k, v in opt2.state[p].items():
            if isinstance(v, torch.Tensor) and k != "step":
                assert torch.all(v == (3 if v.dtype == torch.uint8 else 0.25)), k
                checked += 1
    assert checked


@pytest.mark.parametrize("spec", TORCH_SPECS)
def test_load_hooks_as_torch(spec: str) -> None:
    """The same hooks on torch.optim and on the generated class: the same states, the same steps."""
    cls_name, kw = SETTINGS[spec]
    model = make_model("mlp", DTYPE)
    opt = published_factory(spec, kw)(model.parameters())
    train(model, opt, 2, 0)
    sd = saved(opt)

    def halve(optimizer, state_dict):
        new = copy.deepcopy(state_dict)
        for st in new["state"].values():
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and k != "step":
                    st[k] = v * 0.5
        for g in new["param_groups"]:
            g["lr"] = g["lr"] * 0.5
        return new

    results = []
    for make_opt in (published_factory(spec, kw), lambda ps: make(spec, ps)):
        m2 = copy.deepcopy(model)
        opt2 = make_opt(m2.parameters())
        opt2.register_load_state_dict_pre_hook(halve)
        opt2.load_state_dict(sd)
        train(m2, opt2, 2, 2)
        results.append((params_of(m2), opt2.state_dict()))
    assert_same(results[0][0], results[1][0])
    for a, b in zip(results[0][1]["state"].values(), results[1][1]["state"].values()):
        assert set(a) == set(b)
        for k in a:
            assert torch.equal(torch.as_tensor(a[k]).double(), torch.as_tensor(b[k]).double()), k


# -- 5. values the class fixes ---------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_adam_checkpoint_loaded_into_adamw_keeps_adamw_maths(backend: str) -> None:
    """torch.optim.Adam(weight_decay=0.1)'s state dict (``decoupled_weight_decay=False``) loaded
    into the generated AdamW steps as torch.optim.AdamW loading it does: AdamW's class fixes it."""
    model = make_model("mlp", DTYPE)
    opt = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=0.1)
    train(model, opt, 3, 0)
    sd = saved(opt)
    assert sd["param_groups"][0]["decoupled_weight_decay"] is False
    results = []
    for make_opt in (lambda ps: torch.optim.AdamW(ps), lambda ps: generated.AdamW(ps, backend=backend)):
        m2, opt2 = resumed("adamw", model, copy.deepcopy(sd), backend, make_opt)
        assert opt2.param_groups[0]["decoupled_weight_decay"] is True
        train(m2, opt2, 3, 3)
        results.append(params_of(m2))
    assert_same(*results)
    # and the generated Adam keeps Adam's: the loaded False is its own default, not fixed
    m3, opt3 = resumed("adam", model, copy.deepcopy(sd), backend, lambda ps: generated.Adam(ps, backend=backend))
    assert opt3.param_groups[0]["decoupled_weight_decay"] is False
    train(m3, opt3, 3, 3)
    m4, opt4 = resumed("adam", model, copy.deepcopy(sd), backend, lambda ps: torch.optim.Adam(ps))
    train(m4, opt4, 3, 3)
    assert_same(params_of(m3), params_of(m4))
    with pytest.raises(AssertionError):
        assert_same(params_of(m3), results[0])  # the two maths do differ here


def test_a_group_key_users_set_survives_a_load() -> None:
    """A ``constructor: false`` key without a default (adv_optm's ``optim_type`` routing) is the
    user's, not fixed by the class: a load keeps it."""
    model = make_model("mlp", DTYPE)
    groups = [{"params": list(model.parameters())[:2], "optim_type": "adam"},
              {"params": list(model.parameters())[2:]}]
    opt = generated.Muon_adv(groups)
    train(model, opt, 2, 0)
    m2 = copy.deepcopy(model)
    opt2 = generated.Muon_adv([{"params": list(m2.parameters())[:2], "optim_type": "adam"},
                               {"params": list(m2.parameters())[2:]}])
    opt2.load_state_dict(saved(opt))
    assert [g["optim_type"] for g in opt2.param_groups] == ["adam", None]
    train(model, opt, 2, 2)
    train(m2, opt2, 2, 2)
    assert_same(params_of(model), params_of(m2))


# -- 6. shapes checked on load -----------------------------------------------------------------------
@pytest.mark.parametrize("spec", list(SETTINGS))
def test_a_state_of_the_wrong_shape_is_refused(spec: str) -> None:
    model = make_model("transformer", DTYPE)
    opt = make(spec, model.parameters())
    train(model, opt, 2, 0)
    sd = saved(opt)
    params = list(model.parameters())
    index, key = next((i, k) for i, p in enumerate(params) if p.dim() == 2 and i in sd["state"]
                      for k, v in sd["state"][i].items() if isinstance(v, torch.Tensor) and v.dim() >= 1)
    good = sd["state"][index][key]
    sd["state"][index][key] = good.reshape(*good.shape, 1)  # torch Adafactor keeps (R, 1) factors
    m2 = copy.deepcopy(model)
    opt2 = make(spec, m2.parameters())
    before = opt2.state_dict()
    with pytest.raises(ValueError, match=re.escape(f"state '{key}' of parameter {index} (shape {tuple(params[index].shape)})")):
        opt2.load_state_dict(sd)
    after = opt2.state_dict()  # a refused load changes nothing
    assert after["param_groups"] == before["param_groups"] and after["state"].keys() == before["state"].keys()


def test_a_torch_adafactor_checkpoint_is_refused_by_factored_adamw_adv() -> None:
    """Keys that collide with a factored optimizer's but are shaped (R, 1) as torch.optim.Adafactor
    keeps its factors: refused on load, not a crash at the next step."""
    model = make_model("mlp", DTYPE)
    opt = make("adamw_adv", model.parameters())
    train(model, opt, 1, 0)
    sd = saved(opt)
    w = model.net[0].weight  # (16, 8)
    sd["state"][0]["mu_v_nmf"] = torch.zeros(w.shape[0], 1)
    with pytest.raises(ValueError, match=r"state 'mu_v_nmf' of parameter 0 \(shape \(16, 8\)\) has shape \(16, 1\), expected \(16,\)"):
        resumed("adamw_adv", model, sd, "torch")
    sd["state"][0]["mu_v_nmf"] = torch.zeros(w.shape[0])
    resumed("adamw_adv", model, sd, "torch")  # the right shape loads


def test_a_per_row_state_of_a_vector_is_refused() -> None:
    model = make_model("mlp", DTYPE)
    opt = make("adamw_adv", model.parameters())
    train(model, opt, 1, 0)
    sd = saved(opt)
    sd["state"][1]["mu_v_nmf"] = torch.zeros(16)  # parameter 1 is a bias: never factored
    sd["state"][1]["sign"] = torch.zeros(16, 2, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"parameter 1 \(shape \(16,\)\)"):
        resumed("adamw_adv", model, sd, "torch")


# -- 7. small defects --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["Adam", "AdamW", "NAdam"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_betas_match_torch(name: str, dtype: torch.dtype, backend: str) -> None:
    """torch.optim keeps tensor betas as 0-d tensors and computes its host scalars with them (in
    float32): the generated class does the same, bit for bit."""
    results = []
    for make_opt in (lambda ps, b: getattr(torch.optim, name)(ps, lr=0.01, betas=b),
                     lambda ps, b: getattr(generated, name)(ps, lr=0.01, betas=b, backend=backend)):
        model = make_model("mlp", dtype)
        # a (1,)-shaped beta1 too, where torch takes one (its NAdam fails on it: mu_product *= mu)
        beta1 = torch.tensor(0.9) if name == "NAdam" else torch.tensor([0.9])
        opt = make_opt(model.parameters(), (beta1, torch.tensor(0.99)))
        for i in range(12):
            opt.zero_grad()
            model.loss(model.batch(dtype, seed=i)).backward()
            opt.step()
        results.append(params_of(model))
    assert all(b.dim() == 0 for b in opt.param_groups[0]["betas"])  # torch.optim.Adam's _to_scalar
    assert_same(*results)


def test_tensor_betas_radam_close_to_torch() -> None:
    """RAdam with tensor betas: torch divides ``0-d tensor / tensor`` where, with float betas, it
    multiplies by a reciprocal (``float / tensor``); the generated code has the float form, so
    this pair agrees to an ulp, not bit for bit."""
    results = []
    for cls in (torch.optim.RAdam, generated.RAdam):
        model = make_model("mlp", DTYPE)
        opt = cls(model.parameters(), lr=0.01, betas=(torch.tensor(0.9), torch.tensor(0.99)))
        train(model, opt, 12, 0)
        results.append(params_of(model))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_tensor_betas_are_validated_as_torch() -> None:
    params = make_model("mlp", DTYPE).parameters
    for cls in (torch.optim.Adam, generated.Adam):
        with pytest.raises(ValueError, match="betas must be either both floats or both Tensors"):
            cls(params(), betas=(torch.tensor(0.9), 0.999))
        with pytest.raises(ValueError, match="Invalid beta parameter at index 0"):
            cls(params(), betas=(torch.tensor(1.5), torch.tensor(0.99)))
    # torch.optim.Adam fails on its range check first ("Boolean value of Tensor ... is ambiguous")
    with pytest.raises(ValueError, match=r"Tensor betas\[1\] must be 1-element"):
        generated.Adam(params(), betas=(torch.tensor(0.9), torch.tensor([0.9, 0.99])))
    with pytest.raises(TypeError, match="not a Tensor"):  # adv_optm's betas stay numbers
        generated.AdamW_adv(params(), betas=(torch.tensor(0.9), torch.tensor(0.99)))


DIFFERENTIABLE = sorted(c for c in generated.__all__
                        if "differentiable" in dict(getattr(generated, c)._program.hypers))


@pytest.mark.parametrize("name", DIFFERENTIABLE)
def test_differentiable_true_is_refused(name: str) -> None:
    assert {"SGD", "Adam", "AdamW", "NAdam", "RAdam", "Adagrad", "RMSprop"} <= set(DIFFERENTIABLE)
    cls = getattr(generated, name)
    model = make_model("mlp", DTYPE)
    ps = list(model.parameters())
    with pytest.raises(ValueError, match="differentiable=True is not supported"):
        cls(ps, differentiable=True)
    opt = cls(ps[:2], differentiable=False)
    with pytest.raises(ValueError, match="differentiable=True is not supported"):
        opt.add_param_group({"params": ps[2:], "differentiable": True})


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sgd_state_entries_as_torch(momentum: float, backend: str) -> None:
    """torch.optim.SGD keeps no state entry without momentum, a ``momentum_buffer`` with it."""
    sds = []
    for cls in (lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=momentum),
                lambda ps: generated.SGD(ps, lr=0.01, momentum=momentum, backend=backend)):
        model = make_model("mlp", DTYPE)
        opt = cls(model.parameters())
        train(model, opt, 2, 0)
        assert len(opt.state) == (0 if momentum == 0 else len(list(model.parameters())))
        sds.append(opt.state_dict())
    assert sds[0]["state"].keys() == sds[1]["state"].keys()
    for a, b in zip(sds[0]["state"].values(), sds[1]["state"].values()):
        assert a.keys() == b.keys() == {"momentum_buffer"}
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])


# -- a checkpoint from another process ---------------------------------------------------------------
CHILD = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads({threads})  # the parent's: reductions in backward follow the thread count
    sys.path.insert(0, {root!r})
    import generated
    from tests.models import make_model

    def train(model, opt, steps, seed0):
        for i in range(steps):
            opt.zero_grad()
            model.loss(model.batch(torch.float32, seed=seed0 + i)).backward()
            opt.step()

    for spec, (cls_name, kw) in {settings!r}.items():
        model = make_model("transformer", torch.float32)
        opt = getattr(generated, cls_name)(model.parameters(), **kw)
        train(model, opt, 3, 0)
        torch.save({{"model": model.state_dict(), "opt": opt.state_dict()}}, {out!r} + spec + ".pt")
        train(model, opt, 3, 3)
        torch.save([p.detach() for p in model.parameters()], {out!r} + spec + ".final.pt")
""")


def test_a_checkpoint_from_another_process(tmp_path) -> None:
    """Saved (torch.save) by another Python process, loaded here (torch.load, weights only): the
    training continues exactly as it did there. The child repeats ``train`` (it does not import
    this module, to start fast)."""
    specs = ["adamw", "sgd", "nadam", "adamw_adv", "prodigy_adv", "muon_adv"]
    out = str(tmp_path) + "/"
    code = CHILD.format(root=str(ROOT), settings={s: SETTINGS[s] for s in specs}, out=out,
                        threads=torch.get_num_threads())
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)
    for spec in specs:
        ckpt = torch.load(out + spec + ".pt", weights_only=True)
        cls_name, kw = SETTINGS[spec]
        model = make_model("transformer", DTYPE, seed=1)  # other values: the checkpoint must set them
        model.load_state_dict(ckpt["model"])
        opt = getattr(generated, cls_name)(model.parameters(), **kw)
        opt.load_state_dict(ckpt["opt"])
        train(model, opt, 3, 3)
        assert_same(params_of(model), torch.load(out + spec + ".final.pt", weights_only=True))


# -- helpers ----------------------------------------------------------------------------------------
def _default(h):
    d = h.default
    return tuple(d) if h.as_ is not None and isinstance(d, list) else d


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    return a == b or (a != a and b != b)


def _post_step_hook(optimizer, args, kwargs) -> None:
    pass


def _load_pre_hook(optimizer, state_dict) -> None:
    pass
