"""Adafactor (issue 16 item 4): specs/adafactor.yaml against torch.optim.Adafactor 2.13 (the
published package is the oracle), and the triton backend against the reference backend.

The spec's own settings (float lr) run in tests/test_equivalence.py: 200 steps, both models, float64
and float32, torch and reference backends, bit-identical. Here, what a YAML setting cannot say: a
tensor lr, bit-identical to torch over 200 steps on both models and dtypes (float32: torch computes
the step scale in float32 while min(lr, 1/sqrt(step)) returns the tensor, and 1/sqrt(step) takes
over at step 100; float64: Python-float maths); other tensor dtypes refused; torch's messages and
missing arguments; torch's (R, 1) / (1, C) state dicts loaded both ways.

triton (interpreter on CPU): fp32 against the reference backend within 2e-6 * (1 + |p|)
(tests/test_triton.py: every setting on odd shapes with random gradients, measured 1.1e-7; here a
float32 tensor lr's own branch path): the kernels compute torch's float64 RMS scalings in float32
and sum the norms in their own order, a few fp32 ulps. Not on the training models: there the
comparison is ill-conditioned, not the kernels wrong. The transformer's (8, 1) ``col`` gets
gradients of 1e-8 (rounding noise of the loss), which Adafactor's scale-invariant update turns into
full steps, so a 1e-7 difference elsewhere moves it by 2.6e-4 in one step (2e-3 after 30). bf16
against an oracle written here that rounds to bf16 where triton stores (the parameter after each
step, the row and column factors as they are written, before the outer product re-reads them)
and computes the rest in fp32 as triton does.
"""

from __future__ import annotations

import copy

import pytest
import torch

from generated.adafactor import Adafactor
from optgen.errors import SpecError
from optgen.ir.nodes import Node
from optgen.ir.ops import Op
from optgen.numerics.host import HostContext, evaluate
from optgen.pipeline import lower
from optgen.spec.loader import load_spec
from tests.models import make_model

SETTINGS = [{"lr": ("tensor", 0.1, torch.float32), "weight_decay": 0.01},  # 1/sqrt(step) < lr from step 101
            {"lr": ("tensor", 0.02, torch.float64), "eps": (None, 1e-2), "maximize": True},
            {"lr": ("tensor", 0.005, torch.float32), "beta2_decay": -0.5, "eps": (1e-15, 1e-3), "d": 2.0}]
STEPS = 200


def _kwargs(setting: dict) -> dict:
    """The setting's arguments, a tensor lr made fresh (each optimizer owns its own)."""
    out = dict(setting)
    if isinstance(out.get("lr"), tuple):
        _, value, dtype = out["lr"]
        out["lr"] = torch.tensor(value, dtype=dtype)
    return out


def _train(model, opt, steps: int, start: int = 0) -> list[float]:
    batch = type(model).batch(next(model.parameters()).dtype, seed=1 + start)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model.loss(batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _matches_torch(setting: dict, model_name: str, dtype: torch.dtype, steps: int) -> None:
    torch.set_default_dtype(dtype)  # torch keeps step in the default dtype
    ref = make_model(model_name, dtype)
    ref_losses = _train(ref, torch.optim.Adafactor(ref.parameters(), **_kwargs(setting)), steps)
    for backend in ("torch", "reference"):
        ours = make_model(model_name, dtype)
        losses = _train(ours, Adafactor(ours.parameters(), backend=backend, **_kwargs(setting)), steps)
        for x, y in zip(ours.parameters(), ref.parameters()):
            assert torch.equal(x, y), f"{backend}: {(x - y).abs().max():.3e}"
        assert losses == ref_losses


@pytest.mark.extended
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("model_name", ["mlp", "transformer"])
@pytest.mark.parametrize("index", range(len(SETTINGS)))
def test_matches_torch(index: int, model_name: str, dtype: torch.dtype) -> None:
    _matches_torch(SETTINGS[index], model_name, dtype, STEPS)


def test_matches_torch_sample() -> None:
    """The default run's sample of the matrix above (the mlp's forward and backward cost 85 ms a
    step on CPU): a float32 tensor lr of 0.2, which min() returns up to step 25, over 40 steps."""
    _matches_torch({"lr": ("tensor", 0.2, torch.float32), "weight_decay": 0.01}, "mlp", torch.float32, 40)


def test_state_dicts_cross_with_torch_in_its_shapes() -> None:
    a, b = make_model("transformer", torch.float32), make_model("transformer", torch.float32)
    oa = Adafactor(a.parameters(), backend="torch", weight_decay=0.01)
    ob = torch.optim.Adafactor(b.parameters(), weight_decay=0.01)
    _train(a, oa, 4)
    _train(b, ob, 4)
    sa, sb = oa.state_dict(), ob.state_dict()
    assert {k: {n: tuple(t.shape) for n, t in v.items()} for k, v in sa["state"].items()} == \
        {k: {n: tuple(t.shape) for n, t in v.items()} for k, v in sb["state"].items()}  # (R, 1) / (1, C)
    assert sa["param_groups"] == sb["param_groups"]
    oa.load_state_dict(copy.deepcopy(sb))
    ob.load_state_dict(copy.deepcopy(sa))
    _train(a, oa, 4, start=4)
    _train(b, ob, 4, start=4)
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.equal(x, y)


def test_torchs_messages() -> None:
    params = [torch.nn.Parameter(torch.zeros(2, 2))]
    for kwargs in ({"lr": -1.0}, {"beta2_decay": 0.5}, {"eps": (-1.0, 1e-3)}, {"eps": (None, -1.0)}, {"d": 0.5},
                   {"weight_decay": -1.0}, {"lr": torch.tensor([0.1, 0.2])}):
        with pytest.raises(ValueError) as theirs:
            torch.optim.Adafactor(params, **kwargs)
        with pytest.raises(ValueError) as ours:
            Adafactor(params, **kwargs)
        assert str(ours.value) == str(theirs.value)


def test_capturable_and_differentiable_are_not_arguments_as_in_torch() -> None:
    """torch.optim.Adafactor takes neither: a TypeError that names the argument, in both."""
    params = [torch.nn.Parameter(torch.zeros(2, 2))]
    for kwargs in ({"capturable": False}, {"capturable": True}, {"differentiable": True}):
        name = next(iter(kwargs))
        with pytest.raises(TypeError, match=name):
            torch.optim.Adafactor(params, **kwargs)
        with pytest.raises(TypeError, match=name):
            Adafactor(params, **kwargs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_tensor_lr_of_another_dtype_is_refused(dtype: torch.dtype) -> None:
    """torch would compute the step scale in that dtype; the spec reproduces float32 and float64."""
    params = [torch.nn.Parameter(torch.zeros(2, 2))]
    message = rf"Tensor lr must be float32 or float64, got {dtype}"
    with pytest.raises(ValueError, match=message):
        Adafactor(params, lr=torch.tensor(0.01, dtype=dtype))
    opt = Adafactor(params)
    with pytest.raises(ValueError, match=message):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))], "lr": torch.tensor(0.01, dtype=dtype)})


def test_a_group_mixing_dtypes_takes_each_parameters_eps() -> None:
    """A documented difference: torch's loop sets eps1 = finfo(dtype).eps at the group's first
    parameter and keeps it for the others of that step; here each parameter takes its own dtype's
    (as torch does with one group per dtype)."""
    def run(make):
        g = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(5, 4, generator=g).to(torch.bfloat16)),
              torch.nn.Parameter(torch.randn(6, 3, generator=g) * 1e-4)]
        opt = make(ps)
        for _ in range(3):
            for p in ps:
                p.grad = (torch.randn(p.shape, generator=g) * 1e-3).to(p.dtype)
            opt.step()
        return ps

    ours = run(lambda ps: Adafactor(ps, backend="torch"))
    per_dtype = run(lambda ps: torch.optim.Adafactor([{"params": [ps[0]]}, {"params": [ps[1]]}]))
    one_group = run(torch.optim.Adafactor)
    assert all(torch.equal(x, y) for x, y in zip(ours, per_dtype))
    assert not torch.equal(ours[1], one_group[1])  # torch's float32 parameter stepped with bf16's eps


def test_a_scheduler_moves_a_tensor_lr_across_the_switch() -> None:
    """StepLR halves a float32 tensor lr in place: min() returns it, then 1/sqrt(step), as torch."""
    results = []
    for make in (torch.optim.Adafactor, lambda p, **kw: Adafactor(p, backend="torch", **kw)):
        model = make_model("mlp", torch.float32)
        opt = make(model.parameters(), lr=torch.tensor(0.5))
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
        batch = type(model).batch(torch.float32, seed=3)
        for _ in range(30):
            opt.zero_grad()
            model.loss(batch).backward()
            opt.step()
            sched.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for x, y in zip(*results):
        assert torch.equal(x, y)


# -- the triton backend (interpreter on CPU) -------------------------------------------------------

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_triton_tensor_lr_matches_reference() -> None:
    """A float32 tensor lr takes its own branch path (is_float32(lr)); min() switches at step 5."""
    pytest.importorskip("triton")
    out = []
    for backend in ("reference", "triton"):
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(DEVICE if backend == "triton" else "cpu"))
                  for s in ((9, 5), (2, 3, 4), (11,))]
        opt = Adafactor(params, backend=backend, lr=torch.tensor(0.45), weight_decay=0.01)
        for _ in range(8):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(p.device)
            opt.step()
        out.append([p.detach().cpu() for p in params])
    for e, g in zip(*out):
        assert torch.all((g - e).abs() <= 2e-6 * (1 + e.abs())), f"max diff {(g - e).abs().max():.3e}"


def _bf16_oracle(params: list[torch.Tensor], grads: list[list[torch.Tensor]], lr: float, eps1: float,
                 eps2: float = 1e-3, d: float = 1.0, beta2_decay: float = -0.8) -> list[torch.Tensor]:
    """torch.optim.Adafactor's step in fp32 on bf16-stored values, rounded to bf16 where triton stores:
    the parameter after each step, the row and column factors when written (read back rounded)."""
    bf = lambda x: x.to(torch.bfloat16).float()  # noqa: E731
    ps = [p.float().clone() for p in params]
    states: list[dict] = [{} for _ in ps]
    for step, gs in enumerate(grads, start=1):
        for p, g, st in zip(ps, gs, states):
            g = g.float()
            w = step**beta2_decay
            rho = min(lr, 1 / step**0.5)
            rms = max(eps2, p.norm().item() / p.numel() ** 0.5)
            if p.dim() > 1:
                r = st.setdefault("row", torch.zeros(p.shape[:-1]))
                c = st.setdefault("col", torch.zeros(p.shape[:-2] + p.shape[-1:]))
                r.copy_(bf(torch.lerp(r, g.norm(dim=-1) ** 2 / g.shape[-1], w)))
                c.copy_(bf(torch.lerp(c, g.norm(dim=-2) ** 2 / g.shape[-2], w)))
                v = r.unsqueeze(-1) * c.unsqueeze(-2) / r.mean(dim=-1).clamp(min=eps1)[..., None, None]
            else:
                var = st.setdefault("var", torch.zeros_like(p))
                var.copy_(torch.lerp(var, g * g, w))
                v = var.clone()  # this step reads it unrounded (triton's pass holds it in fp32)
                var.copy_(bf(var))
            u = v.clamp(min=eps1 * eps1).rsqrt() * g
            denom = max(1.0, u.norm().item() / (u.numel() ** 0.5 * d))
            p.copy_(bf(p + (-(rms * rho) / denom) * u))
    return ps


STEPS_BF16 = 10


def test_triton_bf16_matches_an_oracle_rounding_where_it_stores() -> None:
    """Matrices (factored), a batched 3-D parameter and vectors over 10 steps: bit-identical on the
    interpreter; a value may flip by one bf16 ulp where fp32 sums in another order (a GPU's
    reductions, fused multiply-adds) straddle a rounding boundary: at most 1% of the values."""
    pytest.importorskip("triton")
    gen = torch.Generator().manual_seed(0)
    shapes = [(24, 17), (2, 5, 4), (300,), (7,)]
    init = [torch.randn(s, generator=gen).to(torch.bfloat16) for s in shapes]
    grads = [[torch.randn(s, generator=gen).to(torch.bfloat16) for s in shapes] for _ in range(STEPS_BF16)]
    eps1 = 2.0**-7  # eps1=None: bfloat16's eps (test_triton_eps1_none_is_the_dtype_eps)
    expected = _bf16_oracle(init, grads, lr=0.01, eps1=eps1)
    params = [torch.nn.Parameter(x.clone().to(DEVICE)) for x in init]
    opt = Adafactor(params, backend="triton", eps=(eps1, 1e-3))
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.to(DEVICE)
        opt.step()
    ulp = 2.0**-7
    for p, e, shape in zip(params, expected, shapes):
        got, e16 = p.detach().float().cpu(), e.to(torch.bfloat16).float()
        diff = (got - e16).abs()
        assert torch.all(diff <= ulp * (e16.abs() + 0.02)), f"{shape}: max diff {diff.max():.3e}"
        assert (diff > 0).float().mean() <= 0.01, f"{shape}: {(diff > 0).float().mean():.2%} flipped"


def test_triton_eps1_none_is_the_dtype_eps() -> None:
    pytest.importorskip("triton")
    out = []
    for eps in ((None, 1e-3), (2.0**-7, 1e-3)):
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(torch.bfloat16).to(DEVICE)) for s in ((9, 5), (11,))]
        opt = Adafactor(params, backend="triton", eps=eps)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(torch.bfloat16).to(DEVICE)
            opt.step()
        out.append(params)
    for x, y in zip(*out):
        assert torch.equal(x, y)


# -- the language pieces the spec needs -----------------------------------------------------------

_DEMO = """\
name: demo
class: Demo
hyperparameters:
  lr: {default: 0.1, tensor_ok: true, tensor_dtypes: [float32, float64]}
state:
  buf: {kind: element}
update:
  - buf = buf * 0.9 + grad
  - scale = lr
  - if: is_float32(lr)
    then: [scale = LR_EXPR]
  - param = param - scale * buf
"""


def _lower(tmp_path, text: str):
    path = tmp_path / "demo.yaml"
    path.write_text(text)
    return lower(load_spec(path))


def test_is_float32_is_a_host_predicate(tmp_path) -> None:
    _lower(tmp_path, _DEMO.replace("LR_EXPR", "lr * 0.5"))
    node = Node(Op.IS_FLOAT32, (Node(Op.HYPER, attr=("lr", None)),), boolean=True)
    for lr, expected in ((0.1, False), (torch.tensor(0.1), True), (torch.tensor(0.1, dtype=torch.float64), False)):
        assert evaluate(node, HostContext({"lr": lr}, torch.zeros(2), {}, False)) is expected
    bad = _DEMO.replace("LR_EXPR", "lr").replace("is_float32(lr)", "is_float32(buf)")
    with pytest.raises(SpecError, match=r"is_float32\(\) works on host scalars only") as info:
        _lower(tmp_path, bad)
    assert info.value.position.line == 10


@pytest.mark.parametrize(("entry", "message"), [
    ("{default: 0.1, tensor_dtypes: [float32]}", "tensor_dtypes needs tensor_ok: true"),
    ("{default: 0.1, tensor_ok: true, tensor_dtypes: [int8]}", "'int8' is not a floating torch dtype name"),
])
def test_tensor_dtypes_is_checked(tmp_path, entry: str, message: str) -> None:
    text = _DEMO.replace("LR_EXPR", "lr").replace("{default: 0.1, tensor_ok: true, tensor_dtypes: [float32, float64]}", entry)
    with pytest.raises(SpecError, match=message) as info:
        _lower(tmp_path, text)
    assert info.value.position.line == 4
