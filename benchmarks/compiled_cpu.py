"""CPU step time of the compiled backend (torch.compile/inductor of each bucket's step) against
torch.optim.AdamW(fused=True) and the eager torch backend, as ratios of one run, interleaved.

10M fp32 parameters in 20 tensors of GPT-2-block-like shapes, a LambdaLR scheduler stepped after
every step (lr moves every step: the compiled step must not recompile). For each thread count:
warm-up steps (the first compiles), then --rounds rounds of one step of each optimizer in turn,
so drifting load on a shared machine hits all alike; medians. With --specs, every spec's
compiled / eager ratio on the same parameters (1 thread).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

#: GPT-2-small-block-like shapes (768 wide, 4x MLP), scaled to ~10M in 20 tensors
SHAPES = [
    (768,), (768,), (2304, 768), (2304,), (768, 768), (768,), (768,), (768,),
    (3072, 768), (3072,), (768, 3072), (768,), (768,), (768,), (768, 768), (768,),
    (1536, 768), (1536,), (768, 1536), (768,),
]


def make_params() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g).requires_grad_(True) for s in SHAPES]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 1e-2
    return params


def clone(params: list[torch.Tensor]) -> list[torch.Tensor]:
    out = [p.detach().clone().requires_grad_(True) for p in params]
    for p, q in zip(out, params):
        p.grad = q.grad.clone()
    return out


class Timed:
    def __init__(self, make, params):
        self.opt = make(clone(params))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: 1.0 / (1.0 + 0.01 * s))
        self.times: list[float] = []

    def step(self, record: bool) -> None:
        t0 = time.perf_counter()
        self.opt.step()
        self.sched.step()
        if record:
            self.times.append(time.perf_counter() - t0)


def interleaved(rows: dict, params, warmup: int, rounds: int) -> dict[str, float]:
    timed = {name: Timed(make, params) for name, make in rows.items()}
    for _ in range(warmup):
        for t in timed.values():
            t.step(False)
    for _ in range(rounds):
        for t in timed.values():
            t.step(True)
    return {name: statistics.median(t.times) for name, t in timed.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--specs", action="store_true", help="also every spec's compiled / eager ratio")
    args = ap.parse_args()
    import generated

    params = make_params()
    n = sum(p.numel() for p in params)
    print(f"{n / 1e6:.1f}M fp32 params in {len(params)} tensors, torch {torch.__version__}, "
          f"LambdaLR every step, {args.rounds} interleaved rounds, medians")
    rows = {
        "torch AdamW fused=True": lambda ps: torch.optim.AdamW(ps, fused=True),
        "optgen AdamW backend=torch": lambda ps: generated.AdamW(ps, backend="torch"),
        "optgen AdamW backend=compiled": lambda ps: generated.AdamW(ps, backend="compiled"),
    }
    for threads in args.threads:
        torch.set_num_threads(threads)
        res = interleaved(rows, params, args.warmup, args.rounds)
        base = res["torch AdamW fused=True"]
        print(f"{threads} thread(s):")
        for name, t in res.items():
            print(f"  {name:34s} {t * 1e3:8.2f} ms  {t / base:5.2f}x fused time  ({base / t:4.2f}x speed)")
    if args.specs:
        torch.set_num_threads(1)
        print("compiled / eager torch backend, per spec (1 thread, time ratio):")
        for name in generated.__all__:
            cls = getattr(generated, name)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = interleaved({"torch": lambda ps, c=cls: c(ps, backend="torch"),
                                   "compiled": lambda ps, c=cls: c(ps, backend="compiled")},
                                  params, args.warmup, max(5, args.rounds // 3))
            print(f"  {name:24s} eager {res['torch'] * 1e3:8.2f} ms  compiled {res['compiled'] * 1e3:8.2f} ms  "
                  f"{res['compiled'] / res['torch']:5.2f}x")


if __name__ == "__main__":
    main()
