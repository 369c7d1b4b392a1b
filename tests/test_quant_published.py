"""The block-quantised published classes against their pinned packages, 100 steps on real models.

bitsandbytes 0.50.2 ``Adam8bit``/``AdamW8bit`` run on CPU here (its CPU library quantises, the
step is ``backends/cpu/ops.py``): the specs must give the same parameters and the same 8-bit
codes and absmax, bit for bit. The test models' tensors are below bnb's default
``min_8bit_size`` (4096), so the settings lower it to put most of them on the 8-bit path (with
partial last blocks) and leave the smallest on the 32-bit one.

torchao 0.18.0 compiles its per-parameter step with ``torch.compile``; the oracle here is the same
function run eagerly (``torch.compile`` patched to the identity), whose rounding the specs follow
op for op. torchao quantises only tensors of at least 4096 elements (not configurable), so a third
model with 4096-element weights is trained beside the two test models.
"""

from __future__ import annotations

import importlib
from unittest import mock

import pytest
import torch
from torch import nn

from tests.models import make_model, train

bnb = pytest.importorskip("bitsandbytes")
ao = pytest.importorskip("torchao.optim")

STEPS = 100
#: the default run's sample: fewer steps (CI time); the extended run takes all cases at STEPS
QUICK = 25


class Wide(nn.Module):
    """An MLP whose two big weights (16x256, 256x16) torchao quantises."""

    def __init__(self, dtype: torch.dtype = torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(16, 256), nn.Linear(256, 16), nn.Linear(16, 4)
        self.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))

    @staticmethod
    def batch(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(1)
        return torch.randn(64, 16, generator=g).to(dtype), torch.randn(64, 4, generator=g).to(dtype)

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return ((self(x) - y) ** 2).mean()


def _model(name: str) -> nn.Module:
    return Wide() if name == "wide" else make_model(name, torch.float32)


def _ours(module: str):
    mod = importlib.import_module(f"generated.{module}")
    return next(v for v in vars(mod).values() if isinstance(v, type) and v.__module__ == mod.__name__
                and issubclass(v, torch.optim.Optimizer))


def _run(model: str, make, steps: int = STEPS):
    m = _model(model)
    opts = []

    def factory(ps):
        opts.append(make(ps))
        return opts[0]

    params, losses = train(m, factory, steps, torch.float32)
    return params, losses, opts[0]


def _assert_same(ref, got):
    assert len(ref) == len(got)
    for i, (a, b) in enumerate(zip(ref, got)):
        assert torch.equal(a, b), f"parameter {i}: max |diff| {(a - b).abs().max().item():.3g}"


# --- bitsandbytes ----------------------------------------------------------------------------------

BNB_CASES = [
    pytest.param("adamw8bit_bnb", "AdamW8bit", "mlp", {"min_8bit_size": 64}, "torch", QUICK, id="adamw-mlp-quick"),
    pytest.param("adamw8bit_bnb", "AdamW8bit", "mlp", {"min_8bit_size": 64}, "torch", STEPS, id="adamw-mlp",
                 marks=pytest.mark.extended),
    pytest.param("adam8bit_bnb", "Adam8bit", "transformer", {"lr": 3e-3, "weight_decay": 0.1, "min_8bit_size": 16},
                 "torch", STEPS, id="adam-transformer-wd", marks=pytest.mark.extended),
    pytest.param("adamw8bit_bnb", "AdamW8bit", "transformer", {"min_8bit_size": 64}, "reference", STEPS,
                 id="adamw-transformer-reference", marks=pytest.mark.extended),
    pytest.param("adam8bit_bnb", "Adam8bit", "mlp", {"lr": 3e-3, "weight_decay": 0.1, "min_8bit_size": 16},
                 "reference", STEPS, id="adam-mlp-reference", marks=pytest.mark.extended),
    pytest.param("adamw8bit_bnb", "AdamW8bit", "transformer", {}, "torch", STEPS, id="adamw-transformer-32bit",
                 marks=pytest.mark.extended),
    pytest.param("adamw8bit_bnb", "AdamW8bit", "wide", {"weight_decay": 0.1}, "torch", STEPS, id="adamw-wide-default",
                 marks=pytest.mark.extended),
]


@pytest.mark.parametrize("module,cls,model,setting,backend,steps", BNB_CASES)
def test_bitsandbytes_8bit_bit_identical(module, cls, model, setting, backend, steps):
    ref, ref_losses, theirs = _run(model, lambda ps: getattr(bnb.optim, cls)(ps, **setting), steps)
    got, losses, ours = _run(model, lambda ps: _ours(module)(ps, backend=backend, **setting), steps)
    _assert_same(ref, got)
    assert losses == ref_losses
    coded = 0
    for p_ref, p in zip(theirs.state, ours.state):
        s_ref, s = theirs.state[p_ref], ours.state[p]
        for k in ("state1", "state2"):
            assert s[k].dtype == s_ref[k].dtype and torch.equal(s[k], s_ref[k]), k
        if s_ref["state1"].dtype == torch.uint8:
            coded += 1
            assert torch.equal(s["state1_absmax"], s_ref["absmax1"])
            assert torch.equal(s["state2_absmax"], s_ref["absmax2"])
    assert coded > 0 or not setting, "no tensor took the 8-bit path"


# --- torchao ---------------------------------------------------------------------------------------

AO = [("adamw8bit_ao", "AdamW8bit"), ("adam8bit_ao", "Adam8bit"), ("adamw4bit_ao", "AdamW4bit"),
      ("adam4bit_ao", "Adam4bit"), ("adamwfp8_ao", "AdamWFp8"), ("adamfp8_ao", "AdamFp8")]
AO_CASES = [pytest.param(m, c, "wide", QUICK, id=f"{c}-wide-quick") for m, c in AO if c in ("AdamW8bit", "AdamW4bit")]
AO_CASES += [pytest.param(m, c, model, STEPS, id=f"{c}-{model}", marks=pytest.mark.extended)
             for m, c in AO for model in ("wide", "mlp", "transformer")]


def _eager():
    return mock.patch("torch.compile", lambda fn, **kw: fn)


@pytest.mark.parametrize("module,cls,model,steps", AO_CASES)
def test_torchao_low_bit_bit_identical_to_its_eager_step(module, cls, model, steps):
    setting = {"lr": 3e-3, "weight_decay": 0.1}
    with _eager():
        ref, ref_losses, theirs = _run(model, lambda ps: getattr(ao, cls)(ps, **setting), steps)
    got, losses, ours = _run(model, lambda ps: _ours(module)(ps, backend="torch", **setting), steps)
    _assert_same(ref, got)
    assert losses == ref_losses
    coded = 0
    for p_ref, p in zip(theirs.state, ours.state):
        s_ref, s = theirs.state[p_ref], ours.state[p]
        for k in ("exp_avg", "exp_avg_sq"):
            t = s_ref[k]
            if type(t) is torch.Tensor:
                assert torch.equal(s[k], t)
                continue
            coded += 1
            assert torch.equal(s[k + "_scale"], t.scale)
            codes = t.codes.view(torch.uint8) if t.codes.dtype != torch.uint8 else t.codes
            # torchao's own bytes: 4-bit codes packed two per byte (flat, numel / 2), others of p's shape
            assert s[k].dtype == torch.uint8 and s[k].shape == codes.shape, (k, s[k].shape, codes.shape)
            assert torch.equal(s[k], codes)
    assert coded > 0 or model != "wide"


def test_bitsandbytes_cuda_kernel_form():
    """state_precision='8bit_cuda' against a reference written here from math §6.1.2 (the CUDA
    kernel cannot run without a GPU): nearest-code encoding with the sign fix, decay after the
    update, a non-finite gradient element resetting its moments and keeping its parameter."""
    from optgen import quant as Q

    g = torch.Generator().manual_seed(3)
    p0 = torch.randn(300, generator=g)
    ours_p = p0.clone().requires_grad_(True)
    opt = _ours("adamw8bit_bnb")([ours_p], lr=1e-2, weight_decay=0.1, min_8bit_size=64, state_precision="8bit_cuda",
                                 backend="torch")
    lr, b1, b2, eps, wd = 1e-2, 0.9, 0.999, 1e-8, 0.1
    signed, unsigned = Q.qmap("signed"), Q.qmap("unsigned")
    p = p0.clone()
    c1 = torch.zeros(300, dtype=torch.uint8)
    c2 = torch.zeros(300, dtype=torch.uint8)
    a1 = torch.zeros(2)
    a2 = torch.zeros(2)
    for t in range(1, 9):
        grad = torch.randn(300, generator=g)
        if t in (3, 6):
            grad[5], grad[290] = float("nan"), float("inf")
        ours_p.grad = grad.clone()
        opt.step()
        m, v = Q.bnb_dequantize(c1, a1, signed), Q.bnb_dequantize(c2, a2, unsigned)
        finite = grad.isfinite()
        v = torch.where(finite, v.mul(b2).addcmul(grad, grad, value=1 - b2), 0.0)
        m = torch.where(finite, m.mul(b1).add(grad, alpha=1 - b1), 0.0)
        k1, k2 = 1 - b1**t, (1 - b2**t) ** 0.5
        p = torch.where(finite, p.add(m / (v.sqrt() + k2 * eps), alpha=-lr * k2 / k1), p)
        p = torch.where(finite, p * (1 - lr * wd), p)
        c1, a1 = Q.bnb_quantize(m, signed, signed=True, encoder="nearest")
        c2, a2 = Q.bnb_quantize(v, unsigned, signed=False, encoder="nearest")
        st = opt.state[ours_p]
        assert torch.equal(st["state1"], c1) and torch.equal(st["state2"], c2)
        assert torch.equal(st["state1_absmax"], a1) and torch.equal(st["state2_absmax"], a2)
        assert torch.equal(ours_p.detach(), p), t


# --- bitsandbytes' state-dict layout ---------------------------------------------------------------

def _same_tree(a, b, path: str = "") -> None:
    """Two state dicts' ``state`` parts equal: the same keys, nesting, dtypes and values."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (path, sorted(a), sorted(b) if isinstance(b, dict) else b)
        for k in a:
            _same_tree(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    else:
        assert type(a) is type(b) and a == b, (path, a, b)


def _saved(opt) -> dict:
    """``opt.state_dict()`` through torch.save / torch.load, as a checkpoint takes it."""
    import io

    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _continue(pairs, steps: int) -> None:
    """Step each (model, optimizer) on the same full batch ``steps`` times."""
    for _ in range(steps):
        for model, opt in pairs:
            opt.zero_grad()
            model.loss(type(model).batch(torch.float32)).backward()
            opt.step()


@pytest.mark.parametrize("backend", ["torch", pytest.param("reference", marks=pytest.mark.extended)])
def test_bitsandbytes_state_dicts_load_both_ways(backend):
    """A checkpoint of bnb's AdamW8bit (8-bit and 32-bit parameters, its nested
    ``__bnb_optimizer_quant_state__``, code books and int steps) loads into the spec's class, which
    then steps on bit for bit with bnb and saves bnb's layout again; the spec's checkpoint loads
    into bnb's class, which steps on bit for bit with it."""
    setting = {"min_8bit_size": 64}
    theirs_model = make_model("mlp", torch.float32)
    theirs = bnb.optim.AdamW8bit(theirs_model.parameters(), **setting)
    _continue([(theirs_model, theirs)], 5)
    bnb_sd = _saved(theirs)
    kinds = {st["__bnb_optimizer_quant_state__"]["state1"].dtype for st in bnb_sd["state"].values()}
    assert kinds == {torch.uint8, torch.float32}, "both of bnb's paths must be in the checkpoint"

    ours_model = make_model("mlp", torch.float32)
    ours_model.load_state_dict(theirs_model.state_dict())
    ours = _ours("adamw8bit_bnb")(ours_model.parameters(), backend=backend, **setting)
    ours.load_state_dict(bnb_sd)
    mine = ours.state_dict()
    _same_tree(bnb_sd["state"], mine["state"])  # bnb's layout, bnb's values
    for g_theirs, g_ours in zip(bnb_sd["param_groups"], mine["param_groups"]):
        assert all(g_ours[k] == v for k, v in g_theirs.items()), (g_theirs, g_ours)
    _continue([(theirs_model, theirs), (ours_model, ours)], 5)
    _assert_same(list(theirs_model.parameters()), list(ours_model.parameters()))
    _same_tree(theirs.state_dict()["state"], ours.state_dict()["state"])

    # ours into bitsandbytes
    back_model = make_model("mlp", torch.float32)
    back_model.load_state_dict(ours_model.state_dict())
    back = bnb.optim.AdamW8bit(back_model.parameters(), **setting)
    back.load_state_dict(_saved(ours))
    _continue([(back_model, back), (ours_model, ours)], 5)
    _assert_same(list(back_model.parameters()), list(ours_model.parameters()))
    _same_tree(back.state_dict()["state"], ours.state_dict()["state"])


def test_bitsandbytes_state_dict_with_another_code_book_is_refused():
    model = make_model("mlp", torch.float32)
    theirs = bnb.optim.AdamW8bit(model.parameters(), min_8bit_size=64)
    _continue([(model, theirs)], 1)
    sd = theirs.state_dict()
    coded = next(i for i, st in sd["state"].items() if "qmap1" in st["__bnb_optimizer_quant_state__"])
    sd["state"][coded]["__bnb_optimizer_quant_state__"]["qmap1"] = torch.linspace(-1, 1, 256)
    ours = _ours("adamw8bit_bnb")(make_model("mlp", torch.float32).parameters(), min_8bit_size=64, backend="torch")
    with pytest.raises(ValueError, match=rf"parameter {coded} .*'qmap1' is not the code book"):
        ours.load_state_dict(sd)


@pytest.mark.extended  # the interpreter: ~30 s
def test_bitsandbytes_state_dict_steps_on_the_triton_backend():
    """A bnb checkpoint in the triton kernels: saved back unchanged before a step, then three steps
    within float32 rounding of bnb (fused against unfused multiply-adds: tests/test_quant_triton.py),
    the codes within one of bnb's."""
    pytest.importorskip("triton")
    setting = {"min_8bit_size": 64}
    theirs_model = make_model("mlp", torch.float32)
    theirs = bnb.optim.AdamW8bit(theirs_model.parameters(), **setting)
    _continue([(theirs_model, theirs)], 3)
    ours_model = make_model("mlp", torch.float32)
    ours_model.load_state_dict(theirs_model.state_dict())
    ours = _ours("adamw8bit_bnb")(ours_model.parameters(), backend="triton", **setting)
    ours.load_state_dict(_saved(theirs))
    _same_tree(theirs.state_dict()["state"], ours.state_dict()["state"])
    _continue([(theirs_model, theirs), (ours_model, ours)], 3)
    for a, b in zip(theirs_model.parameters(), ours_model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for s_ref, s in zip(theirs.state_dict()["state"].values(), ours.state_dict()["state"].values()):
        q_ref, q = s_ref["__bnb_optimizer_quant_state__"], s["__bnb_optimizer_quant_state__"]
        assert q.keys() == q_ref.keys()
        for k, v in q_ref.items():
            if v.dtype == torch.uint8:
                assert (q[k].int() - v.int()).abs().max() <= 1, k
            else:
                torch.testing.assert_close(q[k], v, rtol=1e-5, atol=1e-7)
