"""``optgen bench``: step time, peak memory and bandwidth of a spec's triton backend on a GPU.

Every number is a ratio against a baseline measured in the same run: ``torch.optim.AdamW`` with
``fused=True`` and with ``foreach=True``, the AdamW spec's own kernels, and a device-to-device copy
(the bandwidth ceiling). A benchmark script, not a test: timings vary between machines and runs.
"""

from __future__ import annotations

import importlib
import json
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from optgen.files import write_atomic
from optgen.render import compile_spec


def gpt2_small_shapes() -> list[tuple[int, ...]]:
    """The parameter shapes of GPT-2 small (124M parameters, 148 tensors, tied embeddings)."""
    vocab, ctx, d, layers = 50257, 1024, 768, 12
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


class Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.enabled = total, 0, enabled

    def advance(self, label: str) -> None:
        self.done += 1
        if self.enabled:
            width = 30
            fill = int(width * self.done / self.total)
            sys.stderr.write(f"\r[{'#' * fill}{' ' * (width - fill)}] {self.done}/{self.total} {label:<48}")
            sys.stderr.flush()
            if self.done == self.total:
                sys.stderr.write("\n")


def load_class(spec_path: str | Path) -> type:
    """Build a spec into a private package and import its optimizer class."""
    built = compile_spec(spec_path)
    tmp = Path(tempfile.mkdtemp(prefix="optgen_bench_"))
    pkg_name = f"optgen_bench_{built.module}"
    pkg = tmp / pkg_name
    for name, text in built.files().items():
        write_atomic(pkg / name, text)
    write_atomic(pkg / "__init__.py", "")
    sys.path.insert(0, str(tmp))
    module = importlib.import_module(f"{pkg_name}.{built.module}")
    return getattr(module, built.program.class_name)


def time_ms(fn: Callable[[], Any], warmup: int = 5, iters: int = 20, repeats: int = 3) -> float:
    """Median over ``repeats`` of the mean CUDA-event time of ``iters`` calls, in milliseconds."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return statistics.median(times)


def copy_bandwidth(numel: int = 2**28) -> float:
    """Bytes per second of a device-to-device fp32 copy (read plus write)."""
    x = torch.empty(numel, device="cuda")
    y = torch.empty_like(x)
    ms = time_ms(lambda: y.copy_(x))
    return 2 * 4 * numel / (ms * 1e-3)


def _params(shapes: list[tuple[int, ...]], dtype: torch.dtype) -> list[torch.nn.Parameter]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, device="cuda", generator=gen).to(dtype))
        p.grad = torch.randn(s, device="cuda", generator=gen).to(dtype) * 1e-2
        params.append(p)
    return params


def _traffic(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> int:
    """The least bytes one step must move: param read + write, grad read, element states read + write."""
    total = 0
    for p in params:
        total += 3 * p.numel() * p.element_size()
        for v in opt.state[p].values():
            if isinstance(v, torch.Tensor) and v.numel() == p.numel() and v.dim() > 0:
                total += 2 * v.numel() * v.element_size()
    return total


def count_kernels(fn: Callable[[], Any]) -> int:
    """GPU kernels one call launches, counted by the profiler (copies and memsets excluded)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(
        1 for e in prof.events()
        if e.device_type == DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset"))
    )


def measure(make: Callable[[list], torch.optim.Optimizer], shapes: list, dtype: torch.dtype) -> dict[str, float]:
    """Step time (ms) with a LambdaLR scheduler stepped every step, peak extra memory (bytes) and
    bytes moved per step for one optimizer."""
    torch.cuda.empty_cache()
    params = _params(shapes, dtype)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    opt = make(params)
    # as users train: an LR scheduler moves lr at every step (it must not rebuild or sync anything)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1.0 + 1e-4 * k))

    def step() -> None:
        opt.step()
        sched.step()

    step()
    ms = time_ms(step)
    peak = torch.cuda.max_memory_allocated() - base
    out = {"ms": ms, "peak_bytes": float(peak), "traffic": float(_traffic(opt, params))}
    out["launches"] = float(count_kernels(step))
    opt = sched = params = None  # freed before the next case
    torch.cuda.empty_cache()
    return out


def run(spec: str, baseline_spec: str | None = "specs/adamw.yaml", plot: str | None = None,
        json_out: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Run the whole benchmark and return (and print) its results."""
    if not torch.cuda.is_available():
        raise SystemExit("optgen bench needs a CUDA GPU (the triton backend's target)")
    cls = load_class(spec)
    base_cls = load_class(baseline_spec) if baseline_spec and Path(baseline_spec).resolve() != Path(spec).resolve() \
        else None
    makers: dict[str, Callable] = {
        "torch_fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
        "torch_foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
        "optgen": lambda ps: cls(ps, backend="triton"),
    }
    if base_cls is not None:
        makers["optgen_adamw"] = lambda ps: base_cls(ps, backend="triton")
    cases = [
        ("one 2^28 fp32 tensor", [(2**28,)], torch.float32),
        ("GPT-2 small fp32", gpt2_small_shapes(), torch.float32),
        ("GPT-2 small bf16", gpt2_small_shapes(), torch.bfloat16),
    ]
    sweep = [2**k for k in range(16, 29, 2)]
    bar = Progress(1 + len(cases) * len(makers) + len(sweep) * 3, progress)
    bw = copy_bandwidth()
    bar.advance("copy bandwidth")
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "triton": importlib.import_module("triton").__version__, "spec": str(spec),
        "copy_bandwidth_GBps": bw / 1e9, "cases": {}, "sweep": {},
    }
    for label, shapes, dtype in cases:
        row = {}
        for name, make in makers.items():
            row[name] = measure(make, shapes, dtype)
            bar.advance(f"{label}: {name}")
        results["cases"][label] = row
    for n in sweep:
        for name in ("torch_fused", "torch_foreach", "optgen"):
            results["sweep"].setdefault(name, []).append((n, measure(makers[name], [(n,)], torch.float32)["ms"]))
            bar.advance(f"sweep 2^{n.bit_length() - 1}: {name}")
    print(report(results))
    if json_out:
        write_atomic(Path(json_out), json.dumps(results, indent=1))
    if plot:
        save_plot(results, plot)
    return results


def report(results: dict[str, Any]) -> str:
    """The results as a markdown table of ratios measured in the same run."""
    bw = results["copy_bandwidth_GBps"]
    lines = [
        f"device: {results['device']}; torch {results['torch']}; triton {results['triton']}; spec {results['spec']}",
        f"device-to-device copy: {bw:.0f} GB/s (read + write)",
        "",
        "| case | optimizer | step ms | vs torch fused (x faster) | vs foreach | peak extra MiB | GB/s | % of copy |"
        + " kernels/step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, row in results["cases"].items():
        fused, foreach = row["torch_fused"]["ms"], row["torch_foreach"]["ms"]
        for name, m in row.items():
            gbps = m["traffic"] / (m["ms"] * 1e-3) / 1e9
            launches = f"{m['launches']:.0f}"
            lines.append(
                f"| {label} | {name} | {m['ms']:.3f} | {fused / m['ms']:.2f} | {foreach / m['ms']:.2f} | "
                f"{m['peak_bytes'] / 2**20:.0f} | {gbps:.0f} | {100 * gbps / bw:.1f} | {launches} |"
            )
        if "optgen_adamw" in row:
            lines.append(f"| {label} | spec / AdamW spec step time | {row['optgen']['ms'] / row['optgen_adamw']['ms']:.3f}"
                         " | | | | | | |")
    return "\n".join(lines)


def save_plot(results: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in results["sweep"].items():
        ax.plot([n for n, _ in pts], [ms for _, ms in pts], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("parameters (one fp32 tensor)")
    ax.set_ylabel("step time (ms)")
    ax.set_title(f"{Path(results['spec']).stem} step time, {results['device']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
