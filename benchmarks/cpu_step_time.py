"""CPU step time of the generated optimizers vs torch.optim.AdamW and adams-torch, as ratios
measured in one run (a script, not a test: timings vary 3-5x between runs on shared machines).

10M parameters in 20 tensors of mixed shapes, fp32. Each optimizer is warmed up, then timed as
the median of --repeats steps.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch


def make_params(total: int = 10_000_000, n: int = 20) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    per = total // n
    shapes = []
    for i in range(n):
        if i % 4 == 0:
            shapes.append((per,))
        elif i % 4 == 1:
            shapes.append((4, per // 4))
        else:
            rows = 500 if i % 2 else 1000
            shapes.append((rows, per // rows))
    params = [torch.randn(s, generator=g) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 1e-2
    return params


def time_steps(opt, repeats: int) -> float:
    for _ in range(3):
        opt.step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import adams

    import generated

    params = make_params()
    n = sum(p.numel() for p in params)
    rows = [
        ("torch AdamW (default: single-tensor)", lambda ps: torch.optim.AdamW(ps)),
        ("torch AdamW foreach=True", lambda ps: torch.optim.AdamW(ps, foreach=True)),
        ("torch AdamW fused=True", lambda ps: torch.optim.AdamW(ps, fused=True)),
        ("optgen AdamW (torch backend)", lambda ps: generated.AdamW(ps)),
        ("adams-torch Adams_ZeRO", lambda ps: adams.Adams_ZeRO(ps)),
        ("optgen Adams (torch backend)", lambda ps: generated.Adams(ps)),
    ]
    results = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, make in rows:
            ps = [p.clone().requires_grad_(True) for p in params]
            for p, q in zip(ps, params):
                p.grad = q.grad.clone()
            results[name] = time_steps(make(ps), args.repeats)
    print(f"{n / 1e6:.1f}M fp32 params in {len(params)} tensors, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    base = results["torch AdamW fused=True"]
    for name, t in results.items():
        print(f"  {name:40s} {t * 1e3:8.2f} ms   {t / base:5.2f}x fused AdamW")
    print(f"  optgen AdamW / torch AdamW fused: {results['optgen AdamW (torch backend)'] / base:.2f}x time")
    print(f"  optgen Adams speed-up over adams-torch: "
          f"{results['adams-torch Adams_ZeRO'] / results['optgen Adams (torch backend)']:.2f}x")


if __name__ == "__main__":
    main()
