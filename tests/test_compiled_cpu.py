"""backend="compiled" (optgen.runtime.compiled): each bucket's step compiled by inductor.

Against the eager torch backend over 20 steps on the TinyTransformer's parameters, float32, a
LambdaLR moving lr every step and the same synthetic gradients on both sides (drawn per step,
not from a loss, so a difference is not fed back into the gradients). The compiled step is not
bit-identical: inductor fuses each tensor's ops into one loop, keeps intermediates in registers,
and gcc may contract a * b + c into an FMA (one rounding instead of two) and evaluates lerp and
addcdiv with its own operation order. Tolerances (max ulps where |x| >= 1e-3, measured 2026-12-01
with benchmarks/compiled_cpu_accuracy.py, then a margin of about 2x) are per spec below.
Compiles take 10-20 s each cold, so only a representative handful of specs is tested here.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch._dynamo.utils as du

import generated
from optgen.runtime import compiled, compiled_ops
from tests.models import make_model, max_diffs

pytestmark = pytest.mark.skipif(not compiled.cxx_available(), reason="inductor's CPU backend needs a C++ compiler")

# spec: (constructor arguments, max ulps, max abs diff, steps that take new branch paths); the
# ulps measured are in the comments. SGD's step 1 creates the momentum buffer (its own branch
# path, hence its own graph); step 2 takes the steady path: no graph is added after that.
CASES = {
    "AdamW": ({}, 8, 1e-6, 1),  # measured 3: FMA contraction of the moment updates, lerp's order
    "SGD": ({"lr": 0.01, "momentum": 0.9}, 4, 1e-6, 2),  # measured 1
    "Adams": ({}, 16, 1e-6, 1),  # measured 7: the same, plus the power iteration's reductions
    "AdamW_adv": ({}, 8, 1e-6, 1),
    "Lion_adv": ({}, 4, 1e-6, 1),  # sign updates: lerp rounding can only move a sign at zero
    "Adopt_adv": ({}, 4, 1e-6, 2),  # measured 1; step 1 only sets the second moment (its own path)
    # measured 3: Newton-Schulz runs as an opaque custom op (the eager bf16 products, bit for bit),
    # the element-wise parts around it fuse
    "Muon_adv": ({}, 8, 1e-6, 1),
}


def _run(cls: type, backend: str, kwargs: dict, steps: int = 20) -> tuple[list[torch.Tensor], list[int], list[str]]:
    model = make_model("transformer", torch.float32)
    params = list(model.parameters())
    opt = cls(params, backend=backend, **kwargs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.1 * s))
    gen = torch.Generator().manual_seed(1)
    graphs = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen) * 1e-2
            opt.step()
            sched.step()
            graphs.append(du.counters["stats"]["unique_graphs"])
    notes = [str(w.message) for w in caught if "backend='compiled'" in str(w.message)]
    return [p.detach().clone() for p in params], graphs, notes


def _max_ulps(a: list[torch.Tensor], b: list[torch.Tensor], floor: float = 1e-3) -> int:
    worst = 0
    for x, y in zip(a, b):
        m = (x.abs() >= floor) & (y.abs() >= floor) & ((x > 0) == (y > 0))
        if m.any():
            worst = max(worst, int((x[m].view(torch.int32).long() - y[m].view(torch.int32).long()).abs().max()))
    return worst


@pytest.mark.parametrize("name", list(CASES))
def test_compiled_matches_eager_and_never_recompiles(name: str) -> None:
    kwargs, ulps, abs_tol, warm = CASES[name]
    cls = getattr(generated, name)
    eager, _, _ = _run(cls, "torch", kwargs)
    before = du.counters["stats"]["unique_graphs"]
    comp, graphs, notes = _run(cls, "compiled", kwargs)
    assert notes == [], notes  # it really compiled: no bucket fell back to eager
    assert graphs[0] > before  # step 1 compiled at least one graph (fresh bucket structures)
    assert graphs[-1] == graphs[warm - 1], f"recompiled as lr moved: {graphs}"
    assert _max_ulps(eager, comp) <= ulps
    assert max_diffs(eager, comp)[0] <= abs_tol
    assert any(not torch.equal(p, q) for p, q in zip(comp, _run(cls, "compiled", kwargs, steps=1)[0]))


def test_compile_failure_warns_once_and_steps_eagerly(monkeypatch: pytest.MonkeyPatch) -> None:
    def untraceable(a, b, w):  # a host read of a tensor: a graph break, refused under fullgraph
        return compiled_ops._fe.lerp_(a, b, [float(x) for x in w] if isinstance(w, list) else float(w))

    monkeypatch.setattr(compiled, "_CACHE", {})
    monkeypatch.setattr(compiled_ops, "lerp_", untraceable)
    eager, _, _ = _run(generated.AdamW, "torch", {}, steps=3)
    comp, _, notes = _run(generated.AdamW, "compiled", {}, steps=3)
    assert len(notes) == 1 and "stepped by the eager torch backend" in notes[0]
    assert all(torch.equal(p, q) for p, q in zip(eager, comp))  # the fallback is the eager step, exactly


def test_compiled_backend_survives_a_copy() -> None:
    import copy

    model = make_model("mlp", torch.float32)
    opt = generated.AdamW(model.parameters(), backend="compiled")
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    assert copy.deepcopy(opt).backend == "compiled"
    with pytest.raises(ValueError, match="backend must be one of"):
        generated.AdamW(model.parameters(), backend="inductor")


def test_auto_takes_the_compiled_backend_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model("mlp", torch.float32)
    monkeypatch.setenv("OPTGEN_AUTO_COMPILE", "1")
    assert generated.AdamW(model.parameters()).backend == "compiled"
    assert generated.AdamW(model.parameters(), backend="torch").backend == "torch"  # eager stays available
    monkeypatch.setenv("OPTGEN_AUTO_COMPILE", "0")  # the suite's setting
    assert generated.AdamW(model.parameters()).backend == "torch"


def test_auto_without_a_compiler_warns_once_and_steps_eagerly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPTGEN_AUTO_COMPILE", "1")
    monkeypatch.setattr(compiled, "cxx_available", lambda: False)
    monkeypatch.setattr(compiled, "_warned_no_cxx", False)
    model = make_model("mlp", torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opts = [generated.AdamW(model.parameters()) for _ in range(2)]
    notes = [str(w.message) for w in caught if "no C++ compiler" in str(w.message)]
    assert len(notes) == 1 and "backend='torch'" in notes[0]
    assert [o.backend for o in opts] == ["torch", "torch"]
