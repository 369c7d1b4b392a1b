"""Feature ``adamw_prune``: AdamWPrune's state-based pruning (issue 16 item 2, math §3.6).

AdamWPrune's pruning is no package: helper functions (``apply_adamprune_masking`` before the step,
``update_adamprune_masks`` after it) around a torch.optim Adam-family optimizer in its training
loops (github.com/mcgrof/AdamWPrune, seed-era lib/optimizers.py). The oracle here,
:class:`_PruneLoop`, is an eager reference written in this test from math/ §3.6 around
``torch.optim.AdamW`` / ``torch.optim.Adam``: bool masks of every ``nn.Linear`` weight, gradients
multiplied by them, and after each step the bitter0 importance, one global ``torch.kthvalue``
threshold at the linear sparsity ramp, the weights and moments multiplied by the masks.

Bit for bit (weights, losses, masks) on both test models, torch and reference backends, float32,
100 steps under ``-m extended`` (fewer in the default run), for the generated ``AdamWPrune``
(AdamW base) and for the feature switched on in an Adam spec with amsgrad (a second base); the
triton backend (interpreter) against the reference backend on one small sample.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from generated import AdamWPrune
from optgen.authoring.load import build_class
from optgen.runtime.param_groups import mark_prunable
from tests.models import make_model
from tests.published import ROOT

EXT = pytest.mark.extended


class _PruneLoop:
    """AdamWPrune's loop (math §3.6) around ``base``: masks on every nn.Linear / nn.Conv2d weight."""

    def __init__(self, model, base, *, target=0.7, warmup=100, frequency=50, ramp_end=3000):
        self.opt = base
        self.masks = {m.weight: torch.ones_like(m.weight, dtype=torch.bool) for m in model.modules()
                      if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
        self.target, self.warmup, self.frequency, self.ramp_end = target, warmup, frequency, ramp_end
        self.step_count = 0
        self.pruned = 0
        self.param_groups = base.param_groups

    def zero_grad(self):
        self.opt.zero_grad()

    def step(self):
        for w, mask in self.masks.items():  # apply_adamprune_masking
            if w.grad is not None:
                w.grad.mul_(mask.to(w.grad.dtype))
        self.opt.step()
        self.step_count += 1  # update_adamprune_masks
        sc = self.step_count
        if sc > self.warmup and sc % self.frequency == 0:
            progress = min(1.0, (sc - self.warmup) / (self.ramp_end - self.warmup))
            sparsity = self.target * progress
            scores = {}
            for w in self.masks:
                st = self.opt.state.get(w, {})
                if "exp_avg" in st and "exp_avg_sq" in st:
                    scores[w] = torch.abs(w.data * st["exp_avg"]) * (torch.abs(w.data) / (torch.sqrt(st["exp_avg_sq"]) + 1e-8))
                else:
                    scores[w] = torch.abs(w.data)
            flat = torch.cat([s.flatten() for s in scores.values()])
            k = int(sparsity * flat.numel())
            if k > 0:
                thr = torch.kthvalue(flat, k).values
                self.pruned += 1
                for w in self.masks:
                    self.masks[w] = scores[w] > thr
                    w.data.mul_(self.masks[w].to(w.dtype))
        elif sc > self.warmup:
            for w, mask in self.masks.items():
                w.data.mul_(mask.to(w.dtype))
        for w, mask in self.masks.items():
            st = self.opt.state.get(w, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:
                    st[key].mul_(mask.to(st[key].dtype))


ADAM_PRUNE = """\
name: adam_prune
class: AdamPrune
extends: adam
doc: "torch.optim.Adam (amsgrad available) with AdamWPrune's pruning switched on (a second base of the feature)"
features: [maximize, amsgrad, adamw_prune]
hyperparameters:
  adamwprune_enable_pruning: {default: true}
"""


@pytest.fixture(scope="module")
def adam_prune(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prune") / "specs"
    shutil.copytree(ROOT / "specs", folder)
    (folder / "adam_prune.yaml").write_text(ADAM_PRUNE)
    return build_class(folder / "adam_prune.yaml")[1]


SCHEDULE = {"adamwprune_target_sparsity": 0.6, "adamwprune_warmup_steps": 6, "adamwprune_frequency": 4,
            "adamwprune_ramp_end_step": 40}
CASES = [("adamw", "torch", "mlp", 30), ("adam", "reference", "transformer", 18),
         *(pytest.param(b, be, m, 100, marks=EXT) for b in ("adamw", "adam") for be in ("torch", "reference")
           for m in ("mlp", "transformer"))]


def _pair(base: str, backend: str, model_name: str, adam_prune):
    kw = {"lr": 0.01, "weight_decay": 0.05}
    m1, m2 = make_model(model_name, torch.float32), make_model(model_name, torch.float32)
    mark_prunable(m1)
    if base == "adamw":
        ours = AdamWPrune(m1.parameters(), backend=backend, **kw, **SCHEDULE)
        ref_base = torch.optim.AdamW(m2.parameters(), **kw)
    else:
        ours = adam_prune(m1.parameters(), backend=backend, amsgrad=True, **kw, **SCHEDULE)
        ref_base = torch.optim.Adam(m2.parameters(), amsgrad=True, **kw)
    ref = _PruneLoop(m2, ref_base, target=0.6, warmup=6, frequency=4, ramp_end=40)
    return (m1, ours), (m2, ref)


def _train(model, opt, steps):
    batch = type(model).batch(torch.float32)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model.loss(batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize(("base", "backend", "model_name", "steps"), CASES)
def test_adamw_prune_matches_the_reference(base, backend, model_name, steps, adam_prune):
    (m1, ours), (m2, ref) = _pair(base, backend, model_name, adam_prune)
    assert _train(m1, ours, steps) == _train(m2, ref, steps)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    assert ref.pruned >= 2
    for w, mask in ref.masks.items():
        p = dict(zip(map(id, m2.parameters()), m1.parameters()))[id(w)]
        assert torch.equal(ours.state[p]["adamprune_mask"], mask)
    sparsity = sum(int((~m).sum()) for m in ref.masks.values()) / sum(m.numel() for m in ref.masks.values())
    assert sparsity > 0.1


def test_masks_are_in_the_state_dict_and_load_back():
    model = make_model("mlp", torch.float32)
    mark_prunable(model)
    opt = AdamWPrune(model.parameters(), lr=0.01, **SCHEDULE)
    _train(model, opt, 12)
    sd = opt.state_dict()
    masks = [st["adamprune_mask"] for st in sd["state"].values() if "adamprune_mask" in st]
    assert len(masks) == 3 and all(m.dtype == torch.bool for m in masks) and any(not m.all() for m in masks)
    twin = AdamWPrune(model.parameters(), lr=0.01, **SCHEDULE)
    twin.load_state_dict(sd)
    assert twin.param_groups[0]["adamprune_step_count"] == 12
    assert all(torch.equal(twin.state[p]["adamprune_mask"], opt.state[p]["adamprune_mask"])
               for p in model.parameters() if "adamprune_mask" in opt.state[p])


def test_adamw_prune_triton_matches_reference():
    pytest.importorskip("triton")
    out = []
    for backend in ("reference", "triton"):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s)) for s in [(6, 5), (7,), (4, 3)]]
        params[0].prunable = params[2].prunable = True
        opt = AdamWPrune(params, lr=0.01, backend=backend, adamwprune_warmup_steps=2, adamwprune_frequency=3,
                         adamwprune_ramp_end_step=8)
        gen = torch.Generator().manual_seed(3)
        for _ in range(10):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        out.append([p.detach().clone() for p in params] + [opt.state[params[0]]["adamprune_mask"]])
    for a, b in zip(*out):
        assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6)
    assert not out[0][-1].all()


def test_the_feature_refuses_a_base_without_moments(tmp_path):
    folder = tmp_path / "specs"
    shutil.copytree(ROOT / "specs", folder)
    (folder / "sgd_prune.yaml").write_text("name: sgd_prune\nclass: SGDPrune\nextends: sgd\n"
                                           "features: [adamw_prune]\n")
    with pytest.raises(Exception, match="adamw_prune needs the per-element moment state 'exp_avg'"):
        build_class(folder / "sgd_prune.yaml")
