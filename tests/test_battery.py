"""One generic battery over every generated optimizer (as torch's OptimizerInfo tests do)."""

from __future__ import annotations

import copy
import importlib
import io

import pytest
import torch

import generated
from optgen.spec.loader import load_spec
from tests.published import SPECS, dtype_argument, handed, matched_specs, published_factory, same_value

CLASSES = {p.stem: getattr(importlib.import_module(f"generated.{p.stem}"), load_spec(p).model.class_)
           for p in sorted(SPECS.glob("*.yaml"))}
TORCH_SPECS = [s for s in matched_specs() if load_spec(SPECS / f"{s}.yaml").model.matches.package.startswith("torch==")]
# Settings that exercise every state buffer of each optimizer.
RICH = {
    "sgd": {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.01},
    "rmsprop": {"momentum": 0.9, "centered": True},
    "adam": {"amsgrad": True, "weight_decay": 0.01},
    "adamw": {"amsgrad": True},
    "adamwadv": {"max_grad_norm": None, "amsgrad": True},  # torch.optim.AdamW has no clipping to compare
    "adamw_adv": {"weight_decay": 0.01, "cautious_wd": True, "nesterov": True, "orthogonal_gradient": "flattened",
                  "kourkoutas_beta": True},
    "adamw_adv_2_2_3": {"use_AdEMAMix": True, "cautious_mask": True, "weight_decay": 0.01},
    "adopt_adv_2_2_3": {"use_AdEMAMix": True, "grams_moment": True, "orthogonal_gradient": True},
    "lion_adv": {"kappa_p": 1.5, "weight_decay": 0.01},
    "signsgd_adv": {"normed_momentum": True, "snr_cond": True, "nesterov": True},
    "simplified_ademamix": {"beta1_warmup": 3, "weight_decay": 0.01},
}


def shapes_params(dtype=torch.float32) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    shapes = [(), (5,), (4, 3), (2, 3, 4), (0,), (0, 3), (1, 6), (6, 1), (37,)]
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in shapes]


def set_grads(params, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)


def run(opt, params, steps: int, seed0: int = 0) -> None:
    for i in range(steps):
        set_grads(params, seed0 + i)
        opt.step()


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_backends_agree_on_every_shape(name: str) -> None:
    """0-D, 1-D, 2-D, batched 3-D, empty and (M,1)/(1,N) tensors: torch backend == reference."""
    cls = CLASSES[name]
    kw = {**RICH.get(name, {}), **dtype_argument(name, torch.float64)}
    a, b = shapes_params(torch.float64), shapes_params(torch.float64)
    run(cls(a, backend="torch", **kw), a, 10)
    run(cls(b, backend="reference", **kw), b, 10)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
        assert torch.isfinite(x).all()


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_state_dict_round_trip(name: str) -> None:
    cls = CLASSES[name]
    kw = RICH.get(name, {})
    params = shapes_params()
    opt = cls(params, **kw)
    run(opt, params, 5)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    clone = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = cls(clone, **kw)
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf, weights_only=False))
    sd1, sd2 = opt.state_dict(), opt2.state_dict()
    assert sd1["param_groups"] == sd2["param_groups"]
    for k in sd1["state"]:
        for key, v in sd1["state"][k].items():
            # tensors bit for bit; a published layout's flag, int step or nested quantisation state
            assert same_value(v, sd2["state"][k][key]), key
    run(opt, params, 5, seed0=100)
    run(opt2, clone, 5, seed0=100)
    for x, y in zip(params, clone):
        assert torch.equal(x, y)


@pytest.mark.parametrize("name", TORCH_SPECS)
def test_state_dict_interchange_with_torch(name: str) -> None:
    """A state_dict saved by torch.optim loads into ours and continues identically, and back."""
    kw = RICH.get(name, {})
    make_torch = published_factory(name, kw)
    for first_is_torch in (True, False):
        p1 = shapes_params()
        p2 = [torch.nn.Parameter(p.detach().clone()) for p in p1]
        src = make_torch(p1) if first_is_torch else CLASSES[name](handed(name, p1), **kw)
        run(src, p1, 5)
        with torch.no_grad():
            for a, b in zip(p1, p2):
                b.copy_(a)
        dst = CLASSES[name](handed(name, p2), **kw) if first_is_torch else make_torch(p2)
        dst.load_state_dict(copy.deepcopy(src.state_dict()))
        run(src, p1, 5, seed0=50)
        run(dst, p2, 5, seed0=50)
        for a, b in zip(p1, p2):
            assert torch.equal(a, b)


@pytest.mark.parametrize("name", TORCH_SPECS)
def test_param_groups_scheduler_and_tensor_lr(name: str) -> None:
    """Per-group hyperparameters, add_param_group, a scheduler and a tensor lr, vs torch.optim."""
    kw = RICH.get(name, {})
    results = []
    for make in (lambda groups: published_factory(name, kw)(groups), lambda groups: CLASSES[name](handed(name, groups), **kw)):
        params = shapes_params()
        groups = [{"params": params[:3]}, {"params": params[3:6], "lr": torch.tensor(0.003)}]
        opt = make(groups)
        opt.add_param_group(handed(name, [{"params": params[6:], "lr": 0.02}])[0])
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        for i in range(8):
            set_grads(params, i)
            opt.step()
            sched.step()
        results.append(params)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_grad_none_is_skipped_and_closure_returns_loss(name: str) -> None:
    cls = CLASSES[name]
    w = torch.nn.Parameter(torch.randn(3, 2))
    frozen = torch.nn.Parameter(torch.randn(4))
    opt = cls([w, frozen], **RICH.get(name, {}))
    before = frozen.detach().clone()

    def closure():
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor)
    assert torch.equal(frozen, before)
    if load_spec(SPECS / f"{name}.yaml").model.state_init == "lazy":
        assert frozen not in opt.state or not opt.state[frozen]


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_sparse_grads_are_rejected(name: str) -> None:
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = CLASSES[name](emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()


@pytest.mark.parametrize("name", TORCH_SPECS)
def test_invalid_lr_message_matches_torch(name: str) -> None:
    p = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError) as theirs:
        published_factory(name, {"lr": -1.0})(p)
    with pytest.raises(ValueError) as ours:
        CLASSES[name](p, lr=-1.0)
    assert str(ours.value) == str(theirs.value)


def test_unknown_backend_and_argument() -> None:
    p = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="backend must be one of"):
        generated.AdamW(p, backend="cuda")
    with pytest.raises(TypeError):
        generated.AdamW(p, betaz=(0.9, 0.9))
    with pytest.raises(ValueError, match="Nesterov momentum requires a momentum and zero dampening"):
        generated.SGD(p, nesterov=True)
    with pytest.raises(ValueError, match=r"Invalid beta parameter at index 1: 1.0"):
        generated.Adams(p, betas=(0.9, 1.0))
    # published arguments whose other values are not implemented: accepted at their default only
    with pytest.raises(ValueError, match=r"adam_kourkoutas_beta=True is not supported; supported: False"):
        generated.Muon_adv(p, adam_kourkoutas_beta=True)
    with pytest.raises(ValueError, match=r"orthogonal_gradient='rank2' is not supported; supported: 'disabled', 'flattened', 'iterative'"):
        generated.AdamW_adv(p, orthogonal_gradient="rank2")
    with pytest.raises(ValueError, match=r"For Kourkoutas-β, betas\[1\] \(as beta2_max\) must be > beta2_min"):
        generated.AdamW_adv(p, kourkoutas_beta=True, betas=(0.9, 0.85))
    with pytest.raises(ValueError, match=r"clip_lambda=.* is not supported; supported: 'step \*\* 0.25', None"):
        generated.Adopt_adv(p, clip_lambda=lambda step: step**0.5)
    generated.AdamW_adv(p, orthogonal_gradient="disabled", compiled_optimizer=True)


def test_adams_zero_matrix_never_recovers_u() -> None:
    """As adams-torch: a zero matrix sends u to 0 for good, so its spectral decay stays off."""
    w = torch.nn.Parameter(torch.zeros(4, 3))
    opt = generated.Adams([w], weight_decay=0.5)
    for i in range(3):
        w.grad = torch.randn(4, 3, generator=torch.Generator().manual_seed(i))
        opt.step()
    assert torch.equal(opt.state[w]["u"], torch.zeros(4))
    assert torch.count_nonzero(w) > 0


@pytest.mark.parametrize(("name", "kw"), [
    ("adamw_adv", {"normed_momentum": True, "orthogonal_gradient": "flattened"}),
    ("signsgd_adv", {"normed_momentum": True}),
    ("adopt_adv_2_2_3", {"orthogonal_gradient": True, "use_AdEMAMix": True}),
], ids=["adamw_adv", "signsgd_adv", "adopt_adv_2_2_3"])
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_the_gradient_is_never_written(name: str, kw: dict, backend: str) -> None:
    """adv_optm mutates p.grad in these paths (math/adv-optm.md §9.8); optgen leaves it alone."""
    params = shapes_params()
    opt = CLASSES[name](params, backend=backend, **kw)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g) for p in params]
        for p, x in zip(params, grads):
            p.grad = x.clone()
        opt.step()
        for p, x in zip(params, grads):
            assert torch.equal(p.grad, x)
