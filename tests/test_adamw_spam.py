"""AdamWSPAM (issue 16 item 2, math/torch-adams-adamw-family.md §3.2) and window statistics.

AdamWSPAM's published code is no package: it is ``torch.optim.AdamW(amsgrad=True)`` plus helper
functions that AdamWPrune's training loops call (github.com/mcgrof/AdamWPrune lib/optimizers.py).
The oracle here, :class:`_AdamWPruneLoop`, is an eager reference written in this test from
math/ §3.2: torch.optim.AdamW for the step, the SPAM processing in plain torch and Python floats
(a ``collections.deque(maxlen=100)`` of norms, numpy's population mean and std), in the published
order. It reproduces both the published quirks and their fixes by the same flags the class has.

Bit for bit against it (torch and reference backends, both test models, float32, 100 steps under
``-m extended``, fewer in the default run), with settings where spikes are detected, the
spike-aware clip acts, periodic resets fire and the warm-up scales the lr (the test asserts each
happened in the reference). The triton backend (interpreter) against the reference backend on one
small sample. The window statistics (``reductions: {over: mean|std|count|..., window: N}``) are
checked against numpy on a history written by hand.
"""

from __future__ import annotations

import collections
import io
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from generated import AdamWSPAM
from optgen.authoring.load import build_class
from optgen.errors import SpecError
from optgen.runtime.param_groups import param_groups_for_weight_decay
from tests.models import make_model
from tests.published import ROOT

EXT = pytest.mark.extended


class _AdamWPruneLoop:
    """AdamWPrune's AdamWSPAM iteration (math §3.2 steps 3-6), around torch.optim.AdamW(amsgrad).

    ``count_steps_twice``, ``resets_keep_max`` and ``compound_warmup_lr`` select the published
    behaviour (True) or its fix. Published, the warm-up writes ``group['lr'] = base_lr * scale``
    with ``base_lr`` never set, so the scale compounds; fixed, the scaled lr is used for the step
    and the group's lr restored (what the gpt2 trainer gets, which re-sets the lr every iteration).
    """

    def __init__(self, groups, *, lr, theta=50.0, interval=0, warmup_steps=0, enable_clip=False,
                 spike_threshold=2.0, max_grad_norm=1.0, count_steps_twice=False, resets_keep_max=False,
                 compound_warmup_lr=False, **kw):
        self.opt = torch.optim.AdamW(groups, lr=lr, amsgrad=True, **kw)
        self.params = [p for g in self.opt.param_groups for p in g["params"]]
        self.norms: collections.deque = collections.deque(maxlen=100)
        self.global_step = 0
        self.warmup_until = 0
        self.theta, self.interval, self.warmup_steps = theta, interval, warmup_steps
        self.enable_clip, self.spike_threshold, self.max_grad_norm = enable_clip, spike_threshold, max_grad_norm
        self.twice, self.keep_max, self.compound = count_steps_twice, resets_keep_max, compound_warmup_lr
        self.events = collections.Counter()
        self.param_groups = self.opt.param_groups

    def zero_grad(self):
        self.opt.zero_grad()

    def _moments(self):
        keys = ("exp_avg", "exp_avg_sq") if self.keep_max else ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
        return [(self.opt.state[p], k) for p in self.params if self.opt.state.get(p) for k in keys]

    def step(self):
        # 3a. spike-aware clipping against the previous exp_avg_sq (never before a parameter's first step)
        if self.enable_clip:
            for p in self.params:
                v = self.opt.state.get(p, {}).get("exp_avg_sq")
                if p.grad is None or v is None:
                    continue
                thr = (self.theta * (v + 1e-12)).sqrt()
                over = p.grad.abs() > thr
                self.events["clipped"] += int(over.sum())
                p.grad[over] = p.grad[over].sign() * thr[over]
        # 3b-d. the total norm (Python floats from per-parameter .item()), its history, the z-score
        total = sum(p.grad.norm(2).item() ** 2 for p in self.params if p.grad is not None) ** 0.5
        if math.isfinite(total):
            self.norms.append(total)
        self.global_step += 1
        if len(self.norms) >= 10:
            hist = np.array(list(self.norms)[:-1])
            hist = hist[np.isfinite(hist)]
            mean, std = np.mean(hist), np.std(hist)
            if len(hist) and std > 0 and np.isfinite(mean) and np.isfinite(std):
                z = (total - mean) / std
                if z > self.spike_threshold and np.isfinite(z):
                    self.events["spike"] += 1
                    for st, k in self._moments():
                        st[k].mul_(0.5 if k == "exp_avg" else 0.9)
        # 4. clip_grad_norm_
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        # 5. the periodic reset and its warm-up (the published second increment is the quirk)
        if self.twice:
            self.global_step += 1
        gs = self.global_step
        if self.interval > 0 and gs % self.interval == 0:
            self.events["reset"] += 1
            for st, k in self._moments():
                st[k].zero_()
            if self.warmup_steps > 0:
                self.warmup_until = gs + self.warmup_steps
        base = [g["lr"] for g in self.opt.param_groups]
        if self.warmup_until > gs:
            t = (self.warmup_steps - (self.warmup_until - gs)) / max(self.warmup_steps, 1)
            scale = max(1e-3, float(0.5 * (1 - math.cos(math.pi * t))))
            self.events["warmup"] += 1
            for g in self.opt.param_groups:
                g["lr"] = g["lr"] * scale
        # 6. the AdamW (amsgrad) step
        self.opt.step()
        if not self.compound:
            for g, lr in zip(self.opt.param_groups, base):
                g["lr"] = lr


SETTINGS = {  # spikes, clipping, resets and warm-ups all happen within 40 steps of both models
    "clip": dict(lr=0.01, weight_decay=0.1, enable_clip=True, theta=300.0, interval=12, warmup_steps=4),
    "quirks": dict(lr=0.01, enable_clip=True, theta=600.0, interval=10, warmup_steps=6, spike_threshold=0.3,
                   count_steps_twice=True, resets_keep_max=True, compound_warmup_lr=True, max_grad_norm=0.5),
    "defaults": dict(lr=0.01),
}

CASES = [("torch", "mlp", "clip", 30), ("reference", "transformer", "quirks", 25), ("torch", "transformer", "defaults", 12),
         *(pytest.param(b, m, s, 100, marks=EXT) for b in ("torch", "reference") for m in ("mlp", "transformer")
           for s in SETTINGS)]


def _train(model, opt, steps: int, sched=None) -> list[float]:
    """Full-batch steps; every 7th loss from step 11 on is scaled by 30: a gradient spike; ``sched``
    is stepped every 5 steps (an epoch)."""
    batch = type(model).batch(torch.float32)
    losses = []
    for k in range(steps):
        opt.zero_grad()
        loss = model.loss(batch)
        (loss * (30.0 if k >= 10 and k % 7 == 3 else 1.0)).backward()
        opt.step()
        if sched is not None and (k + 1) % 5 == 0:
            sched.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize(("backend", "model_name", "setting", "steps"), CASES)
def test_adamw_spam_matches_the_reference(backend, model_name, setting, steps):
    kw = SETTINGS[setting]
    runs = []
    for make in (lambda g: AdamWSPAM(g, backend=backend, **kw), lambda g: _AdamWPruneLoop(g, **kw)):
        model = make_model(model_name, torch.float32)
        opt = make(param_groups_for_weight_decay(model, 5e-4))
        # AdamWPrune's recursive CosineAnnealingLR per epoch: it reads back the lr a compounding warm-up wrote
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(getattr(opt, "opt", opt), T_max=20, eta_min=1e-6)
        losses = _train(model, opt, steps, sched)
        runs.append(([p.detach().clone() for p in model.parameters()], losses, opt))
    (ours, l1, opt), (want, l2, ref) = runs
    assert l1 == l2
    for a, b in zip(ours, want):
        assert torch.equal(a, b)
    if setting != "defaults":  # the settings exercise what they are for
        assert ref.events["spike"] and ref.events["clipped"] and ref.events["reset"] and ref.events["warmup"], ref.events
    assert opt.param_groups[0]["global_step"] == ref.global_step
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in ref.param_groups]  # compounded or not
    hist = opt.state["history.spike_norm"]
    n = min(int(hist["count"]), hist["values"].numel())
    got = hist["values"][hist["values"].numel() - n:].tolist()
    assert np.allclose(got, list(ref.norms)[-n:], rtol=1e-12, atol=0)  # float64 sums in another order


def test_adamw_spam_state_dict_round_trip():
    model = make_model("mlp", torch.float32)
    opt = AdamWSPAM(model.parameters(), **SETTINGS["clip"])
    _train(model, opt, 14)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf)
    assert "history.spike_norm" in sd["state"] and sd["param_groups"][0]["warmup_until"] > 0
    twin_model = make_model("mlp", torch.float32)
    twin_model.load_state_dict(model.state_dict())
    twin = AdamWSPAM(twin_model.parameters(), **SETTINGS["clip"])
    twin.load_state_dict(sd)
    _train(model, opt, 6)
    _train(twin_model, twin, 6)
    for a, b in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(a, b)


def test_adamw_spam_triton_matches_reference():
    pytest.importorskip("triton")
    kw = {**SETTINGS["clip"], "interval": 6, "warmup_steps": 2}
    out = []
    for backend in ("reference", "triton"):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s)) for s in [(6, 5), (7,), (3, 2, 2)]]
        opt = AdamWSPAM([{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0}], backend=backend, **kw)
        gen = torch.Generator().manual_seed(3)
        for k in range(14):
            for p in params:  # a spike every 5 steps
                p.grad = torch.randn(p.shape, generator=gen) * (8.0 if k % 5 == 4 else 1.0)
            opt.step()
        out.append([p.detach().clone() for p in params])
    for a, b in zip(*out):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


# -- window statistics: the construct itself -------------------------------------------------------

WINDOW_SPEC = """\
name: window_stats
class: WindowStats
doc: "every window statistic of the total gradient norm, written into the parameter (a test of the construct)"
hyperparameters:
  size: {default: 4, type: int}
reductions:
  gnorm: {of: grad, over: norm}
  w_mean: {of: gnorm, over: mean, window: size}
  w_std: {of: gnorm, over: std, window: size}
  w_count: {of: gnorm, over: count, window: size}
  w_sum: {of: gnorm, over: sum, window: size - 1}
  w_max: {of: gnorm, over: max, window: size}
  w_min: {of: gnorm, over: min, window: size}
update:
  - param = param * 0.0 + where(w_count > 0, w_mean + w_std + w_sum + w_max + w_min, 0.0) + w_count
"""


def _spec(tmp_path: Path, text: str, name: str) -> Path:
    folder = tmp_path / "specs"
    if not folder.exists():
        shutil.copytree(ROOT / "specs" / "blocks", folder / "blocks")
    path = folder / f"{name}.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_window_statistics_are_numpys(tmp_path, backend):
    _, cls = build_class(_spec(tmp_path, WINDOW_SPEC, "window_stats"))
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = cls([p], backend=backend)
    scales = [1.0, 2.0, math.inf, 0.5, 3.0, math.nan, 4.0, 0.25, 5.0]
    kept: list[float] = []
    for s in scales:
        g = torch.tensor([s, 0.0, 0.0], dtype=torch.float64)
        p.grad = g
        opt.step()
        prev = np.array(kept[-4:])
        want = len(prev)
        if len(prev):  # numpy on the earlier finite norms
            want += prev.mean() + prev.std() + np.array(kept[-3:]).sum() + prev.max() + prev.min()
        assert p.detach()[0].item() == pytest.approx(want, rel=1e-15, abs=0), (s, kept)
        if math.isfinite(s):
            kept.append(abs(s))


@pytest.mark.parametrize(("text", "message"), [
    ("  bad: {of: grad, over: mean}\n", "is a window statistic"),
    ("  bad: {of: grad, over: mean, window: 3}\n", "is that reduction's name"),
    ("  bad: {of: w_mean, over: mean, window: 3}\n", "is that reduction's name"),
    ("  bad: {of: gnorm, over: kthvalue, window: 3}\n", "a window has no 'kthvalue'"),
    ("  bad: {of: gnorm, over: mean, window: 'ndim'}\n", "computed once per step"),
])
def test_window_errors_name_the_field(tmp_path, text, message):
    spec = WINDOW_SPEC.replace("update:\n", text + "update:\n")
    with pytest.raises(SpecError) as exc:
        build_class(_spec(tmp_path, spec, "window_stats"))
    assert message in str(exc.value) and "reductions.bad" in str(exc.value)
