"""bitsandbytes' and torchao's low-bit Adam against optgen's specs of them: state bytes per
parameter and CPU step-time ratios (a script, not a test: timings vary on shared machines).

Bytes are counted from the state tensors (every tensor in ``optimizer.state`` but ``step``; bnb's
shared ``qmap1``/``qmap2`` tables once per parameter, as its state holds them; torchao's quantised
subclasses by their ``codes`` and ``scale``) on the GPT-2-small parameter list (124.4M, 148
tensors), allocated as each class allocates on its first step, without stepping. Step times: one
interleaved run (theirs, ours, theirs, ...) on 12.4M parameters in 7 matrices of GPT-2-block shapes
and 3 vectors, fp32, fixed gradients, median of the rounds; torchao runs its compiled step
(compile time excluded by warm-up steps).

    python benchmarks/quant_published.py [--time] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from optgen.bench import gpt2_small_shapes

CLASSES = [
    # (label, package, published class, optgen module, optgen class)
    ("bnb Adam8bit", "bnb", "Adam8bit", "adam8bit_bnb", "Adam8bit"),
    ("bnb AdamW8bit", "bnb", "AdamW8bit", "adamw8bit_bnb", "AdamW8bit"),
    ("torchao AdamW8bit", "ao", "AdamW8bit", "adamw8bit_ao", "AdamW8bit_ao"),
    ("torchao AdamW4bit", "ao", "AdamW4bit", "adamw4bit_ao", "AdamW4bit"),
    ("torchao AdamWFp8", "ao", "AdamWFp8", "adamwfp8_ao", "AdamWFp8"),
]


def _classes(package: str, name: str, module: str, cls: str):
    import importlib

    if package == "bnb":
        import bitsandbytes as bnb
        theirs = getattr(bnb.optim, name)
    else:
        import torchao.optim as ao
        theirs = getattr(ao, name)
    return theirs, getattr(importlib.import_module(f"generated.{module}"), cls)


def _tensor_bytes(v) -> int:
    if type(v) is torch.Tensor:
        return v.numel() * v.element_size()
    if isinstance(v, torch.Tensor):  # torchao's quantised subclasses
        return sum(_tensor_bytes(getattr(v, a)) for a in ("codes", "scale"))
    return 0


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(_tensor_bytes(v) for st in opt.state.values() for k, v in st.items() if k != "step")


def allocate(opt: torch.optim.Optimizer, package: str | None) -> None:
    """Each class's first-step state allocation, without a step."""
    for gi, group in enumerate(opt.param_groups):
        for pi, p in enumerate(group["params"]):
            if package == "bnb":
                opt.init_state(group, p, gi, pi)
            elif package == "ao":
                st = opt.state[p]
                st["exp_avg"], st["exp_avg_sq"] = opt._new_buffer(p, True), opt._new_buffer(p, False)
            else:
                opt._init_state(p, group)


def bytes_table() -> None:
    shapes = gpt2_small_shapes()
    n = sum(torch.Size(s).numel() for s in shapes)
    print(f"GPT-2 small: {len(shapes)} tensors, {n / 1e6:.1f}M parameters; state bytes per parameter")
    print("| class | optgen | published |")
    print("|---|---|---|")
    for label, package, name, module, cls in CLASSES:
        theirs, ours = _classes(package, name, module, cls)
        row = []
        for make, pkg in ((ours, None), (theirs, package)):
            params = [torch.nn.Parameter(torch.empty(s)) for s in shapes]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt = make(params)
            allocate(opt, pkg)
            row.append(state_bytes(opt) / n)
            del opt, params
        print(f"| {label} | {row[0]:.4f} | {row[1]:.4f} |", flush=True)


def block_params() -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    # a GPT-2 block's matrices and vectors (few distinct shapes: torchao compiles its step per shape)
    shapes = [(768, 2304), (768, 768), (768, 3072), (3072, 768), (768, 768), (768, 3072), (3072, 768),
              (2304,), (768,), (768,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    return params


def time_table(repeats: int) -> None:
    torch._dynamo.config.recompile_limit = 1024
    built = []
    for label, package, name, module, cls in CLASSES:
        theirs, ours = _classes(package, name, module, cls)
        for who, make in ((label, theirs), (f"optgen {cls}", lambda ps, o=ours: o(ps, backend="torch"))):
            params = block_params()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt = make(params)
                for _ in range(2):
                    opt.step()
            built.append((who, opt, []))
    for _ in range(repeats):
        for _, opt, times in built:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t0 = time.perf_counter()
                opt.step()
                times.append(time.perf_counter() - t0)
    n = sum(p.numel() for p in block_params())
    print(f"CPU step time, {n / 1e6:.1f}M parameters, {repeats} interleaved rounds, median")
    print("| published class | published ms | optgen ms | optgen / published |")
    print("|---|---|---|---|")
    for i in range(0, len(built), 2):
        a, b = statistics.median(built[i][2]) * 1e3, statistics.median(built[i + 1][2]) * 1e3
        print(f"| {built[i][0]} | {a:.1f} | {b:.1f} | {b / a:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--time", action="store_true", help="also time the steps")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    bytes_table()
    if args.time:
        time_table(args.repeats)


if __name__ == "__main__":
    main()
