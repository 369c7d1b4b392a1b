"""Gradient clipping (the ``clip_grad`` feature) and gradient accumulation.

A spec with ``clip_grad`` under ``features:`` steps, on clipped copies of the gradients, exactly
what ``torch.nn.utils.clip_grad_norm_`` / ``clip_grad_value_`` over every parameter followed by
the same optimizer without clipping steps: bit for bit, on the torch and reference backends, 20
steps of tests/models.py models under LambdaLR, two param groups, norm_type 2 and inf. The user's
``.grad`` is never modified. The variants are built from a copy of specs/ with the feature added
(the shipped specs do not list it: their generated code is unchanged). The triton backend runs
under the interpreter on CPU (tests/conftest.py), on two specs and 5 steps.
"""

from __future__ import annotations

import functools
import importlib
import re
import shutil

import pytest
import torch

from optgen.authoring.load import build_class
from optgen.spec.loader import load_spec
from tests.models import make_model
from tests.published import ROOT

STEPS = 20
CLIP_NAMES = ", max_grad_norm, grad_norm_type, error_if_nonfinite, clip_grad_value"
#: spec -> the files of its extends chain that carry features / constructor_order, and its settings
SPECS = {
    "adamw": ({"weight_decay": 0.1}, ("adam", "adamw")),
    "adam": ({}, ("adam",)),
    "lion_adv": ({"weight_decay": 0.1}, ("lion_adv",)),
    "muon_adv": ({}, ("muon_adv",)),
}
#: (max_grad_norm, grad_norm_type, clip_grad_value): small enough that every step clips
MODES = {
    "norm2": (0.05, 2.0, None),
    "norm_inf": (0.01, float("inf"), None),
    "value": (None, 2.0, 0.002),
    "value_and_norm": (0.03, 2.0, 0.004),
}


@functools.cache
def _specs_copy(tmp_root: str) -> str:
    import pathlib

    root = pathlib.Path(tmp_root) / "specs"
    shutil.copytree(ROOT / "specs", root)
    for name in {f for _, files in SPECS.values() for f in files}:
        path = root / f"{name}.yaml"
        text = path.read_text()
        if re.search(r"^features: \[", text, flags=re.M):
            text = re.sub(r"^features: \[", "features: [clip_grad, ", text, count=1, flags=re.M)
        text = re.sub(r"(constructor_order: \[[^\]]*)\]", lambda m: m.group(1) + CLIP_NAMES + "]", text, count=1)
        path.write_text(text)
    return str(root)


@pytest.fixture(scope="module")
def clipped_cls(tmp_path_factory):
    root = _specs_copy(str(tmp_path_factory.mktemp("clip")))
    cache: dict[str, type] = {}

    def get(spec: str) -> type:
        if spec not in cache:
            cache[spec] = build_class(f"{root}/{spec}.yaml")[1]
        return cache[spec]

    return get


def _plain(spec: str) -> type:
    return getattr(importlib.import_module(f"generated.{spec}"), load_spec(ROOT / "specs" / f"{spec}.yaml").model.class_)


def _groups(model: torch.nn.Module) -> list[dict]:
    params = list(model.parameters())
    half = len(params) // 2
    return [{"params": params[:half]}, {"params": params[half:], "lr": 3e-4}]


def _run(model_name: str, make_opt, clip=None, steps: int = STEPS):
    """Train under LambdaLR; ``clip(model)``: torch's clipping between backward and step. Returns
    the parameters, and whether each step's .grad came back untouched from the step."""
    model = make_model(model_name, torch.float32)
    opt = make_opt(_groups(model))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.1 * s))
    batch = type(model).batch(torch.float32)
    untouched = True
    norms = []
    for _ in range(steps):
        opt.zero_grad()
        model.loss(batch).backward()
        if clip is not None:
            clip(model)
        before = [p.grad.clone() for p in model.parameters()]
        opt.step()
        untouched &= all(torch.equal(b, p.grad) for b, p in zip(before, model.parameters()))
        norms.append(getattr(opt, "last_grad_norm", None))
        sched.step()
    return [p.detach().clone() for p in model.parameters()], untouched, norms


def _torch_clip(mode: str):
    max_norm, norm_type, value = MODES[mode]

    def clip(model):
        if value is not None:
            torch.nn.utils.clip_grad_value_(model.parameters(), value)
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, norm_type)

    return clip


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("model_name", ["mlp", "transformer"])
@pytest.mark.parametrize("spec", list(SPECS))
def test_clipping_matches_torch_clip_then_step(clipped_cls, spec: str, model_name: str, mode: str, backend: str) -> None:
    settings, _ = SPECS[spec]
    max_norm, norm_type, value = MODES[mode]
    want, _, _ = _run(model_name, lambda ps: _plain(spec)(ps, backend=backend, **settings), _torch_clip(mode))
    got, untouched, norms = _run(model_name, lambda ps: clipped_cls(spec)(
        ps, backend=backend, max_grad_norm=max_norm, grad_norm_type=norm_type, clip_grad_value=value, **settings))
    assert untouched, "the step modified .grad"
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"parameter {i}: max diff {(a - b).abs().max().item()}"
    if max_norm is not None:  # the coefficient was below 1 (it clipped) at every step
        assert all(n is not None and n.item() > max_norm for n in norms)


def test_clipping_off_by_default_is_the_plain_optimizer(clipped_cls) -> None:
    want, _, _ = _run("mlp", lambda ps: _plain("adamw")(ps, backend="torch"))
    got, _, norms = _run("mlp", lambda ps: clipped_cls("adamw")(ps, backend="torch"))
    assert all(torch.equal(a, b) for a, b in zip(got, want)) and norms == [None] * STEPS


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_error_if_nonfinite_raises_as_torch(clipped_cls, backend: str) -> None:
    model = make_model("mlp", torch.float32)
    opt = clipped_cls("adamw")(_groups(model), backend=backend, max_grad_norm=1.0, error_if_nonfinite=True)
    model.loss(type(model).batch(torch.float32)).backward()
    first = next(model.parameters())
    first.grad[0, 0] = float("inf")
    with pytest.raises(RuntimeError) as torch_err:
        torch.nn.utils.get_total_norm([p.grad.clone() for p in model.parameters()], 2.0, error_if_nonfinite=True)
    grads = [p.grad.clone() for p in model.parameters()]
    params = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError) as ours:
        opt.step()
    assert str(ours.value) == str(torch_err.value)
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, model.parameters()))
    assert all(torch.equal(a, p) for a, p in zip(params, model.parameters()))  # nothing was stepped
    # without the flag torch scales by the non-finite norm anyway: so do we
    opt.error_if_nonfinite = False
    opt.step()
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, model.parameters()))


def test_step_parameter_refuses_clipping(clipped_cls) -> None:
    model = make_model("mlp", torch.float32)
    opt = clipped_cls("adamw")(model.parameters(), backend="torch", max_grad_norm=1.0)
    model.loss(type(model).batch(torch.float32)).backward()
    with pytest.raises(RuntimeError, match="call step"):
        opt.step_parameter(next(model.parameters()))


# -- gradient accumulation -------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("spec", ["adamw", "lion_adv"])
def test_gradient_accumulation(spec: str, backend: str) -> None:
    """k micro-batches (each loss scaled by 1/k) then one step: the step reads the accumulated
    .grad, never zeroes nor modifies it, and equals one step on the whole batch (float64: up to
    the summation order of the gradients) and torch's / the same optimizer's step on the same
    accumulated gradients bit for bit."""
    k, steps = 4, 5
    settings, _ = SPECS[spec]
    cls = _plain(spec)
    full, accum = make_model("mlp", torch.float64), make_model("mlp", torch.float64)
    opt_full = cls(full.parameters(), backend=backend, **settings)
    opt_acc = cls(accum.parameters(), backend=backend, **settings)
    x, y = type(full).batch(torch.float64)
    for _ in range(steps):
        opt_full.zero_grad()
        full.loss((x, y)).backward()
        opt_full.step()
        opt_acc.zero_grad()
        for xs, ys in zip(x.chunk(k), y.chunk(k)):
            (accum.loss((xs, ys)) / k).backward()
        grads = [p.grad.clone() for p in accum.parameters()]
        opt_acc.step()
        assert all(torch.equal(g, p.grad) for g, p in zip(grads, accum.parameters()))
    for a, b in zip(accum.parameters(), full.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _triton_available(), reason="needs triton (on CPU: TRITON_INTERPRET=1, set by conftest)")
@pytest.mark.parametrize("mode", ["norm2", "value"])
@pytest.mark.parametrize("spec", ["adamw", "lion_adv"])
def test_clipping_on_triton(clipped_cls, spec: str, mode: str) -> None:
    """The phase runs before the executors: the triton backend steps the clipped copies too, bit
    for bit as torch's clipping followed by the triton step (5 steps: the interpreter is slow)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        pytest.skip("the models of tests/models.py are built on CPU")
    settings, _ = SPECS[spec]
    max_norm, norm_type, value = MODES[mode]
    want, _, _ = _run("mlp", lambda ps: _plain(spec)(ps, backend="triton", **settings), _torch_clip(mode), steps=5)
    got, untouched, _ = _run("mlp", lambda ps: clipped_cls(spec)(
        ps, backend="triton", max_grad_norm=max_norm, grad_norm_type=norm_type, clip_grad_value=value, **settings),
        steps=5)
    assert untouched
    assert all(torch.equal(a, b) for a, b in zip(got, want))
