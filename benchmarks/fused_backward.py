"""Peak memory of a training step with and without the fused backward pass.

On CUDA: ``torch.cuda.max_memory_allocated`` around forward + backward + step. On CPU (no
allocator statistics): the peak number of bytes held by ``.grad`` tensors during backward,
sampled at every gradient accumulation, plus the wall time of a step, as ratios against the
unfused run of the same spec in the same process.

    python benchmarks/fused_backward.py [--spec adamw_adv] [--class AdamW_adv] [--layers 8] [--width 1024]
"""

from __future__ import annotations

import argparse
import importlib
import time

import torch
from torch import nn


def make_model(layers: int, width: int, device: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.GELU()) for _ in range(layers)]).to(device)


def run(cls, fused: bool, layers: int, width: int, device: str, steps: int = 3) -> tuple[int, float]:
    model = make_model(layers, width, device)
    opt = cls(model.parameters())
    x = torch.randn(64, width, device=device)
    params = list(model.parameters())
    peak_grads = 0

    def sample(_: torch.Tensor) -> None:
        nonlocal peak_grads
        peak_grads = max(peak_grads, sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None))

    probes = [p.register_post_accumulate_grad_hook(sample) for p in params]  # before the fused hooks
    handle = opt.attach_fused_backward() if fused else None
    times = []
    for _ in range(steps):
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        model(x).square().mean().backward()
        if not fused:
            opt.step()
            opt.zero_grad()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else peak_grads
    for h in probes:
        h.remove()
    if handle is not None:
        handle.remove()
    return peak, min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default="adamw_adv")
    ap.add_argument("--class", dest="cls", default="AdamW_adv")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--width", type=int, default=1024)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cls = getattr(importlib.import_module(f"generated.{args.spec}"), args.cls)
    (p0, t0), (p1, t1) = (run(cls, f, args.layers, args.width, device) for f in (False, True))
    what = "peak allocated" if device == "cuda" else "peak live gradient bytes"
    print(f"{args.cls} on {device}, {args.layers} x Linear({args.width}): {what}")
    print(f"  step() after backward: {p0 / 2**20:9.1f} MiB   {t0 * 1e3:8.2f} ms")
    print(f"  fused backward:        {p1 / 2**20:9.1f} MiB   {t1 * 1e3:8.2f} ms")
    print(f"  ratio fused / plain:   {p1 / p0:9.3f}       {t1 / t0:8.3f}")


if __name__ == "__main__":
    main()
