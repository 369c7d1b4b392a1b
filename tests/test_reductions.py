"""Optimizer-wide values consumed in the same step: the ``reductions:`` construct.

A reduction is computed over every selected parameter of every group as the first phase of
``step()`` and read by every parameter's update. The oracle for ``over: norm`` is torch itself:
a spec that clips its gradients by ``minimum(max_norm / (total_norm + 1e-6), 1.0)`` and then
steps AdamW equals ``torch.nn.utils.clip_grad_norm_`` + ``torch.optim.AdamW`` bit for bit
(torch and reference backends, both test models, norm 2 and inf: 20 steps under -m extended,
5-10 in the default run). The other
reductions are checked against torch ops on the concatenated values written in the test
(``torch.kthvalue``, ``torch.quantile``, ``sum``/``amax``/``amin``), and the triton backend
(interpreter on CPU) against the reference on fixed gradients (the suite's triton tolerance).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from optgen.authoring.load import build_class
from optgen.errors import SpecError
from optgen.render import compile_spec
from tests.models import make_model, train
from tests.published import ROOT

CLIP_SPEC = """\
name: adamw_gclip
class: AdamWGClip
doc: "AdamW whose gradients are first clipped to a total norm, as clip_grad_norm_ + torch.optim.AdamW"
hyperparameters:
  lr: {default: 1.0e-3}
  betas: {default: [0.9, 0.999], as: [beta1, beta2]}
  eps: {default: 1.0e-8}
  weight_decay: {default: 0.01}
  max_norm: {default: 1.0}
  norm_type: {default: 2.0}
reductions:
  total_norm: {of: grad, over: norm, order: norm_type}
state:
  exp_avg: {init: zeros}
  exp_avg_sq: {init: zeros}
update:
  - grad = grad * minimum(max_norm / (total_norm + 1.0e-6), 1.0)
  - param = param * (1 - lr * weight_decay)
  - exp_avg = lerp(exp_avg, grad, 1 - beta1)
  - exp_avg_sq = exp_avg_sq * beta2 + (1 - beta2) * grad * grad
  - denom = sqrt(exp_avg_sq) / sqrt(1 - beta2 ** step) + eps
  - param = param + (-lr / (1 - beta1 ** step)) * exp_avg / denom
"""

#: every other reduction, each applied as a per-tensor value the update adds to the parameter
STATS_SPEC = """\
name: reduction_stats
class: ReductionStats
doc: "each reduction over all parameters, written into the parameters (a test of the construct)"
hyperparameters:
  frac: {default: 0.3}
reductions:
  thr: {of: "abs(param) * abs(grad)", over: kthvalue, k: "floor(frac * count)", select: "ndim == 2"}
  med: {of: "grad", over: quantile, q: 0.5}
  total: {of: "grad * grad", over: sum}
  biggest: {of: "abs(grad)", over: max, select: "ndim == 1"}
  smallest: {of: "sum(param)", over: min}
  scaled: {of: "grad / total", over: norm, order: 1}
  never: {of: grad, over: sum, if: "frac > 1"}
update:
  - mask = abs(param) * abs(grad) > thr
  - param = where(mask, param, 0.0) + med + total + biggest + smallest + scaled
"""


def _spec(tmp_path: Path, text: str, name: str) -> Path:
    folder = tmp_path / "specs"
    if not folder.exists():
        shutil.copytree(ROOT / "specs" / "blocks", folder / "blocks")
    path = folder / f"{name}.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def clip_cls(tmp_path_factory):
    return build_class(_spec(tmp_path_factory.mktemp("red"), CLIP_SPEC, "adamw_gclip"))[1]


class _TorchClipAdamW:
    """The oracle: torch.nn.utils.clip_grad_norm_ over every parameter, then torch.optim.AdamW."""

    def __init__(self, params, max_norm: float, norm_type: float, **kw):
        self.params = list(params)
        self.opt = torch.optim.AdamW(self.params, **kw)
        self.max_norm, self.norm_type = max_norm, norm_type

    def zero_grad(self):
        self.opt.zero_grad()

    def step(self):
        torch.nn.utils.clip_grad_norm_(self.params, self.max_norm, self.norm_type)
        self.opt.step()


_EXT = pytest.mark.extended
CLIP_CASES = [  # (backend, model, norm type, steps): two in the default run, the rest under -m extended
    ("torch", "mlp", 2.0, 10), ("reference", "transformer", math.inf, 5),
    *(pytest.param(*c, 20, marks=_EXT) for c in [("torch", "mlp", math.inf), ("torch", "transformer", 2.0),
                                              ("torch", "transformer", math.inf), ("reference", "mlp", 2.0),
                                              ("reference", "mlp", math.inf), ("reference", "transformer", 2.0)]),
]


@pytest.mark.parametrize(("backend", "model_name", "norm_type", "steps"), CLIP_CASES)
def test_total_norm_clipping_is_torchs(clip_cls, backend, model_name, norm_type, steps):
    kw = {"lr": 1e-2, "weight_decay": 0.1}
    torch.manual_seed(0)
    m1 = make_model(model_name, torch.float32)
    torch.manual_seed(0)
    m2 = make_model(model_name, torch.float32)
    got, _ = train(m1, lambda ps: clip_cls(ps, max_norm=0.05, norm_type=norm_type, backend=backend, **kw),
                   steps, torch.float32)
    want, _ = train(m2, lambda ps: _TorchClipAdamW(ps, 0.05, norm_type, **kw), steps, torch.float32)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


SHAPES = [(7, 5), (33,), (4, 3, 6), (130, 2)]


def _grads(steps: int):
    gen = torch.Generator().manual_seed(1)
    params = [torch.randn(s, generator=gen) for s in SHAPES]
    return params, [[torch.randn(s, generator=gen) * 0.1 for s in SHAPES] for _ in range(steps)]


def _run(cls, backend: str, steps: int, **kw):
    init, grads = _grads(steps)
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = cls([{"params": params[:2]}, {"params": params[2:]}], backend=backend, **kw)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in params], opt


def test_triton_reads_the_reductions(clip_cls):
    pytest.importorskip("triton")
    want, _ = _run(clip_cls, "reference", 5, max_norm=0.3, lr=1e-2)
    got, opt = _run(clip_cls, "triton", 5, max_norm=0.3, lr=1e-2)
    for g, e in zip(got, want):
        assert torch.allclose(g, e, rtol=2e-6, atol=2e-6)
    # the clipping coefficient is computed inside the passes from the loaded total: no vector stage
    path = next(iter(opt._triton.plan.paths.values()))
    assert [kind for _, kind in path.launches] == ["prologue", "flat"]


def _stats_by_hand(params: list[torch.Tensor], grads: list[torch.Tensor], frac: float) -> list[torch.Tensor]:
    """One step of STATS_SPEC written with torch ops on the concatenated values."""
    sel = [(p.abs() * g.abs()).reshape(-1) for p, g in zip(params, grads) if p.dim() == 2]
    flat = torch.cat(sel)
    k = math.floor(frac * flat.numel())
    thr = torch.kthvalue(flat, k).values
    med = torch.quantile(torch.cat([g.reshape(-1) for g in grads]), 0.5)
    total = torch.stack([(g * g).sum() for g in grads]).sum()
    biggest = torch.stack([g.abs().amax() for p, g in zip(params, grads) if p.dim() == 1]).amax()
    smallest = torch.stack([p.sum() for p in params]).amin()
    scaled = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g / total, 1) for g in grads]), 1)
    return [torch.where(p.abs() * g.abs() > thr, p, 0.0) + med + total + biggest + smallest + scaled
            for p, g in zip(params, grads)]


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_order_statistics_and_sums(tmp_path, backend):
    _, cls = build_class(_spec(tmp_path, STATS_SPEC, "reduction_stats"))
    init, grads = _grads(1)
    got, opt = _run(cls, backend, 1, frac=0.3)
    want = _stats_by_hand(init, grads[0], 0.3)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert set(opt._reduced) == {"thr", "med", "total", "biggest", "smallest", "scaled"}  # 'never': if false


def test_kthvalue_bounds(tmp_path):
    """k < 1 is -inf (nothing is at or below it) and k > count +inf."""
    text = STATS_SPEC.replace("floor(frac * count)", "frac * count - 1").replace("name: reduction_stats",
                                                                               "name: reduction_bounds")
    _, cls = build_class(_spec(tmp_path, text, "reduction_bounds"))
    _, opt = _run(cls, "reference", 1, frac=0.0)
    assert opt._reduced["thr"].item() == -math.inf
    _, opt = _run(cls, "reference", 1, frac=2.0)
    assert opt._reduced["thr"].item() == math.inf


@pytest.mark.parametrize(("field", "text", "message"), [
    ("of", "{of: 'grad > 0', over: sum}", "a mask"),
    ("k", "{of: grad, over: kthvalue}", "needs k:"),
    ("if", "{of: grad, over: sum, if: 'ndim == 2'}", "computed once per step"),
    ("select", "{of: grad, over: sum, select: 'grad > 0'}", "host condition"),
])
def test_errors_point_at_the_field(tmp_path, field, text, message):
    spec = CLIP_SPEC.replace("{of: grad, over: norm, order: norm_type}", text)
    path = _spec(tmp_path, spec, "adamw_gclip")
    with pytest.raises(SpecError, match=message) as exc:
        compile_spec(path)
    assert "reductions.total_norm" in str(exc.value)


def test_partial_steps_are_refused(clip_cls):
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    opt = clip_cls([p], backend="torch")
    with pytest.raises(RuntimeError, match="reduce over every parameter"):
        opt.step_parameter(p)
