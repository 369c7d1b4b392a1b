"""The AdamW family of seed 002 and SPAM (issue 16 item 2): AdamWAdv, pytorch-optimizer's SPAM.

* ``AdamWAdv`` (AdamWPrune's recipe, reference from /work/shared/math §3.1 written here): the
  class with its default clipping at 1.0 (and a tighter 0.05, so every step clips), the
  parameter groups of ``param_groups_for_weight_decay`` and torch's ``CosineAnnealingLR``
  stepped every 5 steps (an "epoch") equals ``torch.nn.utils.clip_grad_norm_`` over the
  optimizer's parameters + ``torch.optim.AdamW(amsgrad=True)`` on the same groups and schedule,
  bit for bit (torch and reference backends).
* ``SPAM`` against pytorch-optimizer 4.1.0 (the pinned test dependency) with random masks at
  density 0.5 (test_equivalence runs the density-1 settings): the global random stream seeded
  before each optimizer is built, so both draw the same masks (torch.randperm at construction,
  torch.rand_like at each redraw); bit for bit over 100 steps (-m extended; 20 in the default run)
  on both models; its state dict keeps pytorch-optimizer's 1-D moments of masked parameters and
  loads back; triton vs reference under the interpreter before the first redraw (the triton
  backend draws redraws from its own Philox stream).
"""

from __future__ import annotations

import math

import pytest
import torch

from generated import SPAM, AdamWAdv
from optgen.runtime.param_groups import param_groups_for_weight_decay
from tests.models import make_model

pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
EXT = pytest.mark.extended


def _train(model, opt, steps: int, dtype, every: int = 0, sched=None) -> list[float]:
    batch = type(model).batch(dtype)
    losses = []
    for k in range(steps):
        opt.zero_grad()
        loss = model.loss(batch)
        loss.backward()
        opt.step()
        if sched is not None and (k + 1) % every == 0:
            sched.step()
        losses.append(loss.item())
    return losses


class _ClipThenAdamW(torch.optim.AdamW):
    """AdamWPrune's loop: clip_grad_norm_(params, max_norm) before every AdamW step."""

    def __init__(self, groups, max_norm: float, **kw):
        super().__init__(groups, **kw)
        self.max_norm = max_norm

    def step(self, closure=None):
        torch.nn.utils.clip_grad_norm_([p for g in self.param_groups for p in g["params"]], self.max_norm)
        return super().step(closure)


ADV_CASES = [("torch", "transformer", 1.0, 10), ("reference", "mlp", 0.05, 20),
             *(pytest.param(*c, 100, marks=EXT) for c in [("torch", "mlp", 1.0), ("torch", "transformer", 0.05),
                                                           ("reference", "transformer", 1.0), ("torch", "mlp", 0.05)])]


@pytest.mark.parametrize(("backend", "model_name", "max_norm", "steps"), ADV_CASES)
def test_adamwadv_recipe(backend, model_name, max_norm, steps):
    dtype = torch.float32
    runs = []
    for make in (lambda g: AdamWAdv(g, lr=0.01, max_grad_norm=max_norm, backend=backend),
                 lambda g: _ClipThenAdamW(g, max_norm, lr=0.01, amsgrad=True)):
        model = make_model(model_name, dtype)
        opt = make(param_groups_for_weight_decay(model, 5e-4))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps // 5, eta_min=1e-6)
        losses = _train(model, opt, steps, dtype, every=5, sched=sched)
        runs.append(([p.detach().clone() for p in model.parameters()], losses, opt))
    (ours, l1, opt), (ref, l2, _) = runs
    assert l1 == l2
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["weight_decay"] == 0.0
    assert opt.state[next(iter(opt.state))]["max_exp_avg_sq"] is not None


def test_weight_decay_groups():
    model = make_model("transformer")
    decay, no_decay = param_groups_for_weight_decay(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(not names[id(p)].endswith("bias") and ".ln" not in "." + names[id(p)] for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} >= {"ln1.weight", "ln1.bias", "head.bias"}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


SPAM_SETTING = {"density": 0.5, "update_proj_gap": 12, "warmup_epoch": 4, "grad_accu_steps": 3, "threshold": 50,
                "weight_decay": 0.1, "lr": 0.01}
SPAM_CASES = [("torch", "transformer", torch.float32, 20), ("reference", "mlp", torch.float64, 20),
              *(pytest.param(*c, 100, marks=EXT) for c in [
                  ("torch", "mlp", torch.float64), ("torch", "transformer", torch.float64),
                  ("torch", "mlp", torch.float32), ("reference", "transformer", torch.float32),
                  ("reference", "transformer", torch.float64), ("reference", "mlp", torch.float32)])]


def _spam(cls, model_name: str, dtype, steps: int, **kw):
    model = make_model(model_name, dtype)
    torch.manual_seed(1234)  # the masks: torch.randperm at construction, torch.rand_like at redraws
    opt = cls(model.parameters(), **SPAM_SETTING, **kw)
    losses = _train(model, opt, steps, dtype)
    return [p.detach().clone() for p in model.parameters()], losses, opt


@pytest.mark.parametrize(("backend", "model_name", "dtype", "steps"), SPAM_CASES)
def test_spam_masks_match_pytorch_optimizer(backend, model_name, dtype, steps):
    ours, l1, opt = _spam(SPAM, model_name, dtype, steps, backend=backend)
    ref, l2, pub = _spam(pytorch_optimizer.SPAM, model_name, dtype, steps)
    assert l1 == l2
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)
    for p, q in zip(opt.param_groups[0]["params"], pub.param_groups[0]["params"]):
        if p.dim() == 2:
            assert torch.equal(opt.state[p]["mask"], pub.state[q]["mask"])
            assert 0 < int(opt.state[p]["mask"].sum()) < p.numel()


def test_spam_state_dict_keeps_the_published_layout():
    _, _, opt = _spam(SPAM, "mlp", torch.float32, 13)  # after a redraw (step 11) and a reset (step 12)
    _, _, pub = _spam(pytorch_optimizer.SPAM, "mlp", torch.float32, 13)
    mine, theirs = opt.state_dict()["state"], pub.state_dict()["state"]
    for i in range(len(opt.param_groups[0]["params"])):
        assert set(mine[i]) == set(theirs[i]) == ({"exp_avg", "exp_avg_sq", "mask"} if "mask" in theirs[i]
                                                  else {"exp_avg", "exp_avg_sq"})
        for key in theirs[i]:
            assert torch.equal(mine[i][key], theirs[i][key]), key
    again = SPAM(opt.param_groups[0]["params"], **SPAM_SETTING)
    again.load_state_dict(opt.state_dict())
    for p in opt.param_groups[0]["params"]:
        for key, value in opt.state[p].items():
            assert torch.equal(again.state[p][key], value)


def test_spam_triton_matches_reference_before_the_redraw():
    pytest.importorskip("triton")
    shapes = [(6, 5), (17,), (3, 40)]
    runs = []
    for backend in ("reference", "triton"):
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
        torch.manual_seed(7)
        opt = SPAM(params, backend=backend, **{**SPAM_SETTING, "update_proj_gap": 9})
        for _ in range(8):  # steps 1-8: clipping from step 3, the redraw would come after step 8
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        runs.append([p.detach().clone() for p in params])
    for e, g in zip(*runs):
        assert torch.allclose(g, e, rtol=2e-6, atol=2e-6)


class _OfficialSPAM(torch.optim.Optimizer):
    """The official SPAM, written here from /work/shared/math/torch-adams-adamw-family.md §3.3
    (galore_torch/SPAM.py is not a package): the reference SPAMOfficial is compared with. Masks
    are drawn as pytorch-optimizer draws them (torch.randperm at construction, torch.rand_like at
    redraws); the grad copy of a masked parameter, the in-place clipping of p.grad and the
    weight decay of a copy (a no-op) are the published code's, as §3.3 records them."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, correct_bias=True,
                 warmup_steps=150, threshold=5000, DeltaT=500, grad_accu_steps=20):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      correct_bias=correct_bias))
        self.warmup_steps, self.threshold, self.DeltaT, self.grad_accu_steps = warmup_steps, threshold, DeltaT, \
            grad_accu_steps
        self.total_step, self.current_step = 0, warmup_steps + 1
        for group in self.param_groups:
            for p in group["params"]:
                if "density" in group and p.dim() == 2:
                    self.state[p]["mask"] = _randperm_mask(p, group["density"])

    def _death_rate(self, c: int) -> float:
        if c >= self.warmup_steps:
            return 0.0
        return 0.0 + (0.99 - 0.0) * (1 + math.cos(math.pi * c / (self.warmup_steps + 1))) / 2

    @torch.no_grad()
    def step(self):
        scale = 1 - self._death_rate(self.current_step)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                state.setdefault("step", 0)
                mask = state.get("mask")
                g = p.grad[mask] if mask is not None else p.grad
                if "exp_avg" not in state or (self.total_step + 1) % self.DeltaT == 0:
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(g), torch.zeros_like(g)
                state["step"] += 1
                m, v = state["exp_avg"], state["exp_avg_sq"]
                k = self.total_step + 1
                if self.threshold != 0 and k >= self.grad_accu_steps and k % self.DeltaT >= self.grad_accu_steps:
                    spike = g ** 2 > self.threshold * v
                    g[spike] = g[spike].sign() * torch.sqrt(v[spike] * self.threshold)
                m.mul_(beta1).add_(g, alpha=1.0 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
                denom = v.sqrt().add_(group["eps"])
                step_size = group["lr"]
                if group["correct_bias"]:
                    step_size = step_size * math.sqrt(1.0 - beta2 ** state["step"]) / (1.0 - beta1 ** state["step"])
                norm_grad = m / denom
                if mask is not None:
                    full = torch.zeros_like(p)
                    full[mask] = norm_grad
                    p.add_(full * scale, alpha=-step_size)
                else:
                    p.add_(norm_grad, alpha=-step_size * scale)
                if group["weight_decay"] > 0.0:
                    target = p[mask] if mask is not None else p  # a copy for masked ones: no decay
                    target.add_(target, alpha=-group["lr"] * group["weight_decay"])
        self.total_step += 1
        self.current_step += 1
        if self.total_step != 0 and (self.total_step + 1) % self.DeltaT == 0:
            for group in self.param_groups:
                for p in group["params"]:
                    st = self.state[p]
                    if "mask" in st:
                        new = torch.rand_like(p) < group["density"]
                        both = new & st["mask"]
                        for key in ("exp_avg", "exp_avg_sq"):
                            fresh = torch.zeros_like(p[new])
                            fresh[both[new]] = st[key][both[st["mask"]]]
                            st[key] = fresh
                        st["mask"] = new
            self.current_step = 0


def _randperm_mask(p: torch.Tensor, density: float) -> torch.Tensor:
    n = p.numel()
    mask = torch.zeros(n, dtype=torch.bool, device=p.device)
    if int(density * n) > 0:
        mask[torch.randperm(n, device=p.device)[: int(density * n)]] = True
    return mask.view(p.shape)


OFFICIAL = {"DeltaT": 9, "warmup_steps": 4, "grad_accu_steps": 3, "threshold": 50, "weight_decay": 0.1, "lr": 0.01}
OFFICIAL_CASES = [("torch", "mlp", torch.float32, 20), ("reference", "mlp", torch.float64, 20),
                  *(pytest.param(*c, 100, marks=EXT) for c in [("torch", "transformer", torch.float32),
                      ("torch", "mlp", torch.float64), ("torch", "transformer", torch.float64),
                      ("reference", "transformer", torch.float32), ("torch", "mlp", torch.float32)])]


@pytest.mark.parametrize(("backend", "model_name", "dtype", "steps"), OFFICIAL_CASES)
def test_official_spam_matches_the_reference(backend, model_name, dtype, steps):
    from generated import SPAMOfficial

    runs = []
    for make in (lambda g: SPAMOfficial(g, backend=backend, **OFFICIAL), lambda g: _OfficialSPAM(g, **OFFICIAL)):
        model = make_model(model_name, dtype)
        matrices = [p for p in model.parameters() if p.dim() == 2]
        rest = [p for p in model.parameters() if p.dim() != 2]
        torch.manual_seed(99)
        opt = make([{"params": matrices, "density": 0.5}, {"params": rest}])
        losses = _train(model, opt, steps, dtype)
        runs.append(([p.detach().clone() for p in model.parameters()], losses))
    (ours, l1), (ref, l2) = runs
    assert l1 == l2
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)
