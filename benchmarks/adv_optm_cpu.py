"""adv_optm vs optgen on CPU: step time as ratios measured in one run, and optimizer-state bytes
per parameter (a script, not a test: timings vary between runs on shared machines).

Parameters: 6M in 13 tensors (matrices of mixed aspect ratios plus vectors), fp32, fixed
gradients. adv_optm runs plain and with ``compiled_optimizer=True`` (torch.compile per tensor
shape; the compile time is excluded by warm-up steps), optgen's class on its torch backend,
dense and factored. ``--optimizer Prodigy_adv`` compares Prodigy (its D-adaptation included).

    python benchmarks/adv_optm_cpu.py [--repeats 10] [--optimizer AdamW_adv|Prodigy_adv]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch


def make_params(total: int = 6_000_000) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    shapes = [(1024, 768), (768, 1024), (3072, 256), (256, 3072), (512, 512), (2048, 128), (128, 2048),
              (1000, 333), (768,), (1024,), (3072,), (50000,)]
    used = sum(torch.Size(s).numel() for s in shapes)
    shapes.append((max(total - used, 1),))
    params = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    return params


def state_bytes(opt, params) -> float:
    total = 0
    for p in params:
        for v in opt.state[p].values():
            if isinstance(v, torch.Tensor) and v.device.type != "meta":
                total += v.numel() * v.element_size()
    return total / sum(p.numel() for p in params)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--optimizer", default="AdamW_adv", choices=["AdamW_adv", "Prodigy_adv"])
    args = ap.parse_args()
    import importlib

    import adv_optm

    name = args.optimizer
    theirs = getattr(adv_optm, name)
    ours = getattr(importlib.import_module(f"generated.{name.lower()}"), name)
    torch._dynamo.config.recompile_limit = 1024
    torch._dynamo.config.accumulated_recompile_limit = 4096
    cases = [
        (f"adv_optm {name} (plain)", lambda ps: theirs(ps)),
        (f"adv_optm {name} (compiled_optimizer=True)", lambda ps: theirs(ps, compiled_optimizer=True)),
        (f"adv_optm {name} (nnmf_factor=True)", lambda ps: theirs(ps, nnmf_factor=True)),
        (f"optgen {name} (torch backend)", lambda ps: ours(ps, backend="torch")),
        (f"optgen {name} (nnmf_factor=True, torch backend)", lambda ps: ours(ps, nnmf_factor=True, backend="torch")),
    ]
    # One step of each optimizer in turn per round, so that drifting machine load hits all alike.
    built = []
    for name, make in cases:
        params = make_params()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = make(params)
            for _ in range(3):  # warm-up (torch.compile compiles here)
                opt.step()
        built.append((name, opt, params, []))
    for _ in range(args.repeats):
        for _, opt, _, times in built:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t0 = time.perf_counter()
                opt.step()
                times.append(time.perf_counter() - t0)
    rows = [(name, statistics.median(times), state_bytes(opt, params)) for name, opt, params, times in built]
    base = rows[0][1]
    n = sum(p.numel() for p in make_params())
    print(f"{n / 1e6:.1f}M fp32 parameters, {torch.get_num_threads()} threads, median of {args.repeats} interleaved steps")
    print(f"{'optimizer':52s} {'ms/step':>9s} {'vs adv plain':>13s} {'state B/param':>14s}")
    for name, t, b in rows:
        print(f"{name:52s} {t * 1e3:9.2f} {t / base:13.3f} {b:14.3f}")


if __name__ == "__main__":
    main()
