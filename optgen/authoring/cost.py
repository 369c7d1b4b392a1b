"""The cost model ``optgen show`` prints: bytes one step moves per parameter element, state bytes per
parameter, kernel launches per step on the triton backend, and the step time a copy bandwidth
allows (the roofline).

Counted from the triton plan of the branch path a parameter takes with every hyperparameter at its
default (the path the runtime picks, decided as the runner decides it): each element pass reads
from memory the parameter, the gradient, the states and the spilled temporaries it uses before
writing them, and writes the parameter, the states it assigns and the temporaries later stages
read. Per-row, per-column and per-matrix values (factored moments, row norms) are O(rows + cols)
and are left out of the per-element bytes; 1-bit states count 1/8 byte.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from optgen.ir.nodes import Assign, Kind, Program, walk_nodes
from optgen.ir.ops import Op
from optgen.render import Built

#: Parameter shapes the cost model reports on: a matrix and a vector.
SHAPES: dict[str, tuple[int, ...]] = {"matrix 1024x1024": (1024, 1024), "vector 1024": (1024,)}
_DTYPE_BYTES = {"float32": 4.0, "float64": 8.0, "bfloat16": 2.0, "float16": 2.0, "bits": 0.125}


@dataclass
class PathCost:
    shape: str
    key: tuple
    reads: dict[str, float] = field(default_factory=dict)  # name -> bytes per element (summed over passes)
    writes: dict[str, float] = field(default_factory=dict)
    launches: int = 0
    passes: int = 0
    calls: int = 0
    unsupported: str = ""
    #: one line per stage of the plan, in launch order: what the triton backend runs for this path
    kernels: list[str] = field(default_factory=list)
    state_bytes: float = 0.0  # the states the runtime allocates for this parameter, bytes per element

    @property
    def total(self) -> float:
        return sum(self.reads.values()) + sum(self.writes.values())


@dataclass
class CostModel:
    class_name: str
    dtype: str
    state_bytes: float  # per-element states the runtime allocates at the defaults (largest path)
    small_states: list[str]  # states of O(rows + cols) or per-tensor size
    paths: list[PathCost]
    n_paths_rendered: int


def _elem_bytes(program: Program, name: str, param_bytes: float) -> float:
    if name in ("param", "grad"):
        return param_bytes
    try:
        d = program.state_decl(name)
    except KeyError:
        return 4.0  # a workspace temporary (float32)
    if d.dtype in ("param", "default"):
        return param_bytes
    return _DTYPE_BYTES.get(d.dtype, 4.0)


def state_bytes(program: Program, param_bytes: float) -> tuple[float, list[str]]:
    total, small = 0.0, []
    for d in program.state:
        if d.kind == Kind.ELEMENT:
            total += _elem_bytes(program, d.name, param_bytes)
        elif d.kind == Kind.HOST:
            continue
        else:
            small.append(f"{d.name} ({d.kind.label})")
    return total, small


def _path_for(built: Built, cls: type, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[tuple, Any, float]:
    """The branch path one parameter of ``shape`` takes at the defaults, after one step."""
    from optgen.numerics.host import HostContext
    from optgen.numerics.matrix_view import view_shape
    from optgen.runtime.triton_runner import _static_pass

    p = torch.nn.Parameter(torch.randn(shape, dtype=dtype))
    opt = cls([p], backend="torch")
    p.grad = torch.randn(shape, dtype=dtype)
    opt.step()
    group, state = opt.param_groups[0], opt.state[p]
    ctx = HostContext(group, p, state, tensor_math=False, view=view_shape(built.program, p, group, state))
    key: list = []
    from optgen.backends.triton_plan import dynamic_names

    dyn = dynamic_names(built.program)
    _static_pass(built.program.body, ctx, key, dyn)
    held = sum(v.numel() * v.element_size() for n, v in state.items()
               if isinstance(v, torch.Tensor) and n != "step" and v.dim() > 0)
    return tuple(key), dyn, held / p.numel()


_STAGE_LABELS = {"pass": "element pass", "vec": "vector stage", "call": "torch call"}


def _stage_line(st: Any) -> str:
    label = _STAGE_LABELS[st.kind] + (f" ({st.layout})" if st.kind == "pass" else "")
    targets = list(dict.fromkeys(s.target for s in st.statements))
    reduced = [s.target for s in st.statements if s.role == "reduce"]
    return f"{label}: {', '.join(targets)}" + (f"; reduces {', '.join(reduced)}" if reduced else "")


def path_cost(program: Program, label: str, key: tuple, dyn: set[str], param_bytes: float) -> PathCost:
    from optgen.backends.triton_plan import TritonUnsupported, enumerate_paths, plan_path

    cost = PathCost(label, key)
    found = [(k, s) for k, s in enumerate_paths(program.body, dyn, fixed=dict(key)) if k == key]
    if not found:
        cost.unsupported = "no branch path of the plan has this key"
        return cost
    try:
        plan = plan_path(program, key, found[0][1], dyn)
    except TritonUnsupported as exc:
        cost.unsupported = str(exc)
        return cost
    states = {d.name for d in program.state if d.kind == Kind.ELEMENT}
    spilled: set[str] = set()
    cost.launches = 1 + (1 if plan.accumulates else 0)  # the prologue; zeroing the accumulators
    for i, st in enumerate(plan.stages):
        cost.kernels.append(_stage_line(st))
        if st.kind == "call":
            cost.calls += 1
            continue  # a torch op between kernels (Newton-Schulz): launches of its own, not counted
        cost.launches += 1
        if st.kind != "pass":
            continue
        cost.passes += 1
        memory = {"param", "grad"} | states | spilled
        assigned: set[str] = set()
        read: set[str] = set()
        written: set[str] = set()
        for s in st.statements:
            for n in walk_nodes(s.value):
                if n.op == Op.VAR and n.kind == Kind.ELEMENT and n.attr in memory and n.attr not in assigned:
                    read.add(n.attr)
            if isinstance(s, Assign):
                assigned.add(s.target)
                if s.value.kind == Kind.ELEMENT and (s.role in ("param", "state")):
                    written.add(s.target)
        written |= set(plan.spills.get(i, []))
        spilled |= set(plan.spills.get(i, []))
        order = ["param", "grad", *(d.name for d in program.state)]
        rank = {n: i for i, n in enumerate(order)}
        for n in sorted(read, key=lambda x: (rank.get(x, len(order)), x)):
            cost.reads[n] = cost.reads.get(n, 0.0) + _elem_bytes(program, n, param_bytes)
        for n in sorted(written, key=lambda x: (rank.get(x, len(order)), x)):
            cost.writes[n] = cost.writes.get(n, 0.0) + _elem_bytes(program, n, param_bytes)
    return cost


def cost_model(built: Built, dtype: torch.dtype = torch.float32) -> CostModel:
    program = built.program
    pb = float(torch.empty((), dtype=dtype).element_size())
    from optgen.authoring.load import import_class

    _, small = state_bytes(program, pb)
    cls = import_class(built)
    paths = []
    for label, shape in SHAPES.items():
        key, dyn, held = _path_for(built, cls, shape, dtype)
        pc = path_cost(program, label, key, dyn, pb)
        pc.state_bytes = held
        paths.append(pc)
    sb = max(pc.state_bytes for pc in paths)
    n_rendered = 0
    try:
        from optgen.backends.triton_codegen import default_decisions
        from optgen.backends.triton_plan import dynamic_names, enumerate_paths

        n_rendered = len(enumerate_paths(program.body, dynamic_names(program), fixed=default_decisions(program)))
    except Exception:
        pass
    return CostModel(program.class_name, str(dtype).replace("torch.", ""), sb, small, paths, n_rendered)


def benchmarks_bandwidth(path: Path = Path("BENCHMARKS.md")) -> tuple[float, str] | None:
    """The measured device-to-device copy bandwidth (GB/s) BENCHMARKS.md records, and where."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return None
    m = re.search(r"device-to-device copy measured in the same run: \*\*(\d+(?:\.\d+)?) GB/s\*\*", text)
    if not m:
        return None
    device = re.search(r"one (NVIDIA [^(\n]*?)\s*\(", text)
    return float(m.group(1)), f"{path} ({device.group(1).strip() if device else 'GPU'})"


def bench_times(path: Path) -> dict[str, Any]:
    """The measured optgen step times of an ``optgen bench --json`` file, with their traffic."""
    data = json.loads(path.read_text(encoding="utf-8"))
    out = {"device": data.get("device"), "bandwidth": data.get("copy_bandwidth_GBps"), "cases": {}}
    for label, row in data.get("cases", {}).items():
        if "optgen" in row:
            out["cases"][label] = row["optgen"]
    return out


def format_cost(cm: CostModel, bandwidth_gbps: float | None, source: str, bench: dict[str, Any] | None = None,
                numel: int = 2**28) -> list[str]:
    lines = [f"cost model ({cm.dtype} parameters, every hyperparameter at its default; triton plan):"]
    lines.append(f"  state: {cm.state_bytes:g} bytes per parameter (states allocated at the defaults: "
                 + ", ".join(f"{pc.shape} {pc.state_bytes:g}" for pc in cm.paths) + ")")
    if cm.small_states:
        lines.append(f"  declared states of O(rows + cols) or per tensor, not in the bytes per element: "
                     f"{', '.join(cm.small_states)}")
    for pc in cm.paths:
        if pc.unsupported:
            lines.append(f"  {pc.shape}: not on the triton backend ({pc.unsupported})")
            continue
        parts = [f"{n} {b:g}" for n, b in pc.reads.items()]
        wparts = [f"{n} {b:g}" for n, b in pc.writes.items()]
        lines.append(f"  {pc.shape}: {pc.total:g} bytes moved per parameter per step "
                     f"(read {sum(pc.reads.values()):g}: {', '.join(parts) or '-'}; "
                     f"write {sum(pc.writes.values()):g}: {', '.join(wparts) or '-'}); "
                     f"{pc.passes} element pass(es), {pc.launches} kernel launches per step per bucket"
                     + (f" plus {pc.calls} torch call stage(s) (Newton-Schulz and the like: not counted)"
                        if pc.calls else ""))
        lines += [f"    {i}. {k}" for i, k in enumerate(pc.kernels, 1)]
    lines.append(f"  branch paths rendered at the defaults: {cm.n_paths_rendered}")
    if bandwidth_gbps:
        lines.append(f"  roofline at {bandwidth_gbps:.0f} GB/s copy bandwidth ({source}):")
        for pc in cm.paths:
            if pc.unsupported:
                continue
            ms = pc.total * numel / (bandwidth_gbps * 1e9) * 1e3
            lines.append(f"    {pc.shape} path, 2^{numel.bit_length() - 1} parameters: {ms:.3f} ms per step")
    else:
        lines.append("  roofline: no bandwidth (pass --bandwidth GBps, or keep BENCHMARKS.md beside the specs)")
    if bench:
        bw = bench.get("bandwidth")
        lines.append(f"  measured by optgen bench on {bench.get('device')}:")
        for label, m in bench["cases"].items():
            roof = m["traffic"] / (bw * 1e9) * 1e3 if bw else None
            extra = f", roofline {roof:.3f} ms at the run's {bw:.0f} GB/s ({100 * roof / m['ms']:.0f}%)" if roof else ""
            lines.append(f"    {label}: {m['ms']:.3f} ms per step{extra}")
    return lines
