"""State bytes per parameter and CPU step-time ratios of AdamW_adv's state precisions.

Bytes are counted from the state tensors (every tensor in ``optimizer.state`` but ``step``) of
optgen's ``AdamW_adv`` and adv_optm 2.5.16's, right after construction (both allocate eagerly) on
the GPT-2-small parameter list (124M: wte, wpe, 12 blocks, ln_f). Step times: one interleaved run
(ours, theirs, ours, ...) on a smaller list of GPT-2-block shapes, median of the rounds.

    python benchmarks/state_precision.py [--time]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

PRECISIONS = ["auto", "fp32", "bf16_sr", "fp16", "int8_sr"]


def gpt2_small() -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = [(50257, 768), (1024, 768)]
    for _ in range(12):
        shapes += [(768,), (768,), (768, 2304), (2304,), (768, 768), (768,), (768,), (768,), (768, 3072), (3072,),
                   (3072, 768), (768,)]
    return shapes + [(768,), (768,)]


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for st in opt.state.values() for k, v in st.items()
               if isinstance(v, torch.Tensor) and k != "step")


def main() -> None:
    import adv_optm

    from generated import AdamW_adv

    ap = argparse.ArgumentParser()
    ap.add_argument("--time", action="store_true", help="also time the CPU step")
    args = ap.parse_args()
    shapes = gpt2_small()
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    n = sum(p.numel() for p in params)
    print(f"GPT-2-small list: {len(params)} tensors, {n / 1e6:.1f}M parameters")
    print("| state_precision | optgen AdamW_adv bytes/param | adv_optm AdamW_adv bytes/param |")
    print("|---|---|---|")
    for prec in PRECISIONS:
        ours = AdamW_adv(params, state_precision=prec, backend="torch")
        b_ours = state_bytes(ours)
        del ours
        theirs = adv_optm.AdamW_adv(params, state_precision=prec)
        b_theirs = state_bytes(theirs)
        del theirs
        print(f"| {prec} | {b_ours / n:.4f} | {b_theirs / n:.4f} |")
    if not args.time:
        return
    small = [(768, 2304), (2304,), (768, 768), (768,), (768, 3072), (3072,), (3072, 768), (768,)]
    g = torch.Generator().manual_seed(0)
    print("\n| state_precision | optgen torch ms | adv_optm ms | ratio |")
    print("|---|---|---|---|")
    for prec in ["fp32", "bf16_sr", "int8_sr"]:
        runs = {}
        for name, cls, extra in (("ours", AdamW_adv, {"backend": "torch"}), ("theirs", adv_optm.AdamW_adv, {})):
            ps = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in small]
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g)
            runs[name] = (cls(ps, state_precision=prec, **extra), [])
        for r in range(12):
            for opt, times in runs.values():
                t = time.perf_counter()
                opt.step()
                if r >= 2:
                    times.append(time.perf_counter() - t)
        a, b = (statistics.median(runs[k][1]) * 1e3 for k in ("ours", "theirs"))
        print(f"| {prec} | {a:.2f} | {b:.2f} | {a / b:.2f} |")


if __name__ == "__main__":
    main()
