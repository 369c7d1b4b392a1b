"""The compiled backend against the eager torch backend, every spec in specs/: 20 steps on the
TinyTransformer's parameters (tests/models.py) in float32 under a LambdaLR that moves lr every
step, with the same synthetic gradients on both sides (drawn per step from a seeded generator,
not from the loss: a loss would feed a 1-ulp difference back into the gradients, and Adam's
m / sqrt(v) turns that into lr-sized jumps that say nothing about the step's rounding). Prints
the max abs / rel (floor 1) difference of the parameters, the max ulps where |x| >= 1e-3, the
graphs compiled in step 1 and after it (recompiles), and whether a bucket fell back to eager.

Run from the repository root: ``python benchmarks/compiled_cpu_accuracy.py [SPEC...]``.
"""

from __future__ import annotations

import importlib
import pathlib
import sys
import warnings

import torch
import torch._dynamo.utils as du

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from optgen.runtime import GeneratedOptimizer  # noqa: E402
from tests.models import make_model, max_diffs  # noqa: E402


def optimizer_class(spec: str) -> type:
    mod = importlib.import_module(f"generated.{spec}")
    return next(v for v in vars(mod).values()
                if isinstance(v, type) and issubclass(v, GeneratedOptimizer) and v.__module__ == mod.__name__)


def run(cls: type, backend: str, steps: int = 20, **kw) -> tuple[list[torch.Tensor], list[int], list[str]]:
    model = make_model("transformer", torch.float32)
    opt = cls(model.parameters(), backend=backend, **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.1 * s))
    params = list(model.parameters())
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
    return [p.detach().clone() for p in model.parameters()], graphs, notes


def max_ulps(a: list[torch.Tensor], b: list[torch.Tensor], floor: float = 1e-3) -> int:
    worst = 0
    for x, y in zip(a, b):
        m = (x.abs() >= floor) & (y.abs() >= floor) & ((x > 0) == (y > 0))
        if m.any():
            d = (x[m].view(torch.int32).long() - y[m].view(torch.int32).long()).abs().max().item()
            worst = max(worst, int(d))
    return worst


def measure(spec: str) -> dict:
    cls = optimizer_class(spec)
    eager, _, _ = run(cls, "torch")
    before = du.counters["stats"]["unique_graphs"]
    comp, graphs, notes = run(cls, "compiled")
    abs_d, rel_d = max_diffs(eager, comp)
    return {"spec": spec, "abs": abs_d, "rel": rel_d, "ulps": max_ulps(eager, comp),
            "graphs_step1": graphs[0] - before, "recompiles": graphs[-1] - graphs[0], "fallback": notes}


def main() -> None:
    specs = sys.argv[1:] or sorted(p.stem for p in pathlib.Path("specs").glob("*.yaml"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; compiled vs eager torch backend, "
          "TinyTransformer fp32, 20 steps, LambdaLR")
    for spec in specs:
        try:
            r = measure(spec)
        except Exception as exc:  # noqa: BLE001 - report and go on to the next spec
            print(f"  {spec:32s} ERROR {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
            continue
        fb = f"  FALLBACK: {r['fallback'][0][:160]}" if r["fallback"] else ""
        print(f"  {spec:32s} abs {r['abs']:.2e}  rel {r['rel']:.2e}  ulps {r['ulps']:6d}  "
              f"graphs {r['graphs_step1']} (+{r['recompiles']} after step 1){fb}", flush=True)


if __name__ == "__main__":
    main()
