"""Coupled Adam (feature ``coupled``, spec ``coupled_adam``; math/torch-adams-adamw-family.md §4).

The published code (``nanoGPT/coupled_adam.py`` of github.com/flxst/coupled-adam, ba54c74) is not a
package and does not import under torch 2.13 (it imports ``_dispatch_sqrt``, gone from torch), so
these tests carry a reference written from math/ §4 (its foreach path, the one the paper's code
modifies, per tensor: on CPU torch's ``_foreach_*`` ops fall back to the same per-tensor kernels).
Tolerance 0 on the torch and reference backends: the spec names the published order of operations.
"""

from __future__ import annotations

import importlib
import math
import textwrap

import pytest
import torch

from optgen.render import compile_spec
from optgen.smoke import import_built
from tests.models import make_model, max_diffs, train


class CoupledAdamRef(torch.optim.Optimizer):
    """Coupled Adam from math §4: AdamW whose denominator reads ``avg_scale * mean(v, dim=0)``
    broadcast to the parameter's shape; the amsgrad path is plain AdamW, as published."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, avg_scale=1.0, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                                      maximize=maximize))
        self.avg_scale = avg_scale  # an optimizer attribute in the published class

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = torch.tensor(0.0)
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)
                    if group["amsgrad"]:
                        st["max_exp_avg_sq"] = torch.zeros_like(p)
                g = -p.grad if group["maximize"] else p.grad
                st["step"] += 1
                if wd != 0:
                    p.mul_(1 - lr * wd)
                m, v = st["exp_avg"], st["exp_avg_sq"]
                m.lerp_(g, 1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                t = st["step"].item()
                step_size = (lr / (1 - beta1 ** t)) * -1
                bc2_sqrt = math.sqrt(1 - beta2 ** t)
                if group["amsgrad"]:
                    torch.maximum(st["max_exp_avg_sq"], v, out=st["max_exp_avg_sq"])
                    shared = st["max_exp_avg_sq"]
                else:  # the coupling: one second moment per hidden coordinate, broadcast back
                    shared = torch.broadcast_to(self.avg_scale * torch.mean(v, dim=0), v.shape)
                denom = torch.sqrt(shared)
                denom.div_(bc2_sqrt).add_(eps)
                p.addcdiv_(m, denom, value=step_size)


def _ours(**kw):
    cls = importlib.import_module("generated.coupled_adam").CoupledAdam
    return lambda params: cls(params, **kw)


SETTINGS = [
    {},
    {"avg_scale": 0.125, "weight_decay": 0.1, "betas": (0.9, 0.95), "lr": 3e-3},
    {"amsgrad": True},
    {"maximize": True, "eps": 1e-6, "weight_decay": 0.0},
]


def _check(setting: dict, model: str, dtype: torch.dtype, steps: int, backends=("torch", "reference")) -> None:
    torch.set_default_dtype(dtype)  # the published step counter is a float tensor of the default dtype
    try:
        ref, ref_losses = train(make_model(model, dtype), lambda ps: CoupledAdamRef(ps, **setting), steps, dtype)
        for backend in backends:
            got, losses = train(make_model(model, dtype), _ours(backend=backend, **setting), steps, dtype)
            abs_d, rel_d = max_diffs(got, ref)
            assert abs_d == 0.0, f"{backend}: max abs diff {abs_d:.3e} (rel {rel_d:.3e}) after {steps} steps"
            assert losses == ref_losses
        went_down = ref_losses[-1] < ref_losses[0]
        assert went_down != setting.get("maximize", False)
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize(("index", "model"), [(0, "mlp"), (1, "transformer")])
def test_coupled_adam_matches_math(index: int, model: str) -> None:
    """Every parameter coupled (the MLP's matrices and biases; the transformer's embedding, 3-D QKV,
    0-D gate and (d, 1) column): 20 steps in float64, both backends, bit for bit (the extended run:
    every setting, both models, float64 and float32, 200 steps)."""
    _check(SETTINGS[index], model, torch.float64, 20)


@pytest.mark.extended
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("model", ["mlp", "transformer"])
@pytest.mark.parametrize("index", range(len(SETTINGS)))
def test_coupled_adam_matches_math_200_steps(index: int, model: str, dtype: torch.dtype) -> None:
    _check(SETTINGS[index], model, dtype, 200)


def test_paper_setup_embedding_group_equals_two_optimizers() -> None:
    """The paper's code: CoupledAdam over the token embedding, torch.optim.AdamW over the rest. One
    CoupledAdam with the embedding in its own group and ``coupled=False`` on the other equals it bit
    for bit; the stored exp_avg_sq stays per element (the coupling is only in the denominator)."""
    dtype, steps, hp = torch.float32, 10, dict(lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    cls = importlib.import_module("generated.coupled_adam").CoupledAdam
    a, b = make_model("transformer", dtype), make_model("transformer", dtype)
    emb_a = [a.emb.weight]
    rest_a = [p for p in a.parameters() if p is not a.emb.weight]
    ours = cls([{"params": [b.emb.weight]}, {"params": [p for p in b.parameters() if p is not b.emb.weight],
                                             "coupled": False}], backend="torch", **hp)
    theirs = [CoupledAdamRef(emb_a, **hp), torch.optim.AdamW(rest_a, **hp)]
    batch = type(a).batch(dtype)
    for _ in range(steps):
        for model, opts in ((a, theirs), (b, [ours])):
            for o in opts:
                o.zero_grad()
            model.loss(batch).backward()
            for o in opts:
                o.step()
    assert max_diffs(list(b.parameters()), list(a.parameters()))[0] == 0.0
    for pa, pb in zip(a.parameters(), b.parameters()):
        sa = (theirs[0] if pa is a.emb.weight else theirs[1]).state[pa]
        assert torch.equal(ours.state[pb]["exp_avg_sq"], sa["exp_avg_sq"])
    uncoupled, _ = train(make_model("transformer", dtype), lambda ps: torch.optim.AdamW(ps, **hp), steps, dtype)
    assert max_diffs(list(b.parameters()), uncoupled)[0] > 1e-4  # the coupling changed the embedding


# an Adam written with its own names: the feature finds its denominator and second moment by role
ODD_ADAM = """
name: odd_coupled
class: OddCoupled
hyperparameters:
  lr: {default: 1.0e-3}
  b1: {default: 0.9}
  b2: {default: 0.999}
  eps: {default: 1.0e-8}
features: [coupled]
roles: {denominator: dd, second_moment: sq}
state:
  mom: {kind: element, init: zeros}
  sq: {kind: element, init: zeros}
update:
  - mom = lerp(mom, grad, 1 - b1)
  - sq = sq * b2 + (1 - b2) * grad * grad
  - dd = eps + sqrt(sq / (1 - b2 ** step))
  - param = param - lr / (1 - b1 ** step) * mom / dd
"""


def _odd_ref(coupled: bool, avg_scale: float):
    class Ref(torch.optim.Optimizer):
        @torch.no_grad()
        def step(self):
            for g in self.param_groups:
                for p in g["params"]:
                    st = self.state[p]
                    if not st:
                        st["t"], st["m"], st["v"] = 0, torch.zeros_like(p), torch.zeros_like(p)
                    st["t"] += 1
                    st["m"].lerp_(p.grad, 0.1)
                    st["v"].mul_(0.999).addcmul_(p.grad, p.grad, value=0.001)
                    v = st["v"].mean(dim=0) * avg_scale if coupled else st["v"]
                    dd = 1e-8 + (v / (1 - 0.999 ** st["t"])).sqrt()
                    p.sub_(1e-2 / (1 - 0.9 ** st["t"]) * st["m"] / dd)

    return lambda ps: Ref(ps, {})


@pytest.mark.parametrize("coupled", [True, pytest.param(False, marks=pytest.mark.extended)])
def test_coupled_feature_on_another_base(tmp_path, coupled: bool) -> None:
    path = tmp_path / "odd_coupled.yaml"
    path.write_text(textwrap.dedent(ODD_ADAM))
    built = compile_spec(path)
    cls = getattr(import_built(built), built.program.class_name)
    dtype = torch.float64
    for backend in ("torch", "reference"):
        ours, _ = train(make_model("transformer", dtype),
                        lambda ps, b=backend: cls(ps, lr=1e-2, coupled=coupled, avg_scale=0.5, backend=b), 10, dtype)
        ref, _ = train(make_model("transformer", dtype), _odd_ref(coupled, 0.5), 10, dtype)
        # the reference's operation order differs from the generated step's (lr / bc1 * m / dd): float64,
        # 25 steps: the (d, 1) column amplifies it to 1.1e-9 coupled, 3.2e-10 uncoupled (others <= 1e-15)
        assert max_diffs(ours, ref)[0] < 1e-8, backend


def test_coupled_feature_needs_a_second_moment(tmp_path) -> None:
    from optgen.errors import SpecError

    path = tmp_path / "odd_coupled.yaml"
    path.write_text(textwrap.dedent(ODD_ADAM).replace("roles: {denominator: dd, second_moment: sq}", ""))
    with pytest.raises(SpecError, match="second moment 'exp_avg_sq'"):
        compile_spec(path)


#: 0-D, 1-D, 2-D (an embedding-like (13, 8), several tiles), (1, N), (M, 1), 3-D batched, empty
SHAPES = [(), (300,), (13, 8), (1, 9), (9, 1), (3, 4, 6), (0,), (0, 4), (40, 33)]


def _random_run(backend: str, steps: int = 10, **kw) -> list[torch.Tensor]:
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in SHAPES]
    opt = importlib.import_module("generated.coupled_adam").CoupledAdam(params, backend=backend, **kw)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(device)
        opt.step()
    return [p.detach().cpu() for p in params]


@pytest.mark.parametrize("kw", [pytest.param({}, marks=pytest.mark.extended),
                                {"avg_scale": 0.125, "weight_decay": 0.1}])
def test_triton_matches_reference(kw: dict) -> None:
    """fp32, 10 steps: |diff| <= 2e-6 (1 + |p|), tests/test_triton.py's bound (the column means
    are summed by the kernels in another order than torch's)."""
    pytest.importorskip("triton")
    ref = _random_run("reference", **kw)
    got = _random_run("triton", **kw)
    for a, b in zip(got, ref):
        assert ((a - b).abs() <= 2e-6 * (1 + b.abs())).all(), (a - b).abs().max()
