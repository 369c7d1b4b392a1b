"""Launching the triton backend: device-side tables, built once per parameter set and cached.

For each param group the runner keeps, until the set of parameters (or a hyperparameter that
decides a branch) changes:

* the parameters split into *buckets*, one per (branch path, dtype), each with a device table of
  pointers, sizes and workspace offsets per tensor and chunk tables for its passes;
* one flat device tensor of step counts (``state["step"]`` are 0-d views into it) and one per
  host-state buffer, so the prologue kernel updates them all in one launch;
* the float64 hyperparameter vector on the device (re-uploaded, without a sync, when it changes).

A step then costs, per bucket: one prologue launch plus one launch per stage of its path. The only
per-step Python work over parameters is collecting gradient pointers (re-uploaded when they move).
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from optgen.backends.launch_plan import CallPlan, PathLaunch, TritonPlan
from optgen.backends.triton_plan import decision_atoms
from optgen.ir.codecs import codec_for
from optgen.ir.nodes import Assign, If, Kind, Program, Stmt, walk_nodes
from optgen.ir.ops import Op
from optgen.numerics.dtypes import storage_dtype
from optgen.numerics.host import HostContext, evaluate
from optgen.numerics.matrix_view import view_shape
from optgen.runtime.state_alloc import new_state

#: Elements per program of a flat pass, and the tile of a tiled pass (GPU / interpreter).
GPU_CONFIG = {"BLOCK": 2048, "BM": 16, "BN": 128, "VB": 4096, "num_warps": 4}
INTERPRETER_CONFIG = {"BLOCK": 256, "BM": 8, "BN": 32, "VB": 64, "num_warps": 4}

_STORAGE = {torch.float32, torch.bfloat16, torch.float16}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_available(device: torch.device) -> None:
    """Raise a clear error when the triton backend cannot run on ``device``."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(
            "backend='triton' needs the triton package: pip install triton (or use backend='torch')"
        ) from exc
    if device.type == "cuda":
        return
    if device.type == "cpu" and interpreting():
        return
    if device.type == "cpu":
        raise RuntimeError(
            "backend='triton' got CPU tensors: Triton kernels run on CUDA devices. Set TRITON_INTERPRET=1 "
            "before importing optgen's generated modules to run them through Triton's (slow) CPU "
            "interpreter, or use backend='torch' on CPU"
        )
    raise RuntimeError(f"backend='triton' does not support {device.type} tensors; use backend='torch'")


def _tl_dtype(dtype: torch.dtype):
    import triton.language as tl

    return {
        torch.float32: tl.float32,
        torch.bfloat16: tl.bfloat16,
        torch.float16: tl.float16,
        torch.float64: tl.float64,
        torch.uint8: tl.uint8,
        torch.float8_e4m3fn: tl.float8e4nv,  # adv_optm's centered-decay anchor
        torch.int8: tl.int8,  # int8_sr codes (feature state_precision)
        torch.bool: tl.int1,  # a mask state (dtype: bool): one byte per element
    }[dtype]


def _dims(p: torch.Tensor, view: tuple[int, int] | None = None) -> tuple[int, int, int]:
    """(B, M, N): the parameter as a batch of M x N matrices (its matrix ``view``, if stepped as one)."""
    shape = tuple(p.shape) if view is None else view
    n = shape[-1] if len(shape) >= 1 else 1
    m = shape[-2] if len(shape) >= 2 else 1
    b = math.prod(shape[:-2]) if len(shape) > 2 else 1
    return b, m, n


@dataclass
class _Bucket:
    path: PathLaunch
    idx: list[int]  # positions in the group's parameter list
    dtype: torch.dtype
    table: torch.Tensor
    flat_chunks: torch.Tensor | None
    tiled_chunks: torch.Tensor | None
    ws: torch.Tensor
    acc_size: int
    hv: torch.Tensor
    nh: int
    aligned: bool  # every pointer 16-byte aligned
    n_aligned: bool  # every row length a multiple of 16 elements (tiled passes vectorise)
    consts: dict[str, Any]
    grad_ptrs: tuple[int, ...] = ()
    gptr: torch.Tensor | None = None
    calls: list = field(default_factory=list)  # per call stage: see _call_plan
    keep: list = field(default_factory=list)  # expanded copies the table points at
    #: workspace temp of an accumulation -> the workspace offsets of its per-tensor values
    sums: dict = field(default_factory=dict)
    positions: torch.Tensor | None = None  # idx on the device
    key: tuple = ()  # the branch path's key (sharded runners re-plan it: optgen.runtime.sharded_triton)
    envs: list = field(default_factory=list)  # per tensor: its static host values
    views: list = field(default_factory=list)  # per tensor: the matrix view it is stepped as


@dataclass
class _GroupCache:
    ids: tuple[int, ...]
    snapshot: tuple
    buckets: list[_Bucket]
    steps: torch.Tensor | None
    host_states: dict[str, torch.Tensor]
    dirty: bool = False  # stale after the step that built it (an absent state was created)
    hyp_values: tuple | None = None
    hyp: torch.Tensor | None = None


class TritonRunner:
    """The triton backend of one optimizer."""

    def __init__(self, program: Program, module_name: str):
        self.program = program
        self.module = importlib.import_module(module_name)
        if self.module.PLAN is None:
            raise RuntimeError(f"{program.class_name} has no triton kernels: {self.module.UNSUPPORTED}")
        self.plan = TritonPlan.from_data(self.module.PLAN)
        self.kernels = dict(self.module.KERNELS)
        self.module_name = module_name
        self.dynamic = set(self.plan.dynamic)
        # the hoisted conditions of hyperparameters (and globals) alone that a table's path depends
        # on: their outcomes, not the values they read, are part of a table's snapshot (re-evaluated
        # per step), so a scheduler moving betas or lr never rebuilds a table
        conds = [*self.plan.group_conditions, *(self.plan.global_conditions or ())]
        found = {s.target: s.value for s in program.body if isinstance(s, Assign) and s.target in conds}
        # and the hyperparameter-only parts of the conditions that also read parameter facts
        self.group_conditions = [found[c] for c in conds] + decision_atoms(program, self.dynamic)
        # their outcomes change only when a value they read does: remembered per those values
        self._condition_reads = sorted({n.attr[0] for v in self.group_conditions for n in walk_nodes(v)
                                        if n.op == Op.HYPER})
        self._outcomes: dict[tuple, tuple[bool, ...]] = {}
        self.builds = 0  # tables built (for tests: a scheduler must not rebuild them)
        # by (group index, ids of the stepped parameters): the whole group for step(), one
        # parameter at a time for the fused backward pass
        self.caches: dict[tuple[int, tuple[int, ...]], _GroupCache] = {}
        self.config: dict[str, int] | None = None
        self.launches = 0  # kernel launches issued (for tests and the benchmark)

    def _render_path(self, key: tuple) -> PathLaunch:
        """Kernels for a branch path the generated module does not carry (hyperparameters away from
        their defaults): rendered once, written to the cache folder, imported."""
        from optgen.runtime.kernel_cache import load_path_module

        mod = load_path_module(self.program, self.module_name, key)
        self.kernels.update(mod.KERNELS)
        if mod.PLAN is None:
            path = PathLaunch(unsupported=mod.UNSUPPORTED)
        else:
            path = PathLaunch.from_data(mod.PLAN["paths"][key])
        self.plan.paths[key] = path
        return path

    def invalidate(self) -> None:
        """Forget every table (after load_state_dict or a change of state tensors)."""
        self.caches.clear()

    # -- building ------------------------------------------------------------------------------
    def _snapshot(self, group: dict) -> tuple:
        """What a group's tables depend on: its static hyperparameters, and the conditions on
        optimizer-wide globals (not the globals themselves, which change every step)."""
        values = tuple(_hashable(group[h]) for h in self.plan.static_hypers)
        if not self.group_conditions:
            return values
        raw = [group.get(name) for name in self._condition_reads]
        # a tensor value can change in place: never remembered
        read = None if any(_holds_tensor(v) for v in raw) else tuple(_hashable(v) for v in raw)
        outcomes = self._outcomes.get(read) if read is not None else None
        if outcomes is None:
            if len(self._outcomes) > 64:  # a scheduler moving a value they read: keep it bounded
                self._outcomes.clear()
            ctx = HostContext(group, torch.empty(0), {}, tensor_math=False)
            outcomes = tuple(bool(evaluate(node, ctx)) for node in self.group_conditions)
            if read is not None:
                self._outcomes[read] = outcomes
        return values + outcomes

    def _path_key(self, group: dict, p: torch.Tensor, state: dict) -> tuple:
        return self._static_env(group, p, state)[0]

    def _static_env(self, group: dict, p: torch.Tensor, state: dict) -> tuple[tuple, dict]:
        """The parameter's branch path and its static host values."""
        ctx = HostContext(group, p, state, tensor_math=False, view=view_shape(self.program, p, group, state))
        key: list[tuple[str, bool]] = []
        _static_pass(self.program.body, ctx, key, self.dynamic)
        return tuple(key), ctx.env

    def _build(self, group: dict, params: list[torch.Tensor], states: dict) -> _GroupCache:
        prog = self.program
        device = params[0].device
        check_available(device)
        cfg = self.config or (INTERPRETER_CONFIG if device.type == "cpu" else GPU_CONFIG)
        for p in params:
            if p.device != device:
                raise RuntimeError(f"{prog.class_name}: all parameters of a group must be on one device for "
                                   f"backend='triton', got {device} and {p.device}")
            if p.dtype not in _STORAGE:
                raise RuntimeError(f"{prog.class_name}: backend='triton' supports float32, bfloat16 and float16 "
                                   f"parameters, got {p.dtype}; use backend='torch'")
            if not p.is_contiguous():
                raise RuntimeError(f"{prog.class_name}: backend='triton' needs contiguous parameters")
        steps = None
        if prog.step_store == "tensor":
            vals = [states[p]["step"] for p in params]
            steps = torch.stack([v.detach().reshape(()).to(device) for v in vals])
            for i, p in enumerate(params):
                states[p]["step"] = steps[i]
        host_states = {}
        for d in prog.state:
            if d.kind == Kind.HOST:
                vals = [states[p][d.name] for p in params]
                host_states[d.name] = torch.stack([v.detach().reshape(()).to(device) for v in vals])
                for i, p in enumerate(params):
                    states[p][d.name] = host_states[d.name][i]
        groups: dict[tuple, list[int]] = {}
        envs = []
        for i, p in enumerate(params):
            key, env = self._static_env(group, p, states[p])
            envs.append(env)
            groups.setdefault((key, p.dtype), []).append(i)
        cache = _GroupCache(tuple(map(id, params)), self._snapshot(group), [], steps, host_states)
        decls = {d.name: d for d in prog.state}
        for (key, dtype), idx in groups.items():
            path = self.plan.paths.get(key) or self._render_path(key)
            if path.unsupported is not None:
                raise RuntimeError(f"{self.program.class_name} on the triton backend: {path.unsupported}")
            for name in path.creates:
                decl = decls[name]
                for i in idx:
                    p = params[i]
                    if states[p].get(name) is None:
                        # in its storage layout (a coded state's codes and scales): the path writes it whole
                        ctx = HostContext(group, p, states[p], tensor_math=False)
                        states[p][name] = new_state(decl, p, group, view_shape(prog, p, group, states[p]), ctx,
                                                    decl.block, init=0.0)
                        cache.dirty = True  # has(name) flips: the next step takes another path
            views = [self._view(group, params[i], states[params[i]]) for i in idx]
            stride = group[prog.slice_stride] if prog.slice_stride else 1
            bucket = self._bucket(path, idx, dtype, params, states, cfg, device, views, stride)
            bucket.calls = [_call_plan(call, path, bucket, idx, envs, views, params) for call in path.calls]
            bucket.key, bucket.envs, bucket.views = key, [envs[i] for i in idx], views
            cache.buckets.append(bucket)
        return cache

    def _bucket(self, path: PathLaunch, idx: list[int], dtype: torch.dtype, params: list[torch.Tensor],
                states: dict, cfg: dict, device: torch.device, views: list, stride: int) -> _Bucket:
        prog = self.program
        # a path that codes states in blocks (feature state_precision) tiles by whole blocks
        block = max(cfg["BLOCK"], path.block)
        kinds = {d.name: d.kind for d in prog.state}
        keep: list[torch.Tensor] = []  # buffers the table points at that no state holds
        temps = [(name, Kind[kind.upper()], acc) for name, kind, acc in path.temps]
        rows: list[list[int]] = []
        ws_size = 0
        acc_size = 0
        aligned = True
        flat, tiled = [], []
        for t, i in enumerate(idx):
            p = params[i]
            st = states[p]
            b, m, n = _dims(p, views[t])
            row = []
            for col in path.columns:
                if col == "param":
                    row.append(p.data_ptr())
                elif col.startswith("state:"):
                    buf = st.get(col[6:])
                    if buf is None and col[6:] in path.states and col[6:] not in path.creates:
                        raise RuntimeError(
                            f"{prog.class_name}: state '{col[6:]}' of parameter {i} (shape {tuple(p.shape)}) does "
                            "not exist, but the branch path its group takes now reads it: a flag that needs "
                            "this state was switched on after the state was allocated (torch.optim raises a "
                            "KeyError there); set the flag when the optimizer is built")
                    n_slice = -(-p.numel() // stride)
                    if kinds[col[6:]] == Kind.SLICE and isinstance(buf, torch.Tensor) and buf.numel() != n_slice:
                        # a per-slice state stored as a 0-d value (Prodigy's p0 of an all-zero
                        # parameter): read-only, so the kernels read an expanded copy
                        buf = buf.reshape(()).expand(n_slice).contiguous()
                        keep.append(buf)
                    row.append(buf.data_ptr() if isinstance(buf, torch.Tensor) else 0)
                    if isinstance(buf, torch.Tensor) and buf.dim() == p.dim() and buf.data_ptr() % 16:
                        aligned = False
                elif col == "numel":
                    row.append(p.numel())
                elif col in ("B", "M", "N"):
                    row.append({"B": b, "M": m, "N": n}[col])
                elif col == "ndim":
                    row.append(p.dim())
                elif col == "gidx":
                    row.append(i)
                elif col == "stride":
                    row.append(stride)
                elif col.startswith("book:"):  # a codec's code book (feature state_precision)
                    _, name, non_neg, key = col.split(":")
                    book = codec_for(name).table(key, non_neg == "1", device)
                    keep.append(book)
                    row.append(book.data_ptr())
                else:
                    row.append(-1)  # workspace offsets, filled below
            rows.append(row)
            if p.data_ptr() % 16:
                aligned = False
            for s in range(0, p.numel(), block):
                flat.append((t, s))
            if p.numel():
                for bb in range(b):
                    for i0 in range(0, m, cfg["BM"]):
                        for j0 in range(0, n, cfg["BN"]):
                            tiled.append((t, bb, i0, j0))
        # workspace: accumulators first (zeroed every step), 16-byte aligned slots
        for acc_pass in (True, False):
            for name, kind, acc in temps:
                if acc != acc_pass:
                    continue
                c = path.columns.index(f"ws:{name}")
                for t, i in enumerate(idx):
                    b, m, n = _dims(params[i], views[t])
                    size = {Kind.ELEMENT: params[i].numel(), Kind.ROW: b * m, Kind.COL: b * n,
                            Kind.MATRIX: b, Kind.TENSOR: 1, Kind.SLICE: -(-params[i].numel() // stride)}[kind]
                    rows[t][c] = ws_size
                    ws_size += -(-size // 4) * 4
            if acc_pass:
                acc_size = ws_size
        table = torch.tensor(rows, dtype=torch.int64).reshape(len(idx), len(path.columns)).to(device)
        nh = max(len(path.hv), 1)
        consts = {
            "TBL_W": len(path.columns), "NH": nh, "BLOCK": block, "BM": cfg["BM"], "BN": cfg["BN"],
            "VB": cfg["VB"], "P_DT": _tl_dtype(dtype), "num_warps": cfg["num_warps"],
            "STEP_DT": _tl_dtype(states[params[0]]["step"].dtype if prog.step_store == "tensor" else torch.float32),
        }
        for d in prog.state:
            # the buffers' own dtype where they exist (a conditional dtype, a 1-bit state)
            bufs = [states[params[i]].get(d.name) for i in idx]
            found = next((b.dtype for b in bufs if isinstance(b, torch.Tensor)), None)
            consts[f"DT_{d.name}"] = _tl_dtype(found or storage_dtype(d.dtype, dtype))
        def chunk_table(entries: list[tuple[int, ...]]) -> torch.Tensor | None:
            return torch.tensor(entries, dtype=torch.int64).to(device) if entries else None

        sums = {}  # per accumulation: the workspace offsets of its per-tensor values
        for _, temp in path.accumulates:
            c = path.columns.index(f"ws:{temp}")
            sums[temp] = torch.tensor([r[c] for r in rows], dtype=torch.int64).to(device)
        return _Bucket(
            keep=keep, sums=sums, positions=torch.tensor(idx, dtype=torch.int64).to(device),
            path=path, idx=idx, dtype=dtype, table=table, flat_chunks=chunk_table(flat),
            tiled_chunks=chunk_table(tiled),
            ws=torch.zeros(max(ws_size, 1), dtype=torch.float32, device=device), acc_size=acc_size,
            hv=torch.zeros(len(idx) * nh, dtype=torch.float32, device=device), nh=nh, aligned=aligned,
            n_aligned=all(_dims(params[i], v)[2] % 16 == 0 for i, v in zip(idx, views)),
            consts=consts,
        )

    # -- stepping ------------------------------------------------------------------------------
    def step(self, gi: int, group: dict, params: list[torch.Tensor], states: dict,
             inputs: Callable[[torch.Tensor], dict] | None = None,
             reduced: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """One step of the parameters of group ``gi`` that have gradients; ``inputs(p)`` gives the
        per-parameter runtime values the kernels read (Kourkoutas-beta's beta2), ``reduced`` the
        step's optimizer-wide reductions (0-d device tensors; read from one float32 vector). Returns, per
        accumulator, the parameters' contributions in ``params`` order (a device vector, no sync)."""
        ids = tuple(map(id, params))
        cache = self.caches.get((gi, ids))
        if cache is None or cache.dirty or cache.snapshot != self._snapshot(group):
            # A table re-points the states of its parameters (step counters, host state) at its own
            # buffers, so any other table holding one of them is stale from now on.
            mine = set(ids)
            for key in [k for k in self.caches if mine.intersection(k[1])]:
                del self.caches[key]
            cache = self._build(group, params, states)
            self.builds += 1
            self.caches[(gi, ids)] = cache
        device = params[0].device
        hyp = self._hypers(cache, group, device)
        hs_args = {f"hs_{name}": t for name, t in cache.host_states.items()}
        names = self.plan.inputs
        if names:
            given = [inputs(p) if inputs is not None else {} for p in params]
            values = [g.get(n, float("nan")) for g in given for n in names]
            host = torch.tensor(values, dtype=torch.float64)
            hs_args["inp"] = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host
        steps = cache.steps if cache.steps is not None else hyp
        if self.program.reductions:  # one device vector, stacked on the device: no sync
            nan = torch.full((), math.nan, dtype=torch.float32, device=device)
            hs_args["red"] = torch.stack([(reduced or {}).get(r.name, nan).to(device=device, dtype=torch.float32)
                                          for r in self.program.reductions])
        sums: dict[str, torch.Tensor] = {}
        for bucket in cache.buckets:
            gptr = self._grad_pointers(bucket, params)
            if bucket.acc_size:
                bucket.ws[: bucket.acc_size].zero_()
                self.launches += 1
            for index, (kernel_name, kind) in enumerate(bucket.path.launches):
                self._launch(bucket, index, kernel_name, kind, bucket.table, bucket.ws, gptr, hyp, steps, hs_args)
            for acc, temp in bucket.path.accumulates:
                if acc not in sums:
                    sums[acc] = torch.zeros(len(params), dtype=torch.float32, device=device)
                sums[acc][bucket.positions] += bucket.ws[bucket.sums[temp]]
        return sums

    def _launch(self, bucket: _Bucket, index: int, kernel_name: str, kind: str, table: torch.Tensor,
                ws: torch.Tensor, gptr: torch.Tensor, hyp: torch.Tensor, steps: torch.Tensor, hs_args: dict) -> None:
        """Launch stage ``index`` of a bucket's path (``table``/``ws``: the tables it reads; a
        sharded runner passes others and adds collectives between stages)."""
        if kind == "call":
            _run_call(bucket.calls[int(kernel_name[4:])], ws)
            return
        if kind == "flat":
            chunks, grid = bucket.flat_chunks, 0 if bucket.flat_chunks is None else len(bucket.flat_chunks)
        elif kind == "tiled":
            chunks, grid = bucket.tiled_chunks, 0 if bucket.tiled_chunks is None else len(bucket.tiled_chunks)
        else:
            chunks, grid = table, len(bucket.idx)
        if grid == 0:
            return
        self.kernels[kernel_name][(grid,)](
            table, chunks, gptr, bucket.hv, ws, hyp, steps, **hs_args,
            ALIGNED=bucket.aligned and (kind == "flat" or (kind == "tiled" and bucket.n_aligned)),
            **bucket.consts,
        )
        self.launches += 1

    def _view(self, group: dict, p: torch.Tensor, state: dict) -> tuple[int, int] | None:
        """The matrix view the kernels step ``p`` as."""
        return view_shape(self.program, p, group, state)

    def _hypers(self, cache: _GroupCache, group: dict, device: torch.device) -> torch.Tensor:
        values = []
        device_tensors = []
        for slot, (name, idx) in enumerate(self.plan.hyper_slots):
            v = group[name]
            if idx is not None:
                v = v[idx]
            if isinstance(v, torch.Tensor):
                if v.device.type != "cpu":
                    device_tensors.append((slot, v))
                    values.append(0.0)
                    continue
                v = v.item()
            # Slots cover every hyperparameter of the spec; one that is None or not a number (a mode
            # string, a callable) only decides static conditions and is never read by the kernels.
            values.append(float(v) if isinstance(v, (bool, int, float)) else float("nan"))
        values_t = tuple(values)
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if cache.hyp is None or (values_t != cache.hyp_values and not capturing):
            host = torch.tensor(values or [0.0], dtype=torch.float64)
            if device.type == "cuda":
                host = host.pin_memory()
            cache.hyp = host.to(device, non_blocking=True)
            cache.hyp_values = values_t
        for slot, v in device_tensors:
            cache.hyp[slot].copy_(v.reshape(()))
        return cache.hyp

    def _grad_pointers(self, bucket: _Bucket, params: list[torch.Tensor]) -> torch.Tensor:
        ptrs = []
        for i in bucket.idx:
            p = params[i]
            g = p.grad
            if g.dtype != p.dtype or g.shape != p.shape or not g.is_contiguous() or g.device != p.device:
                raise RuntimeError(
                    f"{self.program.class_name}: backend='triton' needs contiguous gradients of the parameter's "
                    f"shape, dtype and device; got {tuple(g.shape)} {g.dtype} for {tuple(p.shape)} {p.dtype}"
                )
            ptrs.append(g.data_ptr())
        key = tuple(ptrs)
        if key != bucket.grad_ptrs or bucket.gptr is None:
            host = torch.tensor(ptrs, dtype=torch.int64)
            if params[0].device.type == "cuda":
                host = host.pin_memory()
            bucket.gptr = host.to(params[0].device, non_blocking=True)
            bucket.grad_ptrs = key
            if bucket.aligned and any(x % 16 for x in ptrs):
                bucket.aligned = False
        return bucket.gptr


def _call_plan(call: CallPlan, path: PathLaunch, bucket: _Bucket, idx: list[int], envs: list[dict], views: list,
               params: list[torch.Tensor]) -> list[tuple]:
    """A call stage's work, grouped: (args, (M, N), [(input offset, output offset)]) per distinct
    matrix shape and argument values, so each group runs as one batched torch call."""
    cin, cout = path.columns.index(f"ws:{call.input}"), path.columns.index(f"ws:{call.output}")
    groups: dict[tuple, list[tuple[int, int]]] = {}
    for t, i in enumerate(idx):
        p, env = params[i], envs[i]
        if not p.numel():
            continue
        args = []
        for kind, value in call.args:
            if kind == "var" and value not in env:
                raise RuntimeError(f"{call.op}()'s arguments must not depend on the step on the triton backend")
            args.append(env[value] if kind == "var" else value)
        b, m, n = _dims(p, views[t])
        groups.setdefault((call.op, tuple(args), (b * m, n)), []).append(
            (int(bucket.table[t, cin]), int(bucket.table[t, cout])))
    return [(op, args, shape, offsets) for (op, args, shape), offsets in groups.items()]


def _run_call(work: list[tuple], ws: torch.Tensor) -> None:
    """Run a call stage on the workspace: every matrix of one shape in one batched call."""
    from optgen.numerics import newton_schulz as ns

    for op, args, (m, n), offsets in work:
        size = m * n
        x = torch.stack([ws[i:i + size].view(m, n) for i, _ in offsets])
        y = getattr(ns, op)(x if len(offsets) > 1 else x[0], *args)
        y = y.reshape(len(offsets), size)
        for k, (_, o) in enumerate(offsets):
            ws[o:o + size].copy_(y[k])


def _holds_tensor(v: Any) -> bool:
    return isinstance(v, torch.Tensor) or (isinstance(v, (list, tuple)) and any(isinstance(x, torch.Tensor) for x in v))


def _hashable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return ("tensor", id(v))
    if isinstance(v, list):
        return tuple(v)
    return v


def _static_pass(stmts: list[Stmt], ctx: HostContext, key: list, dynamic: set[str]) -> None:
    """Decide the static conditions for one parameter, in the order the code generator did
    (:func:`optgen.backends.triton_plan.enumerate_paths`): each condition once, both branches of a
    step-dependent conditional."""
    for s in stmts:
        if isinstance(s, If):
            if s.cond.attr in dynamic:
                _static_pass(s.then, ctx, key, dynamic)
                _static_pass(s.orelse, ctx, key, dynamic)
                continue
            known = dict(key)
            if s.cond.attr in known:
                taken = known[s.cond.attr]
            else:
                taken = bool(ctx.env[s.cond.attr]) if s.cond.attr in ctx.env else bool(evaluate(s.cond, ctx))
                key.append((s.cond.attr, taken))
            _static_pass(s.then if taken else s.orelse, ctx, key, dynamic)
        elif isinstance(s, Assign) and s.value.is_host and s.target not in dynamic:
            ctx.env[s.target] = evaluate(s.value, ctx)
